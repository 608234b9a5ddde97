"""Bad input fails fast and cleanly; runs resume after a crash; writes are atomic."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF, run_cli
from PIL import Image

TINY = ["data=synthetic", "backbone=tiny_vit", "device=cpu"]


_cli = run_cli


def _evil_pickle(path: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    torch.save({"model": Evil()}, path)
    return path


def _bad_image_dir(root: Path) -> Path:
    for split in ("train", "val"):
        for c in range(200):
            d = root / "cub_200" / split / f"{c:03d}.c"
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(d / "ok.png")
    (root / "cub_200" / "train" / "000.c" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


BAD = [
    # (id, extra overrides (format with {tmp}), expected exit code, message fragment)
    ("lr-classifier-zero", ["optim.lr.classifier=0"], 2, "optim.lr.classifier: must be > 0"),
    ("lr-representation-negative", ["optim.lr.representation=-1e-4"], 2, "optim.lr.representation: must be >= 0"),
    ("epochs-zero", ["optim.epochs=0"], 2, "optim.epochs: must be >= 1"),
    ("milestone-zero", ["optim.milestones=[0]"], 2, "every milestone must be a positive epoch number"),
    ("epochs-wrong-type", ["optim.epochs=abc"], 2, "optim.epochs: expected an integer"),
    ("unknown-schedule", ["optim.schedule=linear"], 2, "optim.schedule: unknown 'linear'"),
    ("bad-device", ["device=tpu"], 2, "device: expected auto, cpu or cuda"),
    ("bad-precision", ["precision=fp8"], 2, "precision: expected one of"),
    ("split-does-not-add-up", ["data.num_tasks=4"], 2, "give 3 tasks [2, 2, 2], but data.num_tasks=4"),
    ("initial-increment-too-big", ["data.initial_increment=50"], 2, "exceeds the 6 classes"),
    ("ca-samples-zero", ["method.ca.samples_per_class=0"], 2, "method.ca.samples_per_class: must be >= 1"),
    ("unknown-transform", ["data.transform=fancy"], 2, "data.transform: unknown recipe 'fancy'"),
    # Hydra's own composition errors come out as clcli paragraphs (clcli.hydra_errors)
    ("unknown-key", ["optim.lr.backbone=1e-3"], 2, "optim.lr.backbone: no such key in the configuration."),
    # a `+key=value` addition passes Hydra: clcli refuses every key no code reads, by name
    ("added-unknown-key", ["+optim.lrr=3"], 2, "optim.lrr: unknown key, nothing reads it. Did you mean optim.lr?"),
    ("added-unknown-nested-key", ["+method.ca.foo=1"], 2, "method.ca.foo: unknown key, nothing reads it."),
    ("optimizer-name-is-gone", ["+optim.name=adam"], 2, "optim.name: unknown key, nothing reads it."),
    ("optimizer-bad-argument", ["+optim.optimizer.betas=[0.9,0.99]"], 2, "optim.optimizer.betas: unknown key"),
    ("schedule-key-not-read", ["optim.schedule=cosine"], 2, "optim.milestones: not read by optim.schedule=cosine"),
    ("clip-method-on-timm", ["method=diki"], 2, "method=diki needs a CLIP backbone"),
    ("unknown-group-option", ["method=slcaa"], 2, "no option 'slcaa' in config group 'method'. Did you mean method=slca?"),
    ("missing-data-dir", ["data=split_cub200", "paths.data_dir={tmp}/nowhere"], 2, "cub_200/train"),
    ("missing-checkpoint-file", ["backbone=vit_b16_mocov3", "backbone.checkpoint_path={tmp}/none.pth"], 2,
     "backbone.checkpoint_path: file"),
    ("pickle-that-runs-code", ["backbone.checkpoint_path={tmp}/evil.pth"], 2, "weights_only=True"),
    ("garbage-checkpoint", ["backbone.checkpoint_path={tmp}/garbage.pth"], 2, "not a loadable weights file"),
    ("unreadable-image", ["data=split_cub200", "paths.data_dir={tmp}/imgs", "data.initial_increment=200",
                          "data.num_tasks=1", "optim=synthetic", "optim.epochs=1", "optim.milestones=[1]"], 2, "broken.jpg"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_fails_cleanly(tmp_path, capsys, case):
    _, extra, code, fragment = case
    _evil_pickle(tmp_path / "evil.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    if "unreadable" in case[0]:
        _bad_image_dir(tmp_path / "imgs")
    run_dir = tmp_path / "run"
    args = ["train", *TINY, *[e.format(tmp=tmp_path) for e in extra], f"hydra.run.dir={run_dir}"]
    got, out = _cli(args, capsys)
    assert got == code, out
    assert fragment in out, out
    assert "Traceback" not in out
    assert not (run_dir / "results.json").exists() and not (run_dir / "checkpoints").exists()
    assert not (tmp_path / "PWNED").exists()  # nothing executed from the pickle


def test_validate_lists_every_problem(capsys):
    code, out = _cli(["validate", *TINY, "optim.epochs=0", "optim.lr.classifier=-1", "device=tpu"], capsys)
    assert code == 2
    for frag in ("optim.epochs", "optim.lr.classifier", "device"):
        assert frag in out
    code, out = _cli(["validate", *TINY], capsys)
    assert code == 0 and "valid" in out


def test_validate_checks_method_keys_and_every_sweep_job_without_writing(tmp_path, monkeypatch, capsys):
    import tempfile

    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where validate's sweep scratch dir goes
    # DIKI's own keys, checked without building CLIP (the constructor runs the same checks)
    code, out = _cli(["validate", "method=diki", "data=synthetic_mtil", "backbone=tiny_clip", "method.n_tokens=0",
                      "method.calibration.task_select=vote", "method.feature_cache=ram"], capsys)
    assert code == 2
    for fragment in ("method.n_tokens: expected an integer >= 1, got 0.", "task_select: expected one of batch, sample",
                     "method.feature_cache: expected one of memory, disk, off, got 'ram'."):
        assert fragment in out, out
    # a sweep: every job is checked and named, in this process even when the sweep asks for joblib;
    # one bad job fails the whole validation
    code, out = _cli(["validate", "+sweep=smoke", "seed=1993,-1", "hydra/launcher=joblib"], capsys)
    assert code == 2
    assert out.count("configuration is valid") == 2 and out.count("seed: must be >= 0, got -1.") == 2, out
    assert "method=slow_learner seed=-1 +sweep=smoke: 1 problem(s)" in " ".join(out.split())
    # job labels are printed as they are, never read as rich markup
    code, out = _cli(["validate", "-m", *TINY, "optim.milestones=[2],[3]"], capsys)
    assert code == 0 and "optim.milestones=[2]" in out and "optim.milestones=[3]" in out, out
    assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []  # no sweep dirs, .hydra or logs left
    # a missing mandatory value is listed with the rest, not raised
    code, out = _cli(["validate", "method=diki", "data=synthetic_mtil", "backbone=tiny_clip", "method.n_tokens=0",
                      "optim.lr.representation=null"], capsys)
    assert code == 2 and "Traceback" not in out
    assert "optim.lr.representation: expected a number, got null." in out and "method.n_tokens" in out, out


def test_existing_results_of_another_config_are_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _cli(["train", *TINY, "method=frozen", f"hydra.run.dir={run_dir}"], capsys)[0] == 0
    before = (run_dir / "results.json").read_bytes()
    code, out = _cli(["train", *TINY, "method=frozen", "optim.epochs=2", "optim.milestones=[1]",
                      f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2 and "different configuration" in out
    code, out = _cli(["train", *TINY, "method=frozen", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2 and "resume=true" in out
    assert (run_dir / "results.json").read_bytes() == before
    # resume=true on a finished run is a no-op (a re-launched sweep skips finished jobs)
    assert _cli(["train", *TINY, "method=frozen", "resume=true", f"hydra.run.dir={run_dir}"], capsys)[0] == 0
    assert (run_dir / "results.json").read_bytes() == before


def test_corrupted_checkpoint_is_refused_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _cli(["train", *TINY, "method=frozen", f"hydra.run.dir={run_dir}"], capsys)[0] == 0
    (run_dir / "results.json").unlink()
    last = sorted((run_dir / "checkpoints").glob("task_*.pt"))[-1]
    last.write_bytes(last.read_bytes()[:100])  # truncated by hand
    code, out = _cli(["train", *TINY, "method=frozen", "resume=true", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2 and "cannot be read safely" in out and not (run_dir / "results.json").exists()


def test_divergence_stops_with_task_epoch_step(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out = _cli(["train", *TINY, "method=seq_ft", "optim.lr.classifier=1e4", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 3 and "Training diverged in task 0" in out and "epoch" in out and "step" in out
    res = json.loads((run_dir / "results.json").read_text())  # an outcome, recorded
    assert res["status"] == "diverged" and res["failure"]["task"] == 0 and res["finished_tasks"] == 0


SLOW_DATA = ["data.source.train_per_class=60", "data.source.test_per_class=10", "method=slca", "optim.lr.classifier=0.01",
             "optim.epochs=3", "optim.milestones=[2]"]


def _clcli(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "clcli.cli", "train", *TINY, *SLOW_DATA, *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def test_sigkill_during_task_2_then_resume_equals_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _clcli([f"hydra.run.dir={ref_dir}"])
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    proc = _clcli([f"hydra.run.dir={run_dir}"])
    first = run_dir / "checkpoints" / "task_00.pt"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # well inside task 2 of 3
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists()
    assert not (run_dir / "checkpoints" / "task_02.pt").exists()
    resumed = _clcli([f"hydra.run.dir={run_dir}", "resume=true"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = json.loads((ref_dir / "results.json").read_text())
    b = json.loads((run_dir / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["counts"] == b["counts"]
    assert a["metrics"] == b["metrics"]


WRITER = """
import json, sys
from pathlib import Path
from clcli.results import atomic_write_text
path = Path(sys.argv[1])
i = 0
while True:
    i += 1
    atomic_write_text(path, json.dumps({"i": i, "payload": "x" * 2_000_000}))
"""


def test_kill_while_writing_results_leaves_a_complete_file(tmp_path):
    target = tmp_path / "results.json"
    for k in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        deadline = time.time() + 120
        while not target.exists() and time.time() < deadline:  # the first write (after imports)
            time.sleep(0.01)
        time.sleep(0.05 + 0.07 * k)  # then kill at varying points of later writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(target.read_text())  # never truncated
        assert len(data["payload"]) == 2_000_000


def test_shipped_conf_is_the_one_used():
    assert (CONF / "config.yaml").is_file()


def test_results_and_tables_of_a_run_go_through_the_atomic_writer(tmp_path, capsys, monkeypatch):
    """Every file of a run dir is written by atomic_write_bytes (temporary file + rename)."""
    import clcli.results as results_mod

    written = []
    real = results_mod.atomic_write_bytes
    monkeypatch.setattr(results_mod, "atomic_write_bytes", lambda path, data: (written.append(Path(path).name), real(path, data)))
    run_dir = tmp_path / "run"
    assert _cli(["train", *TINY, "method=frozen", f"hydra.run.dir={run_dir}"], capsys)[0] == 0
    for name in ("results.json", "accuracy_matrix.csv", "summary.md", "accuracy_curve.png", "task_02.pt"):
        assert name in written, name


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """Deterministic counterpart of the kill test: the write raises after half the bytes."""
    from clcli.results import atomic_write_text

    target = tmp_path / "results.json"
    atomic_write_text(target, '{"old": true}')
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError("disk full")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, json.dumps({"new": "x" * 1000}))
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
