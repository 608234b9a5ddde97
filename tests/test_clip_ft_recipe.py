"""ZSCL's Continual-FT recipe (docs/diki_mtil_protocol.md#continual-ft-zscl-recipe): the iteration loop,
the warm-up + cosine schedule, label smoothing, per-dataset lrs, the crop, what trains."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose, run_tiny
from hydra.utils import get_class

from clcli import optim as optim_lib
from clcli.engine import Runtime, fit_iterations, seed_everything
from clcli.methods.clip_baselines import ContinualCLIPFT, zscl_train_transform

RECIPE = ["method=clip_ft", "data=synthetic_mtil", "backbone=tiny_clip", "optim=synthetic_mtil_zscl",
          "optim.lr.representation=1e-3", "method.augment=zscl_rrc", "device=cpu"]


def _lrs(schedule_steps: int, lr: float, warmup: int, iterations: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = optim_lib.scheduler(opt, "warmup_cosine", 1, 1, warmup=warmup, iterations=iterations)
    out = []
    for _ in range(schedule_steps):
        out.append(opt.param_groups[0]["lr"])  # the lr the step uses
        opt.step()
        sched.step()
    return out


def test_warmup_cosine_values_by_hand():
    lrs = _lrs(1001, 1e-5, 100, 1000)
    # ZSCL at lr 1e-5: 1e-7 at step 0, 1e-5 at steps 99 and 100, 5e-6 at 550, 0 at 1000.
    assert lrs[0] == pytest.approx(1e-7, rel=1e-9)
    assert lrs[49] == pytest.approx(5e-6, rel=1e-9)  # (49 + 1) / 100
    assert lrs[99] == pytest.approx(1e-5, rel=1e-9) and lrs[100] == pytest.approx(1e-5, rel=1e-9)
    assert lrs[550] == pytest.approx(5e-6, rel=1e-9)
    assert lrs[325] == pytest.approx(1e-5 * 0.5 * (1 + math.cos(math.pi * 225 / 900)), rel=1e-9)
    assert lrs[1000] == pytest.approx(0.0, abs=1e-20)
    assert all(b <= a for a, b in zip(lrs[100:], lrs[101:]))  # monotone after the warm-up


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def forward(self, x, y):
        self.seen.append(y.tolist())
        return (self.w - 1).pow(2).sum() + 0 * x.sum()


def test_fit_iterations_cycles_the_loader():
    ds = torch.utils.data.TensorDataset(torch.zeros(6, 1), torch.arange(6))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True)
    step = _Recorder()
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    after = []
    torch.manual_seed(0)
    passes = fit_iterations(step, loader, iterations=7, optimizer=opt, scheduler=None, rt=Runtime(), where="t",
                            num_classes=2, after_step=after.append)
    assert after == list(range(8))  # steps 0..iterations inclusive
    assert len(step.seen) == 8 and len(passes) == 1  # 3 + 3 + 2 batches, one fit epoch
    for k in (0, 3):  # every full pass sees each item once, in a fresh order
        assert sorted(sum(step.seen[k : k + 3], [])) == list(range(6))
    assert sum(step.seen[0:3], []) != sum(step.seen[3:6], [])  # re-shuffled (seed 0)


def test_label_smoothing_and_logits_of_the_step(tiny_clip, synthetic_mtil):
    cfg = compose(RECIPE)
    assert cfg.optim.label_smoothing == 0.2 and cfg.optim.iterations == 12
    method = ContinualCLIPFT(copy.deepcopy(tiny_clip), cfg.optim, Runtime(), augment="zscl_rrc")
    method.prepare_scenario(synthetic_mtil)
    task = synthetic_mtil.tasks[1]
    step = method.make_step(task)
    x = torch.stack([task.train[i][0] for i in range(4)])
    y = torch.as_tensor([task.train[i][1] for i in range(4)])
    bb = method.backbone
    img = F.normalize(bb.model.encode_image(x), dim=-1)
    txt = F.normalize(bb.model.encode_text(bb.tokenize(task.prompts())), dim=-1)  # full 77 tokens
    logits = bb.logit_scale * img @ txt.T
    target = y - task.labels.start
    loss = step(x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, target, label_smoothing=0.2), atol=1e-5)
    logp = F.log_softmax(logits, 1)  # by hand: (1 - ε)·NLL + ε·mean over classes of −log p
    hand = (0.8 * -logp[torch.arange(4), target] + 0.2 * -logp.mean(1)).mean()
    assert torch.allclose(loss, hand, atol=1e-5)
    assert not torch.allclose(loss, F.cross_entropy(logits, target), atol=1e-3)


def test_lr_by_dataset_trainable_and_crop(tiny_clip, synthetic_mtil):
    cfg = compose(RECIPE + ["method.lr_by_dataset={minerals: 5.0e-3}"])
    method = get_class(cfg.method._target_)(copy.deepcopy(tiny_clip), cfg.optim, Runtime(),
                                            lr_by_dataset=cfg.method.lr_by_dataset, augment="zscl_rrc")
    method.prepare_scenario(synthetic_mtil)
    assert [method.task_lr(t) for t in synthetic_mtil.tasks] == [1e-3, 5e-3, 1e-3]
    names = {n for n, p in method.backbone.model.named_parameters()}
    trained = {id(p) for p in method._trainable()}
    assert {n for n, p in method.backbone.model.named_parameters() if id(p) not in trained} == {"logit_scale"}
    assert len(names) > 10
    scale = method.backbone.model.logit_scale.detach().clone()
    before = {n: p.detach().clone() for n, p in method.backbone.model.named_parameters()}
    seed_everything(0)
    method.train_task(synthetic_mtil.tasks[1])
    rec = method.history[-1]
    assert rec["lr"] == 5e-3 and len(rec["train_loss"]) >= 1
    assert torch.equal(method.backbone.model.logit_scale, scale)  # exp(logit_scale) never trains
    changed = [n for n, p in method.backbone.model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == names - {"logit_scale"}  # both towers, embeddings, projections, norms
    t = zscl_train_transform(method.backbone)
    rrc = t.transforms[0]
    assert rrc.scale == (0.9, 1.0) and rrc.interpolation.value == "bicubic" and rrc.size == (32, 32)
    assert method.train_data(synthetic_mtil.tasks[0]).transform is not synthetic_mtil.tasks[0].train.transform
    bad = ContinualCLIPFT.config_problems(cfg.optim, type(tiny_clip), lr_by_dataset={"aircraft": 0}, augment="flip")
    assert any("method.lr_by_dataset.aircraft" in p for p in bad) and any("method.augment" in p for p in bad)


def test_recipe_learns_on_synthetic_mtil(tmp_path):
    res = run_tiny(tmp_path, RECIPE)
    m = np.array(res["accuracy_matrix"], dtype=float)
    assert m.shape == (3, 3) and not np.isnan(m).any()
    assert {"transfer", "avg", "last"} <= set(res["metrics"])
    summary = res["method_summary"]
    assert summary["schedule"]["iterations"] == 12 and summary["schedule"]["label_smoothing"] == 0.2
    assert summary["augment"] == "zscl_rrc"
    # it learns: each dataset's accuracy right after training it beats chance (1/4, 1/3, 1/5)
    chance = [25.0, 100 / 3, 20.0]
    assert sum(m[i, i] > chance[i] + 1 for i in range(3)) >= 2


@pytest.mark.parametrize("method,extra", [("diki", ["data=synthetic_mtil", "backbone=tiny_clip"]),
                                          ("zeroshot", ["data=synthetic_mtil", "backbone=tiny_clip"]),
                                          ("slca", []), ("l2p", [])])
def test_iteration_keys_are_refused_for_methods_that_train_by_epochs(method, extra):
    """optim.iterations / optim.label_smoothing set with a method that does not read them (its class's
    optim_keys) is a `clcli validate` problem naming the key and the methods that read it."""
    from clcli.config import check_config

    problems = check_config(compose([f"method={method}", *extra, "+optim.iterations=5", "+optim.label_smoothing=0.1"]))
    for key in ("iterations", "label_smoothing"):
        mine = [p for p in problems if p.startswith(f"optim.{key}: method={method} ")]
        assert len(mine) == 1 and "only clip_ft, moe_adapters, zscl do" in mine[0], problems
    assert not any(p.startswith("optim.iterations") for p in check_config(compose(RECIPE)))  # clip_ft reads it
    cfg = compose([f"method={method}", *extra, "+optim.iterations=null"])  # null = epoch-based: fine
    assert not any(p.startswith("optim.iterations") for p in check_config(cfg))
