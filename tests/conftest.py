"""Shared fixtures: offline hub, Hydra composition of the shipped configs, tiny runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait ~47 s on an unreachable hub
# Tiny models gain nothing from intra-op threads; several processes x threads oversubscribe 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def compose(overrides: list[str]):
    """Compose the primary config with overrides, as `clcli train` would (no run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=False)


def run_cli(args: list[str], capsys, stdout_only: bool = False) -> tuple[int, str]:
    """Run `clcli <args>` in-process; return (exit code, stdout + stderr, or stdout alone)."""
    from clcli.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out if stdout_only else out.out + out.err


def run_tiny(tmp_path: Path, overrides: list[str], name: str = "run") -> dict:
    """Run a tiny experiment in-process into tmp_path/name and return results.json as a dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from clcli.train import run

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
        choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
        HydraConfig.instance().set_config(cfg)
        from omegaconf import open_dict

        with open_dict(cfg):
            del cfg["hydra"]
        return run(cfg, tmp_path / name, choices)


@pytest.fixture
def tiny_overrides():
    return ["data=synthetic", "backbone=tiny_vit", "device=cpu"]


@pytest.fixture(scope="session")
def tiny_clip():
    """A tiny random-init open_clip model (registered config, offline tokenizer), built once."""
    import torch

    from clcli.models.clip import clip_backbone

    torch.manual_seed(0)
    return clip_backbone(model_name="tiny-clip", precision="fp32")


@pytest.fixture(scope="session")
def synthetic_mtil(tiny_clip):
    """The synthetic MTIL scenario (three generated datasets) seen through the tiny CLIP."""
    from clcli.data.mtil_data import SyntheticMTILData

    return SyntheticMTILData().build(tiny_clip)
