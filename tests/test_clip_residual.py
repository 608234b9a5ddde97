"""ClipBackbone and DIKI residual attention (docs/diki_mtil_protocol.md#backbone,
docs/diki_mtil_protocol.md#residual-attention).

DIKI: Tang et al., ECCV 2024, arXiv 2407.05342. Everything runs on the randomly initialised
``tiny-clip`` on CPU in seconds, except the ``slow`` test that builds ViT-B-16-quickgelu (random init,
no download). References are independent of the code under test: open_clip's own ``encode_image`` /
``encode_text`` / ``nn.MultiheadAttention`` and a hand-written per-head loop.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from the tests

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clcli.errors import BackboneError
from clcli.models.clip import ClipBackbone, eot_positions, register_tiny_clip, truncate_to_eot
from clcli.models.residual_attention import (
    DikiClip,
    ResidualPools,
    residual_attention,
    residual_parameter_count,
    residual_parameter_count_from_config,
)

PROMPTS = [
    "a photo of a cat.",
    "a photo of a 2012 Tesla Model S Sedan, a type of car.",
    'a photo of the number: "7 - seven".',
    "a centered satellite photo of Sea or Lake.",
]


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return ClipBackbone("tiny-clip")


def make_diki(backbone: ClipBackbone, n_tasks: int = 2, **kw) -> DikiClip:
    # depth_vision=2 < 3 blocks exercises untouched blocks after the residual ones; text: all blocks.
    kw = {"depth_vision": 2, "depth_text": 3, "n_tokens_vision": 3, "n_tokens_text": 5, **kw}
    model = DikiClip(backbone, **kw)
    for _ in range(n_tasks):
        model.add_task()
    return model


def randomize_values(model: DikiClip, task: int, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.residual_parameters(task):
            p[1].normal_(0.0, scale)


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32)


# --------------------------------------------------------------------------- backbone


def test_backbone_frozen_transform_and_tokenizer(backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    assert backbone.feature_dim == 32 and backbone.quick_gelu
    assert isinstance(backbone.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert backbone.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)  # random init; 100 for openai
    # Same deterministic val transform for train and test (docs/diki_mtil_protocol.md#preprocessing): no random ops.
    assert backbone.transform(True) is backbone.transform(False)
    names = [type(t).__name__ for t in backbone.transform(True).transforms]
    assert not any(n.startswith("Random") for n in names), names
    from PIL import Image

    out = backbone.transform(True)(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert out.shape == (3, 32, 32)
    tokens = backbone.tokenize(PROMPTS)
    assert tokens.dtype == torch.long and tokens.shape == (4, 77)
    backbone.train()
    assert not backbone.model.training  # the frozen CLIP never leaves eval mode


def test_register_tiny_clip_is_idempotent():
    assert register_tiny_clip() == register_tiny_clip() == "tiny-clip"
    assert open_clip.get_model_config("tiny-clip")["vision_cfg"]["width"] == 64


def test_quickgelu_mismatch_refused_before_loading(monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("create_model called: the check must happen before loading")

    monkeypatch.setattr(open_clip, "create_model", must_not_build)
    with pytest.raises(BackboneError) as e:
        ClipBackbone("ViT-B-16", "openai")
    msg = str(e.value)
    assert "ViT-B-16-quickgelu" in msg and "force_quick_gelu" in msg and "QuickGELU" in msg


def test_unreachable_hub_gives_clear_error(monkeypatch):
    calls = {}

    def offline(*args, **kwargs):
        calls.update(kwargs)
        raise RuntimeError("Failed to download weights for tag 'openai': offline")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(BackboneError) as e:
        ClipBackbone("ViT-B-16", "openai", force_quick_gelu=True)
    assert calls["force_quick_gelu"] is True
    msg = str(e.value)
    assert "backbone.pretrained='openai'" in msg and "backbone.checkpoint_path" in msg and "offline" in msg


def test_missing_checkpoint_file_names_the_key(tmp_path):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(BackboneError) as e:
        ClipBackbone("tiny-clip", checkpoint_path=missing)
    assert "backbone.checkpoint_path" in str(e.value) and missing in str(e.value)


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="backbone.pretrained"):
        ClipBackbone("tiny-clip", pretrained="openai")  # tiny-clip has no tags
    with pytest.raises(BackboneError, match="both"):
        f = tmp_path / "w.pt"
        f.write_bytes(b"")
        ClipBackbone("tiny-clip", pretrained="openai", checkpoint_path=str(f))
    with pytest.raises(BackboneError, match="backbone.model_name"):
        ClipBackbone("ViT-B-16-nonexistent")


def test_checkpoint_path_round_trip(backbone, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(backbone.model.state_dict(), path)
    loaded = ClipBackbone("tiny-clip", checkpoint_path=str(path))
    torch.manual_seed(1)
    x, tokens = images(2), backbone.tokenize(PROMPTS[:2])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), backbone.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), backbone.encode_text(tokens))
    # A file for another architecture is a clear error, not a traceback from load_state_dict.
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(BackboneError, match="backbone.checkpoint_path"):
        ClipBackbone("tiny-clip", checkpoint_path=str(tmp_path / "bad.pt"))


# --------------------------------------------------------------------------- pools


def test_pools_init_and_bookkeeping():
    torch.manual_seed(0)
    pools = ResidualPools(64, 32, depth_vision=2, depth_text=1, n_tokens_vision=3, n_tokens_text=4)
    assert pools.add_task() == 0 and pools.add_task() == 1 and pools.num_tasks == 2
    p = pools.get(1, "vision", 1)
    assert p.shape == (2, 3, 64) and pools.get(1, "text", 0).shape == (2, 4, 32)
    assert pools.get(0, "vision", 2) is None and pools.get(0, "text", 1) is None  # beyond depth
    for t in range(2):
        for q in pools.parameters_of(t):
            assert q[0].abs().max() <= 1 and q[0].abs().max() > 0.5  # keys U(-1, 1)
            assert torch.equal(q[1], torch.zeros_like(q[1]))  # values 0 => zero-shot CLIP at start
    assert pools.num_parameters_per_task() == sum(q.numel() for q in pools.parameters_of(0)) == 2 * 3 * 64 * 2 + 2 * 4 * 32
    pools.freeze_all_but(1)
    assert [q.requires_grad for q in pools.parameters_of(0)] == [False] * 3
    assert [q.requires_grad for q in pools.parameters_of(1)] == [True] * 3
    with pytest.raises(IndexError):
        pools.get(2, "vision", 0)
    assert set(pools.state_dict()) == {f"tasks.{t}.{k}" for t in range(2) for k in ("vision_0", "vision_1", "text_0")}


def test_param_count_formula_vit_b16():
    cfg = open_clip.get_model_config("ViT-B-16-quickgelu")  # no model is built
    assert residual_parameter_count_from_config(cfg) == 8 * 2 * 8 * 768 + 8 * 2 * 8 * 512 == 163_840
    assert 11 * residual_parameter_count(768, 512) == 1_802_240


# --------------------------------------------------------------------------- forward equivalences


def test_step0_equals_frozen_clip_for_any_task_and_weight(backbone):
    torch.manual_seed(0)
    model = make_diki(backbone)
    x, tokens = images(4), backbone.tokenize(PROMPTS)
    with torch.no_grad():
        ref_img = backbone.model.encode_image(x, normalize=True)
        ref_txt = backbone.model.encode_text(tokens, normalize=True)
        for task in (None, 0, 1):
            for w in (None, 1.0, 0.37, torch.tensor([0.0, 0.2, 1.0, 3.0])):
                img = model.encode_image(x, task=task, weight=w)
                txt = model.encode_text(tokens, task=task, weight=w)
                torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
                torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
        # unnormalised features too
        torch.testing.assert_close(
            model.encode_image(x, task=0, normalize=False), backbone.model.encode_image(x), atol=1e-5, rtol=0
        )
    # task=None runs open_clip's own blocks: bit-identical to the plain model.
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), ref_img)
        assert torch.equal(model.encode_text(tokens), ref_txt)


def per_head_reference(attn, h, mask, kv, w):
    """Independent reference: frozen nn.MultiheadAttention output + w·W_o·concat_h(residual_h)."""
    d = h.shape[-1]
    heads = attn.num_heads
    hd = d // heads
    frozen = attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    wq, bq = attn.in_proj_weight[:d], attn.in_proj_bias[:d]
    outs = []
    for head in range(heads):
        sl = slice(head * hd, (head + 1) * hd)  # head h owns residual channels [h*hd, (h+1)*hd)
        q = h @ wq[sl].T + bq[sl]  # [N, L, hd]
        k_r, v_r = kv[0][:, sl], kv[1][:, sl]  # [P, hd]
        a = torch.softmax(q @ k_r.T / hd**0.5, dim=-1)  # [N, L, P], no mask
        outs.append(a @ v_r)
    res = torch.cat(outs, dim=-1) @ attn.out_proj.weight.T  # no bias: out_proj bias counted once
    if w is not None:
        w = torch.as_tensor(w, dtype=h.dtype)
        res = res * (w.view(-1, 1, 1) if w.ndim == 1 else w)
    return frozen + res


@pytest.mark.parametrize("encoder", ["vision", "text"])
def test_one_layer_matches_per_head_loop(backbone, encoder):
    torch.manual_seed(0)
    m = backbone.model
    blocks = m.visual.transformer.resblocks if encoder == "vision" else m.transformer.resblocks
    attn = blocks[1].attn
    n, seq, d = 3, 7, attn.embed_dim
    h = torch.randn(n, seq, d)
    mask = m.attn_mask[:seq, :seq] if encoder == "text" else None
    kv = torch.randn(2, 5, d)  # non-zero keys and values
    with torch.no_grad():
        for w in (None, 0.6, torch.tensor([1.0, 0.0, 0.25])):
            out = residual_attention(attn, h, mask, kv, w)
            torch.testing.assert_close(out, per_head_reference(attn, h, mask, kv, w), atol=1e-5, rtol=1e-5)
        # without a pool: exactly frozen attention (to kernel rounding)
        frozen = attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        torch.testing.assert_close(residual_attention(attn, h, mask, None, None), frozen, atol=1e-6, rtol=0)


def test_zero_weight_is_exactly_frozen_clip(backbone):
    torch.manual_seed(0)
    model = make_diki(backbone)
    randomize_values(model, 1)
    x, tokens = images(4), backbone.tokenize(PROMPTS)
    with torch.no_grad():
        ref_img = backbone.model.encode_image(x, normalize=True)
        ref_txt = backbone.model.encode_text(tokens, normalize=True)
        for w in (0.0, torch.zeros(4)):
            assert torch.equal(model.encode_image(x, task=1, weight=w), ref_img)
            assert torch.equal(model.encode_text(tokens, task=1, weight=w), ref_txt)
        # sanity: the non-zero residual does change the features
        assert (model.encode_image(x, task=1) - ref_img).abs().max() > 1e-3
        assert (model.encode_text(tokens, task=1) - ref_txt).abs().max() > 1e-3


def test_per_sample_weights_apply_per_sample(backbone):
    torch.manual_seed(0)
    model = make_diki(backbone)
    randomize_values(model, 0)
    x = images(3)
    with torch.no_grad():
        mixed = model.encode_image(x, task=0, weight=torch.tensor([0.0, 1.0, 0.5]))
        full = model.encode_image(x, task=0)
        half = model.encode_image(x, task=0, weight=0.5)
        frozen = backbone.model.encode_image(x, normalize=True)
    torch.testing.assert_close(mixed[0], frozen[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], full[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[2], half[2], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="weight"):
        model.encode_image(x, task=0, weight=torch.ones(2))


def test_text_truncation_to_max_eot(backbone):
    torch.manual_seed(0)
    model = make_diki(backbone)
    randomize_values(model, 0)
    tokens = backbone.tokenize(PROMPTS)
    short = truncate_to_eot(tokens)
    assert short.shape[1] == int(eot_positions(tokens).max()) + 1 < 77
    assert torch.equal(backbone.truncate_tokens(tokens), short)
    with torch.no_grad():
        for task, w in ((None, None), (0, None), (0, 0.4), (0, torch.rand(4))):
            full = model.encode_text(tokens, task=task, weight=w)
            cut = model.encode_text(short, task=task, weight=w)
            assert (full - cut).abs().max() < 1e-5
        assert (backbone.encode_text(tokens) - backbone.encode_text(short)).abs().max() < 1e-5


# --------------------------------------------------------------------------- gradients / training


def ce_loss(model: DikiClip, task: int) -> torch.Tensor:
    torch.manual_seed(1)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    tokens = model.backbone.tokenize(PROMPTS)
    logits = model.logit_scale * model.encode_image(x, task=task) @ model.encode_text(tokens, task=task).T
    return F.cross_entropy(logits, y)


def test_step0_gradients(backbone):
    torch.manual_seed(0)
    model = make_diki(backbone)
    ce_loss(model, task=1).backward()
    for p in model.residual_parameters(1):
        assert torch.equal(p.grad[0], torch.zeros_like(p.grad[0]))  # grad K_r = 0 while V_r = 0
        assert p.grad[1].abs().max() > 0  # grad V_r != 0
    assert all(p.grad is None for p in model.residual_parameters(0))  # only the selected task
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())


def test_sgd_changes_only_current_task_residuals(backbone):
    torch.manual_seed(0)
    model = make_diki(backbone)
    clip_before = {k: v.clone() for k, v in backbone.state_dict().items()}
    other_before = [p.detach().clone() for p in model.residual_parameters(0)]
    mine_before = [p.detach().clone() for p in model.residual_parameters(1)]
    model.pools.freeze_all_but(1)
    # momentum + weight decay: safe only because the optimizer sees task 1's tensors alone
    # (docs/diki_mtil_protocol.md#training)
    opt = torch.optim.SGD(model.residual_parameters(1), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for step in range(3):
        opt.zero_grad()
        ce_loss(model, task=1).backward()
        if step == 1:  # V_r != 0 after the first step => K_r starts receiving gradient
            assert any(p.grad[0].abs().max() > 0 for p in model.residual_parameters(1))
        opt.step()
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    assert all(not p.requires_grad for p in backbone.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.residual_parameters(0), other_before))
    assert all(not torch.equal(p[1], q[1]) for p, q in zip(model.residual_parameters(1), mine_before))


def test_fp16_backbone_with_fp32_residuals():
    """Reference precision is pure fp16 (docs/diki_mtil_protocol.md#training); fp32 residual master
    copies get fp32 grads."""
    torch.manual_seed(0)
    bb = ClipBackbone("tiny-clip", precision="fp16")
    assert bb.dtype == torch.float16
    model = make_diki(bb, n_tasks=1)
    x, tokens = images(2), bb.tokenize(PROMPTS[:2])
    with torch.no_grad():
        img = model.encode_image(x, task=0, weight=torch.tensor([0.5, 1.0]))
        assert img.dtype == torch.float16
        torch.testing.assert_close(img.float(), bb.encode_image(x).float(), atol=2e-3, rtol=0)
    randomize_values(model, 0)
    loss = (model.encode_image(x, task=0).float() @ model.encode_text(tokens, task=0).float().T).sum()
    loss.backward()
    grads = [p.grad for p in model.residual_parameters(0)]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_depth_beyond_blocks_is_refused(backbone):
    with pytest.raises(ValueError, match="depth_vision=8 exceeds the 3 blocks"):
        DikiClip(backbone)  # DIKI's default depth 8 needs >= 8 blocks


# --------------------------------------------------------------------------- real widths (slow)


@pytest.mark.slow
def test_vit_b16_quickgelu_counts_and_step0():
    torch.manual_seed(0)
    bb = ClipBackbone("ViT-B-16-quickgelu")  # random init: no download
    assert sum(p.numel() for p in bb.parameters()) == 149_620_737
    assert isinstance(bb.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    model = DikiClip(bb)  # depth 8, 8 tokens in both encoders
    model.add_task()
    assert model.num_residual_parameters_per_task == 163_840
    assert sum(p.numel() for p in model.residual_parameters(0)) == 163_840
    assert sum(p.numel() for p in model.pools.parameters()) == 163_840
    # step-0 equivalence at the real widths (12 vision heads of 64, 8 text heads of 64)
    x = torch.randn(1, 3, 224, 224)
    tokens = bb.tokenize(PROMPTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x, 0, torch.tensor([0.7])), bb.model.encode_image(x, normalize=True),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens, 0, 0.7), bb.model.encode_text(tokens, normalize=True),
                                   atol=1e-5, rtol=0)
