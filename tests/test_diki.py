"""DIKI, the CLIP baselines and the MTIL configs (docs/diki_mtil_protocol.md#overview).

DIKI: Tang et al., ECCV 2024, arXiv 2407.05342. Everything runs on the random-init ``tiny-clip`` and
generated data (``data=synthetic_mtil``) on CPU in seconds; the real MTIL configs are only composed and
validated (no weights, no images).
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from the tests

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clcli.config import check_config
from clcli.data import mtil
from clcli.data.mtil_data import FewShotView, MTILData
from clcli.data.synthetic import SyntheticSource
from clcli.engine import Runtime
from clcli.errors import ConfigError, DataError
from clcli.evaluation import mtil_metrics
from clcli.methods.base import EvalBatch
from clcli.methods.clip_baselines import ZeroShotCLIP
from clcli.methods.diki import DIKI, calibrate, calibration_weight, majority_task

CONF = str(Path(__file__).resolve().parents[1] / "conf")

OPTIM = {  # conf/optim/mtil.yaml with a short schedule
    "lr": {"representation": 5.0},
    "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.0, "weight_decay": 0.0},
    "epochs": 1, "batch_size": 32, "schedule": "cosine_steps", "final_lr_ratio": 1.0e-3,
}


def optim_cfg(**kw):
    return OmegaConf.create({**OPTIM, **kw})


@pytest.fixture(scope="module")
def backbone(tiny_clip):
    return tiny_clip


@pytest.fixture(scope="module")
def scenario(synthetic_mtil):
    return synthetic_mtil


def make_diki(backbone, scenario, **kw) -> DIKI:
    kw.setdefault("optim", optim_cfg())
    method = DIKI(backbone=backbone, runtime=Runtime(), **kw)
    method.prepare_scenario(scenario)
    return method


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


# ------------------------------------------------------------------ calibration
# docs/diki_mtil_protocol.md#calibration-and-task-selection


def test_calibration_weight_formula():
    w = calibration_weight(torch.tensor([512.0, 0.0, -1e6, 1024.0], dtype=torch.float64))
    assert w[0].item() == pytest.approx(0.5, abs=1e-12)
    assert w[1].item() == pytest.approx(1 / (1 + math.e), abs=1e-12)  # 0.2689
    assert round(w[1].item(), 4) == 0.2689
    assert w[2].item() == 0.0 and w[3].item() == pytest.approx(1 / (1 + math.exp(-1)))
    s = torch.linspace(-3000, 3000, 101, dtype=torch.float64)
    assert (calibration_weight(s).diff() >= 0).all()  # monotone
    assert calibration_weight(torch.tensor(100.0), scale=100.0, shift=0.0).item() == pytest.approx(1 / (1 + math.exp(-1)))


def test_gaussian_log_prob_equals_multivariate_normal(backbone, scenario):
    method = make_diki(backbone, scenario)
    method.begin_task(scenario.tasks[0])  # fits task 0's Gaussian on frozen normalised features
    method.begin_task(scenario.tasks[1])
    stats = method.stats
    assert stats.keys == [0, 1] and stats.ridge == 1e-7
    x = torch.stack([backbone.features(scenario.tasks[i].test[j][0][None])[0] for i in (0, 1, 2) for j in (0, 5)])
    ours = stats.log_prob(x.double(), [0, 1])
    for k in (0, 1):
        ref = torch.distributions.MultivariateNormal(stats.mean[k], covariance_matrix=stats.cov[k].double())
        torch.testing.assert_close(ours[:, k], ref.log_prob(x.double()), rtol=1e-9, atol=1e-6)


def test_majority_vote_and_per_sample_weights(backbone, scenario, monkeypatch):
    assert majority_task(torch.tensor([2, 0, 2, 1, 2, 0])) == 2
    assert majority_task(torch.tensor([1, 0, 0, 1])) == 0  # a tie goes to the lowest task id

    method = make_diki(backbone, scenario)
    for _t in scenario.tasks:
        method.model.add_task()
    scores = torch.tensor([[900.0, 100.0, 50.0],   # votes 0
                           [10.0, 700.0, 20.0],    # votes 1
                           [0.0, 512.0, -9.0],     # votes 1
                           [-50.0, -60.0, 200.0],  # votes 2
                           [1.0, 300.0, 2.0]],     # votes 1
                          dtype=torch.float64)

    class FakeStats:
        keys = [0, 1, 2]

        def log_prob(self, x, keys):
            assert keys == [0, 1, 2]
            return scores

    method.stats = FakeStats()
    tasks, best, w = calibrate(method.stats, torch.zeros(5, 4), [0, 1, 2], 512.0, 1.0)
    assert tasks.tolist() == [0, 1, 1, 2, 1]
    expected_w = torch.sigmoid(torch.tensor([900.0, 700.0, 512.0, 200.0, 300.0]) / 512 - 1)
    torch.testing.assert_close(w, expected_w)

    calls = {}
    real_image, real_text = method.model.encode_image, method.model.encode_text

    def spy_image(images, task=None, weight=None, normalize=True):
        calls["image"] = (task, weight.clone())
        return real_image(images, task=task, weight=weight, normalize=normalize)

    def spy_text(tokens, task=None, weight=None, normalize=True):
        calls["text"] = (task, weight)
        return real_text(tokens, task=task, weight=weight, normalize=normalize)

    monkeypatch.setattr(method.model, "encode_image", spy_image)
    monkeypatch.setattr(method.model, "encode_text", spy_text)
    images = torch.stack([scenario.tasks[1].test[i][0] for i in range(5)])
    logits = method.predict(EvalBatch(images, scenario.tasks[1], scenario.tasks[1].labels))
    assert logits.shape == (5, scenario.tasks[1].num_classes)
    assert calls["image"][0] == 1  # the majority task for the whole batch
    torch.testing.assert_close(calls["image"][1], expected_w)  # each sample its own max-S weight
    assert calls["text"][0] == 1
    assert float(calls["text"][1]) == pytest.approx(float(expected_w.mean()))  # text: batch mean


def test_sample_selection_equals_batch_selection_one_sample_at_a_time(backbone, scenario):
    torch.manual_seed(1)
    method = make_diki(backbone, scenario, calibration={"task_select": "sample"})
    for t in scenario.tasks[:2]:
        method.begin_task(t)
        with torch.no_grad():  # non-zero residual values so that tasks and weights matter
            for p in method.model.residual_parameters(t.index):
                p[1].normal_(0.0, 0.5)
    batch = make_diki(backbone, scenario)  # same residuals and Gaussians, batch-wise selection
    batch.model, batch.stats = method.model, method.stats
    task = scenario.tasks[2]
    images = torch.stack([task.test[i][0] for i in range(0, len(task.test), 3)])
    per_sample = method.predict(EvalBatch(images, task, task.labels))
    one_by_one = torch.cat([batch.predict(EvalBatch(images[i : i + 1], task, task.labels)) for i in range(len(images))])
    torch.testing.assert_close(per_sample, one_by_one, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ training
# docs/diki_mtil_protocol.md#training


def test_training_task_changes_only_its_residuals(backbone, scenario):
    torch.manual_seed(2)
    clip_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    method = make_diki(backbone, scenario, param_dtype="fp32")
    t0, t1 = scenario.tasks[0], scenario.tasks[1]
    method.begin_task(t0)
    method.train_task(t0)
    method.end_task(t0)
    method.begin_task(t1)
    before = [[p.detach().clone() for p in method.model.residual_parameters(t)] for t in (0, 1)]
    method.train_task(t1)
    after = [list(method.model.residual_parameters(t)) for t in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[0]))  # task 0 bit-identical
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(after[1], before[1]))  # task 1's values moved
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, clip_before[k]), k  # frozen CLIP bit-identical
    assert not any(p.requires_grad for p in backbone.parameters())
    summary = method.summary()
    per_task = 2 * 8 * 64 * 3 * 2  # 2 (K, V) x 8 tokens x width 64 x 3 blocks x 2 encoders
    assert summary["residual_parameters_per_task"] == {"leaves": per_task, "minerals": per_task}
    assert summary["depth_vision"] == summary["depth_text"] == 3  # null = DIKI's 8 capped at 3 blocks
    assert len(summary["tasks"][1]["val_acc"]) == 1 and summary["tasks"][1]["best_epoch"] == 0
    json.dumps(summary)


def test_lr_schedule_per_step_cosine(backbone, scenario):
    method = make_diki(backbone, scenario, optim=optim_cfg(epochs=10))
    method.model.add_task()
    opt, sched = method.make_optimizer(method.model.residual_parameters(0), steps_per_epoch=7)
    assert sched.per_step and len(opt.param_groups) == 1
    total, lrs = 70, []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(5.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # at step S = 10 x len(loader)
    s = 35
    assert lrs[s] == pytest.approx(0.005 + 0.5 * (5.0 - 0.005) * (1 + math.cos(math.pi * s / total)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_depth_beyond_backbone_is_refused(backbone, scenario):
    with pytest.raises(ConfigError, match="depth_vision=8 exceeds the 3 blocks"):
        DIKI(backbone=backbone, optim=optim_cfg(), runtime=Runtime(), depth_vision=8)
    with pytest.raises(ConfigError, match="task_select"):
        DIKI(backbone=backbone, optim=optim_cfg(), runtime=Runtime(), calibration={"task_select": "vote"})


# ------------------------------------------------------------------ zero-shot
# docs/diki_mtil_protocol.md#residual-attention


def test_zeroshot_equals_plain_clip_and_untrained_diki(backbone, scenario):
    zs = ZeroShotCLIP(backbone=backbone, optim=None, runtime=Runtime())
    zs.prepare_scenario(scenario)
    task = scenario.tasks[2]
    images = torch.stack([task.test[i][0] for i in range(12)])
    with torch.no_grad():
        txt = backbone.model.encode_text(backbone.tokenize(task.prompts()), normalize=True)  # full 77 tokens
        img = backbone.model.encode_image(images, normalize=True)
        plain = backbone.logit_scale * img @ txt.T
    ours = zs.predict(EvalBatch(images, task, task.labels))
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(1), plain.argmax(1))

    method = make_diki(backbone, scenario)
    method.begin_task(scenario.tasks[0])  # a Gaussian and residuals with V_r = 0: still zero-shot CLIP
    torch.testing.assert_close(method.predict(EvalBatch(images, task, task.labels)), plain, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ protocol
# docs/diki_mtil_protocol.md#the-protocol-choice


def _hand_classifier(model, tokenize, prompt_sets, task, weight):
    """By hand: every template's full 77-token prompts through DIKI's text tower with ``task``'s residual
    at ``weight``; one template = its features, several = the re-normalised mean of the normalised ones."""
    feats = [model.encode_text(tokenize(p), task=task, weight=weight) for p in prompt_sets]
    if len(feats) == 1:
        return feats[0]
    mean = torch.stack([f / f.norm(dim=-1, keepdim=True) for f in feats]).mean(0)
    return mean / mean.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("task_select", ["batch", "sample"])
def test_diki_evaluates_with_the_protocols_classifier(backbone, task_select):
    """protocol=zscl: DIKI's logits use the template ensemble built through its own text tower with the
    selected task's residual (second implementation by hand); protocol=diki: the first template only."""
    from clcli.data.mtil_data import SyntheticMTILData

    torch.manual_seed(4)
    by = {p: SyntheticMTILData(protocol=p).build(backbone) for p in ("zscl", "diki")}
    method = make_diki(backbone, by["zscl"], calibration={"task_select": task_select})
    for t in by["zscl"].tasks[:2]:
        method.begin_task(t)
        with torch.no_grad():  # non-zero residual values so that tasks and weights matter
            for p in method.model.residual_parameters(t.index):
                p[1].normal_(0.0, 0.5)
    single = make_diki(backbone, by["diki"], calibration={"task_select": task_select})
    single.model, single.stats = method.model, method.stats  # same residuals and Gaussians
    task = by["zscl"].tasks[2]
    assert len(task.eval_prompt_sets()) == 3
    images = torch.stack([task.test[i][0] for i in range(0, len(task.test), 2)])
    model, scale = method.model, method.model.logit_scale
    with torch.no_grad():
        frozen = backbone.model.encode_image(images, normalize=True)
        tasks, _, w = calibrate(method.stats, frozen, method.stats.keys, 512.0, 1.0)
        assert len(set(tasks.tolist())) == 2  # both learned tasks are selected by some sample
        hand = {}
        for protocol, prompt_sets in (("zscl", task.eval_prompt_sets()), ("diki", [task.prompts()])):
            if task_select == "batch":
                k = majority_task(tasks)
                img = model.encode_image(images, task=k, weight=w)
                hand[protocol] = scale * img @ _hand_classifier(model, backbone.tokenize, prompt_sets, k, w.mean()).T
            else:
                hand[protocol] = torch.cat([
                    scale * model.encode_image(images[b : b + 1], task=int(tasks[b]), weight=w[b : b + 1])
                    @ _hand_classifier(model, backbone.tokenize, prompt_sets, int(tasks[b]), w[b]).T for b in range(len(images))])
        ours = method.predict(EvalBatch(images, task, task.labels))
        first = single.predict(EvalBatch(images, by["diki"].tasks[2], task.labels))
    torch.testing.assert_close(ours, hand["zscl"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first, hand["diki"], rtol=1e-4, atol=1e-4)
    assert (ours - first).abs().max() > 1e-2  # the ensemble is not the first template
    # zero-shot CLIP honours the protocol the same way: frozen CLIP's ensemble classifier
    zs = ZeroShotCLIP(backbone=backbone, optim=None, runtime=Runtime(), feature_cache="off")
    zs.prepare_scenario(by["zscl"])
    with torch.no_grad():
        plain = scale * frozen @ _hand_classifier(model, backbone.tokenize, task.eval_prompt_sets(), None, None).T
        torch.testing.assert_close(zs.predict(EvalBatch(images, task, task.labels)), plain, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ end to end
# docs/metrics.md#mtil-transfer


@pytest.mark.parametrize("method", ["diki", "zeroshot", "clip_ft"])
def test_end_to_end_synthetic_mtil(method, tmp_path):
    from clcli.train import run

    cfg = compose_cfg([f"method={method}", "data=synthetic_mtil", "backbone=tiny_clip", "device=cpu",
                       "checkpoint.keep=all"])  # all: the resume below starts from task_01.pt
    assert check_config(cfg) == []
    results = run(cfg, tmp_path, {"method": method, "data": "synthetic_mtil", "backbone": "tiny_clip"})
    on_disk = json.loads((tmp_path / "results.json").read_text())
    acc = np.array(on_disk["accuracy_matrix"], dtype=float)
    assert acc.shape == (3, 3) and not np.isnan(acc).any()  # every dataset after every task
    m = results["metrics"]
    assert all(isinstance(m[k], float) for k in ("transfer", "avg", "last"))
    assert on_disk["scenario"]["kind"] == "domain_class_incremental"
    if method == "zeroshot":
        assert (acc == acc[0]).all()  # nothing is trained: identical rows
    if method == "diki":
        assert on_disk["method_summary"]["residual_parameters_total"] == 3 * 2 * 8 * 64 * 3 * 2
        # resume after task 1 (state_dict/load_state_dict through the run's checkpoints): same matrix
        (tmp_path / "results.json").unlink()
        (tmp_path / "checkpoints" / "task_02.pt").unlink()  # task_02.stats.pt stays: a leftover, ignored
        cfg.resume = True
        again = run(cfg, tmp_path, {"method": method, "data": "synthetic_mtil", "backbone": "tiny_clip"})
        assert again["accuracy_matrix"] == results["accuracy_matrix"]
        assert again["method_summary"]["tasks"] == results["method_summary"]["tasks"]  # losses bit-equal


# ------------------------------------------------------------------ metrics and configs


def test_mtil_metrics_golden_zscl_zero_shot_row():
    row = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]
    m = mtil_metrics(np.array([row] * 11))
    assert (m["transfer"], m["avg"], m["last"]) == (69.4, 65.3, 65.3)


@pytest.mark.parametrize("data,order,shots", [
    ("mtil", mtil.MTIL_ORDER_I, -1),
    ("mtil_order2", mtil.MTIL_ORDER_II, -1),
    ("mtil_fewshot", mtil.MTIL_FEWSHOT_DATASETS, 16),
])
def test_mtil_configs_compose_and_report_missing_data(data, order, shots, tmp_path):
    from hydra.utils import instantiate

    weights = tmp_path / "ViT-B-16.pt"  # the hub weights are not on this machine: a local file stands in
    weights.write_bytes(b"0")
    clip = ["backbone=clip_vit_b16", f"backbone.checkpoint_path={weights}", "backbone.pretrained=null"]
    cfg = compose_cfg(["method=diki", f"data={data}", *clip, f"paths.data_dir={tmp_path}"])
    assert cfg.backbone.model_name == "ViT-B-16-quickgelu" and "classifier" not in cfg.optim.lr
    assert cfg.optim.optimizer == {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.0,
                                   "weight_decay": 0.0}
    assert cfg.optim.lr.representation == 5.0 and cfg.optim.schedule == "cosine_steps" and cfg.optim.epochs == 10
    assert cfg.method.n_tokens == 8 and cfg.method.calibration.scale == 512.0
    data_obj = instantiate(cfg.data)
    assert data_obj.datasets == list(order) and data_obj.num_shots == shots
    problems = check_config(cfg)
    text = "\n".join(problems)
    for name in order:  # every dataset of the order is reported, with its folder under data_dir
        assert str(tmp_path / cfg.data.dirs[name]) in text, name
    assert all(p.split(":")[0] in order for p in problems), problems  # nothing but missing data
    for other in ("zeroshot", "clip_ft"):
        cfg2 = compose_cfg([f"method={other}", f"data={data}", *clip, f"paths.data_dir={tmp_path}"])
        assert check_config(cfg2) == problems


@pytest.mark.parametrize("method", ["diki", "zeroshot", "clip_ft"])
def test_clip_methods_refuse_timm_backbones_and_a_classifier_lr(method):
    cfg = compose_cfg([f"method={method}", "data=synthetic_mtil", "backbone=tiny_vit"])
    assert any(f"method={method} needs a CLIP backbone" in p and "TimmBackbone" in p for p in check_config(cfg))
    if method != "zeroshot":  # zeroshot trains nothing: it reads no optim key at all
        cfg = compose_cfg([f"method={method}", "data=synthetic_mtil", "backbone=tiny_clip", "+optim.lr.classifier=1"])
        assert [p for p in check_config(cfg) if "classifier" in p] == [
            f"optim.lr.classifier: method={method} has no classifier head (the prompts' text features classify), "
            "so nothing reads it; remove it (~optim.lr.classifier)."]


def test_clip_ft_trains_with_the_optimizer_component(tiny_clip):
    from hydra.utils import get_class

    from clcli import optim as optim_lib

    cfg = compose_cfg(["method=clip_ft", "data=synthetic_mtil", "backbone=tiny_clip"])
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and check_config(cfg) == []
    cfg = compose_cfg(["method=clip_ft", "data=synthetic_mtil", "backbone=tiny_clip", "optim/optimizer=sgd_plain"])
    assert cfg.optim.optimizer._target_ == "torch.optim.SGD"  # the command line wins over the method's choice
    method = get_class(cfg.method._target_)(backbone=tiny_clip, optim=cfg.optim, runtime=Runtime())
    opt = optim_lib.make_optimizer(cfg.optim, [([torch.nn.Parameter(torch.zeros(2))], 0.5)])
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.0
    assert method.summary()["optimizer"] == "torch.optim.SGD"


def test_few_shot_view_and_missing_data_errors(backbone, tmp_path):
    src = SyntheticSource(num_classes=3, train_per_class=20, val_per_class=6, test_per_class=5, seed=3)
    fs = FewShotView(src, shots=16, seed=1)
    assert np.bincount(fs.load("train").labels).tolist() == [16, 16, 16]
    assert np.bincount(fs.load("val").labels).tolist() == [4, 4, 4]  # min(16, 4) val shots
    assert len(fs.load("test")) == 15
    assert fs.load("train") is fs.load("train")  # drawn once
    data = MTILData("x", order=["dtd", "eurosat"], data_dir=str(tmp_path))
    with pytest.raises(DataError, match="dtd"):
        data.build(backbone)
    assert MTILData("x", order="III", num_shots=0).problems()[:2] == [
        "data.order: unknown order 'III' (known: I, II, FS, or a list of dataset names).",
        "data.num_shots: -1 (full training sets) or an integer >= 1, got 0.",
    ]


def test_validate_refuses_diki_on_a_class_incremental_benchmark(capsys):
    """The scenario kind is known from the data config, so validate (and train, before anything is
    built) refuses DIKI on a class-incremental benchmark; an MTIL benchmark passes."""
    code, out = run_cli(["validate", "method=diki", "data=synthetic", "backbone=tiny_clip", "device=cpu",
                         "~optim.lr.classifier"], capsys)
    assert code == 2 and "method=diki needs a domain-class incremental (MTIL) scenario" in " ".join(out.split()), out
    code, out = run_cli(["validate", "method=diki", "data=synthetic_mtil", "backbone=tiny_clip", "device=cpu"], capsys)
    assert code == 0, out
