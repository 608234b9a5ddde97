"""Training outcomes are data: divergence and collapse are recorded, sweeps run every job, tables
and the metric-vs-key figure read the statuses."""
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from clcli.engine import LossGuard, Runtime, fit
from clcli.errors import DivergenceError
from clcli.methods.slca import SLCA

TINY = ["data=synthetic", "backbone=tiny_vit", "device=cpu"]


_cli = run_cli


class SLCADivergingAt(SLCA):
    """SLCA whose training diverges (a NaN loss seen by the real guard) in the task named by the
    environment variable CLCLI_TEST_DIVERGE_AT: outside the config, so a redo has the same fingerprint."""

    def train_task(self, task):
        if os.environ.get("CLCLI_TEST_DIVERGE_AT") == str(task.index):
            LossGuard(f"task {task.index} ({task.name})", task.num_classes, 10.0).check(float("nan"), 1, 6)
        super().train_task(task)


DIVERGING = [*TINY, "method=slow_learner", f"method._target_={__name__}.SLCADivergingAt"]


# ------------------------------------------------------------------------------------ the guard


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf"), 1e6])
def test_guard_raises_divergence_with_where_and_why(loss):
    guard = LossGuard("task 3 (x)", num_classes=4, factor=10.0)
    guard.check(1.5, epoch=0, step=0)
    with pytest.raises(DivergenceError) as info:
        guard.check(loss, epoch=2, step=7)
    d = info.value.details
    assert d["where"] == "task 3 (x)" and d["epoch"] == 3 and d["step"] == 8
    assert d["reason"] == ("exploding loss" if math.isfinite(loss) else "non-finite loss")
    # the limit is factor x max(first loss, ln C) = 10 x max(1.5, ln 4) = 15: 14.9 passes
    guard.check(14.9, epoch=2, step=8)


def test_guard_collapse_is_a_record_not_an_error():
    guard = LossGuard("task 0 (t)", num_classes=2, factor=10.0, chance_ratio=0.9)
    assert guard.collapse(0.6, epoch=5) is None  # 0.6 < 0.9 ln 2 = 0.6238
    rec = guard.collapse(0.65, epoch=5)
    assert rec["kind"] == "collapse" and rec["epoch"] == 5 and rec["loss"] == 0.65
    assert rec["limit"] == pytest.approx(0.9 * math.log(2)) and rec["chance_loss"] == pytest.approx(math.log(2))
    assert LossGuard("t", 2, 10.0, chance_ratio=0).collapse(5.0, epoch=1) is None


def _toy_loader(n=16):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, generator=g), torch.arange(n) % 2)
    return torch.utils.data.DataLoader(data, batch_size=4)


def test_fit_stops_on_a_nan_loss():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def step(x, y):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(DivergenceError) as info:
        fit(step, _toy_loader(), epochs=2, optimizer=opt, scheduler=None, rt=Runtime(), where="task 0 (t)", num_classes=2)
    assert info.value.details["step"] == 3 and info.value.details["epoch"] == 1 and len(calls) == 3


def test_fit_records_a_collapse_and_goes_on():
    rt = Runtime(chance_loss_ratio=0.9)
    rt.task_index = 4
    model = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)  # lr 0: the loss stays exactly ln 2, chance
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    history = fit(lambda x, y: torch.nn.functional.cross_entropy(model(x), y), _toy_loader(), epochs=2, optimizer=opt,
                  scheduler=None, rt=rt, where="task 4 (t)", num_classes=2, require_learning=True)
    assert history == pytest.approx([math.log(2)] * 2)
    assert len(rt.warnings) == 1
    w = rt.warnings[0]
    assert w["task"] == 4 and w["epoch"] == 2 and w["loss"] == pytest.approx(math.log(2)) and w["kind"] == "collapse"


# ------------------------------------------------------------------------------------ single runs


def test_a_diverged_run_keeps_what_it_finished_and_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLCLI_TEST_DIVERGE_AT", "1")
    run_dir = tmp_path / "run"
    code, out = _cli(["train", *DIVERGING, f"hydra.run.dir={run_dir}"], capsys)
    assert code == 3 and "Training diverged in task 1 (task1), epoch 2, step 7" in out and "did not complete" in out
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "diverged" and res["finished_tasks"] == 1
    f = res["failure"]
    assert (f["task"], f["stage"], f["epoch"], f["step"], f["reason"]) == (1, "train", 2, 7, "non-finite loss")
    assert res["metrics"] == {"last_acc": None, "inc_acc": None, "forgetting": None}
    # the finished task's row and its metrics as a one-task run; nothing after it
    assert res["accuracy_matrix"][0][0] is not None and res["accuracy_matrix"][1] == [None, None, None]
    assert res["partial_metrics"]["last_acc"] == pytest.approx(res["accuracy_matrix"][0][0])
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("*.pt"))] == ["task_00.pt"]
    assert "diverged" in (run_dir / "summary.md").read_text() and (run_dir / "accuracy_curve.png").is_file()

    # resume treats it as finished: nothing retrained, nothing rewritten
    before = (run_dir / "results.json").read_bytes()
    code, out = _cli(["train", *DIVERGING, "resume=true", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 3 and (run_dir / "results.json").read_bytes() == before
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("*.pt"))] == ["task_00.pt"]

    # redo_diverged=true retrains from the last finished task and keeps the old results aside
    monkeypatch.delenv("CLCLI_TEST_DIVERGE_AT")
    code, out = _cli(["train", *DIVERGING, "resume=true", "redo_diverged=true", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 0, out
    assert (run_dir / "results.diverged.json").read_bytes() == before
    redone = json.loads((run_dir / "results.json").read_text())
    assert redone["status"] == "complete" and redone["accuracy_matrix"][0] == res["accuracy_matrix"][0]
    assert redone["metrics"]["last_acc"] is not None


def test_a_collapse_is_a_warning_in_results_log_and_summary(tmp_path, capsys):
    # ratio 0.01: a last-epoch loss above 0.01 ln 2 counts as chance level, so every task "collapses"
    run_dir = tmp_path / "run"
    code, out = _cli(["train", *TINY, "method=slow_learner", "guard.chance_loss_ratio=0.01", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 0
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete" and res["metrics"]["last_acc"] is not None
    assert [w["task"] for w in res["warnings"]] == [0, 1, 2]
    assert all(w["kind"] == "collapse" and w["epoch"] == 5 and w["loss"] > 0.01 * math.log(2) for w in res["warnings"])
    assert "collapsed in task 2" in (run_dir / "clcli.log").read_text()
    assert "collapse" in (run_dir / "summary.md").read_text() and "Training collapsed in task 0" in out


# ------------------------------------------------------------------------------------ sweeps


SWEEP = [*TINY, "method=slow_learner", "optim.lr.representation=0.0001,0.001,1000", "seed=1,2",
         "guard.chance_loss_ratio=0.01"]  # 1000 diverges in task 0; 0.01: collapse warnings for the table


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory):
    """A basic-launcher sweep with two diverging jobs among four that complete (subprocess: exit code, stderr)."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    proc = subprocess.run([sys.executable, "-m", "clcli.cli", "train", "-m", *SWEEP, f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, COLUMNS="200"))
    return sweep_dir, proc


def _results(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("results.json"))]


def test_a_sweep_runs_every_job_and_names_the_ones_that_failed(lr_sweep):
    sweep_dir, proc = lr_sweep
    assert proc.returncode == 3, proc.stderr[-3000:]
    runs = _results(sweep_dir)
    assert len(runs) == 6
    status = {(r["config"]["optim"]["lr"]["representation"], r["seed"]): r["status"] for r in runs}
    assert status == {(lr, s): ("diverged" if lr == 1000 else "complete") for lr in (0.0001, 0.001, 1000) for s in (1, 2)}
    assert "2 of 6 job(s) did not complete" in proc.stderr
    assert ("#4 (data=synthetic backbone=tiny_vit device=cpu method=slow_learner optim.lr.representation=1000 seed=1 "
            "guard.chance_loss_ratio=0.01): diverged: Training diverged in task 0") in proc.stderr
    assert "#5 (" in proc.stderr and "#3 (" not in proc.stderr.split("did not complete")[-1]


def test_joblib_sweep_runs_every_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = subprocess.run([sys.executable, "-m", "clcli.cli", "train", "-m", *TINY, "method=seq_ft",
                           "optim.lr.classifier=10000,0.05", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                           f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    by_lr = {r["config"]["optim"]["lr"]["classifier"]: r["status"] for r in _results(tmp_path)}
    assert by_lr == {10000: "diverged", 0.05: "complete"}
    assert "1 of 2 job(s) did not complete" in proc.stderr and "#0 (" in proc.stderr


def test_a_bad_job_is_reported_before_any_job_runs(tmp_path, capsys):
    code, out = _cli(["train", "-m", *TINY, "optim.epochs=5,0", f"hydra.sweep.dir={tmp_path / 's'}"], capsys)
    assert code == 2 and "optim.epochs: must be >= 1" in out and "no job was run" in out
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ tables


def test_table_never_averages_a_diverged_run(lr_sweep, capsys):
    sweep_dir, _ = lr_sweep
    code, out = _cli(["table", str(sweep_dir), "--format", "csv"], capsys, stdout_only=True)
    assert code == 0
    import csv
    import io

    rows = {r["config_diff"]: r for r in csv.DictReader(io.StringIO(out))}
    runs = _results(sweep_dir)
    for lr in (0.0001, 0.001, 1000):
        row = rows[f"optim.lr.representation={lr!r}" if lr != 1000 else "optim.lr.representation=1000"]
        mine = [r for r in runs if r["config"]["optim"]["lr"]["representation"] == lr]
        done = [r["metrics"]["last_acc"] for r in mine if r["status"] == "complete"]
        assert int(row["n_runs"]) == 2 and int(row["n_complete"]) == len(done)
        collapsed = sum(bool(r["warnings"]) for r in mine)
        if done:
            assert float(row["last_acc_mean"]) == pytest.approx(np.mean(done))
            assert float(row["last_acc_std"]) == pytest.approx(np.std(done, ddof=1))
            assert row["outcome"] == (f"collapse {collapsed}/2" if collapsed else "")
        else:
            assert row["last_acc_mean"] == "" and row["outcome"].startswith("diverged 2/2")
    code, out = _cli(["table", str(sweep_dir), "--format", "md"], capsys)
    assert "| outcome |" in out and "diverged 2/2" in out and "collapse" in out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_x_series_equal_a_hand_computation(lr_sweep, tmp_path, capsys):
    sweep_dir, _ = lr_sweep
    fig = tmp_path / "lr.png"
    code, out = _cli(["table", str(sweep_dir), "--plot-x", "optim.lr.representation", "--plot", str(fig),
                      "--format", "csv"], capsys, stdout_only=True)
    assert code == 0 and _png_size(fig)[0] > 500
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["optim.lr.representation"]) for r in rows] == [0.0001, 0.001, 1000]  # one series, sorted
    runs = _results(sweep_dir)
    for row in rows:
        lr = float(row["optim.lr.representation"])
        mine = [r for r in runs if r["config"]["optim"]["lr"]["representation"] == lr]
        assert int(row["n_runs"]) == 2 and int(row["n_incomplete"]) == sum(r["status"] != "complete" for r in mine)
        for m in ("last_acc", "inc_acc", "forgetting"):
            vals = [r["metrics"][m] for r in mine if r["status"] == "complete"]
            if vals:
                assert float(row[f"{m}_mean"]) == pytest.approx(np.mean(vals))
                assert float(row[f"{m}_std"]) == pytest.approx(np.std(vals, ddof=1))
            else:
                assert row[f"{m}_mean"] == "" and int(row[f"{m}_n"]) == 0
    # the default figure path, and a key that does not exist
    code, _ = _cli(["table", str(sweep_dir), "--plot-x", "optim.lr.representation"], capsys)
    assert code == 0 and (sweep_dir / "metric_vs_optim.lr.representation.png").is_file()
    code, out = _cli(["table", str(sweep_dir), "--plot-x", "optim.lr.represent"], capsys)
    assert code == 2 and "no such config key" in out and "optim.lr.representation" in out


def test_plot_x_splits_series_by_what_else_differs(tmp_path, capsys):
    """Two methods x two learning rates: two series, each with its own points."""
    from clcli.aggregate.series import build_series, log_axis

    runs = []
    for method, ca in (("slca", True), ("slow_learner", False)):
        for lr in (1e-4, 1e-2):
            for seed, acc in ((1, 50.0), (2, 60.0)):
                runs.append({"_path": f"{method}/{lr}/{seed}", "run": {"method": method}, "seed": seed, "status": "complete",
                             "scenario": {"kind": "class_incremental"},
                             "metrics": {"last_acc": acc + (10 if ca else 0) + lr, "inc_acc": 1.0, "forgetting": 2.0},
                             "config": {"method": {"ca": {"enabled": ca}}, "optim": {"lr": {"representation": lr}},
                                        "seed": seed}})
    series = build_series(runs, "optim.lr.representation")
    assert sorted(s.label for s in series) == ["method=slca", "method=slow_learner"]
    slca = next(s for s in series if s.label == "method=slca")
    assert [p.x for p in slca.points] == [1e-4, 1e-2]
    assert slca.points[1].stat("last_acc").mean == pytest.approx(65.01)
    assert slca.points[1].stat("last_acc").std == pytest.approx(np.std([60.01, 70.01], ddof=1))
    assert log_axis("optim.lr.representation", [1e-4, 1e-2]) and not log_axis("optim.epochs", [1, 5])
    assert not log_axis("optim.lr.representation", [0.0, 1e-2])  # 0 has no place on a log axis


def test_group_means_use_complete_runs_only():
    """A run that stopped early is left out by its status, whatever numbers it carries."""
    from clcli.aggregate.group import group_runs

    def run(seed, status, acc):
        return {"_path": str(seed), "run": {"method": "slca"}, "seed": seed, "status": status,
                "scenario": {"kind": "class_incremental"}, "config": {"seed": seed},
                "metrics": {"last_acc": acc, "inc_acc": acc, "forgetting": 0.0}, "warnings": []}

    (g,) = group_runs([run(1, "complete", 80.0), run(2, "complete", 90.0), run(3, "diverged", 10.0)])
    assert g.stat("last_acc").mean == pytest.approx(85.0) and g.stat("last_acc").n == 2
    assert g.outcome == "diverged 1/3" and len(g.complete) == 2


# ------------------------------------------------------------------------------------ precision and fingerprint


def _tiny_update(amp_dtype, param_dtype=torch.float32) -> torch.Tensor:
    """One SGD step (lr 1) from zero weights on a loss whose gradient (1e-9 per output) flushes to
    zero in fp16 unless the loss is scaled."""
    model = torch.nn.Linear(3, 2).to(param_dtype)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = [(torch.ones(4, 3, dtype=param_dtype), torch.zeros(4, dtype=torch.long))]
    fit(lambda x, y: model(x).float().sum() * 1e-9, loader, epochs=1, optimizer=opt, scheduler=None,
        rt=Runtime(amp_dtype=amp_dtype, chance_loss_ratio=0.0), where="t", num_classes=2)
    return model.weight.detach().float()


def test_fp16_autocast_training_scales_the_loss():
    expected = torch.full((2, 3), -4e-9)  # d(loss)/dw = 4 samples x 1e-9
    assert torch.allclose(_tiny_update(None), expected, rtol=1e-6)  # fp32: nothing underflows
    assert torch.allclose(_tiny_update(torch.float16), expected, rtol=1e-2)  # unscaled fp16 gradients: all 0
    # fp16 parameters (DIKI's reference residuals) train unscaled, as the reference does: no unscale error
    assert torch.equal(_tiny_update(torch.float16, param_dtype=torch.float16), torch.zeros(2, 3))


def test_paper_metadata_is_not_part_of_the_resume_fingerprint():
    from clcli.results import config_fingerprint

    cfg = {"seed": 1993, "device": "cpu", "method": {"_target_": "x.Y", "feature_cache": "memory"},
           "optim": {"lr": {"representation": 1e-4}}}
    assert config_fingerprint(cfg) == "9ee9abe406d9d31e"  # as before paper was left out (RNG_PROTOCOL 3)
    assert config_fingerprint({**cfg, "paper": {"note": "edited"}}) == config_fingerprint(cfg)
    assert config_fingerprint({**cfg, "seed": 1996}) != config_fingerprint(cfg)
