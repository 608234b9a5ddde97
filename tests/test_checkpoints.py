"""Run-dir checkpoints: statistics written once per key in task_XX.stats.pt, the newest task_XX.pt
by default, resume from the merged state, old (v1) checkpoints still read, foreign formats refused."""
import shutil

import pytest
import torch
from conftest import run_tiny

from clcli.errors import CheckpointError
from clcli.results import RunStore
from clcli.stats import GaussianStats

TINY_SLCA = ["data=synthetic", "backbone=tiny_vit", "device=cpu", "method=slca"]


def _stats_bytes(d: int, classes: int) -> int:
    """Bytes of ``classes`` float32 covariances and float64 means of dimension ``d``."""
    return classes * (d * d * 4 + d * 8)


def test_checkpoint_size_does_not_grow_with_finished_tasks(tmp_path):
    """keep=all: each task_XX.pt is about as big as the first (heads and counts grow, the statistics of
    finished classes are not repeated); each task_XX.stats.pt holds exactly its task's new classes."""
    res = run_tiny(tmp_path, TINY_SLCA + ["checkpoint.keep=all"])
    ckpt = tmp_path / "run" / "checkpoints"
    d = torch.load(ckpt / "task_00.stats.pt", weights_only=True)["stats"]["method/stats"]["dim"]
    one_class = _stats_bytes(d, 1)
    main = [(ckpt / f"task_{t:02d}.pt").stat().st_size for t in range(3)]
    assert all(b - a < one_class / 2 for a, b in zip(main, main[1:])), (main, one_class)
    for t, task in enumerate(res["tasks"]):
        part = torch.load(ckpt / f"task_{t:02d}.stats.pt", weights_only=True)["stats"]["method/stats"]
        assert part["keys"] == list(range(*task["labels"]))  # only the classes this task finalized
        size = (ckpt / f"task_{t:02d}.stats.pt").stat().st_size
        assert _stats_bytes(d, len(part["keys"])) <= size < _stats_bytes(d, len(part["keys"])) + 8192
    stub = torch.load(ckpt / "task_02.pt", weights_only=True)["method"]["stats"]
    assert stub["stored_apart"] and stub["keys"] == list(range(6)) and "blocks" not in stub


def test_default_keeps_newest_checkpoint_and_every_statistics_file(tmp_path):
    run_tiny(tmp_path, TINY_SLCA)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["task_00.stats.pt", "task_01.stats.pt", "task_02.pt", "task_02.stats.pt"]


def _gauss(keys, d=4):
    s = GaussianStats(d, ridge=1e-4)
    g = torch.Generator().manual_seed(0)
    for k in keys:
        s.update(torch.randn(20, d, generator=g) + k, torch.full((20,), k))
    s.finalize()
    return s


def test_latest_state_merges_statistics_of_earlier_tasks_and_ignores_leftovers(tmp_path):
    store = RunStore(tmp_path, "fp", keep="last")
    for t in range(3):  # two new keys per task
        full = _gauss(range(2 * t + 2))
        store.save_checkpoint(t, {"method": {"stats": full.state_dict(), "w": torch.ones(3) * t}, "matrix": {}})
    # an interrupted task 3 left its statistics file but no checkpoint (nor pruned task_02.pt)
    store.keep = "all"
    store.save_checkpoint(3, {"method": {"stats": _gauss(range(8)).state_dict(), "w": torch.zeros(3)}})
    (tmp_path / "checkpoints" / "task_03.pt").unlink()
    assert [p.name for p in store.checkpoints()] == ["task_02.pt"]
    fresh = RunStore(tmp_path, "fp", keep="last")
    state = fresh.latest_state()
    assert state["task"] == 2 and torch.equal(state["method"]["w"], torch.ones(3) * 2)
    loaded = GaussianStats(4, ridge=1.0)
    loaded.load_state_dict(state["method"]["stats"])
    ref = _gauss(range(6))
    assert loaded.keys == list(range(6))
    for k in ref.keys:
        assert torch.equal(loaded.mean[k], ref.mean[k]) and torch.equal(loaded.cov[k], ref.cov[k])
    # continuing: task 3's statistics file is rewritten with the two keys it adds
    fresh.save_checkpoint(3, {"method": {"stats": _gauss(range(8)).state_dict(), "w": torch.zeros(3)}})
    part = torch.load(tmp_path / "checkpoints" / "task_03.stats.pt", weights_only=True)["stats"]["method/stats"]
    assert part["keys"] == [6, 7]
    # a deleted statistics file: refused with what to do
    (tmp_path / "checkpoints" / "task_01.stats.pt").unlink()
    with pytest.raises(CheckpointError, match=r"keys \[2, 3\].*task_00..task_03.stats.pt.*restore the files"):
        RunStore(tmp_path, "fp").latest_state()


def test_unknown_checkpoint_format_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"format": "clcli-checkpoint-v9", "fingerprint": "fp", "task": 0}, tmp_path / "checkpoints" / "task_00.pt")
    with pytest.raises(CheckpointError, match="format clcli-checkpoint-v9.*new directory"):
        RunStore(tmp_path, "fp").latest_state()


def _to_v1(path):
    """Rewrite a v2 checkpoint as the previous format wrote it: statistics inline, no kind tag."""
    state = RunStore(path.parent.parent, torch.load(path, weights_only=True)["fingerprint"]).state_at(path)
    state["format"] = "clcli-checkpoint-v1"
    st = state["method"]["stats"]
    state["method"]["stats"] = {"dim": st["dim"], "ridge": st["ridge"], "keys": [k for b in st["blocks"] for k in b["keys"]],
                                "mean": torch.cat([b["mean"] for b in st["blocks"]]),
                                "cov": torch.cat([b["cov"] for b in st["blocks"]]), "jitter": st["jitter"]}
    torch.save(state, path)


def test_v1_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    """A run dir of the previous format (full statistics in every task_XX.pt) resumes, and the result
    equals the uninterrupted run."""
    ref = run_tiny(tmp_path, TINY_SLCA + ["checkpoint.keep=all"], "ref")
    run = tmp_path / "old"
    shutil.copytree(tmp_path / "ref", run)
    ckpt = run / "checkpoints"
    _to_v1(ckpt / "task_01.pt")
    for name in ("task_00.pt", "task_02.pt", "task_00.stats.pt", "task_01.stats.pt", "task_02.stats.pt"):
        (ckpt / name).unlink()
    (run / "results.json").unlink()
    again = run_tiny(tmp_path, TINY_SLCA + ["checkpoint.keep=all", "resume=true"], "old")
    assert again["accuracy_matrix"] == ref["accuracy_matrix"] and again["counts"] == ref["counts"]
    # the first v2 statistics file after a v1 checkpoint holds every key (none was in a file yet)
    part = torch.load(ckpt / "task_02.stats.pt", weights_only=True)["stats"]["method/stats"]
    assert part["keys"] == list(range(6))
