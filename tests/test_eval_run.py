"""`clcli eval RUN_DIR` and `clcli export-stats RUN_DIR` on tiny finished runs.

The reference for a re-evaluation is the run's own accuracy matrix, computed by the training loop;
the reference for exported statistics is RunStore's merged checkpoint state. A run dir is never
changed except for the new eval folder."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, run_tiny

from clcli.results import RunStore

SLCA = ["data=synthetic", "backbone=tiny_vit", "device=cpu", "method=slca"]
# Dropout on the features: a re-evaluation with the freshly built backbone left in train mode differs.
DROPOUT = ["+backbone.model_kwargs.drop_rate=0.5"]
DIKI = ["data=synthetic_mtil", "backbone=tiny_clip", "device=cpu", "method=diki"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny finished runs, trained once for the module: SLCA with every task's state (keep=all) and
    with the default keep=last, DIKI with keep=all."""
    root = tmp_path_factory.mktemp("runs")
    out = {
        "all": run_tiny(root, SLCA + DROPOUT + ["checkpoint.keep=all"], "slca_all"),
        "last": run_tiny(root, SLCA + DROPOUT, "slca_last"),
        "diki": run_tiny(root, DIKI + ["checkpoint.keep=all"], "diki_all"),
    }
    return root, out


def _copy(runs, name: str, tmp_path: Path) -> Path:
    """A private copy of a fixture run dir (tests write into run dirs)."""
    dst = tmp_path / name
    shutil.copytree(runs[0] / name, dst)
    return dst


def _hashes(d: Path, skip: str | None = None) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and (skip is None or p.relative_to(d).parts[0] != skip)}


def _reeval(folder: Path) -> dict:
    return json.loads((folder / "reevaluation.json").read_text())


# ----------------------------------------------------------------------------------- clcli eval


def test_eval_reproduces_every_row_and_changes_nothing_in_the_run_dir(runs, tmp_path, capsys):
    run = _copy(runs, "slca_all", tmp_path)
    original = json.loads((run / "results.json").read_text())
    before = _hashes(run)
    code, out = run_cli(["eval", str(run)], capsys)
    assert code == 0, out
    res = _reeval(run / "eval")
    assert res["accuracy_matrix"] == original["accuracy_matrix"]
    assert res["counts"] == original["counts"]
    assert res["metrics"] == original["metrics"]
    block = res["reevaluation"]
    assert [r["task"] for r in block["rows"]] == [0, 1, 2] and block["all_equal"] and not block["not_reevaluated"]
    assert [c["file"] for c in block["checkpoints"]] == [f"checkpoints/task_{t:02d}.pt" for t in range(3)]
    assert block["checkpoints"][1]["sha256"] == hashlib.sha256((run / "checkpoints/task_01.pt").read_bytes()).hexdigest()
    assert block["run_dir"] == str(run.resolve()) and block["overrides"] == [] and res["format"] == "clcli-reevaluation-v1"
    for name in ("accuracy_matrix.csv", "summary.md", "accuracy_curve.png", "accuracy_matrix.png"):
        assert (run / "eval" / name).is_file()
    assert not (run / "eval" / "results.json").exists()  # `clcli table` must not count it as a run
    assert "Re-evaluation of" in (run / "eval" / "summary.md").read_text()
    assert out.count("yes") == 3 and "re-evaluation of" in out
    assert _hashes(run, skip="eval") == before  # nothing of the run changed
    # a second eval never overwrites the first: the next free name
    code, out = run_cli(["eval", str(run), "task=2"], capsys)
    assert code == 0, out
    assert _reeval(run / "eval")["reevaluation"]["rows"][0]["task"] == 0  # untouched
    assert (run / "eval-1" / "reevaluation.json").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".clcli-eval-")]  # no staging left behind


def test_eval_task_k_gives_row_k_only(runs, tmp_path, capsys):
    run = runs[0] / "slca_all"
    original = json.loads((run / "results.json").read_text())
    before = _hashes(run)
    out_dir = tmp_path / "out"
    code, out = run_cli(["eval", str(run), "task=1", "eval.batch_size=5", "--output", str(out_dir)], capsys)
    assert code == 0, out
    res = _reeval(out_dir)
    assert res["accuracy_matrix"][1] == original["accuracy_matrix"][1]
    assert res["accuracy_matrix"][0] == [None] * 3 and res["accuracy_matrix"][2] == [None] * 3
    block = res["reevaluation"]
    assert [r["task"] for r in block["rows"]] == [1] and block["rows"][0]["equal_to_original"]
    assert [(r["task"], r["reason"]) for r in block["not_reevaluated"]] == [
        (0, "not asked for (task=1)"), (2, "not asked for (task=1)")]
    assert block["overrides"] == ["eval.batch_size=5"] and res["config"]["eval"]["batch_size"] == 5
    assert res["metrics"]["last_acc"] is None and res["metrics"]["seen_acc"][1] == original["metrics"]["seen_acc"][1]
    assert _hashes(run) == before and not (run / "eval").exists()
    # a non-empty --output is refused before anything is evaluated
    code, out = run_cli(["eval", str(run), "--output", str(out_dir)], capsys)
    assert code == 2 and "exists and is not an empty folder" in out


def test_eval_keep_last_reevaluates_the_last_row_and_says_why_not_the_others(runs, capsys):
    run = runs[0] / "slca_last"
    original = json.loads((run / "results.json").read_text())
    out_dir = run.parent / "slca_last_eval"
    code, out = run_cli(["eval", str(run), "--output", str(out_dir)], capsys)
    assert code == 0, out
    res = _reeval(out_dir)
    assert res["accuracy_matrix"][2] == original["accuracy_matrix"][2]
    assert res["accuracy_matrix"][:2] == [[None] * 3, [None] * 3]  # never filled from the old results
    assert res["counts"]["total"][0] == [-1, -1, -1]
    block = res["reevaluation"]
    assert [r["task"] for r in block["rows"]] == [2] and block["all_equal"]
    assert [r["task"] for r in block["not_reevaluated"]] == [0, 1]
    assert all("checkpoint.keep=last" in r["reason"] and "task_02.pt" in r["reason"] for r in block["not_reevaluated"])
    assert res["metrics"]["last_acc"] == original["metrics"]["last_acc"]
    assert res["metrics"]["inc_acc"] is None and res["metrics"]["forgetting"] is None  # need every row
    assert "not re-evaluated: task0" in out and "checkpoint.keep=last" in out
    code, out = run_cli(["eval", str(run), "task=0"], capsys)
    assert code == 2 and "task=0: its state is not stored" in out and "checkpoint.keep=all" in out


def test_eval_diki_reproduces_every_row(runs, tmp_path, capsys):
    run = runs[0] / "diki_all"
    original = json.loads((run / "results.json").read_text())
    code, out = run_cli(["eval", str(run), "--output", str(tmp_path / "e")], capsys)
    assert code == 0, out
    res = _reeval(tmp_path / "e")
    assert res["counts"] == original["counts"] and res["accuracy_matrix"] == original["accuracy_matrix"]
    assert {k: res["metrics"][k] for k in ("transfer", "avg", "last")} == \
        {k: original["metrics"][k] for k in ("transfer", "avg", "last")}
    assert res["reevaluation"]["all_equal"]


def test_eval_refuses_overrides_that_change_what_was_trained(runs, tmp_path, capsys):
    run = runs[0] / "slca_all"
    code, out = run_cli(["eval", str(run), "method.ca.lr=0.5", "optim.lr.representation=1", "seed=7",
                         "+foo=1", "device=cpu", "--output", str(tmp_path / "x")], capsys)
    assert code == 2
    for key in ("method.ca.lr", "optim.lr.representation", "seed"):
        assert f"{key}: clcli eval cannot change what was trained" in out
    assert "'+foo=1'" in out and "  - device" not in out and "4 problem(s)" in out
    assert not (tmp_path / "x").exists()


def test_eval_paths_override_moves_the_values_under_the_old_path():
    from clcli.evaluate_run import apply_overrides

    config = {"paths": {"data_dir": "data", "cache_dir": "cache"},
              "data": {"source": {"root": "data/cifar100"}, "name": "database"},
              "method": {"feature_cache_dir": "cache/features"}}
    effective, moved = apply_overrides(config, {"paths.data_dir": "/big/disk"})
    assert effective["data"]["source"]["root"] == "/big/disk/cifar100"
    assert effective["data"]["name"] == "database" and effective["method"]["feature_cache_dir"] == "cache/features"
    assert moved == {"data.source.root": ["data/cifar100", "/big/disk/cifar100"]}
    assert config["data"]["source"]["root"] == "data/cifar100"  # the run's config itself is not changed


def _tampered(runs, tmp_path, how) -> tuple[Path, dict]:
    run = _copy(runs, "slca_all", tmp_path)
    how(run)
    return run, _hashes(run)


def test_eval_refuses_a_tampered_config(runs, tmp_path, capsys):
    def edit_lr(run):
        res = json.loads((run / "results.json").read_text())
        res["config"]["optim"]["lr"]["representation"] *= 10
        (run / "results.json").write_text(json.dumps(res))

    run, before = _tampered(runs, tmp_path, edit_lr)
    code, out = run_cli(["eval", str(run)], capsys)
    assert code == 2 and "hashes to" in out and "edited after the run" in out
    assert _hashes(run) == before and not (run / "eval").exists()


def test_eval_refuses_a_config_edited_together_with_its_fingerprint(runs, tmp_path, capsys):
    from clcli.results import config_fingerprint

    def edit_both(run):
        res = json.loads((run / "results.json").read_text())
        res["config"]["method"]["ca"]["lr"] = 0.5
        res["fingerprint"] = config_fingerprint(res["config"])
        (run / "results.json").write_text(json.dumps(res))

    run, before = _tampered(runs, tmp_path, edit_both)
    code, out = run_cli(["eval", str(run)], capsys)
    assert code == 2 and "task_00.pt' was written by a run of another configuration" in out
    assert _hashes(run) == before


def test_eval_refuses_a_checkpoint_of_another_run_and_a_corrupt_one(runs, tmp_path, capsys):
    other = run_tiny(tmp_path, SLCA + DROPOUT + ["checkpoint.keep=all", "seed=7"], "other")
    assert other["fingerprint"] != runs[1]["all"]["fingerprint"]
    run, before = _tampered(runs, tmp_path, lambda r: shutil.copy(tmp_path / "other/checkpoints/task_01.pt",
                                                                   r / "checkpoints/task_01.pt"))
    code, out = run_cli(["eval", str(run)], capsys)
    assert code == 2 and "task_01.pt' was written by a run of another configuration" in out
    assert _hashes(run) == before and not (run / "eval").exists()

    ckpt = run / "checkpoints/task_02.pt"
    shutil.copy(runs[0] / "slca_all/checkpoints/task_01.pt", run / "checkpoints/task_01.pt")
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    code, out = run_cli(["eval", str(run), "task=0"], capsys)
    assert code == 2 and "task_02.pt' cannot be read safely" in out and "nothing was evaluated or written" in out
    assert not (run / "eval").exists()


def test_eval_of_a_run_stopped_before_results_json_reads_hydra_config(tmp_path, capsys):
    """No results.json (killed after a task): the config comes from .hydra/, checked against the
    checkpoints, and the rows are compared with the accuracy matrix the newest checkpoint holds."""
    run = tmp_path / "run"
    code, out = run_cli(["train", *SLCA, "checkpoint.keep=all", "optim.epochs=2", "optim.milestones=[1]", "method.ca.epochs=1",
                         f"hydra.run.dir={run}"], capsys)
    assert code == 0, out
    original = json.loads((run / "results.json").read_text())
    (run / "results.json").unlink()
    code, out = run_cli(["eval", str(run)], capsys)
    assert code == 0, out
    res = _reeval(run / "eval")
    assert res["counts"] == original["counts"] and res["reevaluation"]["all_equal"]
    assert res["reevaluation"]["config_source"].endswith(".hydra/config.yaml")
    assert res["reevaluation"]["original_rows_from"] == "the accuracy matrix in task_02.pt"


# ----------------------------------------------------------------------------------- export-stats


def _stats_of(state) -> dict:
    """label -> (mean, cov) of the single GaussianStats state in a RunStore-merged checkpoint."""
    from clcli.stats import GaussianStats

    st = state["method"]["stats"]
    g = GaussianStats(st["dim"], ridge=st["ridge"], cov_dtype=st["blocks"][0]["cov"].dtype)  # DIKI: float64
    g.load_state_dict(st)
    return {k: (g.mean[k].numpy(), g.cov[k].numpy()) for k in g.keys}


def _load(path: Path) -> tuple[dict, dict]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return arrays, json.loads(str(arrays.pop("metadata")))
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_export_stats_round_trip_every_task(runs, tmp_path, capsys, suffix):
    run = runs[0] / "slca_all"
    res = runs[1]["all"]
    store = RunStore(run, res["fingerprint"])
    before = _hashes(run)
    for task in (None, 0, 1, 2):
        out = tmp_path / f"stats_{task}{suffix}"
        code, text = run_cli(["export-stats", str(run), "--output", str(out)] + ([] if task is None else ["--task", str(task)]),
                             capsys)
        assert code == 0, text
        arrays, meta = _load(out)
        k = 2 if task is None else task
        ref = _stats_of(store.state_at(run / f"checkpoints/task_{k:02d}.pt"))
        labels = sorted(ref)
        assert labels == list(range(2 * (k + 1)))  # every class seen up to task k
        assert arrays["labels"].tolist() == labels
        assert arrays["class_means"].shape == (len(labels), 64) and arrays["class_covariances"].shape == (len(labels), 64, 64)
        for i, label in enumerate(labels):
            assert np.array_equal(arrays["class_means"][i], ref[label][0])
            assert np.array_equal(arrays["class_covariances"][i], ref[label][1])
        assert arrays["class_ids"].tolist() == [res["class_order"][c] for c in labels]
        assert arrays["class_tasks"].tolist() == [c // 2 for c in labels]
        assert meta["task"] == str(k) and meta["feature_dim"] == "64" and float(meta["ridge"]) == 1e-4
        assert meta["run_dir"] == str(run.resolve()) and meta["key_kind"] == "class"
    assert _hashes(run) == before


def test_export_stats_after_a_pruned_task_comes_from_the_statistics_files(runs, tmp_path, capsys):
    """keep=last has no task_01.pt: the statistics after task 1 are merged from task_00.stats.pt and
    task_01.stats.pt and equal those of the same run trained with keep=all (checkpoint.keep does not
    change training)."""
    assert not (runs[0] / "slca_last/checkpoints/task_01.pt").exists()
    out = tmp_path / "s.npz"
    code, text = run_cli(["export-stats", str(runs[0] / "slca_last"), "--task", "1", "--output", str(out)], capsys)
    assert code == 0, text
    arrays, _ = _load(out)
    ref = _stats_of(RunStore(runs[0] / "slca_all", runs[1]["all"]["fingerprint"]).state_at(
        runs[0] / "slca_all/checkpoints/task_01.pt"))
    assert arrays["labels"].tolist() == [0, 1, 2, 3]
    for i in range(4):
        assert np.array_equal(arrays["class_means"][i], ref[i][0])
        assert np.array_equal(arrays["class_covariances"][i], ref[i][1])


def test_export_stats_diki_task_gaussians(runs, tmp_path, capsys):
    run = runs[0] / "diki_all"
    out = tmp_path / "diki.safetensors"
    code, text = run_cli(["export-stats", str(run), "--task", "1", "--output", str(out)], capsys)
    assert code == 0, text
    arrays, meta = _load(out)
    ref = _stats_of(RunStore(run, runs[1]["diki"]["fingerprint"]).state_at(run / "checkpoints/task_01.pt"))
    assert arrays["tasks"].tolist() == [0, 1] and meta["key_kind"] == "task" and meta["task_name"] == "minerals"
    assert arrays["task_covariances"].dtype == np.float64
    for t in (0, 1):
        assert np.array_equal(arrays["task_means"][t], ref[t][0]) and np.array_equal(arrays["task_covariances"][t], ref[t][1])


def test_export_stats_refusals(runs, tmp_path, capsys):
    run = runs[0] / "slca_all"
    out = tmp_path / "s.npz"
    out.write_bytes(b"keep me")
    code, text = run_cli(["export-stats", str(run), "--output", str(out)], capsys)
    assert code == 2 and "--force" in text and out.read_bytes() == b"keep me"
    code, text = run_cli(["export-stats", str(run), "--output", str(out), "--force"], capsys)
    assert code == 0 and _load(out)[0]["labels"].tolist() == list(range(6))
    code, text = run_cli(["export-stats", str(run), "--output", str(tmp_path / "s.pt")], capsys)
    assert code == 2 and ".npz or .safetensors" in text
    code, text = run_cli(["export-stats", str(run), "--task", "3", "--output", str(tmp_path / "t.npz")], capsys)
    assert code == 2 and "tasks 0..2" in text
    code, text = run_cli(["export-stats", str(tmp_path / "nope"), "--output", str(tmp_path / "u.npz")], capsys)
    assert code == 2 and "no such directory" in text
    run_tiny(tmp_path, ["data=synthetic", "backbone=tiny_vit", "device=cpu", "method=seq_ft", "optim.epochs=2",
              "optim.milestones=[1]"], "seq")
    code, text = run_cli(["export-stats", str(tmp_path / "seq"), "--output", str(tmp_path / "v.npz")], capsys)
    assert code == 2 and "stores no Gaussian statistics" in text and "method=seq_ft" in text
    assert not (tmp_path / "v.npz").exists() and not (tmp_path / "t.npz").exists()
