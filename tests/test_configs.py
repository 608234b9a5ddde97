"""Every shipped config option composes and passes validation (DESIGN principle 8)."""
from pathlib import Path

import pytest

from clcli.config import check_config
from conftest import CONF, compose

FOLDER_DATASETS = {"split_imagenet_r": ("imagenet-r", 200), "split_cub200": ("cub_200", 200),
                   "split_cars196": ("cars196", 196)}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _fake_layouts(root: Path) -> None:
    """Class folders for the ImageFolder benchmarks (validation only stats folders)."""
    for folder, n in FOLDER_DATASETS.values():
        for split in ("train", "val"):
            for c in range(n):
                (root / folder / split / f"{c:03d}.class_{c}").mkdir(parents=True, exist_ok=True)


def _needs_clip(name: str) -> bool:
    return "requires_backbone: clip" in (CONF / "method" / f"{name}.yaml").read_text()


def _clip_data(name: str) -> bool:
    return "mtil" in name


def _base(tmp_path: Path) -> list[str]:
    ckpt = tmp_path / "mocov3.pth"
    ckpt.write_bytes(b"0")
    return [f"paths.data_dir={tmp_path}", "device=cpu", f"++backbone.checkpoint_path={ckpt}"]


@pytest.mark.parametrize("group", ["data", "backbone", "method"])
def test_every_option_composes_and_validates(tmp_path, group):
    _fake_layouts(tmp_path)
    for opt in options(group):
        overrides = [f"{group}={opt}"]
        if group == "method" and _needs_clip(opt):
            overrides += ["backbone=tiny_clip", "data=synthetic_mtil"]
        if group == "data" and _clip_data(opt):
            overrides += ["backbone=tiny_clip", "method=zeroshot"]
        if group == "backbone" and "kind: clip" in (CONF / "backbone" / f"{opt}.yaml").read_text():
            overrides += ["method=zeroshot", "data=synthetic_mtil"]
        cfg = compose(overrides + _base(tmp_path))
        if group == "backbone" and "checkpoint_path" not in cfg.backbone:
            continue
        problems = check_config(cfg)
        if group == "data" and _clip_data(opt) and opt != "synthetic_mtil":
            # MTIL datasets are not faked here: the only problems allowed are the missing dataset folders
            assert problems and all(str(tmp_path) in p for p in problems), (opt, problems)
        else:
            assert problems == [], (group, opt, problems)


def test_default_config_is_slca_digits_efficientnet():
    cfg = compose([])
    assert cfg.method._target_ == "clcli.methods.slca.SLCA" and cfg.method.ca.enabled
    assert cfg.data.name == "split_digits" and cfg.data.num_tasks == 5
    assert cfg.backbone.model_name == "efficientnet_lite0" and cfg.backbone.weights == "efficientnet_lite0_package"
    assert cfg.optim.lr.representation == 1e-4 and cfg.optim.lr.classifier == 3e-3


def test_spec_hyper_parameters_are_config_keys():
    cfg = compose(["data=split_cifar100", "backbone=vit_b16_in21k"])
    o, ca = cfg.optim, cfg.method.ca
    assert (o.lr.representation, o.lr.classifier, o.momentum, o.weight_decay, o.batch_size) == (1e-4, 1e-2, 0.9, 5e-4, 128)
    assert (o.epochs, list(o.milestones), o.schedule) == (20, [18], "multistep")
    assert (ca.epochs, ca.samples_per_class, ca.lr, ca.logit_norm_tau) == (5, 256, 0.01, 0.1)
    assert cfg.method.stats.ridge == 1e-4
    assert cfg.backbone.reinit_final_norm and cfg.data.transform == "slca_cifar"
    for data, epochs, ms in [("split_imagenet_r", 50, [40]), ("split_cub200", 50, [40]), ("split_cars196", 50, [40])]:
        c = compose([f"data={data}"])
        assert (c.optim.epochs, list(c.optim.milestones)) == (epochs, ms)


def test_method_variants_set_the_learning_rates():
    assert compose(["method=seq_ft"]).optim.lr.representation == compose([]).optim.lr.classifier
    frozen = compose(["method=frozen"])
    assert frozen.optim.lr.representation == 0.0 and not frozen.method.ca.enabled
    assert not compose(["method=slow_learner"]).method.ca.enabled
    assert compose(["method=joint"]).method.joint
    # a command-line override still wins over the method's choice
    assert compose(["method=seq_ft", "optim.lr.representation=0.003"]).optim.lr.representation == 0.003
