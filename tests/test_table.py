"""`clcli table` (sweep aggregation beside the papers' numbers) and the paper-table presets:
conf/experiment/{slca,diki}/*.yaml (one file per table cell) and conf/sweep/*.yaml (one per table)."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from clcli import table as T
from clcli.aggregate.group import common_choices, group_runs
from clcli.aggregate.kinds import headline_metrics
from clcli.aggregate.plot import write_plot
from clcli.aggregate.render import render_csv
from clcli.aggregate.tables import build_tables, headline_table

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
CLCLI = [sys.executable, "-m", "clcli.cli"]
# One torch thread per process: on small shared CPUs oversubscription makes the tiny runs ~10x slower.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

EXPERIMENTS = sorted(p.relative_to(CONF / "experiment").with_suffix("").as_posix()
                     for p in (CONF / "experiment").rglob("*.yaml"))
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
SEEDS = {1993, 1996, 1997}  # SLCA's class-order seeds (docs/slca_protocol.md#class-order-and-seeds)


def _table(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*CLCLI, "table", *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120)


# ------------------------------------------------------------------ (1) a real tiny sweep, end to end


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """2 methods x 2 seeds on generated data with a tiny ViT, through the real CLI (`-m`)."""
    out = tmp_path_factory.mktemp("sweep")
    cmd = [*CLCLI, "train", "-m", "data=synthetic", "backbone=tiny_vit", "method=slca,slow_learner",
           "seed=1993,1996", "device=cpu", f"hydra.sweep.dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.rglob("results.json"))) == 4
    return out


def _expected(sweep: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and sample std per method and metric, straight from the results files."""
    vals: dict[str, dict[str, list[float]]] = {}
    for p in sweep.rglob("results.json"):
        r = json.loads(p.read_text())
        for m in ("last_acc", "inc_acc", "forgetting"):
            vals.setdefault(r["run"]["method"], {}).setdefault(m, []).append(r["metrics"][m])
    return {meth: {m: (float(np.mean(v)), float(np.std(v, ddof=1))) for m, v in d.items()} for meth, d in vals.items()}


def test_tiny_sweep_table_matches_numpy(tiny_sweep, tmp_path):
    proc = _table([tiny_sweep, "--output", tmp_path / "t.csv", "--plot", tmp_path / "t.png"])
    assert proc.returncode == 0, proc.stderr
    # the rich table: two rows, labelled by the choice that varies, each with n=2 per metric
    assert "method=slca" in proc.stdout and "method=slow_learner" in proc.stdout
    assert proc.stdout.count("(n=2)") == 2 * 3
    assert "data=synthetic" in proc.stdout  # shared choices go into the title

    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert len(rows) == 2
    expected = _expected(tiny_sweep)
    for row in rows:
        assert row["n_runs"] == "2" and row["seeds"] == "1993 1996"
        for m, (mean, std) in expected[row["method"]].items():
            assert row[f"{m}_n"] == "2"
            assert float(row[f"{m}_mean"]) == pytest.approx(mean, abs=1e-9)
            assert float(row[f"{m}_std"]) == pytest.approx(std, abs=1e-9)
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_sweep_md_and_latex_files(tiny_sweep, tmp_path):
    md, tex = tmp_path / "t.md", tmp_path / "t.tex"
    for fmt, path in (("md", md), ("latex", tex)):
        proc = _table([tiny_sweep, "--format", fmt, "--output", path])
        assert proc.returncode == 0, proc.stderr
    # markdown: a header, a separator and two rows with the same number of cells
    lines = [ln for ln in md.read_text().splitlines() if ln.startswith("|")]
    assert len(lines) == 4 and len({ln.count("|") for ln in lines}) == 1
    assert re.fullmatch(r"\|(-{3}:?\|)+", lines[1])
    assert all("(n=2)" in ln for ln in lines[2:])
    # LaTeX: one tabular, column spec width = cells per row, two body rows
    text = tex.read_text()
    assert text.count("\\begin{tabular}") == 1 and text.count("\\end{tabular}") == 1
    spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", text).group(1)
    body = [ln for ln in text.splitlines() if ln.endswith("\\\\")]
    assert len(body) == 3 and all(ln.count(" & ") == len(spec) - 1 for ln in body)
    assert "$\\pm$" in text and "\\_" in text  # ± and method=slow_learner escaped


# ------------------------------------------------------------------ (2) grouping on hand-made results


def _res(seed, method="slca", lr=1e-4, last=50.0, inc=60.0, paper=None, **extra_cfg) -> dict:
    config = {"seed": seed, "train_seed": None, "device": "cpu", "resume": False, "paths": {"data_dir": f"/d{seed}"},
              "data": {"name": "synthetic", "class_order_seed": seed, "source": {"seed": 0}},
              "optim": {"lr": {"representation": lr, "classifier": 0.01}, "milestones": [18]},
              "method": {"ca": {"enabled": method == "slca"}}, **extra_cfg}
    return {"format": "clcli-results-v1", "run": {"method": method, "data": "synthetic", "backbone": "tiny_vit",
                                                  "optim": "synthetic", "sweep": "x"},
            "seed": seed, "metrics": {"last_acc": last, "inc_acc": inc, "forgetting": 1.0, "seen_acc": [90.0, last]},
            "scenario": {"kind": "class_incremental"}, "config": config, "paper": paper, "_path": f"r{seed}"}


def test_seed_only_differences_are_grouped():
    groups = group_runs([_res(1993, last=50), _res(1996, last=60), _res(1997, last=70)])
    assert len(groups) == 1
    s = groups[0].stat("last_acc")
    assert (s.mean, s.n) == (60.0, 3) and s.std == pytest.approx(10.0)  # sample std, ddof=1
    # data.class_order_seed follows ${seed}; data.source.seed (a fixed split seed) is still compared
    assert "data.class_order_seed" not in groups[0].config and groups[0].config["data.source.seed"] == 0


def test_learning_rates_split_groups_with_readable_labels():
    runs = [_res(s, lr=lr, last=lr * 1e5) for lr in (1e-5, 1e-4, 1e-3) for s in (1993, 1996)]
    groups = group_runs(runs)
    assert [g.label for g in groups] == ["optim.lr.representation=1e-05", "optim.lr.representation=0.0001",
                                        "optim.lr.representation=0.001"]  # numeric order
    assert all(g.stat("last_acc").n == 2 for g in groups)
    assert common_choices(groups) == {"method": "slca", "data": "synthetic", "backbone": "tiny_vit"}


def test_method_choice_labels_and_config_difference_among_siblings():
    runs = [_res(1993, "slca", precision="fp32"), _res(1993, "slow_learner", precision="fp32"),
            _res(1993, "slca", precision="bf16")]
    labels = [g.label for g in group_runs(runs)]
    # the slca runs differ in precision (kept: it changes numerics); slow_learner has no sibling, and its
    # other config differences (method.ca.enabled) are explained by the method choice
    assert sorted(labels) == ["method=slca precision=bf16", "method=slca precision=fp32", "method=slow_learner"]


def test_prompt_rows_sort_in_the_slca_table_order_from_a_sweep_dir(tmp_path):
    """A fake `outputs/sweeps/slca` (SLCA's and the prompt sweeps' results.json, written in a shuffled
    order): `clcli table` prints, per backbone block and benchmark, joint / Seq FT / L2P / L2P + CA /
    DualPrompt / DualPrompt + CA / CODA-P / CODA-P + CA / slow learner / SLCA / SLCA++ (the order
    written out by hand here: the reference)."""
    import random

    cells = [("slca", m, m == "slca" or m == "slcapp") for m in ("slca", "seq_ft", "joint", "slow_learner", "slcapp")]
    cells += [("prompts", m, ca) for m in ("coda_prompt", "l2p", "dualprompt") for ca in (True, False)]
    runs = []
    for pre in ("mocov3", "in21k"):
        for bench, data in (("imagenet_r", "split_imagenet_r"), ("cifar100", "split_cifar100")):
            for family, method, ca in cells:
                exp = f"{family}/{method}{'_ca' if ca and family == 'prompts' else ''}_{bench}_{pre}"
                for seed in (1993, 1996):
                    r = _res(seed, method)
                    r["run"].update(experiment=exp, data=data, backbone=f"vit_b16_{pre}", optim=data)
                    r["config"]["method"] = {"ca": {"enabled": ca}}
                    runs.append((f"{pre}/{exp}/seed={seed}", r))
    random.Random(0).shuffle(runs)
    for where, r in runs:
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "results.json").write_text(json.dumps({k: v for k, v in r.items() if k != "_path"}))
    T.main([str(tmp_path), "--output", str(tmp_path / "table.md")])
    labels = [line.split("|")[1].strip() for line in (tmp_path / "table.md").read_text().splitlines()
              if line.startswith("| slca/") or line.startswith("| prompts/")]
    order = ["slca/joint", "slca/seq_ft", "prompts/l2p", "prompts/l2p_ca", "prompts/dualprompt", "prompts/dualprompt_ca",
             "prompts/coda_prompt", "prompts/coda_prompt_ca", "slca/slow_learner", "slca/slca", "slca/slcapp"]
    # SLCA's blocks: IN21k before MoCo v3 (by backbone name), CIFAR-100 before ImageNet-R (DATA_RANK)
    want = [f"{e}_{bench}_{pre}" for pre in ("in21k", "mocov3") for bench in ("cifar100", "imagenet_r") for e in order]
    assert labels == want


def test_paper_values_diff_and_unverified_mark(tmp_path):
    paper = {"last_acc": 91.53, "inc_acc": 94.09, "unverified": ["inc_acc"], "source": "figure", "note": "n"}
    groups = group_runs([_res(1993, last=90.0, inc=93.0, paper=paper), _res(1996, last=92.0, inc=95.0, paper=paper)])
    table = headline_table(groups, "class_incremental")
    row = dict(zip(table.header, table.rows[0]))
    assert row["last_acc"] == "91.00 ± 1.41 (n=2)"
    assert (row["last_acc paper"], row["last_acc Δ"]) == ("91.53", "-0.53")
    assert (row["inc_acc paper"], row["inc_acc Δ"]) == ("94.09*", "-0.09")
    assert "forgetting paper" not in row  # no paper value for it anywhere: no empty columns
    assert any("figure; n" in n for n in table.notes)
    rec = next(csv.DictReader(render_csv(groups).splitlines()))
    assert float(rec["last_acc_diff"]) == pytest.approx(-0.53)
    assert rec["inc_acc_paper_unverified"] == "true" and rec["paper_source"] == "figure"


def test_paper_kind_column_and_probe_columns():
    """``paper.kinds`` prints beside the paper column; the probe's metrics get columns only where some run has them."""
    paper = {"last_acc": 84.71, "inc_acc": 90.94, "kinds": {"last_acc": "derived", "inc_acc": "recalled"},
             "unverified": ["last_acc", "inc_acc"], "source": "s"}
    probed = _res(1993, paper=paper)
    probed["metrics"].update(probe_last=70.0, probe_inc=80.0)
    table = headline_table(group_runs([probed, _res(1993, "slow_learner")]), "class_incremental")
    i = table.header.index("last_acc paper")
    assert table.header[i : i + 3] == ["last_acc paper", "last_acc kind", "last_acc Δ"]
    assert "probe_last" in table.header and "probe_inc" in table.header and "probe_last paper" not in table.header
    rows = {r[0]: dict(zip(table.header, r)) for r in table.rows}
    assert rows["method=slca"]["last_acc kind"] == "derived" and rows["method=slca"]["inc_acc kind"] == "recalled"
    assert rows["method=slca"]["probe_last"].startswith("70.00") and rows["method=slow_learner"]["probe_last"].startswith("–")
    assert rows["method=slow_learner"]["last_acc kind"] == "–"
    rec = next(csv.DictReader(render_csv(group_runs([probed])).splitlines()))
    assert rec["last_acc_paper_kind"] == "derived" and float(rec["probe_inc_mean"]) == 80.0
    plain = headline_table(group_runs([_res(1993)]), "class_incremental")
    assert "probe_last" not in plain.header and not any(h.endswith(" kind") for h in plain.header)


def test_single_run_std_is_a_dash_not_zero():
    (g,) = group_runs([_res(1993)])
    assert g.stat("last_acc").std is None and g.stat("last_acc").text() == "50.00 ± – (n=1)"
    rec = next(csv.DictReader(render_csv([g]).splitlines()))
    assert rec["last_acc_std"] == "" and rec["last_acc_n"] == "1"


def test_mtil_headline_and_per_dataset_tables():
    names = ["aircraft", "caltech101", "dtd"]

    def mtil(seed, shift):
        per = {"transfer": [None, 80 + shift, 40 + shift], "avg": [30.0, 85.0, 50.0 + shift], "last": [35.0, 90.0, 60.0]}
        return {"run": {"method": "zeroshot", "data": "mtil", "backbone": "clip"}, "seed": seed,
                "metrics": {"transfer": 60 + shift, "avg": 55.0, "last": 61.7, "per_dataset": per},
                "scenario": {"kind": "domain_class_incremental"}, "tasks": [{"name": n} for n in names],
                "accuracy_matrix": [[30.0, 80.0, 40.0], [30.0, 85.0, 50.0], [35.0, 90.0, 60.0]], "config": {"seed": seed},
                "paper": {"transfer": 69.4, "per_dataset": {"transfer": [None, 88.4, 44.6]}}, "_path": str(seed)}

    groups = group_runs([mtil(1993, 0.0), mtil(1996, 2.0)])
    tables = build_tables(groups)
    assert [t.header[2:5] for t in tables[:1]] == [["transfer", "transfer paper", "transfer Δ"]]
    per = tables[1]
    assert per.header == ["group", "metric", *names]
    rows = {r[1]: r[2:] for r in per.rows}
    assert rows["transfer"] == ["–", "81.0 ± 1.4", "41.0 ± 1.4"]
    assert rows["transfer paper"] == ["–", "88.4", "44.6"]
    mean, std = groups[0].curve()
    assert mean.tolist() == pytest.approx([50.0, 55.0, 61.666666], abs=1e-4) and std.tolist() == [0, 0, 0]


def test_plot_writes_png(tmp_path):
    groups = group_runs([_res(1993), _res(1996, last=70.0), _res(1993, "slow_learner")])
    write_plot(groups, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


# ------------------------------------------------------------------ (4) errors: exit code 2, file named


def test_empty_dir_exits_2_with_message(tmp_path):
    proc = _table([tmp_path])
    assert proc.returncode == 2
    assert "no results.json" in proc.stderr and str(tmp_path) in proc.stderr


def test_invalid_results_file_is_named(tmp_path, capsys):
    good = tmp_path / "a" / "results.json"
    good.parent.mkdir()
    good.write_text(json.dumps({k: v for k, v in _res(1993).items() if k != "_path"}))
    bad = tmp_path / "b" / "results.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        T.main([str(tmp_path)])
    assert exc.value.code == 2 and str(bad) in capsys.readouterr().err
    bad.write_text(json.dumps({"run": {}, "seed": 1}))  # valid JSON, not a results file
    with pytest.raises(SystemExit) as exc:
        T.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(bad) in err and "metrics" in err


def test_unknown_output_suffix_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main([str(tmp_path), "--output", str(tmp_path / "t.xlsx")])
    assert exc.value.code == 2 and "--format" in capsys.readouterr().err


# ------------------------------------------------------------------ (3) experiment and sweep presets


def _compose(overrides: list[str], hydra_cfg: bool = False):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_cfg)


def _missing_options(experiment: str) -> list[str]:
    """Options an experiment file selects that do not exist in conf/."""
    defaults = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text()).get("defaults", [])
    missing = []
    for entry in defaults:
        if isinstance(entry, dict):
            for key, option in entry.items():
                group = key.replace("override", "").strip().strip("/")
                if not (CONF / group / f"{option}.yaml").is_file():
                    missing.append(f"{group}/{option}")
    return missing


def _key_problems(cfg) -> list[str]:
    """check_config's problems other than missing datasets, weight files, ZSCL's reference data and
    MoE-Adapters' selector files (not on this machine: a missing checkpoint_path file, hub weights not
    in the local cache)."""
    from clcli.config import check_config

    owned = ("optim", "method", "backbone.", "seed", "train_seed", "precision", "device", "eval", "guard", "perf")
    return [p for p in check_config(cfg) if "unknown key" in p
            or (p.startswith(owned) and not p.startswith(("backbone.checkpoint_path", "backbone.pretrained",
                                                            "method.ref_images.path", "method.ref_texts.path",
                                                            "method.ddas.alexnet_weights", "method.ddas.tinyimagenet_dir")))]


def test_every_paper_table_cell_has_an_experiment():
    slca = {f"slca/{m}_{b}_{p}" for m in ("seq_ft", "slow_learner", "slca", "joint", "slcapp")
            for b in ("cifar100", "imagenet_r", "cub200", "cars196") for p in ("in21k", "mocov3")}
    diki = {f"diki/{m}_{o}" for m in ("diki", "zeroshot", "clip_ft", "zscl") for o in ("order1", "order2", "fewshot")}
    diki |= {f"diki/tiny_{m}" for m in ("diki", "zeroshot", "clip_ft", "zscl")}  # the tiny CPU benchmark
    diki |= {f"diki/moe_adapters_{o}" for o in ("order1", "order2", "fewshot", "fewshot5", "tiny")}
    prompts = {f"prompts/{m}{ca}_{b}_{p}" for m in ("l2p", "dualprompt", "coda_prompt") for ca in ("", "_ca")
               for b in ("cifar100", "imagenet_r", "cub200", "cars196") for p in ("in21k", "mocov3")}
    assert set(EXPERIMENTS) == slca | diki | prompts


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_a_paper_block(experiment):
    assert not _missing_options(experiment), "the experiment selects options that do not exist"
    cfg = _compose([f"experiment={experiment}"])
    assert cfg.optim.schedule != "multistep" or all(0 < m <= cfg.optim.epochs for m in cfg.optim.milestones)
    assert _key_problems(cfg) == []
    paper = cfg.paper
    assert paper.get("source") or paper.get("note"), "paper: needs a source or a note"
    kind = "domain_class_incremental" if experiment.startswith("diki/") else "class_incremental"
    metrics = set(headline_metrics(kind))
    values = {k: v for k, v in paper.items() if k in metrics}
    assert values, "paper: names the table's metrics (null where not available)"
    assert set(paper.get("unverified") or []) <= {k for k, v in values.items() if v is not None}
    assert all(v is None or 0 <= v <= 100 for v in values.values())
    if any(v is not None for v in values.values()):
        assert paper.get("source"), "a published number needs its source"
    if experiment.startswith("slca/"):  # every number has a kind; all that are not read from a table are unverified
        kinds = dict(paper.get("kinds") or {})
        assert set(kinds) == {k for k, v in values.items() if v is not None}
        assert set(kinds.values()) <= {"table", "figure", "derived", "secondary", "recalled"}
        assert {k for k, kind in kinds.items() if kind != "table"} == set(paper.get("unverified") or [])
        for k, alt in (paper.get("alternatives") or {}).items():
            assert alt.kind in ("table", "figure", "derived", "secondary", "recalled") and alt.source and k in values
    if experiment.startswith("slca/"):
        _check_slca_hyper_parameters(experiment, cfg)


def _check_slca_hyper_parameters(experiment, cfg):
    """IN21k CIFAR 20/[18], other IN21k 50/[40], MoCo v3 90/[80]; tau 0.1 (Cars 0.05)
    (docs/slca_protocol.md#schedules-per-benchmark); torch seed 1 in every run
    (docs/slca_protocol.md#class-order-and-seeds)."""
    method, rest = re.fullmatch(r"slca/(seq_ft|slow_learner|slcapp|slca|joint)_(.+)", experiment).groups()
    bench, pre = rest.rsplit("_", 1)
    mocov3 = (90, [60, 80]) if method == "slcapp" else (90, [80])  # SLCA++'s milestones only set its cosine floor
    expected = mocov3 if pre == "mocov3" else ((20, [18]) if bench == "cifar100" else (50, [40]))
    assert (cfg.optim.epochs, list(cfg.optim.milestones)) == expected
    assert cfg.train_seed == 1
    assert cfg.data.name == f"split_{bench}" and cfg.backbone.model_name.startswith("vit_base_patch16_224")
    assert cfg.method.ca.enabled == (method in ("slca", "slcapp")) and cfg.method.joint == (method == "joint")
    if method == "slcapp":  # docs/slca_protocol.md#slca-configurations-per-benchmark
        heavy = bench in ("imagenet_r", "cars196")
        assert cfg.method.lora.rank == 4 and list(cfg.method.lora.targets) == ["qkv"] and cfg.method.cosine_from_milestones
        assert (cfg.method.loss.ce_weight, cfg.method.loss.rce_weight) == ((0.5, 0.5) if heavy else (1.0, 0.1))
        assert cfg.optim.optimizer.weight_decay == cfg.method.ca.weight_decay == (0.0 if heavy else 5e-4)
        assert cfg.optim.lr.representation == 1e-3 and not cfg.method.ca.mean_scaling
    if method in ("slca", "slcapp"):
        assert cfg.method.ca.logit_norm_tau == (0.05 if bench == "cars196" else 0.1)
    if method == "seq_ft":
        assert cfg.optim.lr.representation == cfg.optim.lr.classifier


def _jobs(sweep: str) -> tuple[object, list[list[str]]]:
    """The job override lists the basic sweeper would launch for ``+sweep=<sweep>``."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose([f"+sweep={sweep}"], hydra_cfg=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return cfg, [list(job) for batch in batches for job in batch]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_expands_to_experiments_times_seeds(sweep):
    from hydra.types import RunMode

    cfg, jobs = _jobs(sweep)
    assert cfg.hydra.mode == RunMode.MULTIRUN  # `clcli train +sweep=...` sweeps without -m
    sizes = [len(str(v).split(",")) for v in cfg.hydra.sweeper.params.values()]
    assert len(jobs) == int(np.prod(sizes)) and len({tuple(j) for j in jobs}) == len(jobs)
    seeds = {int(o.split("=")[1]) for j in jobs for o in j if o.startswith("seed=")}
    assert seeds == ({1993, 1996} if sweep in ("smoke", "slca_lr_curve_offline", "slca_ablation_offline") else
                     {1993} if sweep == "diki_mtil_tiny" else SEEDS)
    experiments = {o.split("=", 1)[1] for j in jobs for o in j if o.startswith("experiment=")}
    assert experiments <= set(EXPERIMENTS)
    if sweep.startswith("slca_lr_curve"):  # the learning-rate figure: methods x representation lrs
        lrs = {float(o.split("=")[1]) for j in jobs for o in j if o.startswith("optim.lr.representation=")}
        assert not experiments and min(lrs) <= 1e-5 and max(lrs) >= 1e-2 and len(lrs) >= 4
        assert {o.split("=")[1] for j in jobs for o in j if o.startswith("method=")} == {"slow_learner", "slca"}
    elif sweep.startswith("slca_ablation"):  # rows = conf/ablation/*.yaml on the preset cells
        rows = {o.split("=")[1] for j in jobs for o in j if o.startswith("+ablation=")}
        assert "full" in rows and len(rows) >= 5 and all((CONF / "ablation" / f"{r}.yaml").is_file() for r in rows)
    elif sweep == "slca_probe":
        assert all("+method.probe.enabled=true" in [o.lower() for o in j] for j in jobs) and len(experiments) == 4
    elif sweep.startswith("slcapp_"):
        assert len(experiments) == 4 and all(e.startswith("slca/slcapp_") and e.endswith(sweep.split("_")[1])
                                             for e in experiments)
    elif sweep.startswith("slca_"):
        assert len(experiments) == 16 and all(e.endswith(sweep.split("_")[1]) for e in experiments)
    elif sweep == "diki_mtil_tiny":  # every row of the table on the tiny CPU benchmark
        assert experiments == {f"diki/tiny_{m}" for m in ("zeroshot", "clip_ft", "zscl", "diki")} | \
            {"diki/moe_adapters_tiny"}
    elif sweep.startswith("diki_"):  # zero-shot, Continual-FT, ZSCL, MoE-Adapters, DIKI on one benchmark
        assert len(experiments) == 5 and len({e.rsplit("_", 1)[1] for e in experiments}) == 1
    elif sweep.startswith("prompts_"):  # tests/test_prompts.py checks these cells
        assert len(experiments) == 24 and all(e.startswith("prompts/") and e.endswith(sweep.split("_")[1]) for e in experiments)
    for job_overrides in (jobs[0], jobs[-1]):
        job = _compose([f"+sweep={sweep}", *job_overrides], hydra_cfg=True)
        assert job.seed == int(next(o for o in job_overrides if o.startswith("seed=")).split("=")[1])
        for o in job_overrides:  # every override of the job is in its composed config
            key, value = o.lstrip("+").split("=", 1)
            if key not in ("experiment", "method", "data", "backbone", "optim", "ablation"):
                got = OmegaConf.select(job, key)
                want = str(float(value) if "lr" in key else value)
                if isinstance(got, bool):  # +method.probe.enabled=true
                    got, want = str(got).lower(), want.lower()
                assert str(got) == want, o
    for job in jobs:  # every job's keys are read by some code (data and weights are not here)
        assert _key_problems(_compose([f"+sweep={sweep}", *job])) == [], job


def test_sweep_run_dirs_are_named_by_experiment_and_seed():
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    _, jobs = _jobs("slca_in21k")
    cfg = _compose(["+sweep=slca_in21k", *jobs[0]], hydra_cfg=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:runtime.choices...}
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=True)
    assert sweep == {"dir": "outputs/sweeps/slca/in21k", "subdir": "slca/seq_ft_cifar100_in21k/seed=1993"}


def test_reproduce_scripts_run_the_sweeps_then_the_table():
    for name, sweeps in (("slca", ["slca_in21k", "slca_mocov3", "prompts_in21k", "prompts_mocov3"]),
                         ("diki", ["diki_mtil", "diki_mtil_order2", "diki_mtil_fewshot"])):
        text = (REPO / "scripts" / f"reproduce_{name}.sh").read_text()
        assert text.startswith("#!") and "set -e" in text
        assert all(s in SWEEPS and s in text for s in sweeps)
        assert f"clcli table outputs/sweeps/{name}" in text
        sweep_dirs = {_compose([f"+sweep={s}"], hydra_cfg=True).hydra.sweep.dir for s in sweeps}
        assert all(d.startswith(f"outputs/sweeps/{name}/") for d in sweep_dirs)  # one table over all of them
