"""MoE-Adapters (docs/moe_adapters.md): adapters and routers, activate-and-freeze, DDAS, presets.

Yu et al., CVPR 2024, arXiv 2403.11549. Everything runs on the random-init ``tiny-clip`` and the
generated ``synthetic_mtil`` datasets on CPU; the real presets are only composed and validated.
"""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clcli.config import check_config
from clcli.engine import CyclingLoader, Runtime
from clcli.errors import ConfigError
from clcli.methods import moe_adapters as moe_module
from clcli.methods.base import EvalBatch
from clcli.methods.clip_baselines import ZeroShotCLIP
from clcli.methods.moe_adapters import MoEAdapters
from clcli.models.ddas import AutoEncoder
from clcli.models.moe import MoEClip, adapter_parameter_count, router_parameter_count, top_k_gates

CONF = str(Path(__file__).resolve().parents[1] / "conf")
OPTIM = {"lr": {"representation": 0.05}, "batch_size": 32, "iterations": 12, "warmup": 2, "schedule": "warmup_cosine",
         "label_smoothing": 0.2,
         "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.0}}
TINY = dict(experts=4, top_k=2, bottleneck=8, lr_by_dataset={},
            ddas=dict(features="pixels", code_dim=16, ae0_data="noise", ae0_steps=100, task_steps=100, batch_size=16,
                      decay_every_epochs=50, threshold="auto", threshold_factor=1.5))


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


def make(backbone, scenario, **kw) -> MoEAdapters:
    args = {**TINY, **kw}
    m = MoEAdapters(backbone=backbone, optim=OmegaConf.create(OPTIM), runtime=Runtime(eval_batch_size=128), **args)
    m.prepare_scenario(scenario)
    return m


def learn(method, task):
    method.begin_task(task)
    method.train_task(task)
    method.end_task(task)


def randomize_routers(model: MoEClip, std: float = 1.0):
    with torch.no_grad():
        for r in model.routers:
            for p in r.values():
                p.normal_(0.0, std)


# ------------------------------------------------------------------ routers (docs/moe_adapters.md#routers)


def test_top_k_gates_by_hand():
    c = torch.tensor([[1.0, -2.0], [0.5, 0.5], [0.0, 0.0]])
    wg = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 0.5, 0.0]])
    wn = torch.tensor([[0.3, -0.2, 0.1, 0.0], [0.0, 0.4, -0.5, 0.2]])
    noise = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 0.25]])

    def by_hand(row, noisy):
        h = [sum(c[row, i].item() * wg[i, e].item() for i in range(2)) for e in range(4)]
        if noisy:
            for e in range(4):
                s = sum(c[row, i].item() * wn[i, e].item() for i in range(2))
                h[e] += noise[row, e].item() * (math.log1p(math.exp(s)) + 0.01)
        order = sorted(range(4), key=lambda e: (-h[e], e))[:2]  # ties: the lower index first
        z = sum(math.exp(h[e]) for e in order)
        return [math.exp(h[e]) / z if e in order else 0.0 for e in range(4)]

    for noisy in (False, True):
        got = top_k_gates(c, wg, wn, 2, noise if noisy else None)
        want = torch.tensor([by_hand(r, noisy) for r in range(3)])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert ((got != 0).sum(1) == 2).all() and torch.allclose(got.sum(1), torch.ones(3))
    # zero-initialised router at evaluation: a tie everywhere -> experts 0 and 1, half each, deterministic
    z = top_k_gates(torch.randn(5, 2), torch.zeros(2, 4), torch.zeros(2, 4), 2)
    assert torch.equal(z, torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 5))


# ------------------------------------------------------------------ model (docs/moe_adapters.md#model)


def test_zero_up_projections_equal_plain_clip_and_the_block_formula(tiny_clip, synthetic_mtil):
    torch.manual_seed(0)
    model = MoEClip(tiny_clip, experts=4, top_k=2, bottleneck=8).eval()
    model.add_task()
    randomize_routers(model)
    task = synthetic_mtil.tasks[1]
    images = torch.stack([task.test[i][0] for i in range(6)])
    tokens = tiny_clip.tokenize(task.prompts())
    with torch.no_grad():
        plain_img = tiny_clip.model.encode_image(images, normalize=True)
        plain_txt = tiny_clip.model.encode_text(tokens, normalize=True)  # open_clip's own forward, 77 tokens
        torch.testing.assert_close(model.encode_image(images, task=0), plain_img, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(tokens, task=0), plain_txt, rtol=0, atol=1e-6)
        # the same with the prompts truncated to the longest EOT + 1 (how the method encodes them)
        torch.testing.assert_close(model.encode_text(tiny_clip.truncate_tokens(tokens), task=0), plain_txt,
                                   rtol=0, atol=1e-6)

        # non-zero experts: the vision tower equals a hand-written block loop
        for bank in model.experts["vision"]:
            for up in bank.up:
                up.weight.normal_(0.0, 0.5)
                up.bias.normal_(0.0, 0.1)
        vis = tiny_clip.model.visual
        x = vis._embeds(images)
        for i, block in enumerate(vis.transformer.resblocks):
            a = x + block.attention(block.ln_1(x))
            r = model.routers[0]
            h = a[:, 0] @ r[f"vision_{i}_gate"]
            top = h.topk(2, dim=1)
            g = torch.zeros_like(h).scatter(1, top.indices, top.values.softmax(1))
            bank = model.experts["vision"][i]
            adapters = sum(g[:, k, None, None] * 0.1 * bank.up[k](F.relu(bank.down[k](a))) for k in range(4))
            x = a + block.mlp(block.ln_2(a)) + adapters  # experts read the un-normalised stream a
        want = F.normalize(vis._pool(x)[0] @ vis.proj, dim=-1)
        got = model.encode_image(images, task=0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got - plain_img).abs().max() > 1e-3  # the experts do act
        torch.testing.assert_close(model.encode_image(images, task=None), plain_img, rtol=0, atol=1e-6)


def test_parameter_counts_of_the_reference_model():
    widths, depths = {"vision": 768, "text": 512}, {"vision": 12, "text": 12}
    assert adapter_parameter_count(widths, depths, 22, 64) == 43_625_472
    assert adapter_parameter_count({"vision": 768}, {"vision": 12}, 22, 64) == 26_171_904
    assert router_parameter_count(widths, depths, 22) == 675_840
    assert sum(p.numel() for p in AutoEncoder(256 * 13 * 13, 100).parameters()) == 8_696_164


# ------------------------------------------------------------------ activate-and-freeze


def test_freeze_bookkeeping_by_hand(tiny_clip):
    model = MoEClip(tiny_clip, experts=4, top_k=2, bottleneck=8, towers=["vision"])
    model.add_task()
    model.add_task()
    model.counts["vision"][:] = torch.tensor([[5, 9, 9, 1], [0, 0, 7, 0], [3, 3, 3, 3]])
    chosen = model.freeze_most_used(2)
    assert chosen == {"vision": [[1, 2], [0, 2], [0, 1]]}  # ties: the lower index
    assert model.frozen["vision"] == [{1, 2}, {0, 2}, {0, 1}]
    model.reset_counts()
    model.counts["vision"][:] = torch.tensor([[0, 4, 1, 3], [2, 2, 2, 2], [0, 0, 1, 5]])
    model.freeze_most_used(2)
    assert model.frozen["vision"] == [{1, 2, 3}, {0, 1, 2}, {0, 1, 2, 3}]  # a union, <= 2 per task
    params = model.set_trainable(1)
    expected = {id(p) for i, block in enumerate(model.experts["vision"]) for k in range(4)
                if k not in model.frozen["vision"][i] for p in block.parameters_of(k)}
    expected |= {id(p) for p in model.routers[1].values()}
    assert {id(p) for p in params} == expected
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected  # router 0 and CLIP frozen
    per_expert = 2 * 64 * 8 + 8 + 64
    assert sum(p.numel() for p in params) == 2 * per_expert + 3 * 2 * 64 * 4


def test_frozen_experts_never_change_and_counts_add_up(tiny_clip, synthetic_mtil):
    torch.manual_seed(3)
    clip_before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    method = make(tiny_clip, synthetic_mtil, selector="oracle")
    t0, t1, t2 = synthetic_mtil.tasks
    learn(method, t0)
    model = method.model
    counts = method.history[0]["counts"]
    steps, rows = 13, 13 * 32  # 12 + 1 steps of 32 of the 64 training images
    for block in counts["vision"]:
        assert sum(block) == 2 * rows  # top-2: two selections per routed image
    for block in counts["text"]:
        assert sum(block) == 2 * steps * t0.num_classes  # the task's prompts, every step
    frozen0 = {t: [set(s) for s in blocks] for t, blocks in model.frozen.items()}
    assert all(len(s) == 2 for blocks in frozen0.values() for s in blocks)
    probe = {t: torch.randn(3, 5, model.widths[t]) for t in model.towers}
    with torch.no_grad():
        before = {(t, i, k): model.experts[t][i].expert(k, probe[t]).clone()
                  for t in model.towers for i, s in enumerate(frozen0[t]) for k in s}
        free_before = {(t, i, k): model.experts[t][i].expert(k, probe[t]).clone()
                       for t in model.towers for i in range(model.depths[t]) for k in range(4) if k not in frozen0[t][i]}
    router0 = {k: v.clone() for k, v in model.routers[0].items()}
    learn(method, t1)
    learn(method, t2)
    with torch.no_grad():
        for (t, i, k), out in before.items():
            assert torch.equal(model.experts[t][i].expert(k, probe[t]), out), (t, i, k)
        moved = [key for key, out in free_before.items()
                 if not torch.equal(model.experts[key[0]][key[1]].expert(key[2], probe[key[0]]), out)]
    assert moved  # later tasks did train the experts that were still free
    assert all(torch.equal(model.routers[0][k], v) for k, v in router0.items())
    assert all(torch.equal(v, clip_before[k]) for k, v in tiny_clip.state_dict().items())
    assert all(len(s) <= 6 for blocks in model.frozen.values() for s in blocks)
    assert method.summary()["trainable_parameters_per_task"]["leaves"] == model.adapter_parameter_count() + \
        model.router_parameter_count()


def moe_lr(s: int, lr: float, n: int, warmup: int) -> float:
    """MoE-Adapters' lr at 0-based step s of n + 1 steps, by hand (the schedule of the former
    method-specific implementation): lr(s+1)/warmup during the warm-up, then cosine to 0 at s = n."""
    if s < warmup:
        return lr * (s + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (n - warmup)))


def test_training_steps_and_lr_per_step_follow_the_optim_keys(tiny_clip, synthetic_mtil, monkeypatch):
    """optim.iterations + 1 optimizer steps, each at the hand-computed lr (the per-dataset lr scaled by the
    warm-up / cosine factor of optim.warmup), the task loss smoothed by optim.label_smoothing."""
    seen = {"lrs": []}
    real = moe_module.fit_iterations

    def spy(step, loader, *, optimizer, **kw):
        seen["smoothing"] = step.smoothing
        optimizer.register_step_pre_hook(lambda opt, *_: seen["lrs"].append(opt.param_groups[0]["lr"]))
        return real(step, loader, optimizer=optimizer, **kw)

    monkeypatch.setattr(moe_module, "fit_iterations", spy)
    t0 = synthetic_mtil.tasks[0]
    optim = {**OPTIM, "iterations": 9, "warmup": 3, "label_smoothing": 0.15}
    method = MoEAdapters(backbone=tiny_clip, optim=OmegaConf.create(optim), runtime=Runtime(eval_batch_size=128),
                         **{**TINY, "lr_by_dataset": {t0.name: 0.02}})
    method.prepare_scenario(synthetic_mtil)
    learn(method, t0)
    assert len(seen["lrs"]) == 10 and method.history[0]["steps"] == 10
    assert seen["lrs"] == pytest.approx([moe_lr(s, 0.02, 9, 3) for s in range(10)], rel=1e-12, abs=1e-15)
    assert seen["smoothing"] == 0.15


def test_reference_schedule_of_optim_mtil_moe():
    """The composed method config (optim=mtil_moe): 1,001 steps, lr 1e-3 x (s+1)/100, then cosine to 0."""
    from clcli import optim as optim_lib

    o = compose_cfg(["method=moe_adapters", "data=synthetic_mtil", "backbone=tiny_clip"]).optim
    assert (o.iterations, o.warmup, o.schedule, o.label_smoothing, o.batch_size) == (1000, 100, "warmup_cosine", 0.2, 64)
    assert o.lr.representation == 1e-3 and o.optimizer.weight_decay == 0.0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = optim_lib.make_optimizer(o, [([p], 5e-3)])  # a per-dataset lr (aircraft)
    sched = optim_lib.make_scheduler(o, opt, steps_per_epoch=7)
    lrs = []
    for _ in range(o.iterations + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([moe_lr(s, 5e-3, 1000, 100) for s in range(1001)], rel=1e-12, abs=1e-18)
    assert lrs[0] == pytest.approx(5e-5) and lrs[99] == pytest.approx(5e-3) and lrs[1000] == pytest.approx(0, abs=1e-18)
    seen = list(CyclingLoader([[1], [2], [3]], 7))  # re-iterates the loader when it runs out
    assert seen == [[1], [2], [3], [1], [2], [3], [1]] and len(CyclingLoader([[1]], 7)) == 7


def test_old_method_keys_name_their_replacement(capsys, tmp_path, monkeypatch):
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    base = ["experiment=diki/moe_adapters_tiny"]
    for old, new in (("iterations", "iterations"), ("warmup_steps", "warmup"), ("label_smoothing", "label_smoothing")):
        code, out = run_cli(["validate", *base, f"method.{old}=5"], capsys)  # without +: Hydra's own refusal
        assert code == 2 and f"method.{old}: replaced by optim.{new}" in " ".join(out.split()), out
    problems = check_config(compose_cfg(base + ["+method.iterations=5", "+method.warmup_steps=3",
                                                "+method.label_smoothing=0.1"]))
    for old, new, value in (("iterations", "iterations", 5), ("warmup_steps", "warmup", 3),
                            ("label_smoothing", "label_smoothing", 0.1)):
        assert any(p.startswith(f"method.{old}: replaced by optim.{new}") and f"optim.{new}={value}" in p
                   for p in problems), (old, problems)
    problems = check_config(compose_cfg(base + ["optim.iterations=null", "+optim.epochs=2"]))
    assert any(p.startswith("optim.iterations: moe_adapters trains a fixed number") for p in problems), problems


# ------------------------------------------------------------------ DDAS (docs/moe_adapters.md#ddas)


def test_ddas_sends_far_inputs_to_zero_shot_clip(tiny_clip, synthetic_mtil):
    torch.manual_seed(5)
    method = make(tiny_clip, synthetic_mtil)
    t0, t1, t2 = synthetic_mtil.tasks
    learn(method, t0)
    assert method.ddas.tasks == [0]  # after one task only autoencoders 0 and 1 compete
    learn(method, t1)
    zs = ZeroShotCLIP(backbone=tiny_clip, optim=None, runtime=Runtime(), feature_cache="off")
    zs.prepare_scenario(synthetic_mtil)

    far = torch.full((8, 3, 32, 32), -40.0)  # far from every training distribution (and from the noise)
    keys, errs = method.ddas.errors(far, per_sample=False)
    assert errs.min() > method.ddas.threshold  # precondition: above the threshold
    for task in (t0, t2):
        batch = EvalBatch(far, task, task.labels, after=1)
        torch.testing.assert_close(method.predict(batch), zs.predict(batch), rtol=0, atol=1e-5)
    assert method.routing["1"][t0.name] == {"zero_shot": 1}

    # autoencoder 0 winning (images like its noise set) is zero-shot as well
    noise = method._ae0_dataset().x[:16]
    keys, errs = method.ddas.errors(noise, per_sample=False)
    assert keys[int(errs.argmin())] == 0
    assert int(method.ddas.select(noise)) == -1
    batch = EvalBatch(noise, t1, t1.labels, after=1)
    torch.testing.assert_close(method.predict(batch), zs.predict(batch), rtol=0, atol=1e-5)

    # in-distribution batches select their own task's router, which is not zero-shot CLIP
    for task in (t0, t1):
        images = torch.stack([task.test[i][0] for i in range(len(task.test))])
        assert int(method.ddas.select(images)) == task.index
        batch = EvalBatch(images, task, task.labels, after=1)
        assert not torch.allclose(method.predict(batch), zs.predict(batch), atol=1e-3)
    # per-sample granularity: each sample decides as a batch of one would
    mixed = torch.cat([images[:5], far[:3]])
    assert method.ddas.select(mixed, per_sample=True).tolist() == [int(method.ddas.select(x[None])) for x in mixed]

    # the state round-trips: a fresh method predicts the same
    again = make(tiny_clip, synthetic_mtil)
    again.load_state_dict(method.state_dict())
    torch.testing.assert_close(again.predict(batch), method.predict(batch), rtol=0, atol=0)


# ------------------------------------------------------------------ end to end and configs


def test_learns_on_synthetic_mtil(tmp_path):
    from clcli.train import run

    results = {}
    for name, overrides in (("moe", ["experiment=diki/moe_adapters_tiny"]),
                            ("zs", ["method=zeroshot", "data=synthetic_mtil", "backbone=tiny_clip", "device=cpu"])):
        cfg = compose_cfg(overrides)
        assert check_config(cfg) == []
        run(cfg, tmp_path / name, {"method": name, "data": "synthetic_mtil", "backbone": "tiny_clip"})
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    moe, zs = results["moe"], results["zs"]
    acc = np.array(moe["accuracy_matrix"], dtype=float)
    assert acc.shape == (3, 3) and not np.isnan(acc).any()
    m = moe["metrics"]
    assert all(isinstance(m[k], float) for k in ("transfer", "avg", "last"))
    # learned: the last row beats zero-shot CLIP (random-init tiny CLIP: about chance) by 25 points
    assert m["last"] >= zs["metrics"]["last"] + 25, (m, zs["metrics"])
    assert np.diag(acc).mean() >= np.array(zs["accuracy_matrix"]).diagonal().mean() + 25
    s = moe["method_summary"]
    assert set(s["trainable_parameters_per_task"]) == {"leaves", "minerals", "signals"}
    assert s["trainable_parameters_total"] == s["adapter_parameters"] + 3 * s["router_parameters_per_task"]
    assert s["ddas"]["autoencoders"] == 4  # autoencoder 0 + one per task


@pytest.mark.parametrize("preset,data,iterations,threshold", [
    ("moe_adapters_order1", "mtil_order1", 1000, 0.0655),
    ("moe_adapters_order2", "mtil_order2", 1000, 0.0655),
    ("moe_adapters_fewshot", "mtil_fewshot", 500, 0.0585),  # DIKI's MTIL-FS (16 shots, 8 datasets)
    ("moe_adapters_fewshot5", "mtil_fewshot5", 500, 0.0585),  # MoE-Adapters' own (5 shots, 11 datasets)
])
def test_presets_compose_and_validate(preset, data, iterations, threshold, tmp_path):
    weights = tmp_path / "ViT-B-16.pt"
    weights.write_bytes(b"0")
    base = [f"experiment=diki/{preset}", f"backbone.checkpoint_path={weights}", "backbone.pretrained=null",
            f"paths.data_dir={tmp_path}"]
    cfg = compose_cfg(base)
    assert cfg.data.name == data and cfg.optim.iterations == iterations and "iterations" not in cfg.method
    assert (cfg.optim.warmup, cfg.optim.label_smoothing, cfg.optim.schedule) == (100, 0.2, "warmup_cosine")
    assert cfg.optim.lr.representation == 1e-3
    assert cfg.method.ddas.threshold == threshold and cfg.method.experts == 22 and cfg.method.top_k == 2
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW" and cfg.optim.optimizer.weight_decay == 0.0
    assert cfg.optim.batch_size == 64 and cfg.eval.batch_size == 128
    problems = check_config(cfg)
    text = "\n".join(problems)
    assert "method.ddas.alexnet_weights" in text and "alexnet-owt-7be5be79.pth" in text
    assert "method.ddas.tinyimagenet_dir" in text and "tiny-imagenet-200" in text
    # with the two DDAS files in place only the (absent) MTIL data is left
    alex = tmp_path / "alexnet.pth"
    alex.write_bytes(b"0")
    (tmp_path / "tiny-imagenet-200" / "train").mkdir(parents=True)
    rest = check_config(compose_cfg(base + [f"method.ddas.alexnet_weights={alex}"]))
    assert rest and not any(p.startswith(("method", "backbone", "optim")) for p in rest), rest
    if preset == "moe_adapters_order1":
        assert (cfg.paper.transfer, cfg.paper.avg, cfg.paper.last) == (68.9, 76.7, 85.0)
        assert list(cfg.paper.unverified) == ["transfer", "avg", "last"] and "LEBA" in cfg.paper.source
        last = cfg.paper.per_dataset.last
        assert round(sum(last) / len(last), 1) == 85.0
    if preset == "moe_adapters_order2":
        assert (cfg.paper.transfer, cfg.paper.avg, cfg.paper.last) == (64.3, 74.7, 84.1)


def test_bad_keys_raise_one_config_error_each(tiny_clip):
    with pytest.raises(ConfigError, match="method.top_k"):
        MoEAdapters(backbone=tiny_clip, optim=OmegaConf.create(OPTIM), runtime=Runtime(), **{**TINY, "top_k": 5})
    with pytest.raises(ConfigError, match=r"method.ddas: unknown key\(s\) \['treshold'\]"):
        MoEAdapters(backbone=tiny_clip, optim=OmegaConf.create(OPTIM), runtime=Runtime(),
                    **{**TINY, "ddas": {**TINY["ddas"], "treshold": 0.1}})
    with pytest.raises(ConfigError, match="features=pixels set method.ddas.threshold=auto"):
        MoEAdapters(backbone=tiny_clip, optim=OmegaConf.create(OPTIM), runtime=Runtime(),
                    **{**TINY, "ddas": {**TINY["ddas"], "threshold": 0.0655}})
    cfg = compose_cfg(["method=moe_adapters", "data=synthetic_mtil", "backbone=tiny_vit"])
    assert any("method=moe_adapters needs a CLIP backbone" in p for p in check_config(cfg))


def test_sweep_validates_every_job(tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "ViT-B-16.pt"
    weights.write_bytes(b"0")
    code, out = run_cli(["validate", "+sweep=diki_mtil", f"backbone.checkpoint_path={weights}",
                         "backbone.pretrained=null", f"paths.data_dir={tmp_path}"], capsys)
    flat = " ".join(out.split())
    assert code == 2  # the MTIL data, AlexNet weights, TinyImageNet, ZSCL's reference data are not here
    for row in ("zeroshot", "clip_ft", "zscl", "moe_adapters", "diki"):  # DIKI's table, MoE-Adapters included
        for seed in (1993, 1996, 1997):
            assert f"experiment=diki/{row}_order1 seed={seed} +sweep=diki_mtil" in flat, (row, seed)
    assert "method.ddas.alexnet_weights" in flat
    assert "Traceback" not in out and "method.top_k" not in out


def test_experts_train_on_zscls_random_resized_crop_by_default(tiny_clip, synthetic_mtil):
    """Both reference codes train with ZSCL's RandomResizedCrop(scale 0.9-1, bicubic); ``augment: none``
    keeps the test transform."""
    task = synthetic_mtil.tasks[0]
    m = make(tiny_clip, synthetic_mtil)
    assert m.augment == "zscl_rrc" and compose_cfg(["method=moe_adapters"]).method.augment == "zscl_rrc"
    rrc = m.train_data(task).transform.transforms[0]
    assert type(rrc).__name__ == "RandomResizedCrop" and rrc.scale == (0.9, 1.0)
    assert rrc.interpolation.value == "bicubic" and rrc.size == (32, 32)
    assert make(tiny_clip, synthetic_mtil, augment="none").train_data(task) is task.train
    with pytest.raises(ConfigError, match="method.augment"):
        make(tiny_clip, synthetic_mtil, augment="flip")
