"""End-to-end runs of every SLCA-family method on generated images and a tiny ViT (seconds)."""
import json

import numpy as np
import pytest
from conftest import run_tiny


@pytest.mark.parametrize("method,rows", [("slca", 3), ("slow_learner", 3), ("seq_ft", 3), ("frozen", 3), ("joint", 1)])
def test_each_method_runs_and_writes_results(tmp_path, tiny_overrides, method, rows):
    res = run_tiny(tmp_path, tiny_overrides + [f"method={method}"])
    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["metrics"] == res["metrics"]
    mat = on_disk["accuracy_matrix"]
    assert len(mat) == rows and all(len(r) == rows for r in mat)
    for i, row in enumerate(mat):  # class-incremental: seen tasks evaluated, future ones null
        assert all(v is not None and 0 <= v <= 100 for v in row[: i + 1])
        assert all(v is None for v in row[i + 1:])
    assert on_disk["run"]["method"] == method and on_disk["run"]["data"] == "synthetic"
    assert on_disk["seed"] == 1993 and on_disk["class_order"] and len(on_disk["tasks"]) == rows
    assert on_disk["metrics"]["last_acc"] == pytest.approx(on_disk["metrics"]["seen_acc"][-1])
    for key in ("config", "timings", "environment"):
        assert on_disk[key]
    assert on_disk["environment"]["torch"] and "timm" in on_disk["environment"]
    for name in ("accuracy_matrix.csv", "summary.md", "accuracy_curve.png", "accuracy_matrix.png"):
        assert (run_dir / name).is_file()
    # checkpoint.keep=last (default): the newest task_XX.pt, plus each task's statistics file (SLCA)
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    stats_files = [f"task_{t:02d}.stats.pt" for t in range(rows)] if method == "slca" else []
    assert names == sorted([f"task_{rows - 1:02d}.pt", *stats_files])
    csv = (run_dir / "accuracy_matrix.csv").read_text().splitlines()
    assert len(csv) == rows + 1


def test_alignment_fixes_biased_old_heads(tmp_path, tiny_overrides):
    """Frozen random features: heads trained one task at a time are mutually uncalibrated (the bias
    classifier alignment targets). SLCA's CA must lift the final accuracy clearly above the same run
    without alignment."""
    common = tiny_overrides + ["optim.lr.representation=0"]
    with_ca = run_tiny(tmp_path, common + ["method=slca"], "ca")
    without = run_tiny(tmp_path, common + ["method=slow_learner"], "noca")
    # identical stage 1 (same seeds, same frozen features): the stage-1 heads' task-0 row agrees
    assert with_ca["accuracy_matrix"][0] == without["accuracy_matrix"][0]
    assert with_ca["metrics"]["last_acc"] > without["metrics"]["last_acc"] + 15


def test_seed_changes_class_order_and_is_recorded(tmp_path, tiny_overrides):
    a = run_tiny(tmp_path, tiny_overrides + ["method=frozen", "seed=1996"], "a")
    b = run_tiny(tmp_path, tiny_overrides + ["method=frozen", "seed=1997"], "b")
    assert a["class_order"] != b["class_order"]
    assert a["tasks"][0]["class_ids"] == a["class_order"][:2]
    assert a["train_seed"] == 1996


def test_runs_are_deterministic_on_cpu(tmp_path, tiny_overrides):
    a = run_tiny(tmp_path, tiny_overrides + ["method=slca"], "a")
    b = run_tiny(tmp_path, tiny_overrides + ["method=slca"], "b")
    assert np.array_equal(np.array(a["counts"]["correct"]), np.array(b["counts"]["correct"]))


def test_channels_last_is_a_layout_change_only(tmp_path, tiny_overrides):
    common = tiny_overrides + ["method=frozen", "guard.chance_loss_ratio=0", "backbone=efficientnet_lite0",
                               "backbone.input_size=32"]
    a = run_tiny(tmp_path, common, "a")
    b = run_tiny(tmp_path, common + ["perf.channels_last=true"], "b")
    assert a["counts"] == b["counts"]


def test_loader_workers_and_perf_validation():
    import torch
    from conftest import compose

    from clcli.config import check_config
    from clcli.engine import loader_workers

    assert loader_workers("auto", torch.device("cpu")) == 0
    assert loader_workers(3, torch.device("cpu")) == 3
    problems = check_config(compose(["data=synthetic", "backbone=tiny_vit", "perf.tf32=maybe", "loader.num_workers=-1"]))
    assert any("perf.tf32" in p for p in problems) and any("loader.num_workers" in p for p in problems)


@pytest.mark.slow
def test_torch_compile_option_trains_and_checkpoints(tmp_path, tiny_overrides):
    """perf.compile compiles the backbone in place (about a minute of inductor work on CPU): the run
    completes, checkpoint keys are the plain module's, and on this tiny run predictions agree."""
    import torch

    a = run_tiny(tmp_path, tiny_overrides + ["method=slca"], "a")
    b = run_tiny(tmp_path, tiny_overrides + ["method=slca", "perf.compile=true"], "b")
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    state = torch.load(tmp_path / "b" / "checkpoints" / "task_02.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in state["method"]["backbone"])
