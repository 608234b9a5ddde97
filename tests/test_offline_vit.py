"""``scripts/pretrain_offline_vit.py`` and ``backbone=offline_vit``: the distilled weights load into
the same tensors, the distillation learns, a missing weights file names the command that makes it."""
from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch
from conftest import REPO, compose, run_cli
from omegaconf import OmegaConf

from clcli.errors import BackboneError
from clcli.models.timm_backbone import TimmBackbone

# A micro student (1 block, width 32) and a 32-px teacher input: seconds on CPU.
MICRO = ["backbone.model_kwargs.depth=1", "backbone.model_kwargs.embed_dim=32", "backbone.model_kwargs.num_heads=2"]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("pretrain_offline_vit", REPO / "scripts" / "pretrain_offline_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def micro_run(script, tmp_path_factory):
    """Two steps of the script on the micro config, fresh crops each step: (weights file, sidecar record)."""
    out = tmp_path_factory.mktemp("ovit") / "micro.pth"
    record = script.main(["--steps", "2", "--batch-size", "4", "--pool", "0", "--teacher-size", "32", "--standardize-steps", "1",
                          "--photos", "camera", "coffee", "--log-every", "1", "--out", str(out), "--override", *MICRO])
    return out, record


def _build(overrides, name="offline_vit"):
    from hydra.utils import instantiate

    return instantiate(compose([f"backbone={name}", *overrides]).backbone)


def test_script_weights_load_into_offline_vit(micro_run):
    out, record = micro_run
    saved = torch.load(out, map_location="cpu", weights_only=True)
    torch.manual_seed(12345)  # another random init than the script's: loading must overwrite every tensor
    backbone = _build([*MICRO, f"backbone.checkpoint_path={out}"])
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not any(k.startswith("proj") or k.startswith("head.") for k in saved)  # the projection is not saved
    # the sidecar identifies these weights, as results.json will
    assert record["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() == backbone.weights_identity["sha256"]
    assert json.loads(out.with_name(out.name + ".json").read_text()) == json.loads(json.dumps(record))
    assert record["steps"] == 2 and record["student"]["model_kwargs"]["depth"] == 1
    assert record["teacher"]["input_size"] == 32 and record["teacher"]["sha256"]
    assert backbone.input_size == 32 and backbone.feature_dim == 32
    assert sorted(p.name for p in out.parent.iterdir()) == ["micro.pth", "micro.pth.json"]  # no temporaries


def test_distillation_learns_on_a_fixed_batch(script):
    """40 AdamW steps on one fixed batch of crops: the student must fit the teacher's features."""
    torch.manual_seed(0)
    student = _build([*MICRO, "backbone.checkpoint_path=null"])
    teacher = _build(["backbone.input_size=32"], "efficientnet_lite0")
    maker = script.CropMaker(script.load_photos(["camera", "coffee", "rocket"]), teacher, student)
    t_in, s_in = maker.batch(64)  # more crops than the micro width: the projection alone cannot fit them
    model = script.Distiller(student, teacher, "cosine")
    model.standardize_on(t_in)
    target = model.targets(t_in)
    assert target.shape == (64, 1280) and target.mean(0).abs().max() < 1e-4  # standardized per dimension
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(40):
        loss = model(s_in, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


def test_missing_weights_file_names_the_command(tmp_path, capsys):
    args = ["validate", "backbone=offline_vit", "method=frozen", "data=split_digits", "device=cpu",
            f"paths.cache_dir={tmp_path}"]
    code, out = run_cli(args, capsys)
    flat = "".join(out.split())  # the console wraps long lines, inside paths too
    assert code == 2
    assert f"file'{tmp_path}/offline_vit/vit6_p8_32_effnet_lite0_distilled.pth'doesnotexist" in flat
    assert "pythonscripts/pretrain_offline_vit.py--minutes10" in flat
    keys = OmegaConf.to_container(compose(["backbone=offline_vit", f"paths.cache_dir={tmp_path}"]).backbone,
                                  resolve=True)
    keys.pop("_target_")
    with pytest.raises(BackboneError, match="scripts/pretrain_offline_vit.py"):  # and at build time
        TimmBackbone(**keys)


def test_validate_accepts_the_weights_file(micro_run, capsys):
    out, _ = micro_run
    code, text = run_cli(["validate", "backbone=offline_vit", "method=frozen", "data=split_digits", "device=cpu",
                          f"backbone.checkpoint_path={out}", *MICRO], capsys)
    assert code == 0, text


def test_pool_mode_runs_the_teacher_once_per_crop(script, tmp_path, monkeypatch):
    """--pool: the teacher sees each pooled crop once; later steps reuse its features."""
    calls = []
    original = script.Distiller.teacher_features
    monkeypatch.setattr(script.Distiller, "teacher_features", lambda self, x: calls.append(len(x)) or original(self, x))
    record = script.main(["--steps", "5", "--batch-size", "4", "--pool", "6", "--teacher-size", "32",
                          "--photos", "camera", "--out", str(tmp_path / "p.pth"), "--override", *MICRO])
    assert record["steps"] == 5 and calls == [4, 2]  # 6 crops in two teacher batches, 5 steps of 4
    assert (tmp_path / "p.pth").is_file()
