"""The everyday CLI surface: presets (experiment=, ls, cp, --config-dir), Hydra's errors as clcli
paragraphs, --version, shell completion, what a failed run leaves behind, file modes, plot ticks,
and the results/report split."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, REPO, compose, run_cli
from omegaconf import OmegaConf

TINY = ["data=synthetic", "backbone=tiny_vit", "device=cpu"]
PRESET = "slca/slca_cifar100_in21k"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from tmp_path, so that a default run dir (outputs/...) would land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _first_comment(path: Path) -> str:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("# @package")]
    return lines[0][1:].strip() if lines and lines[0].startswith("#") else ""


# ----------------------------------------------------------------------------- experiment=NAME


def test_experiment_without_plus_applies_the_preset_and_the_command_line_still_wins():
    raw = OmegaConf.load(CONF / "experiment" / f"{PRESET}.yaml")
    chosen = {k.split("/")[-1]: v for e in OmegaConf.to_container(raw.defaults) if isinstance(e, dict) for k, v in e.items()}
    cfg = compose([f"experiment={PRESET}"])
    assert cfg.data.name == chosen["data"] == "split_cifar100"
    assert cfg.optim.epochs == raw.optim.epochs and list(cfg.optim.milestones) == list(raw.optim.milestones)
    assert cfg.train_seed == raw.train_seed and cfg.paper.last_acc == raw.paper.last_acc
    assert compose([f"experiment={PRESET}", "method=seq_ft"]).method.ca.enabled is False
    assert "paper" not in compose([])  # no preset by default


def test_the_sweeps_and_presets_use_experiment_without_plus():
    texts = [p.read_text() for p in [*CONF.rglob("*.yaml"), REPO / "README.md", *(REPO / "scripts").glob("*.sh")]]
    assert not any(re.search(r"\+experiment[=:] *[a-z]", t) for t in texts)  # a use, not the error it now gives


# ----------------------------------------------------------------------------- ls / cp


def _listing(out: str) -> dict[str, dict[str, str]]:
    """`clcli ls` output -> {group: {option: description}}."""
    groups: dict[str, dict[str, str]] = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0]
            groups[current] = {}
        elif line.strip():
            name, _, desc = line.strip().partition("  ")
            groups[current][name] = desc.strip()
    return groups


def _expected_options(conf: Path, nested=("optim/optimizer",)) -> dict[str, dict[str, Path]]:
    """Every yaml under conf/<group>/, by group: nested groups as given, other folders as paths."""
    out: dict[str, dict[str, Path]] = {}
    for f in conf.rglob("*.yaml"):
        rel = f.relative_to(conf).with_suffix("").as_posix()
        if "/" not in rel:
            continue  # the primary config
        group = next((g for g in nested if rel.startswith(g + "/")), rel.split("/")[0])
        out.setdefault(group, {})[rel[len(group) + 1:]] = f
    return out


def test_every_config_file_starts_with_a_one_line_description():
    missing = [str(p.relative_to(CONF)) for p in CONF.rglob("*.yaml") if not _first_comment(p)]
    assert missing == []


def test_ls_lists_every_option_of_every_group_with_its_description(capsys):
    code, out = run_cli(["ls"], capsys, stdout_only=True)
    assert code == 0
    listed = _listing(out)
    expected = _expected_options(CONF)
    assert set(listed) == set(expected) >= {"data", "backbone", "method", "optim", "optim/optimizer", "experiment", "sweep"}
    for group, options in expected.items():
        assert set(listed[group]) == set(options), group
        for name, path in options.items():
            assert listed[group][name] == _first_comment(path), (group, name)
    assert "slca/slca_cifar100_in21k" in listed["experiment"] and "sgd" in listed["optim/optimizer"]
    headers = [ln for ln in out.splitlines() if ln and not ln.startswith(" ")]
    assert "experiment  (experiment=NAME)" in headers and "sweep  (+sweep=NAME)" in headers


def test_ls_finds_a_new_group_on_disk(tmp_path, capsys, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "callbacks").mkdir()
    (conf / "callbacks" / "early_stop.yaml").write_text("# Stop a task early.\npatience: 3\n")
    import clcli.cli

    monkeypatch.setattr(clcli.cli, "_config_dir", lambda: str(conf))
    code, out = run_cli(["ls"], capsys, stdout_only=True)
    assert code == 0 and _listing(out)["callbacks"] == {"early_stop": "Stop a task early."}
    assert set(_listing(out)) == set(_expected_options(conf))


def test_ls_one_group_a_folder_and_an_unknown_group(capsys):
    assert _listing(run_cli(["ls", "method"], capsys, stdout_only=True)[1]).keys() == {"method"}
    code, out = run_cli(["ls", "experiment/diki"], capsys, stdout_only=True)
    diki = {p.stem for p in (CONF / "experiment" / "diki").glob("*.yaml")}
    assert code == 0 and set(_listing(out)["experiment"]) == {f"diki/{n}" for n in diki}
    code, out = run_cli(["ls", "metod"], capsys)
    assert code == 2 and "Did you mean method?" in out and "Traceback" not in out


def test_cp_copies_a_preset_refuses_to_overwrite_and_the_edited_copy_is_used(tmp_path, capsys):
    mine = tmp_path / "presets" / "experiment" / "mine.yaml"
    code, out = run_cli(["cp", f"experiment/{PRESET}", str(mine)], capsys)
    assert code == 0, out
    source = CONF / "experiment" / f"{PRESET}.yaml"
    assert mine.read_bytes() == source.read_bytes()
    assert f"--config-dir {tmp_path / 'presets'} experiment=mine" in out
    edited = mine.read_text().replace("epochs: 20", "epochs: 7").replace("milestones: [18]", "milestones: [6]")
    assert edited != mine.read_text()
    mine.write_text(edited)
    code, out = run_cli(["cp", f"experiment/{PRESET}", str(mine)], capsys)
    assert code == 2 and "already exists" in out and mine.read_text() == edited  # nothing overwritten
    for how in (["--config-dir", str(tmp_path / "presets")], [f"hydra.searchpath=[file://{tmp_path / 'presets'}]"]):
        code, out = run_cli(["train", *how, "experiment=mine", "--cfg", "job"], capsys, stdout_only=True)
        cfg = OmegaConf.create(out)
        assert code == 0 and cfg.optim.epochs == 7 and list(cfg.optim.milestones) == [6]
        assert cfg.data.name == "split_cifar100"
    code, out = run_cli(["ls", "experiment", "--config-dir", str(tmp_path / "presets")], capsys, stdout_only=True)
    assert "mine" in _listing(out)["experiment"] and str(tmp_path / "presets") in out


def test_cp_into_a_folder_and_an_unknown_preset(tmp_path, capsys):
    code, out = run_cli(["cp", "method/slca", str(tmp_path)], capsys)
    assert code == 0 and (tmp_path / "slca.yaml").read_bytes() == (CONF / "method" / "slca.yaml").read_bytes()
    code, out = run_cli(["cp", "experiment/slca/slca_cifar100_in21", str(tmp_path / "x.yaml")], capsys)
    assert code == 2 and f"Did you mean experiment/{PRESET}?" in out and not (tmp_path / "x.yaml").exists()


# ----------------------------------------------------------------------------- Hydra's errors


HYDRA_ERRORS = [
    (["train", "method=slcaa"], ["method=slcaa", "no option 'slcaa' in config group 'method'", "Did you mean method=slca?"]),
    (["validate", "method=slcaa"], ["Did you mean method=slca?"]),
    (["train", "--cfg", "job", "method=slcaa"], ["Did you mean method=slca?"]),
    (["train", "optim/optimizer=sgdd"], ["Did you mean optim/optimizer=sgd?"]),
    (["train", "experiment=slca/slca_cifar10_in21k"], [f"Did you mean experiment={PRESET}?"]),
    (["train", "optim.lrr=3"], ["optim.lrr: no such key", "Did you mean optim.lr?", "+optim.lrr=3"]),
    (["train", "method.ca.enabld=false"], ["Did you mean method.ca.enabled?"]),
    (["train", "sed=3"], ["Did you mean seed?"]),
    (["train", "method:slca"], ["cannot parse the override 'method:slca'", "Did you mean method=slca?"]),
    (["train", "optim.lr=["], ["cannot parse the override 'optim.lr=['", "key=value"]),
    (["train", "method"], ["A group needs an option: method=NAME"]),
    (["train", f"+experiment={PRESET}"], [f"Drop the '+': experiment={PRESET}"]),
    (["train", "sweep=smoke"], ["+sweep=smoke"]),
    (["train", *TINY, "data=synthetic,synthtic", "-m"], ["Did you mean data=synthetic?"]),
]


@pytest.mark.parametrize(("argv", "says"), HYDRA_ERRORS, ids=[" ".join(a) for a, _ in HYDRA_ERRORS])
def test_hydra_errors_are_one_paragraph_with_a_suggestion(argv, says, in_tmp, capsys):
    code, out = run_cli(argv, capsys)
    assert code == 2, out
    assert out.startswith("clcli: error: ") and "Traceback" not in out and "HYDRA_FULL_ERROR" not in out
    for text in says:
        assert text in out
    assert not (in_tmp / "outputs").exists()  # nothing was run or written
    assert "HYDRA_FULL_ERROR" not in os.environ  # set only while Hydra composes


def test_hydra_full_error_keeps_hydras_exception(monkeypatch, in_tmp):
    from hydra.errors import MissingConfigException

    from clcli.cli import main

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(MissingConfigException):
        main(["validate", "method=slcaa"])


# ----------------------------------------------------------------------------- --version, completion


def test_version_is_the_package_version(capsys):
    code, out = run_cli(["--version"], capsys, stdout_only=True)
    declared = re.search(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert code == 0 and out.strip() == f"clcli {declared}"


def _query(line: str, capsys, monkeypatch) -> list[str]:
    monkeypatch.setenv("COMP_LINE", line)
    code, out = run_cli(["-sc", "query=bash"], capsys, stdout_only=True)
    assert code == 0
    return out.split()


def test_the_completion_script_calls_a_command_the_dispatcher_answers(capsys, monkeypatch):
    code, script = run_cli(["train", "--shell-completion", "install=bash"], capsys, stdout_only=True)
    assert code == 0
    assert script.rstrip().endswith("-F hydra_bash_completion clcli")  # registered for `clcli` alone
    call = re.search(r"\$helper (.+)\)", script).group(1)
    assert call == "-sc query=bash"
    assert "method=" in _query("clcli train meth", capsys, monkeypatch)
    assert _query("clcli train method=sl", capsys, monkeypatch) == ["method=slca", "method=slcapp", "method=slow_learner"]
    assert f"experiment={PRESET}" in _query("clcli validate experiment=slca/slca_ci", capsys, monkeypatch)
    assert _query("clcli tr", capsys, monkeypatch) == ["train"]
    assert _query("clcli ls optim", capsys, monkeypatch) == ["optim", "optim/optimizer"]


def test_bash_completes_through_the_generated_script(tmp_path, capsys):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    code, script = run_cli(["train", "--shell-completion", "install=bash"], capsys, stdout_only=True)
    (tmp_path / "completion.sh").write_text(script)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "clcli"  # `clcli` on PATH runs this checkout's code
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m clcli.cli "$@"\n')
    wrapper.chmod(0o755)
    shell = f"""source {tmp_path / 'completion.sh'}
COMP_LINE="clcli train meth"; COMP_POINT=${{#COMP_LINE}}; COMP_CWORD=2
hydra_bash_completion
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "method=" in done.stdout.split(), done.stdout + done.stderr


# ----------------------------------------------------------------------------- failed runs


def _fail_at_task(monkeypatch, task_index: int, exc: Exception) -> None:
    """Make the evaluation after task ``task_index`` raise ``exc`` (after that task's training)."""
    import clcli.train

    real = clcli.train.evaluate

    def evaluate(method, scenario, index, matrix, rt):
        if index == task_index:
            raise exc
        return real(method, scenario, index, matrix, rt)

    monkeypatch.setattr(clcli.train, "evaluate", evaluate)


def test_a_run_that_crashes_keeps_its_dir_and_logs_the_traceback(tmp_path, capsys, monkeypatch):
    _fail_at_task(monkeypatch, 1, RuntimeError("boom in evaluation"))
    run_dir = tmp_path / "run"
    code, _ = run_cli(["train", *TINY, "method=frozen", f"hydra.run.dir={run_dir}"], capsys)
    assert code != 0
    log = (run_dir / "clcli.log").read_text()
    assert "Traceback" in log and "RuntimeError: boom in evaluation" in log
    assert (run_dir / "checkpoints" / "task_00.pt").is_file()  # the finished task is kept


def test_a_bad_input_error_mid_run_is_logged_as_its_paragraph(tmp_path, capsys, monkeypatch):
    from clcli.errors import DataError

    _fail_at_task(monkeypatch, 1, DataError("Image '/x/y.png' of task 1 is unreadable (test)."))
    run_dir = tmp_path / "run"
    code, out = run_cli(["train", *TINY, "method=frozen", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2 and "clcli: error: Image '/x/y.png'" in out
    log = (run_dir / "clcli.log").read_text()
    assert "the run failed: Image '/x/y.png' of task 1 is unreadable (test)." in log and "Traceback" not in log
    assert log.count("unreadable") == 1


def test_a_sweep_job_that_fails_on_bad_input_logs_its_paragraph(tmp_path, capsys, monkeypatch):
    from clcli.errors import DataError

    _fail_at_task(monkeypatch, 0, DataError("Image '/x/z.png' is unreadable (test)."))
    code, out = run_cli(["train", "-m", *TINY, "method=frozen", f"hydra.sweep.dir={tmp_path}"], capsys)
    assert code == 3 and "clcli: error: Image '/x/z.png'" in out
    logs = list(tmp_path.rglob("clcli.log"))
    assert len(logs) == 1 and "the run failed: Image '/x/z.png' is unreadable (test)." in logs[0].read_text()


def _refuse_in_run(monkeypatch):
    """A check only the run itself makes (the pre-check does not): the data-parallel batch split."""
    import clcli.distributed

    monkeypatch.setattr(clcli.distributed, "problems", lambda batch_size: ["optim.batch_size: refused (test)."])


def test_a_run_refused_before_any_work_leaves_no_dir(in_tmp, capsys, monkeypatch):
    _refuse_in_run(monkeypatch)
    code, out = run_cli(["train", *TINY, "method=frozen"], capsys)  # the default, timestamped run dir
    assert code == 2 and "optim.batch_size: refused (test)." in out
    runs = in_tmp / "outputs" / "runs"
    assert runs.is_dir() and list(runs.iterdir()) == []  # Hydra made the run dir; it is gone again


@pytest.mark.parametrize("had", [[], ["notes.txt"]], ids=["empty", "with-a-file"])
def test_a_refused_run_never_removes_a_dir_that_existed(had, tmp_path, capsys, monkeypatch):
    _refuse_in_run(monkeypatch)
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    for name in had:
        (run_dir / name).write_text("mine")
    code, _ = run_cli(["train", *TINY, "method=frozen", f"hydra.run.dir={run_dir}"], capsys)
    assert code == 2 and run_dir.is_dir()
    assert all((run_dir / name).read_text() == "mine" for name in had)
    assert "optim.batch_size: refused (test)." in (run_dir / "clcli.log").read_text()


# ----------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_leave_the_mode_the_umask_gives(umask, tmp_path):
    from clcli.results import atomic_torch_save, atomic_write_text

    old = os.umask(umask)
    try:
        reference = tmp_path / "plain.txt"
        with open(reference, "w") as f:  # what any other program would create
            f.write("x")
        atomic_write_text(tmp_path / "results.json", "{}")
        atomic_write_text(tmp_path / "results.json", "{}")  # replacing keeps it too
        atomic_torch_save({"a": 1}, tmp_path / "task_00.pt")
    finally:
        os.umask(old)
    expected = stat.S_IMODE(reference.stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("results.json", "task_00.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "results.json", "task_00.pt"]  # no temporaries


# ----------------------------------------------------------------------------- plots


def _results(kind: str, names: list[str]) -> dict:
    T = len(names)
    mat = [[50.0 + i + j if j <= i or kind != "class_incremental" else None for j in range(T)] for i in range(T)]
    return {"accuracy_matrix": mat, "tasks": [{"name": n} for n in names], "scenario": {"kind": kind},
            "metrics": {"seen_acc": [90.0, 80.0, 70.0, 60.0][:T]}, "run": {"method": "m", "data": "d"}, "status": "complete"}


@pytest.mark.parametrize("kind", ["class_incremental", "domain_class_incremental"])
def test_the_accuracy_curve_has_one_integer_tick_per_task_named_as_in_the_heatmap(kind):
    from clcli.report import curve_figure, matrix_figure

    names = ["task_0", "Cars", "Food", "MNIST"]
    results = _results(kind, names)
    curve, heat = curve_figure(results).axes[0], matrix_figure(results).axes[0]
    assert list(curve.get_xticks()) == list(range(len(names))) == list(heat.get_xticks())
    assert [t.get_text() for t in curve.get_xticklabels()] == names == [t.get_text() for t in heat.get_xticklabels()]
    for line in curve.get_lines():  # points sit on the task ticks
        assert all(float(x).is_integer() and 0 <= x < len(names) for x in line.get_xdata())
    if kind == "class_incremental":
        assert list(curve.get_lines()[0].get_ydata()) == results["metrics"]["seen_acc"]


def test_a_run_writes_both_plots(tmp_path):
    from clcli.report import write_plots

    write_plots(tmp_path, _results("class_incremental", ["a", "b", "c"]))
    for name in ("accuracy_curve.png", "accuracy_matrix.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- results / report split


def test_the_rendering_names_stay_importable_from_results():
    import clcli.report
    import clcli.results
    from clcli.results import RunStore, headline, outcome_lines, summary_markdown, write_outputs, write_plots  # noqa: F401

    for name in ("write_outputs", "headline", "outcome_lines", "summary_markdown", "write_plots"):
        assert getattr(clcli.results, name) is getattr(clcli.report, name)
    with pytest.raises(AttributeError):
        clcli.results.no_such_name  # noqa: B018
    done = subprocess.run([sys.executable, "-c", "import clcli.report, clcli.results; print(clcli.results.write_outputs)"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr  # report first: no import cycle


def test_write_outputs_writes_through_the_store(tmp_path):
    from clcli.results import write_outputs

    results = {**_results("class_incremental", ["a", "b"]), "seed": 1, "timings": {"total_s": 1.0},
               "metrics": {"seen_acc": [90.0, 80.0], "last_acc": 80.0, "inc_acc": 85.0, "forgetting": 10.0}}
    write_outputs(tmp_path, results)
    assert json.loads((tmp_path / "results.json").read_text())["metrics"]["last_acc"] == 80.0
    assert (tmp_path / "accuracy_matrix.csv").read_text().splitlines()[0] == "after_task,a,b"
    assert "| last_acc | 80.00 |" in (tmp_path / "summary.md").read_text()
