"""Every shipped config option composes and passes validation (DESIGN principle 8)."""
from pathlib import Path

import pytest
from conftest import CONF, compose

from clcli.config import check_config, target_class
from clcli.models.clip import ClipBackbone
from clcli.models.timm_backbone import TimmBackbone

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
    (root / "ImageNet" / "train").mkdir(parents=True, exist_ok=True)  # ZSCL's reference data (stat only)
    (root / "cc3m").mkdir(exist_ok=True)
    (root / "cc3m" / "Validation_GCC-1.1.0-Validation.tsv").write_text("a caption\thttp://x\n")


def _needs_clip(name: str) -> bool:
    """The method says so itself: its config_problems refuse a timm backbone."""
    cfg = compose([f"method={name}"])
    keys = {k: v for k, v in cfg.method.items() if k != "_target_"}
    return any("needs a CLIP backbone" in p
               for p in target_class(cfg.method._target_).config_problems(cfg.optim, TimmBackbone, **keys))


def _needs_vit(name: str) -> bool:
    """The method says so itself: its config_problems refuse the default CNN's model_name."""
    cfg = compose([f"method={name}"])
    keys = {k: v for k, v in cfg.method.items() if k != "_target_"}
    check = target_class(cfg.method._target_).config_problems
    return any(p.startswith("backbone.model_name:") and "not a ViT" in p
               for p in check(cfg.optim, TimmBackbone, backbone_cfg=cfg.backbone, **keys))


def _clip_backbone(name: str) -> bool:
    return issubclass(target_class(compose([f"backbone={name}"]).backbone._target_), ClipBackbone)


def _clip_data(name: str) -> bool:
    return "mtil" in name


def _base(tmp_path: Path) -> list[str]:
    ckpt = tmp_path / "mocov3.pth"
    ckpt.write_bytes(b"0")
    return [f"paths.data_dir={tmp_path}", "device=cpu", f"++backbone.checkpoint_path={ckpt}"]


@pytest.mark.parametrize("group", ["data", "backbone", "method", "optim", "optim/optimizer"])
def test_every_option_composes_and_validates(tmp_path, group):
    _fake_layouts(tmp_path)
    for opt in options(group):
        overrides = [f"{group}={opt}"]
        if group == "method" and _needs_clip(opt):
            overrides += ["backbone=tiny_clip", "data=synthetic_mtil"]
        elif group == "method" and _needs_vit(opt):  # prompts, SLCA++'s LoRA: not on the default CNN
            overrides += ["backbone=tiny_vit"]
        if group == "data" and _clip_data(opt):
            overrides += ["backbone=tiny_clip", "method=zeroshot"]
        if group == "backbone" and _clip_backbone(opt):
            overrides += ["method=zeroshot", "data=synthetic_mtil"]
        if group == "optim" and "mtil" in opt:  # DIKI's schedule (ZSCL's, MoE's: iterations): no classifier lr
            overrides += ["method=clip_ft" if ("zscl" in opt or "moe" in opt) else "method=diki", "backbone=tiny_clip",
                          "data=synthetic_mtil"]
        cfg = compose(overrides + _base(tmp_path))
        if group == "backbone" and "checkpoint_path" not in cfg.backbone:
            continue
        problems = check_config(cfg)
        if group == "data" and _clip_data(opt) and opt != "synthetic_mtil":
            # MTIL datasets are not faked here: the only problems allowed are the missing dataset folders
            assert problems and all(str(tmp_path) in p for p in problems), (opt, problems)
        elif group == "method" and opt == "moe_adapters":
            # its task selector's user-provided files (AlexNet weights, TinyImageNet) are not here either
            assert problems and all(p.startswith(("method.ddas.alexnet_weights", "method.ddas.tinyimagenet_dir"))
                                    for p in problems), problems
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
    assert (o.lr.representation, o.lr.classifier, o.batch_size) == (1e-4, 1e-2, 128)
    assert o.optimizer == {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "weight_decay": 5e-4}
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


def test_optim_options_carry_only_keys_their_schedule_and_optimizer_read():
    from clcli.optim import SCHEDULE_KEYS

    schedule_keys = {k for keys in SCHEDULE_KEYS.values() for k in keys}
    for opt in options("optim"):
        o = compose([f"optim={opt}"]).optim
        assert not {"name", "momentum", "weight_decay"} & set(o), opt  # the optimizer component's business
        assert schedule_keys & set(o) == set(SCHEDULE_KEYS[o.schedule]), opt
        assert ("classifier" in o.lr) == ("mtil" not in opt), opt


@pytest.mark.parametrize("overrides,problem", [
    (["+optim.lrr=3"], "optim.lrr: unknown key, nothing reads it. Did you mean optim.lr?"),
    (["+method.ca.foo=1"], "method.ca.foo: unknown key, nothing reads it."),
    (["+method.jiont=true"], "method.jiont: unknown key, nothing reads it. Did you mean method.joint?"),
    (["+optim.name=adam"], "optim.name: unknown key, nothing reads it."),
    (["+seeed=3"], "seeed: unknown key, nothing reads it. Did you mean seed?"),
    (["+perf.tf33=true"], "perf.tf33: unknown key, nothing reads it. Did you mean perf.tf32?"),
    (["+backbone.kind=clip"], "backbone.kind: unknown key, nothing reads it."),
    (["+data.source.sead=1"], "data.source.sead: unknown key, nothing reads it. Did you mean data.source.seed?"),
    (["+optim.optimizer.nesterof=true"], "Did you mean optim.optimizer.nesterov?"),
    (["+optim.optimizer.lr=0.1"], "optim.optimizer.lr: not a config key (the learning rates are optim.lr."),
    (["optim.schedule=cosine"], "optim.milestones: not read by optim.schedule=cosine (only by multistep)"),
    (["~optim.milestones"], "optim.milestones: optim.schedule=multistep needs"),
    (["optim.optimizer.momentum=-1"], "optim.optimizer: torch.optim.SGD refuses its arguments"),
    (["optim/optimizer=adamw", "+optim.optimizer.momentum=0.9"], "optim.optimizer.momentum: unknown key"),
    (["method.ca.lr=0"], "method.ca.lr: must be > 0, got 0."),
    (["method.stats.ridge=0"], "method.stats.ridge: must be > 0, got 0."),
    (["~method.ca.epochs"], "method.ca.epochs: missing; classifier alignment (method.ca.enabled) needs it."),
    (["~optim.lr.classifier"], "optim.lr.classifier: SLCA trains its heads with it, but it is not set"),
])
def test_unknown_and_unused_keys_are_named(overrides, problem):
    problems = check_config(compose(["data=synthetic", "backbone=tiny_vit", "device=cpu", *overrides]))
    assert any(problem in p for p in problems), problems


def test_what_a_disabled_alignment_does_not_read_is_not_required():
    cfg = compose(["data=synthetic", "backbone=tiny_vit", "device=cpu", "method=slow_learner", "~method.ca.epochs"])
    assert check_config(cfg) == []
