"""The console (log lines above live bars on a terminal, plain lines in a pipe, third-party INFO in the
log file only) and the experiment loggers, read back with each tracker's own reader and compared with
results.json's ``history``."""
import csv
import fcntl
import json
import math
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import REPO, compose, run_cli, run_tiny

TINY = ["data=synthetic", "backbone=tiny_vit", "device=cpu"]
# `task 0 (leaves) [1/3] epoch 1/1: loss 0.6931  lr 0.0001, 0.05  812 img/s` (the [i/n]: DIKI's fit-per-epoch)
EPOCH_LINE = re.compile(r"(task \d+ \([^)]*\)(?: \[\d+/\d+\])?) epoch (\d+)/(\d+): loss (\d+\.\d{4})  "
                        r"lr ([^ ]+(?:, [^ ]+)*)  (\d+) img/s")
BAR = re.compile(r"━.* \d+/\d+ \d+:\d\d:\d\d")  # a progress bar: `tasks ━━━━╺━━━ 1/3 0:00:02 0:00:04`


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE",
                                                             "TTY_INTERACTIVE", "NO_COLOR", "WANDB_MODE")}
    return dict(env, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)


def _train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "clcli.cli", "train", *args]


def _on_pty(args: list[str], cwd: Path, columns: int = 160, rows: int = 40, timeout: float = 600) -> tuple[int, str]:
    """Run ``clcli train args`` with stdin/stdout/stderr on a pseudo-terminal; (exit code, raw output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(_train_cmd(args), stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                            env=_env(TERM="xterm-256color"), close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), b"".join(chunks).decode("utf-8", errors="replace")


def _screen(raw: str) -> list[str]:
    """The lines a terminal ends up showing (scrollback included) after ``raw``: a minimal VT100
    model of what rich emits (text, CR, LF, cursor up/down/column, erase in line; colours ignored)."""
    lines, row, col, i = [""], 0, 0, 0
    csi = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
    while i < len(raw):
        ch = raw[i]
        if ch == "\x1b":
            m = csi.match(raw, i)
            if m is None:  # another escape (e.g. OSC): skip to its terminator
                end = raw.find("\x07", i)
                i = (end + 1) if end >= 0 else i + 1
                continue
            params, cmd = m.groups()
            n = int(params) if params.isdigit() else (0 if cmd in "JK" else 1)
            if cmd == "A":
                row = max(0, row - n)
            elif cmd == "B":
                row += n
            elif cmd == "C":
                col += n
            elif cmd == "D":
                col = max(0, col - n)
            elif cmd == "G":
                col = n - 1
            elif cmd == "K":
                while len(lines) <= row:
                    lines.append("")
                lines[row] = "" if n == 2 else (lines[row][col:].rjust(len(lines[row])) if n == 1 else lines[row][:col])
            i = m.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
        elif ch >= " ":
            while len(lines) <= row:
                lines.append("")
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1:]
            col += 1
        i += 1
    return [line.rstrip() for line in lines]


def _expected_epoch_lines(history: list[dict]) -> list[tuple[str, str]]:
    """(task prefix, loss) of every epoch, from results.json's history (the independent record)."""
    return [(h["where"], f"{h['loss']:.4f}") for h in history]


def test_terminal_log_lines_stay_above_the_bars(tmp_path):
    run_dir = tmp_path / "run"
    code, raw = _on_pty([*TINY, "method=slow_learner", "optim.epochs=6", f"hydra.run.dir={run_dir}"], tmp_path)
    assert code == 0, raw[-3000:]
    # it was a terminal: colours, and bars drawn (and redrawn) between the log lines
    assert "\x1b[" in raw and BAR.search(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw))
    history = json.loads((run_dir / "results.json").read_text())["history"]
    assert len(history) == 3 * 6
    screen = _screen(raw)
    text = "\n".join(screen)
    # every epoch's log line is on the final screen, once, in order, with the loss results.json holds
    found = [(m.group(1), m.group(4)) for line in screen if (m := EPOCH_LINE.search(line))]
    assert found == _expected_epoch_lines(history), text[-4000:]
    # the bars were transient: none is left (no stale `tasks 0/3`), and the summary table follows the log
    assert not [line for line in screen if BAR.search(line)], text[-4000:]
    assert "after task" in text and "last_acc" in text
    # the run dir: first line of the run and last line
    dirs = [i for i, line in enumerate(screen) if f"run dir: {run_dir}" in line]
    last_epoch = max(i for i, line in enumerate(screen) if EPOCH_LINE.search(line))
    assert len(dirs) == 2 and dirs[0] < screen.index(next(x for x in screen if EPOCH_LINE.search(x))) and dirs[1] > last_epoch
    assert dirs[1] == max(i for i, line in enumerate(screen) if line.strip())


@pytest.fixture(scope="module")
def piped_clip_run(tmp_path_factory):
    """DIKI on the tiny CLIP with stdout and stderr on pipes (a SLURM log, `| tee`)."""
    tmp = tmp_path_factory.mktemp("piped")
    run_dir = tmp / "run"
    proc = subprocess.run(_train_cmd(["data=synthetic_mtil", "backbone=tiny_clip", "method=diki", "device=cpu",
                                      f"hydra.run.dir={run_dir}"]),
                          capture_output=True, text=True, timeout=600, cwd=tmp, env=_env())
    return run_dir, proc


def test_piped_output_is_plain_lines(piped_clip_run):
    run_dir, proc = piped_clip_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "\x1b" not in out and "\r" not in out and not BAR.search(out)  # no colours, no bars
    history = json.loads((run_dir / "results.json").read_text())["history"]
    lines = out.splitlines()
    found = [(m.group(1), m.group(4)) for line in lines if (m := EPOCH_LINE.search(line))]
    assert found == _expected_epoch_lines(history) and len(found) == 3 * 3  # one line per epoch
    dirs = [i for i, line in enumerate(lines) if line.endswith(f"run dir: {run_dir}")]
    assert len(dirs) == 2 and dirs[0] == 0 and dirs[1] == len(lines) - 1
    # the config, once, as a tree; in the log file as YAML
    assert sum(line.strip() == "config" for line in lines) == 1 and "├── data" in out
    log_text = (run_dir / "clcli.log").read_text()
    assert "config:\nseed: 1993" in log_text and "├── data" not in log_text


def test_third_party_info_goes_to_the_log_file_only(piped_clip_run):
    run_dir, proc = piped_clip_run
    out = proc.stdout + proc.stderr
    log_text = (run_dir / "clcli.log").read_text()
    # open_clip logs on the root logger at INFO when it builds the model and the tokenizer
    for message in ("Loaded built-in tiny-clip model config", "Using default SimpleTokenizer"):
        assert message in log_text and message not in out
    assert "[root][INFO]" in log_text and "[root][INFO]" not in out
    # its warning (no pretrained weights) is a warning: on the console too
    assert "No pretrained weights loaded" in out and "No pretrained weights loaded" in log_text
    # clcli's own INFO lines are on both
    assert "after task 2:" in out and "after task 2:" in log_text


# ------------------------------------------------------------------------------------ loggers


def _available(*modules: str) -> list[str]:
    from importlib.util import find_spec

    return [m for m in modules if find_spec(m) is not None]


BACKENDS = ["csv", *_available("tensorboard", "wandb", "mlflow")]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One tiny run logging to every backend installed here (csv always)."""
    tmp = tmp_path_factory.mktemp("loggers")
    cwd = os.getcwd()
    os.chdir(tmp)  # nothing a tracker writes may land outside the run dir
    try:
        res = run_tiny(tmp, [*TINY, "method=slow_learner", f"logger=[{','.join(BACKENDS)}]"])
    finally:
        os.chdir(cwd)
    return tmp / "run", res


def _epoch_rows(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The train/* series results.json's history implies, as (step, value) per key."""
    series: dict[str, list[tuple[int, float]]] = {}
    for step, h in enumerate(history, 1):
        values = {"train/loss": h["loss"], "train/task": h["task"], "train/epoch": h["epoch"],
                  "train/images_per_s": h["images_per_s"], **{f"train/lr_{i}": lr for i, lr in enumerate(h["lrs"])}}
        for k, v in values.items():
            series.setdefault(k, []).append((step, float(v)))
    return series


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]], key: str = "") -> None:
    """Same steps, same values (to float32 precision: TensorBoard stores float32)."""
    assert [s for s, _ in got] == [s for s, _ in want], key
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key


def test_history_is_in_results_json(logged_run):
    run_dir, res = logged_run
    history = res["history"]
    assert [(h["task"], h["epoch"]) for h in history] == [(t, e) for t in range(3) for e in range(1, 6)]
    # optim/synthetic.yaml: lrs 1e-4 (representation) and 5e-2 (classifier), x0.1 from epoch 5 (milestone 4)
    for h in history:
        factor = 0.1 if h["epoch"] == 5 else 1.0
        assert h["lrs"] == pytest.approx([1e-4 * factor, 5e-2 * factor])
        assert h["images_per_s"] > 0 and math.isfinite(h["loss"])
    # the per-epoch losses fit returned (the method's own record) are the history's
    assert json.loads((run_dir / "results.json").read_text())["history"] == history
    assert [t["name"] for t in res["tasks"]] == ["task0", "task1", "task2"]
    # every tracker wrote inside the run dir (the fixture ran in the run dir's parent)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]


def test_csv_metrics_equal_results(logged_run):
    run_dir, res = logged_run
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and v != "":
                got.setdefault(k, []).append((int(row["step"]), float(v)))
    expected = _epoch_rows(res["history"])
    for key, series in expected.items():
        _same(got[key], series, key)
    # one accuracy row per task, at the step its training ended (5 epochs a task)
    matrix = res["accuracy_matrix"]
    for t, name in enumerate(["task0", "task1", "task2"]):
        want = [((i + 1) * 5, matrix[i][t]) for i in range(3) if matrix[i][t] is not None]
        _same(got[f"acc/{name}"], want, name)
    assert got["acc/after_task"] == [(5, 0.0), (10, 1.0), (15, 2.0)]
    for k in ("last_acc", "inc_acc", "forgetting"):
        _same(got[f"final/{k}"], [(15, res["metrics"][k])], k)


def test_tensorboard_scalars_equal_history(logged_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, res = logged_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for key, series in _epoch_rows(res["history"]).items():
        _same([(e.step, e.value) for e in acc.Scalars(key)], series, key)
    _same([(e.step, e.value) for e in acc.Scalars("final/last_acc")], [(15, res["metrics"]["last_acc"])])
    assert "config" in " ".join(acc.Tags()["tensors"])  # the config went in as text (and as hparams)


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file (``run-*.wandb``): a LevelDB-style log, as the W&B SDK writes it
    (file header ``:W&B`` + magic 0xBEE1 + version; 32 KiB blocks; per record a crc32, a length and a
    FULL/FIRST/MIDDLE/LAST kind). wandb >= 0.2x ships no Python reader for it any more."""
    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a record header never straddles a block: the rest is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            records.append(parts + chunk)
    return records


def test_wandb_offline_run_holds_the_metrics(logged_run):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    run_dir, res = logged_run
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    steps: dict[int, dict] = {}
    config, summary_status, exit_code = {}, None, None
    for data in _wandb_records(files[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            steps.setdefault(int(items.pop("_step", rec.history.step.num)), {}).update(items)
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            for i in rec.summary.update:
                if i.key == "status":
                    summary_status = json.loads(i.value_json)
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    for key, series in _epoch_rows(res["history"]).items():
        _same([(s, steps[s][key]) for s, _ in series], series, key)
    assert steps[15]["final/last_acc"] == pytest.approx(res["metrics"]["last_acc"])
    assert config["optim"]["lr"]["classifier"] == 0.05 and config["environment"]["torch"] == res["environment"]["torch"]
    assert summary_status == "complete" and exit_code == 0


def test_mlflow_run_holds_the_metrics(logged_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, res = logged_run
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("clcli").experiment_id])
    for key, series in _epoch_rows(res["history"]).items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        _same(got, series, key)
    assert run.info.status == "FINISHED" and run.data.tags["clcli.status"] == "complete"
    assert run.data.params["optim.lr.classifier"] == "0.05" and run.data.params["method._target_"].endswith("SLCA")
    assert run.data.tags["env.torch"] == res["environment"]["torch"]


def test_resume_replays_the_history_into_new_logger_runs(tmp_path):
    """A run resumed after task 1 restores the history from its checkpoint, and the loggers get the
    whole run again: metrics.csv (and TensorBoard, whose earlier steps are purged) equal an
    uninterrupted run's."""
    backends = ["csv", *_available("tensorboard")]
    common = [*TINY, "method=slow_learner", "checkpoint.keep=all", f"logger=[{','.join(backends)}]"]
    ref = run_tiny(tmp_path, common, "ref")
    run_dir = tmp_path / "ref"
    (run_dir / "results.json").unlink()
    (run_dir / "checkpoints" / "task_02.pt").unlink()  # as if killed during task 2
    before = (run_dir / "metrics.csv").read_text()
    resumed = run_tiny(tmp_path, [*common, "resume=true"], "ref")
    strip = lambda h: [(r["task"], r["epoch"], r["loss"], r["lrs"]) for r in h]
    assert strip(resumed["history"]) == strip(ref["history"])
    after = (run_dir / "metrics.csv").read_text()
    drop_speed = lambda text: [row[:4] + row[5:] for row in csv.reader(text.splitlines())]  # images/s differs
    assert drop_speed(after) == drop_speed(before)
    if "tensorboard" in backends:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        _same([(e.step, e.value) for e in acc.Scalars("train/loss")], [(i, h["loss"]) for i, h in enumerate(ref["history"], 1)])


def test_a_missing_logger_package_is_a_config_problem(monkeypatch, capsys):
    # hide wandb (installed or not): find_spec then reports it missing, as in an environment without it
    import clcli.loggers

    real = clcli.loggers.find_spec
    monkeypatch.setattr(clcli.loggers, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, out = run_cli(["validate", *TINY, "logger=[csv,wandb]"], capsys)
    assert code == 2, out
    out = " ".join(out.split())  # the console wraps long lines
    assert "logger.wandb: the wandb package is not installed; install it with pip install 'clcli[wandb]'" in out
    code, out = run_cli(["validate", *TINY, "logger=[csv,wandb]", "logger.wandb.mode=cloudy"], capsys)
    assert code == 2 and "logger.wandb.mode: expected one of offline, online, disabled, got 'cloudy'" in " ".join(out.split())


@pytest.mark.parametrize("option", sorted(p.stem for p in (REPO / "conf" / "logger").glob("*.yaml")))
def test_every_logger_option_validates_or_names_its_extra(option):
    from clcli.config import check_config
    from clcli.loggers import build

    problems = check_config(compose([*TINY, f"logger={option}"]))
    module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(option)
    if module is None or _available(module):
        assert problems == []
    else:
        assert problems == [f"logger.{option}: the {module} package is not installed; install it with pip install "
                            f"'clcli[{option}]', or choose other loggers (e.g. logger=csv)."]
    assert build(None, REPO).backends == {} and build({"_target_": "clcli.loggers.Loggers"}, REPO).backends == {}


def test_logger_keys_are_checked():
    from clcli.config import check_config

    problems = check_config(compose([*TINY, "+logger.csv.file_name=x.csv"]))
    assert any("logger.csv.file_name" in p and "filename" in p for p in problems), problems
    assert not check_config(compose([*TINY, "logger=[]"]))
