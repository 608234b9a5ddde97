"""L2P, DualPrompt and CODA-Prompt (docs/prompt_baselines.md) on a tiny random ViT (depth 6, so that
blocks 0-4 exist) and generated images: the prompted forward pass against timm's own and against
attention written out by hand, the pools' selection, composition and losses on hand-made numbers, the
task loop's freezing, masking, checkpoints and classifier alignment, learning, and the presets."""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose, run_cli, run_tiny
from hydra.utils import instantiate

from clcli.config import check_config
from clcli.engine import Runtime
from clcli.errors import ConfigError
from clcli.methods.base import EvalBatch
from clcli.methods.prompts import PromptLoss, PromptMethod
from clcli.models.prompt_pools import CodaPool, DualPromptPool, L2PPool, batch_vote, gram_schmidt_rows
from clcli.models.prompting import encode, prefix_attention
from clcli.models.timm_backbone import TimmBackbone

TINY = ["data=synthetic", "backbone=tiny_vit", "device=cpu", "backbone.model_kwargs.depth=6",
        "backbone.reinit_final_norm=false"]
# docs/prompt_baselines.md#fast-cpu-setting: prompts scaled to the tiny model and the 3-task scenario
SIZES = {"l2p": ["method.prompt.length=2", "method.prompt.top_k=3"],
         "dualprompt": ["method.prompt.g_length=2", "method.prompt.e_length=2", "method.prompt.pool_size=3"],
         "coda_prompt": ["method.prompt.pool_size=6", "method.prompt.length=2"]}
FAST = ["optim.epochs=1", "optim.lr.representation=0.01", "optim.lr.classifier=0.01"]
KINDS = tuple(SIZES)


def _vit(depth: int = 6) -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone("vit_tiny_patch16_224", model_kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=depth,
                                                                  num_heads=4, mlp_ratio=2.0)).eval()


def _method(kind: str, overrides=(), backbone=None):
    """A prompt method built from the shipped config as `clcli train` builds it, and its scenario."""
    cfg = compose(TINY + [f"method={kind}", *SIZES[kind], *FAST, *overrides])
    torch.manual_seed(0)
    bb = backbone if backbone is not None else instantiate(cfg.backbone)
    m = instantiate(cfg.method, _partial_=True)(backbone=bb, optim=cfg.optim, runtime=Runtime(chance_loss_ratio=0.0))
    return m, m.prepare_scenario(instantiate(cfg.data).build(bb))


def _run_task(m, task):
    m.begin_task(task); m.train_task(task); m.end_task(task)


def _images(dataset, n=6):
    return torch.stack([dataset[i][0] for i in range(n)]), torch.tensor([dataset[i][1] for i in range(n)])


def _capture_step(monkeypatch):
    """Record the training-step module each call of fit receives (and still train)."""
    import clcli.methods.prompts as module

    steps, real = [], module.fit
    monkeypatch.setattr(module, "fit", lambda step, *a, **k: (steps.append((step, k)), real(step, *a, **k))[1])
    return steps


# ============================================================================ the prompted forward pass
def test_no_prompts_and_empty_prompts_are_the_plain_model():
    bb = _vit()
    m, x = bb.model, torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        plain = bb(x)
        assert torch.equal(encode(m, x).tokens, m.forward_features(x))
        empty_tokens = encode(m, x, prompts=torch.zeros(3, 0, 64))
        empty_prefix = encode(m, x, prefixes={i: (torch.zeros(3, 0, 64), torch.zeros(3, 0, 64)) for i in range(6)})
        zero_prefix = encode(m, x, prefixes={0: (torch.zeros(3, 2, 64), torch.zeros(3, 2, 64))})
    assert (empty_tokens.cls(m) - plain).abs().max() <= 1e-6
    assert (empty_prefix.cls(m) - plain).abs().max() <= 1e-6
    # a zero-valued prefix is not "no prefix": the softmax still puts mass on its keys
    assert (zero_prefix.cls(m) - plain).abs().max() > 1e-3


def _attention_by_hand(attn, x, pk, pv):
    """Multi-head attention over [prefix; tokens] written out from the module's weights."""
    B, N, D = x.shape
    H, hd = attn.num_heads, D // attn.num_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    out = torch.empty(B, N, D)
    for h in range(H):
        s = slice(h * hd, (h + 1) * hd)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(hd), dim=-1)
        out[..., s] = weights @ v[..., s]
    return out @ attn.proj.weight.T + attn.proj.bias


def test_prefix_attention_matches_an_explicit_softmax_over_concatenated_keys_and_values():
    attn = _vit().model.blocks[2].attn
    torch.manual_seed(1)
    x, pk, pv = torch.randn(2, 17, 64), torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        ours, ref = prefix_attention(attn, x, (pk, pv)), _attention_by_hand(attn, x, pk, pv)
        assert (ours - ref).abs().max() <= 1e-5
        assert torch.equal(prefix_attention(attn, x), attn(x))  # no prefix: the module's own forward
        # per-sample prefixes: changing sample 1's leaves sample 0 alone (no mixing across the batch)
        pk2 = pk.clone(); pk2[1] += 1.0
        other = prefix_attention(attn, x, (pk2, pv))
        assert torch.equal(other[0], ours[0]) and not torch.allclose(other[1], ours[1], atol=1e-4)
        # keys are not values: swapping them changes the output
        assert not torch.allclose(prefix_attention(attn, x, (pv, pk)), ours, atol=1e-4)


def _sequence_by_hand(model, x, prompts, layout):
    """[CLS, prompts, patches] with the CLS position embedding on the prompts (L2P paper), or
    [prompts, CLS, patches] without (JAX), built from the model's tensors."""
    patches = model.patch_embed(x) + model.pos_embed[:, 1:]
    cls = (model.cls_token + model.pos_embed[:, :1]).expand(len(x), -1, -1)
    if layout == "cls_prompts_patches":
        return torch.cat([cls, prompts + model.pos_embed[:, :1], patches], 1), 0
    return torch.cat([prompts, cls, patches], 1), prompts.shape[1]


@pytest.mark.parametrize("layout", ["cls_prompts_patches", "prompts_cls_patches"])
def test_prompt_tuning_follows_timm_blocks_and_masked_prompts_are_the_plain_model(layout):
    bb = _vit()
    model, x = bb.model, torch.rand(2, 3, 32, 32)
    prompts = torch.randn(2, 4, 64)
    with torch.no_grad():
        seq, cls_at = _sequence_by_hand(model, x, prompts, layout)
        where = slice(1, 5) if cls_at == 0 else slice(0, 4)
        ref = model.norm(model.blocks(seq))
        enc = encode(model, x, prompts=prompts, layout=layout)
        assert enc.cls_index == cls_at and enc.prompts == where
        assert (enc.tokens - ref).abs().max() <= 1e-5
        assert (enc.prompt_mean() - ref[:, where].mean(1)).abs().max() <= 1e-5
        # timm's own blocks with every token barred from attending to the prompts: the plain model
        mask = torch.zeros(seq.shape[1], seq.shape[1])
        mask[:, where] = -math.inf
        masked = seq
        for block in model.blocks:
            masked = block(masked, attn_mask=mask)
        assert (model.norm(masked)[:, cls_at] - bb(x)).abs().max() <= 1e-5
        assert (enc.cls(model) - bb(x)).abs().max() > 1e-3  # unmasked, the prompts do change the CLS output


# ============================================================================ pools on hand-made numbers
def _l2p(**kw):
    args = dict(insertion="prompt_tuning", layout="cls_prompts_patches", layers=[0], pool_size=5, length=1, top_k=2,
                init=[-1.0, 1.0], head_input="prompt_mean", pull_weight=0.5)
    return L2PPool(4, **{**args, **kw})


def test_l2p_selects_top_k_by_cosine_and_the_pull_loss_by_hand():
    pool = _l2p()
    with torch.no_grad():
        pool.keys.copy_(torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 3, 0]], dtype=torch.float))
    q = torch.tensor([[2.0, 0, 0, 0], [0, 0.5, 0, 0]])
    out = pool(q)
    assert [sorted(r) for r in out.chosen.tolist()] == [[0, 2], [1, 2]]  # cos: [1, 0, .707, -1, 0], [0, 1, .707, 0, 0]
    expected = 0.5 * ((1 - 1) + (1 - 1 / math.sqrt(2)))  # per sample the same; mean over the batch
    assert out.surrogate.item() == pytest.approx(expected, abs=1e-6)
    assert 0 <= out.surrogate.item() <= 2 * 0.5 * 2
    assert torch.equal(out.prompts[0], pool.prompts[out.chosen[0]].flatten(0, 1))  # the chosen prompts, in order
    # the vote: ids {0, 2} and {1, 2} -> 2 (twice), then the tie 0/1 goes to 0; every sample gets them
    voted = pool(q, vote=True)
    assert voted.chosen.tolist() == [[2, 0], [2, 0]]


def test_batch_vote_takes_the_most_frequent_ids_and_the_lowest_on_ties():
    ids = torch.tensor([[0, 2], [1, 2], [3, 1]])
    assert batch_vote(ids, 2, 5).tolist() == [1, 2]
    assert batch_vote(ids, 3, 5).tolist() == [1, 2, 0]
    assert batch_vote(torch.tensor([[4], [4], [1]]), 1, 5).tolist() == [4]


def test_l2p_prompts_learn_from_ce_only_and_keys_from_the_pull_only():
    pool = _l2p()
    q = torch.randn(3, 4)
    out = pool(q)
    out.surrogate.backward()  # the pull alone: no gradient for the prompts
    assert pool.prompts.grad is None or not pool.prompts.grad.any()
    assert pool.keys.grad is not None and pool.keys.grad.abs().sum() > 0
    pool.zero_grad()
    pool(q).prompts.sum().backward()  # anything downstream of the prompts (CE): no gradient for the keys
    assert pool.keys.grad is None or not pool.keys.grad.any()
    assert pool.prompts.grad.abs().sum() > 0


def _dual(**kw):
    args = dict(g_layers=[0, 1], g_length=2, e_layers=[2, 3], e_length=3, pool_size=3, init=[-1.0, 1.0], pull_weight=1.0,
                copy_previous=True, task_id_at_train=True, restrict_to_seen=False)
    return DualPromptPool(4, **{**args, **kw})


def test_dualprompt_selects_the_e_prompt_by_task_id_in_training_and_by_key_at_inference():
    pool = _dual()
    with torch.no_grad():
        pool.keys.copy_(torch.eye(4)[:3])
    q = torch.tensor([[1.0, 0.1, 0, 0], [0.9, 0, 0.2, 0]])  # both closest to key 0
    train = pool(q, task=2)
    assert train.chosen.flatten().tolist() == [2, 2]
    for j, block in enumerate([2, 3]):
        pk, pv = train.prefixes[block]
        assert torch.equal(pk[1], pool.e[2, j, 0]) and torch.equal(pv[1], pool.e[2, j, 1])
    for j, block in enumerate([0, 1]):
        pk, pv = train.prefixes[block]
        assert torch.equal(pk[0], pool.g[j, 0]) and torch.equal(pv[0], pool.g[j, 1])
    cos2 = F.cosine_similarity(q, pool.keys[2:3].detach())
    assert train.surrogate.item() == pytest.approx((1 - cos2).mean().item(), abs=1e-6)  # pulls key 2 only
    train.surrogate.backward()
    assert pool.keys.grad[2].abs().sum() > 0 and not pool.keys.grad[:2].any()
    assert pool(q).chosen.flatten().tolist() == [0, 0]  # inference: argmax cos over all keys
    pool.tasks_begun = 1
    with torch.no_grad():
        pool.keys[0] = -pool.keys[0]  # now key 0 is farthest; restrict_to_seen keeps the choice on task 0
    assert pool(q).chosen.flatten().tolist() != [0, 0]
    assert _dual(restrict_to_seen=True).eval()(q).chosen.shape == (2, 1)
    restricted = _dual(restrict_to_seen=True)
    restricted.load_state_dict(pool.state_dict())
    assert restricted(q).chosen.flatten().tolist() == [0, 0]


def test_coda_components_weights_by_hand():
    pool = CodaPool(3, layers=[1], pool_size=2, length=1, ortho_weight=0.0, init="per_task")
    pool.scenario_problems(1)
    pool.begin_task(0)
    with torch.no_grad():
        pool.keys[0] = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0]])
        pool.attention[0] = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0, 1.0]])
        pool.components[0] = torch.arange(12.0).view(2, 2, 1, 3)
    q = torch.tensor([[1.0, 2.0, 3.0]])
    # alpha_m = cos(q * A_m, K_m): q*A = (1,2,3) and (2,0,3)
    a0 = 1 / math.sqrt(14)
    a1 = 2 / (math.sqrt(13) * math.sqrt(2))
    p = a0 * torch.arange(6.0).view(2, 1, 3) + a1 * torch.arange(6.0, 12.0).view(2, 1, 3)
    out = pool(q)
    assert set(out.prefixes) == {1}
    assert torch.allclose(out.prefixes[1][0][0], p[0], atol=1e-5) and torch.allclose(out.prefixes[1][1][0], p[1], atol=1e-5)
    assert out.surrogate == 0.0


def test_coda_orthogonality_penalty_by_hand():
    pool = CodaPool(4, layers=[0, 2], pool_size=4, length=1, ortho_weight=0.1, init="per_task")
    pool.scenario_problems(2)
    pool.begin_task(0); pool.begin_task(1)
    q = torch.randn(3, 4)
    out = pool(q, task=1)
    expected = 0.0
    for j in range(2):
        for x in (pool.keys[j], pool.attention[j], pool.components[j].reshape(4, -1)):
            expected += ((x @ x.T - torch.eye(4)) ** 2).mean()
    assert out.surrogate.item() == pytest.approx(0.1 * expected.item(), rel=1e-5)
    assert pool(q).surrogate == 0.0  # inference adds no loss


def test_coda_gram_schmidt_init_slices_orthonormal_then_unit_norm_rows():
    pool = CodaPool(64, layers=[0, 1], pool_size=6, length=2, ortho_weight=0.0, init="per_task")
    assert pool.scenario_problems(3) == []
    pool.begin_task(0)
    for tensor in (pool.components, pool.keys, pool.attention):
        for j in range(2):
            rows = tensor[j].reshape(6, -1).double()
            assert (rows[:2] @ rows[:2].T - torch.eye(2, dtype=torch.float64)).abs().max() < 1e-4
            assert torch.allclose(torch.linalg.svdvals(rows[:2]), torch.ones(2, dtype=torch.float64), atol=1e-4)
            assert not rows[2:].any()  # the later tasks' rows stay zero until their task starts
    with torch.no_grad():
        pool.keys.add_(0.3 * torch.randn_like(pool.keys) * (pool.keys != 0))  # "trained": no longer orthonormal
    old = pool.keys[:, :2].clone()
    pool.begin_task(1)
    assert torch.equal(pool.keys[:, :2], old)
    norms = pool.keys[:, 2:4].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5) and not pool.keys[:, 4:].any()
    # against orthonormal old rows, one classical pass gives rows orthogonal to them and to each other
    basis = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64)).Q.T  # 3 orthonormal rows in R^8
    new = gram_schmidt_rows(basis, 4)
    both = torch.cat([basis, new])
    assert (both @ both.T - torch.eye(7, dtype=torch.float64)).abs().max() < 1e-10


def test_upfront_init_is_orthogonal_over_the_whole_pool():
    pool = CodaPool(64, layers=[0], pool_size=6, length=2, ortho_weight=0.1, init="upfront")
    for tensor in (pool.components, pool.keys, pool.attention):
        rows = tensor[0].reshape(6, -1)
        assert (rows @ rows.T - torch.eye(6)).abs().max() < 1e-4
    pool.scenario_problems(3)
    before = pool.components.detach().clone()
    pool.begin_task(1)
    assert torch.equal(pool.components, before)  # nothing is re-initialised per task


def test_parameter_counts_of_the_shipped_defaults_at_vit_b_width():
    def pool(kind, *overrides):
        prompt = compose([f"method={kind}", *overrides]).method.prompt
        return {"l2p": L2PPool, "dualprompt": DualPromptPool, "coda_prompt": CodaPool}[kind](768, **prompt)

    assert pool("l2p").parameter_counts()["total"] == 46_080
    assert pool("dualprompt").parameter_counts()["total"] == 253_440  # CIFAR: E length 5
    assert pool("dualprompt", "method.prompt.e_length=20").parameter_counts()["total"] == 944_640
    coda = pool("coda_prompt")
    coda.scenario_problems(10)
    assert coda.parameter_counts()["total"] == 3_840_000 and coda.parameter_counts()["trained_per_task"] == 384_000


# ============================================================================ the task loop
def test_the_query_is_the_plain_frozen_model_without_autograd_and_the_backbone_never_changes(monkeypatch):
    steps = _capture_step(monkeypatch)
    m, sc = _method("l2p")
    before = copy.deepcopy(m.backbone.state_dict())
    t0 = sc.tasks[0]
    _run_task(m, t0)
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(p.requires_grad for p in m.backbone.parameters())
    seen = []
    hook = m.backbone.register_forward_hook(lambda mod, inp, out: seen.append((torch.is_grad_enabled(), out.requires_grad, out)))
    x, y = _images(t0.train)
    steps[0][0](x, y)
    hook.remove()
    assert len(seen) == 1 and seen[0][:2] == (False, False)  # one query pass, no autograd
    with torch.no_grad():
        assert torch.equal(seen[0][2], m.backbone(x))  # bit-exact: the unprompted model


@pytest.mark.parametrize("kind", KINDS)
def test_the_loss_is_ce_over_the_new_head_plus_the_surrogate_and_old_heads_stay(monkeypatch, kind):
    steps = _capture_step(monkeypatch)
    m, sc = _method(kind, ["method.batchwise.train=false"] if kind == "l2p" else [])
    t0, t1 = sc.tasks[:2]
    _run_task(m, t0)
    old_head = copy.deepcopy(m.heads.heads[0].state_dict())
    _run_task(m, t1)
    for k, v in m.heads.heads[0].state_dict().items():
        assert torch.equal(v, old_head[k])
    step = steps[1][0]
    x, y = _images(t1.train)  # global labels 2..3
    m.heads.zero_grad(set_to_none=True)
    loss = step(x, y)
    with torch.no_grad():
        q = m.backbone(x)
        surrogate = m.pool(q, task=1).surrogate
        logits = m.heads(m.features(x, task=1))
    expected = F.cross_entropy(logits[:, 2:4], y - 2) + surrogate
    assert torch.allclose(loss, expected, atol=1e-5)
    assert not torch.allclose(F.cross_entropy(logits[:, :4], y) + surrogate, expected, atol=1e-3)  # not all seen classes
    loss.backward()
    assert m.heads.heads[0].weight.grad is None and m.heads.heads[1].weight.grad.abs().sum() > 0
    batch = EvalBatch(_images(t1.test, 5)[0], t1, range(0, 4))
    assert m.predict(batch).shape == (5, 4)  # exactly the candidates' columns


def test_with_lambda_zero_l2p_keys_never_move():
    m, sc = _method("l2p", ["method.prompt.pull_weight=0.0"])
    keys, prompts = m.pool.keys.detach().clone(), m.pool.prompts.detach().clone()
    _run_task(m, sc.tasks[0])
    assert torch.equal(m.pool.keys, keys) and not torch.equal(m.pool.prompts, prompts)


def test_dualprompt_trains_only_the_current_entry_and_starts_it_from_the_previous_one():
    m, sc = _method("dualprompt")
    t0, t1 = sc.tasks[:2]
    _run_task(m, t0)
    e, keys, g = m.pool.e.detach().clone(), m.pool.keys.detach().clone(), m.pool.g.detach().clone()
    m.begin_task(t1)
    assert torch.equal(m.pool.e[1], e[0])  # E-prompt 1 starts as a copy of E-prompt 0; keys are not copied
    assert torch.equal(m.pool.keys, keys)
    m.train_task(t1)
    assert torch.equal(m.pool.e[0], e[0]) and torch.equal(m.pool.e[2], e[2])
    assert torch.equal(m.pool.keys[0], keys[0]) and torch.equal(m.pool.keys[2], keys[2])
    assert not torch.equal(m.pool.e[1], e[0]) and not torch.equal(m.pool.keys[1], keys[1])
    assert not torch.equal(m.pool.g, g)  # the G-prompt keeps learning


def test_coda_freezes_finished_rows_and_evaluates_with_the_seen_tasks_components():
    m, sc = _method("coda_prompt")
    t0, t1 = sc.tasks[:2]
    _run_task(m, t0)
    after0 = {k: v.clone() for k, v in m.pool.state_dict().items() if torch.is_tensor(v)}
    m.begin_task(t1)
    m.train_task(t1)
    for name, old in after0.items():  # c = 2 rows per task
        now = getattr(m.pool, name)
        assert torch.equal(now[:, :2], old[:, :2]), name  # task 0's rows: bit-identical
        assert now[:, 2:4].abs().sum() > 0 and not now[:, 4:].any(), name  # task 1's trained, task 2's still zero
    x = _images(t1.test, 4)[0]
    batch = EvalBatch(x, t1, range(0, 4))
    with torch.no_grad():
        ref = m.predict(batch)
        m.pool.components[:, 4:] = torch.randn_like(m.pool.components[:, 4:])  # future rows: not used after task 1
        m.pool.keys[:, 4:], m.pool.attention[:, 4:] = 1.0, 1.0
        assert torch.equal(m.predict(batch), ref)
        m.pool.components[:, 3] += 1.0  # a row of task 1: used
        assert not torch.allclose(m.predict(batch), ref)


def test_coda_optimizer_holds_the_reinitialised_tensors(monkeypatch):
    import clcli.methods.prompts as module

    m, sc = _method("coda_prompt")
    _run_task(m, sc.tasks[0])
    m.begin_task(sc.tasks[1])
    fresh = m.pool.keys[:, 2:4].detach().clone()  # task 1's rows, just initialised
    assert fresh.abs().sum() > 0
    seen, real = {}, module.fit

    def spy(step, loader, **k):  # what the optimizer holds when training starts
        keys = [p for g in k["optimizer"].param_groups for p in g["params"] if p is m.pool.keys]
        seen.update(opt=k["optimizer"], keys=keys[0].detach()[:, 2:4].clone() if keys else None)
        return real(step, loader, **k)

    monkeypatch.setattr(module, "fit", spy)
    m.train_task(sc.tasks[1])
    params = [p for g in seen["opt"].param_groups for p in g["params"]]
    assert any(p is m.pool.components for p in params) and any(p is m.pool.attention for p in params)
    assert torch.equal(seen["keys"], fresh) and type(seen["opt"]).__name__ == "Adam"


def test_predictions_do_not_depend_on_the_batch_unless_the_eval_vote_is_on():
    m, sc = _method("l2p")
    _run_task(m, sc.tasks[0])
    t0 = sc.tasks[0]
    x = _images(t0.test, 8)[0]
    with torch.no_grad():
        batch = m.predict(EvalBatch(x, t0, range(0, 2)))
        alone = torch.cat([m.predict(EvalBatch(x[i : i + 1], t0, range(0, 2))) for i in range(8)])
        assert torch.allclose(batch, alone, atol=1e-5)
        own = m.pool(m.backbone(x)).chosen
        m.batchwise["eval"] = True  # the references' test-time vote: one selection for the whole batch
        voted = m.pool(m.backbone(x), vote=True).chosen
        assert (voted == voted[0]).all()
        assert torch.equal(voted[0], batch_vote(own, m.pool.top_k, m.pool.pool_size))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_reproduces_predictions_bit_exactly(kind):
    m, sc = _method(kind, ["method.ca.enabled=true", "method.ca.epochs=1", "method.ca.samples_per_class=8"])
    for t in sc.tasks[:2]:
        _run_task(m, t)
    x = _images(sc.tasks[1].test, 5)[0]
    batch = EvalBatch(x, sc.tasks[1], range(0, 4))
    with torch.no_grad():
        ref = m.predict(batch)
    state = copy.deepcopy(m.state_dict())
    fresh, _ = _method(kind, ["method.ca.enabled=true", "method.ca.epochs=1", "method.ca.samples_per_class=8"])
    fresh.load_state_dict(state)
    assert fresh.pool.tasks_begun == 2 and fresh.aligned is not None
    with torch.no_grad():
        assert torch.equal(fresh.predict(batch), ref)


def test_alignment_fits_new_classes_on_inference_features_and_serves_one_evaluation():
    m, sc = _method("dualprompt", ["method.ca.enabled=true", "method.ca.epochs=2", "method.ca.samples_per_class=16"])
    t0, t1, t2 = sc.tasks
    _run_task(m, t0)
    assert m.stats.keys == [0, 1] and m.aligned is None  # no alignment after the first task
    m.begin_task(t1); m.train_task(t1)
    stage1 = copy.deepcopy(m.heads.state_dict())
    m.end_task(t1)
    assert m.stats.keys == [0, 1, 2, 3]  # the new classes only were added
    x, y = zip(*[t1.train_plain[i] for i in range(len(t1.train_plain))])
    x, y = torch.stack(x), torch.tensor(y)
    with torch.no_grad():
        f = m.features(x).double()  # the inference path: closest key, no task id
    for c in (2, 3):
        assert torch.allclose(m.stats.mean[c], f[y == c].mean(0), atol=1e-5)
    for k, v in m.heads.state_dict().items():
        assert torch.equal(v, stage1[k])  # the stage-1 heads are untouched
    batch = EvalBatch(_images(t1.test, 4)[0], t1, range(0, 4))
    with torch.no_grad():
        assert torch.allclose(m.predict(batch), m.aligned(m.features(batch.images))[:, :4])
    m.begin_task(t2)
    assert m.aligned is None  # the aligned copy is discarded when the next task begins


def test_without_alignment_predictions_are_the_stage1_heads():
    m, sc = _method("coda_prompt")
    for t in sc.tasks[:2]:
        _run_task(m, t)
    assert m.aligned is None and m.stats.keys == []
    batch = EvalBatch(_images(sc.tasks[1].test, 4)[0], sc.tasks[1], range(0, 4))
    with torch.no_grad():
        assert torch.equal(m.predict(batch), m.heads(m.features(batch.images)))


# ============================================================================ checks and errors
def test_a_cnn_backbone_is_refused_with_the_fix():
    cnn = TimmBackbone("efficientnet_lite0", input_size=32)
    with pytest.raises(ConfigError) as info:
        _method("l2p", backbone=cnn)
    text = str(info.value)
    assert "prompts cannot be inserted into a CNN" in text and "backbone=vit_b16_in21k" in text


@pytest.mark.parametrize("method", ["l2p", "dualprompt", "coda_prompt", "slcapp"])
def test_validate_refuses_the_default_cnn_backbone_before_building_anything(method, monkeypatch):
    """`clcli validate method=X` on the offline default backbone (EfficientNet-Lite0, a timm CNN behind
    the same TimmBackbone class as the ViTs) names backbone.model_name and the fix, from timm's
    registry alone: building a model or a backbone here fails the test."""
    import timm

    def never(*_, **__):
        raise AssertionError("validate built a model")

    monkeypatch.setattr(timm, "create_model", never)
    monkeypatch.setattr(TimmBackbone, "__init__", never)
    cfg = compose([f"method={method}", "device=cpu"])
    assert cfg.backbone.model_name == "efficientnet_lite0"  # the shipped default
    bad = [p for p in check_config(cfg) if p.startswith("backbone.model_name:")]
    assert len(bad) == 1 and f"method={method}" in bad[0] and "'efficientnet_lite0'" in bad[0], bad
    assert "backbone=vit_b16_in21k" in bad[0] and "tiny_vit" in bad[0]
    vit = compose([f"method={method}", "device=cpu", "data=synthetic", "backbone=tiny_vit"])
    assert not [p for p in check_config(vit) if p.startswith("backbone")]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224.augreg_in21k", "deit_tiny_patch16_224",
                                  "vit_tiny_r_s16_p8_224", "efficientnet_lite0", "resnet18", "tiny_vit_5m_224",
                                  "eva02_tiny_patch14_224", "convit_tiny"])
def test_the_registry_check_agrees_with_the_built_model(name):
    """Reference: the class of the model timm builds (random weights, no download)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from clcli.models.vit_config import vit_config_problems

    built = isinstance(timm.create_model(name, pretrained=False), VisionTransformer)
    assert (vit_config_problems("l2p", "inserts prompts into", TimmBackbone, {"model_name": name}) == []) == built


@pytest.mark.parametrize("overrides,problem", [
    (["method=l2p", "method.prompt.top_k=20"], "method.prompt.top_k=20 exceeds method.prompt.pool_size=10"),
    (["method=l2p", "+method.prompt.topk=2"], "method.prompt.topk: unknown key, nothing reads it. Did you mean "
                                              "method.prompt.top_k?"),
    (["method=l2p", "method.prompt.insertion=prefix"], "method.prompt.head_input=prompt_mean needs prompt tokens"),
    (["method=l2p", "method.prompt.init=[1,0]"], "method.prompt.init: expected [low, high] with low < high"),
    (["method=l2p", "method.batchwise.eval=maybe"], "method.batchwise.eval: expected true or false"),
    (["method=dualprompt", "+method.batchwise.train=true"], "method.batchwise.train: unknown key"),
    (["method=coda_prompt", "method.batchwise={eval: true}"], "method.batchwise: coda_prompt composes its prompts per sample"),
    (["method=coda_prompt", "method.prompt.init=orthogonal"], "method.prompt.init: expected one of per_task, upfront"),
    (["method=l2p", "method.clip_grad_norm=0"], "method.clip_grad_norm: must be > 0"),
    (["method=coda_prompt", "method.drop_last=maybe"], "method.drop_last: expected true or false"),
    (["method=l2p", "method.ca.feature_path=own"], "method.ca.feature_path: expected one of inference, own_prompt"),
    (["method=dualprompt", "optim.lr.representation=0"], "optim.lr.representation: must be > 0"),
    (["method=dualprompt", "backbone=tiny_clip"], "backbone: method=dualprompt inserts prompts into a timm ViT"),
])
def test_bad_keys_are_named_by_clcli_validate(overrides, problem):
    problems = check_config(compose(["data=synthetic", "backbone=tiny_vit", "device=cpu", *overrides]))
    assert any(problem in p for p in problems), problems


def test_drop_last_leaves_out_the_short_last_batch_of_the_same_order(monkeypatch):
    """method.drop_last=true (CODA-P's reference loader): one epoch of N images in batches of B takes
    floor(N / B) full steps (N = 48, B = 5), the same images in the same order as the first steps with
    drop_last=false, which takes ceil(N / B) steps over all N (hand computation)."""
    seen, real = {}, PromptLoss.forward

    def record(flag):
        m, sc = _method("coda_prompt", ["optim.batch_size=5", f"method.drop_last={str(flag).lower()}"])
        monkeypatch.setattr(PromptLoss, "forward", lambda self, x, y: (seen[flag].append(y.tolist()),
                                                                      real(self, x, y))[1])
        seen[flag] = []
        m.begin_task(sc.tasks[0])
        torch.manual_seed(1)
        m.train_task(sc.tasks[0])
        return m.losses[0], len(sc.tasks[0].train)

    dropped, n = record(True)
    kept, _ = record(False)
    assert n % 5 != 0, n  # a short last batch exists
    assert (dropped["steps"], dropped["query_passes"]) == (n // 5, 5 * (n // 5))
    assert (kept["steps"], kept["query_passes"]) == (-(-n // 5), n)
    assert seen[True] == seen[False][: n // 5] and all(len(b) == 5 for b in seen[True])
    with pytest.raises(ConfigError, match=r"method.drop_last: task 0 .* fewer than one batch"):
        m, sc = _method("coda_prompt", [f"optim.batch_size={n + 1}", "method.drop_last=true"])
        m.begin_task(sc.tasks[0])
        m.train_task(sc.tasks[0])


@pytest.mark.parametrize("kind,override,problem", [
    ("dualprompt", "method.prompt.pool_size=2", "method.prompt.pool_size=2: DualPrompt needs one E-prompt per task"),
    ("coda_prompt", "method.prompt.pool_size=5", "method.prompt.pool_size=5: CODA-P gives every task pool_size/T"),
    ("coda_prompt", "backbone.model_kwargs.depth=2", "method.prompt.layers: block(s) [2, 3, 4] do not exist"),
])
def test_the_scenario_and_the_built_backbone_are_checked(kind, override, problem):
    with pytest.raises(ConfigError) as info:
        _method(kind, [override])
    assert any(problem in p for p in info.value.problems), info.value.problems


def test_a_reinitialised_final_norm_on_pretrained_weights_is_refused():
    bb = _vit()
    bb.weights_identity["pretrained_tag"] = "timm/vit_base_patch16_224.augreg_in21k"  # as if loaded from the hub
    bb.model.norm = torch.nn.LayerNorm(64, eps=1e-5)  # what reinit_final_norm=true does
    problems = PromptMethod.backbone_problems(bb, "l2p", dict(compose(["method=l2p"]).method.prompt))
    assert any("backbone.reinit_final_norm=false" in p for p in problems)


# ============================================================================ learning, end to end
# Per method: 5 epochs, Adam 1e-2 for head and prompts (a random backbone moves slowly). L2P's prompts
# use lr 1e-3 and the JAX init U[0, 0.01): with U(-1, 1) the prompt tokens' own content swamps what they
# read from a random model, and the prompt-mean head input carries almost no image information.
LEARN = {"l2p": ["optim.lr.representation=0.001", "method.prompt.init=[0.0,0.01]"], "dualprompt": [], "coda_prompt": []}
CHANCE_INC = 100 * (1 / 2 + 1 / 4 + 1 / 6) / 3  # Inc-Acc of guessing among the seen classes (3 tasks x 2 classes)


@pytest.mark.parametrize("kind", KINDS)
def test_each_method_learns_the_tiny_benchmark(tmp_path, kind):
    res = run_tiny(tmp_path, TINY + [f"method={kind}", *SIZES[kind], "optim.epochs=5", "optim.lr.representation=0.01",
                                     "optim.lr.classifier=0.01", *LEARN[kind]])
    assert res["status"] == "complete"
    assert res["warnings"] == []  # every task's last-epoch CE is below 0.9 ln 2 (no collapse)
    assert res["metrics"]["inc_acc"] > CHANCE_INC + 15, res["metrics"]
    summary = res["method_summary"]
    assert summary["kind"] == kind and summary["trainable_prompt_parameters"] > 0
    assert summary["query_pass"]["extra_forward_passes_per_image"] == 1
    assert summary["query_pass"]["train_images"] == 3 * 5 * 48  # tasks x epochs x train images
    assert summary["query_pass"]["eval_cache"]["batches_served"] > 0  # test-set queries computed once
    assert all(x["ce"] < math.log(2) for x in summary["training_losses"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_alignment_on_prompts_runs_end_to_end(tmp_path, kind):
    res = run_tiny(tmp_path, TINY + [f"method={kind}", *SIZES[kind], "optim.epochs=5", "optim.lr.representation=0.01",
                                     "optim.lr.classifier=0.01", *LEARN[kind], "method.ca.enabled=true"])
    assert res["status"] == "complete" and "covariance_jitter" in res["method_summary"]
    assert res["metrics"]["inc_acc"] > CHANCE_INC + 15, res["metrics"]


# ============================================================================ presets, sweeps, table
PROMPT_EXPERIMENTS = [f"prompts/{m}{ca}_{b}_{p}" for m in KINDS for ca in ("", "_ca")
                      for b in ("cifar100", "imagenet_r", "cub200", "cars196") for p in ("in21k", "mocov3")]


def _sweep_jobs(sweep: str):
    from conftest import CONF
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"+sweep={sweep}"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return cfg, [list(job) for batch in batches for job in batch]


def _validate(overrides: list[str], tmp_path) -> list[str]:
    """check_config's problems other than the datasets, which are not on this machine."""
    ckpt = tmp_path / "mocov3.pth"
    ckpt.write_bytes(b"0")
    cfg = compose([*overrides, f"paths.data_dir={tmp_path}", f"++backbone.checkpoint_path={ckpt}"])
    return [p for p in check_config(cfg) if not p.startswith("data")]


@pytest.mark.parametrize("pre", ["in21k", "mocov3"])
def test_prompt_sweeps_expand_to_every_cell_and_seed(tmp_path, pre):
    cfg, jobs = _sweep_jobs(f"prompts_{pre}")
    assert cfg.hydra.sweep.dir == f"outputs/sweeps/slca/prompts_{pre}"  # next to SLCA's: one `clcli table outputs/sweeps/slca`
    experiments = {o.split("=", 1)[1] for j in jobs for o in j if o.startswith("experiment=")}
    assert experiments == {e for e in PROMPT_EXPERIMENTS if e.endswith(pre)}
    assert {o.split("=")[1] for j in jobs for o in j if o.startswith("seed=")} == {"1993", "1996", "1997"}
    assert len(jobs) == 24 * 3
    assert _validate([f"+sweep=prompts_{pre}", *jobs[-1]], tmp_path) == []  # the sweep's own keys and a job's


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["in21k", "mocov3"])
def test_every_job_of_the_prompt_sweeps_validates(tmp_path, pre):
    _, jobs = _sweep_jobs(f"prompts_{pre}")
    for job in jobs:
        assert _validate([f"+sweep=prompts_{pre}", *job], tmp_path) == [], job


@pytest.mark.parametrize("experiment", PROMPT_EXPERIMENTS)
def test_presets_validate_with_the_spec_hyper_parameters_and_paper_blocks(tmp_path, experiment):
    assert _validate([f"experiment={experiment}"], tmp_path) == []
    cfg = compose([f"experiment={experiment}"])
    method, _, bench, pre = re.fullmatch(r"prompts/(l2p|dualprompt|coda_prompt)(_ca)?_(.+)_(in21k|mocov3)", experiment).groups()
    o = cfg.optim
    assert cfg.method.kind == method and cfg.method.ca.enabled == ("_ca_" in experiment)
    assert o.optimizer._target_ == "torch.optim.Adam" and o.optimizer.weight_decay == 0
    assert o.lr.representation == o.lr.classifier and not cfg.backbone.reinit_final_norm
    expected = {  # docs/prompt_baselines.md#hyper-parameters-per-benchmark: (B, lr, epochs)
        "l2p": {"cifar100": (16, 1.875e-3, 5), "imagenet_r": (16, 3.125e-4, 50)},
        "dualprompt": {"cifar100": (24, 2.8125e-3, 5), "imagenet_r": (24, 4.6875e-4, 50)},
        "coda_prompt": {"cifar100": (128, 1e-3, 20), "imagenet_r": (128, 1e-3, 50)}}[method]
    default = {"l2p": (16, 1.875e-3, 5), "dualprompt": (24, 2.8125e-3, 5), "coda_prompt": (128, 1e-3, 50)}[method]
    assert (o.batch_size, o.lr.representation, o.epochs) == expected.get(bench, default)
    assert o.schedule == ("coda_cosine" if method == "coda_prompt" else "constant")
    assert cfg.method.clip_grad_norm == (None if method == "coda_prompt" else 1.0)
    if method == "dualprompt":
        assert cfg.method.prompt.e_length == (5 if bench == "cifar100" else 20)
    if "_ca_" in experiment:
        assert cfg.method.ca.logit_norm_tau == (0.05 if bench == "cars196" else 0.1)
    assert cfg.data.transform.startswith("prompt_") and cfg.data.name == f"split_{bench}"
    paper = cfg.paper
    assert paper.get("source") or paper.get("note")
    published = pre == "in21k" and "_ca_" not in experiment
    assert (paper.last_acc is not None) == published and (paper.inc_acc is not None) == published
    if published:
        assert "[SECONDARY]" in paper.source and list(paper.secondary) == ["last_acc", "inc_acc"]
        assert set(paper.unverified) == ({"last_acc", "inc_acc"} if method == "coda_prompt" else set())


def test_the_coda_cosine_schedule():
    from clcli import optim as optim_lib

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=1e-3)
    sched = optim_lib.scheduler(opt, "coda_cosine", 20, 1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(); sched.step()
    assert lrs[0] == 1e-3 and lrs[-1] == pytest.approx(1e-3 * math.cos(99 * math.pi / 200))
    assert lrs[-1] / lrs[0] == pytest.approx(0.0157, abs=1e-4) and all(a > b for a, b in zip(lrs, lrs[1:]))


def test_prompt_recipes_feed_unnormalised_images():
    from clcli.data.transforms import build_transforms

    bb = _vit(depth=1)
    img = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    from PIL import Image

    for recipe in ("prompt_jhlee", "prompt_coda", "prompt_coda_cifar"):
        train, test = build_transforms(recipe, bb)
        for t in (train, test):
            x = t(Image.fromarray(img))
            assert x.shape == (3, 32, 32) and x.min() >= 0 and x.max() <= 1


def test_clcli_table_prints_the_prompt_rows_beside_slca(tmp_path, capsys):
    common = TINY + ["optim.epochs=1"]
    for name, overrides in (("slca", ["method=slca", "optim.milestones=[1]"]), ("l2p", ["method=l2p", *SIZES["l2p"]]),
                            ("dualprompt", ["method=dualprompt", *SIZES["dualprompt"]]),
                            ("coda_prompt", ["method=coda_prompt", *SIZES["coda_prompt"]])):
        run_tiny(tmp_path / "sweep", common + overrides, f"{name}/seed=1993")
    code, out = run_cli(["table", str(tmp_path / "sweep")], capsys, stdout_only=True)
    assert code == 0, out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
    for label in ("method=slca", "method=l2p", "method=dualprompt", "method=coda_prompt"):
        match = [r for k, r in rows.items() if k.startswith(label)]
        assert match and "1993" in match[0] and "± – (n=1)" in match[0], (label, out)


@pytest.mark.slow
def test_the_cost_benchmark_runs_at_toy_size():
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_prompts.py"), "--img", "32", "--dim", "64",
                           "--heads", "2", "--batch", "4", "--steps", "1", "--rounds", "1"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ("slca", "l2p", "dualprompt", "coda_prompt")
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.split()[:1] in ([n] for n in names)}
    assert set(rows) == {"slca", "l2p", "dualprompt", "coda_prompt"} and rows["slca"][2] == "1.00"
    assert re.fullmatch(r"ratio: \d+\.\d+", proc.stdout.strip().splitlines()[-1])
