"""The MTIL protocol choice (docs/diki_mtil_protocol.md#the-protocol-choice), the reference's few-shot
draws (docs/diki_mtil_protocol.md#few-shot-draws), the protocol column of `clcli table`, the presets."""
from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, compose

from clcli.aggregate.group import group_runs
from clcli.aggregate.tables import headline_table
from clcli.data import mtil
from clcli.data.base import SplitData
from clcli.data.mtil_data import MTILData, SyntheticMTILData
from clcli.data.synthetic import SyntheticSource
from clcli.methods.clip_baselines import PromptBank


def test_ensemble_classifier_is_the_normalised_mean_of_normalised_text_features(tiny_clip):
    scenario = SyntheticMTILData(protocol="zscl").build(tiny_clip)
    bank = PromptBank(tiny_clip, scenario)
    task = scenario.tasks[1]
    assert task.eval_templates == [task.templates[0], "a photo of the {c}.", "an image of a {c}."]
    with torch.no_grad():
        ours = bank.classifier(tiny_clip.encode_text, task.labels, "cpu")
        per_template = []
        for template in task.eval_templates:  # by hand: full 77-token prompts, open_clip's own encoder
            prompts = [template.format(c=c).replace("_", " ") for c in task.class_names]
            per_template.append(F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenize(prompts)), dim=-1))
        mean = torch.stack(per_template).mean(0)
        hand = mean / mean.norm(dim=-1, keepdim=True)
        single = bank.classifier(tiny_clip.encode_text, SyntheticMTILData().build(tiny_clip).tasks[1].labels, "cpu")
    assert torch.allclose(ours, hand, atol=1e-5)
    assert not torch.allclose(ours, per_template[0], atol=1e-3)  # not the first template alone
    diki = PromptBank(tiny_clip, SyntheticMTILData().build(tiny_clip))
    with torch.no_grad():
        first = diki.classifier(tiny_clip.encode_text, task.labels, "cpu")
    assert torch.allclose(first, per_template[0], atol=1e-5) and single.shape == first.shape
    assert bank.ensemble(task.labels) and not diki.ensemble(task.labels)


def test_protocol_recorded_and_checked(tiny_clip):
    s = SyntheticMTILData(protocol="zscl").build(tiny_clip)
    assert s.manifest()["protocol"]["name"] == "zscl" and s.manifest()["protocol"]["eval_templates"] == "ensemble"
    assert all(len(t.eval_prompt_sets()) == 3 for t in s.tasks)  # every task carries its ensemble
    assert all(t.eval_templates is None for t in SyntheticMTILData().build(tiny_clip).tasks)
    assert SyntheticMTILData().build(tiny_clip).manifest()["protocol"]["eval_templates"] == "first"
    (problem,) = SyntheticMTILData(protocol="coop").problems()
    assert problem.startswith("data.protocol:") and "zscl" in problem
    assert MTILData("x", protocol="ZSCL").problems()[0].startswith("data.protocol:")
    for name, templates in mtil.ZSCL_TEMPLATES.items():  # the ensemble starts with DIKI's single template
        assert templates[0] == mtil.MTIL_DATASETS[name].template and len(set(templates)) == len(templates)
    assert [len(mtil.ZSCL_TEMPLATES[n]) for n in mtil.MTIL_ORDER_I] == [2, 34, 18, 8, 3, 1, 1, 1, 1, 9, 2]


def _coop_fewshot(items_labels, k, rng_module):
    """CoOp's draw as DIKI runs it, written independently: items grouped by label in order of first
    appearance (a defaultdict), ``random.sample`` of k per label from the *global* ``random``."""
    tracker = defaultdict(list)
    for i, lab in items_labels:
        tracker[lab].append(i)
    out = []
    for _, items in tracker.items():
        out.extend(rng_module.sample(items, k) if len(items) >= k else items)
    return out


def test_few_shot_draws_follow_the_reference_rule_and_stream(monkeypatch):
    a = SyntheticSource(num_classes=3, train_per_class=9, val_per_class=6, test_per_class=2, seed=1, name="a")
    b = SyntheticSource(num_classes=2, train_per_class=6, val_per_class=3, test_per_class=2, seed=2, name="b")
    # labels out of order and classes of different sizes: the visiting order and the "keep all" rule matter
    perm = np.random.RandomState(0).permutation(len(a.load("train")))
    a_train = a.load("train").subset(perm[:-2])
    a.load = lambda split, _orig=a.load: a_train if split == "train" else _orig(split)
    data = MTILData("fs", order=["dtd", "eurosat"], num_shots=4, few_shot_seed=42)
    monkeypatch.setattr(data, "_sources", lambda: [("dtd", a), ("eurosat", b)])
    monkeypatch.setattr("clcli.data.mtil_data._eval_transform", lambda backbone: None)
    scenario = data.build(None)
    random.seed(42)  # the reference: one global stream, dataset after dataset, train then val
    expected = []
    for src in (a, b):
        for split, k in (("train", 4), ("val", 4)):
            sd = src.load(split)
            expected.append([sd.items[i] for i in _coop_fewshot(enumerate(sd.labels.tolist()), k, random)])
    got = [list(t.train.split.items) for t in scenario.tasks]
    got_val = [list(t.val.split.items) for t in scenario.tasks]
    for ours, ref in zip([got[0], got_val[0], got[1], got_val[1]], expected):
        assert len(ours) == len(ref) and all(np.array_equal(x, y) for x, y in zip(ours, ref))
    assert np.bincount(scenario.tasks[1].val.labels - scenario.tasks[1].labels.start).tolist() == [3, 3]  # kept all
    other = MTILData("fs", order=["dtd", "eurosat"], num_shots=4, few_shot_seed=43)  # ${seed}: per-run draws
    monkeypatch.setattr(other, "_sources", lambda: [("dtd", a), ("eurosat", b)])
    assert not all(np.array_equal(x, y) for x, y in zip(other.build(None).tasks[0].train.split.items, got[0]))


def test_few_shot_reference_on_a_toy_split():
    split = SplitData([f"img{i}" for i in range(10)], np.array([2, 0, 2, 1, 0, 2, 1, 0, 2, 1]))
    rng = random.Random(5)
    ours = mtil.few_shot_reference(split, 2, rng)
    random.seed(5)
    ref = _coop_fewshot(enumerate(split.labels.tolist()), 2, random)
    assert ours.items == [f"img{i}" for i in ref]
    assert ours.labels.tolist()[:2] == [2, 2]  # label 2 appears first, so it is drawn first
    with pytest.raises(ValueError):
        mtil.few_shot_reference(split, 0, rng)


def _result(method, protocol, transfer, paper_protocol=None):
    return {"run": {"method": method, "data": "synthetic_mtil"}, "config": {"method": {"name": method},
            "data": {"protocol": protocol}}, "seed": 1, "status": "complete",
            "metrics": {"transfer": transfer, "avg": 50.0, "last": 60.0},
            "scenario": {"kind": "domain_class_incremental", "protocol": {"name": protocol, "splits": {"a": "synthetic"}}},
            "paper": {"transfer": 40.0, "protocol": paper_protocol} if paper_protocol else None}


def test_table_has_a_protocol_column():
    groups = group_runs([_result("diki", "diki", 30.0, "diki"), _result("zscl", "zscl", 40.0, "zscl"),
                         _result("zeroshot", "diki", 20.0, "zscl")])
    table = headline_table(groups, "domain_class_incremental")
    col = table.header.index("protocol")
    cells = {row[0]: row[col] for row in table.rows}
    assert cells["method=diki"] == "diki" and cells["method=zscl"] == "zscl"
    assert cells["method=zeroshot"] == "diki (paper: zscl)"


@pytest.mark.parametrize("sweep", ["diki_mtil", "diki_mtil_order2", "diki_mtil_fewshot", "diki_mtil_tiny"])
def test_diki_sweeps_compose_and_validate(sweep):
    from omegaconf import OmegaConf

    from clcli.config import check_config

    raw = OmegaConf.load(CONF / "sweep" / f"{sweep}.yaml")
    experiments = str(raw.hydra.sweeper.params["experiment"]).split(",")
    rows = ["zeroshot", "clip_ft", "zscl", "moe_adapters", "diki"]  # the table's rows, in this order
    assert [next(r for r in rows if e.split("/")[1].replace("tiny_", "").startswith(r)) for e in experiments] == rows
    for exp in experiments:
        cfg = compose([f"experiment={exp}"])
        # the data, CLIP weights and user-provided reference files are not on this machine
        problems = [p for p in check_config(cfg) if not p.startswith(("data:", "backbone", "method.ref_",
                                                                       "method.ddas.alexnet_weights",
                                                                       "method.ddas.tinyimagenet_dir"))
                    and " is missing" not in p and "not cached" not in p]
        assert problems == [], (exp, problems)
        if "moe_adapters" in exp:  # MoE-Adapters' recipe through the shared optim keys (optim=mtil_moe)
            assert cfg.data.protocol == "zscl" and cfg.optim.schedule == "warmup_cosine"
            assert cfg.optim.label_smoothing == 0.2 and cfg.optim.optimizer.weight_decay == 0.0
            if not exp.endswith("tiny"):
                assert cfg.optim.iterations == (500 if exp.endswith("fewshot") else 1000)
                assert cfg.optim.batch_size == 64 and cfg.optim.warmup == 100 and cfg.optim.lr.representation == 1e-3
                assert cfg.data.name == {"order1": "mtil_order1", "order2": "mtil_order2",
                                         "fewshot": "mtil_fewshot"}[exp.rsplit("_", 1)[1]]
                assert cfg.data.num_shots == (16 if exp.endswith("fewshot") else -1)
                assert "protocol" in cfg.paper and "note" in cfg.paper and "unverified" in cfg.paper
                if not exp.endswith("fewshot"):  # published (third-party transcriptions, flagged)
                    assert cfg.paper.protocol == "zscl" and cfg.paper.source and set(cfg.paper.unverified) == \
                        {"transfer", "avg", "last"} and "Secondary source" in cfg.paper.note
        if "clip_ft" in exp or "zscl" in exp:
            assert cfg.data.protocol == "zscl" and cfg.optim.schedule == "warmup_cosine"
            if not exp.startswith("diki/tiny"):
                assert cfg.optim.iterations == 1000 and cfg.optim.batch_size == 64 and cfg.optim.label_smoothing == 0.2
                assert dict(cfg.method.lr_by_dataset) == {"aircraft": 5e-5, "mnist": 5e-5}
                assert cfg.optim.lr.representation == 1e-5 and cfg.method.augment == "zscl_rrc"
                assert cfg.paper.protocol in ("zscl", None)


@pytest.mark.slow
def test_tiny_diki_table_prints_every_row_with_its_protocol(tmp_path, capsys, monkeypatch):
    """`clcli train +sweep=diki_mtil_tiny` then `clcli table`: the five rows of DIKI's table (a few
    minutes on CPU), each with the protocol it ran under."""
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["train", "+sweep=diki_mtil_tiny", f"hydra.sweep.dir={tmp_path / 'tiny'}"], capsys)
    assert code == 0, out[-3000:]
    code, out = run_cli(["table", str(tmp_path / "tiny")], capsys, stdout_only=True)
    assert code == 0, out
    rows = {}  # headline table: group | seeds | protocol | transfer | avg | last
    for line in out.split("MTIL per dataset")[0].splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 6 and cells[1].startswith("diki/"):
            rows[cells[1]] = cells[3]
    assert rows == {"diki/tiny_zeroshot": "diki", "diki/tiny_clip_ft": "zscl", "diki/tiny_zscl": "zscl",
                    "diki/moe_adapters_tiny": "zscl", "diki/tiny_diki": "diki"}, out
