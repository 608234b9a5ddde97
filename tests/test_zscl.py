"""ZSCL (docs/diki_mtil_protocol.md#zscl): against continual fine-tuning, the weight ensemble, the
distillation loss and the L2 pull computed by hand, the reference-data checks, a tiny run."""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose, run_tiny
from PIL import Image

from clcli.engine import Runtime, seed_everything
from clcli.methods.clip_baselines import ContinualCLIPFT
from clcli.methods.zscl import ZSCL, distill_loss

TINY = ["data=synthetic_mtil", "backbone=tiny_clip", "optim=synthetic_mtil_zscl", "optim.lr.representation=1e-3",
        "device=cpu"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A stand-in reference set: 32 noise images in an ImageFolder tree and 20 captions."""
    root = tmp_path_factory.mktemp("zscl_ref")
    rng = np.random.RandomState(0)
    for i in range(32):
        d = root / "images" / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(d / f"{i}.png")
    caps = root / "captions.tsv"
    caps.write_text("".join(f"a picture of object number {i} on a table\thttp://x/{i}.jpg\n" for i in range(20)))
    return str(root / "images"), str(caps)


def _zscl(tiny_clip, reference, **kw):
    cfg = compose(["method=zscl", *TINY])
    args = {"lr_by_dataset": None, "augment": "none", "we_every": 4, "ref_images": {"path": reference[0], "batch_size": 8},
            "ref_texts": {"path": reference[1]}, **kw}
    return ZSCL(copy.deepcopy(tiny_clip), cfg.optim, Runtime(), **args)


def _snapshots(method) -> list[dict]:
    """Wrap ``after_step``: the weights after every optimizer step."""
    snaps, original = [], method.after_step

    def hook(s):
        snaps.append({n: p.detach().clone() for n, p in method.backbone.model.named_parameters()})
        original(s)

    method.after_step = hook
    return snaps


def test_zscl_without_its_terms_is_continual_fine_tuning_step_for_step(tiny_clip, synthetic_mtil, reference):
    cfg = compose(["method=clip_ft", *TINY])
    ft = ContinualCLIPFT(copy.deepcopy(tiny_clip), cfg.optim, Runtime())
    zs = _zscl(tiny_clip, reference, lambda_img=0.0, lambda_txt=0.0, lambda_l2=0.0, we_every=0)
    runs = []
    for m in (ft, zs):
        m.prepare_scenario(synthetic_mtil)
        snaps = _snapshots(m)
        for task in synthetic_mtil.tasks[:2]:
            seed_everything(7000 + task.index)
            m.train_task(task)
        runs.append(snaps)
    assert len(runs[0]) == len(runs[1]) == 2 * 13
    for a, b in zip(*runs):
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_weight_ensemble_is_the_mean_of_the_recorded_weights(tiny_clip, synthetic_mtil, reference):
    zs = _zscl(tiny_clip, reference, we_every=4)
    zs.prepare_scenario(synthetic_mtil)
    start = {n: p.detach().clone() for n, p in zs.backbone.model.named_parameters()}
    teacher = _hash(zs.teacher)
    snaps = _snapshots(zs)
    seed_everything(3)
    zs.train_task(synthetic_mtil.tasks[0])
    assert len(snaps) == 13  # steps 0..12
    kept = [start] + [snaps[s] for s in (0, 4, 8, 12)]  # θ^start and the weights after steps 0, 4, 8, 12
    for n, p in zs.backbone.model.named_parameters():
        hand = sum(k[n] for k in kept) / len(kept)
        assert torch.allclose(p, hand, atol=1e-6), n
    assert not torch.allclose(dict(zs.backbone.model.named_parameters())["visual.proj"], snaps[12]["visual.proj"])
    assert zs.history[-1]["weight_ensemble_sets"] == 5
    assert _hash(zs.teacher) == teacher  # the teacher never changes
    # the next task starts from (and its L2 anchor is) the ensembled weights, not θ₀
    step = zs.make_step(synthetic_mtil.tasks[1])
    assert all(torch.equal(step.anchor[n], p) for n, p in zs.backbone.model.named_parameters())
    assert not torch.equal(step.anchor["visual.proj"], start["visual.proj"])


def test_distillation_loss_by_hand():
    torch.manual_seed(0)
    target, logits, temp = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3, 2.0
    hand = 0.0
    for i in range(5):  # T² · mean over rows of −Σ_j p_j log q_j with p = softmax(target/T), q = softmax(logits/T)
        p = [np.exp(v / temp) for v in target[i].tolist()]
        q = [np.exp(v / temp) for v in logits[i].tolist()]
        hand += -sum(pj / sum(p) * np.log(qj / sum(q)) for pj, qj in zip(p, q))
    assert float(distill_loss(target, logits, temp)) == pytest.approx(temp**2 * hand / 5, rel=1e-5)


def test_distillation_terms_on_a_toy_batch(tiny_clip, synthetic_mtil, reference):
    zs = _zscl(tiny_clip, reference)
    zs.prepare_scenario(synthetic_mtil)
    step = zs.make_step(synthetic_mtil.tasks[0])
    with torch.no_grad():  # perturb the student so that it differs from the teacher
        for p in zs.backbone.model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = torch.stack([zs.reference_images()[i][0] for i in range(6)])
    zs.backbone.model.requires_grad_(True)
    l_img, l_txt = step.distillation(ref)
    s = zs.backbone.logit_scale
    u = F.normalize(zs.backbone.model.encode_image(ref), dim=-1).detach()
    u_bar = F.normalize(zs.teacher.model.encode_image(ref), dim=-1)
    v_bar = F.normalize(zs.teacher.model.encode_text(zs.backbone.tokenize(
        [f"a picture of object number {i} on a table" for i in range(20)])), dim=-1)  # full 77 tokens, recomputed
    z, z_bar = s * u @ v_bar.T, s * u_bar @ v_bar.T
    hand_img = 4 * (-(z_bar / 2).softmax(1) * (z / 2).log_softmax(1)).sum(1).mean()
    hand_txt = 4 * (-(z_bar.T / 2).softmax(1) * (z.T / 2).log_softmax(1)).sum(1).mean()
    assert torch.allclose(l_img, hand_img, atol=1e-4) and torch.allclose(l_txt, hand_txt, atol=1e-4)
    # the cached teacher text features equal recomputed ones; no distillation gradient reaches the text tower
    assert torch.allclose(zs.reference_texts()[1], v_bar, atol=1e-5)
    (l_img + l_txt).backward()
    text_grads = [p.grad for n, p in zs.backbone.model.named_parameters() if not n.startswith("visual.")]
    assert all(g is None or not g.any() for g in text_grads)
    assert any(p.grad is not None and p.grad.any() for p in zs.backbone.model.visual.parameters())


def test_l2_pull_value_and_gradient_by_hand(tiny_clip, synthetic_mtil, reference):
    zs = _zscl(tiny_clip, reference)
    zs.prepare_scenario(synthetic_mtil)
    step = zs.make_step(synthetic_mtil.tasks[0])
    torch.manual_seed(1)
    deltas = {}
    with torch.no_grad():
        for n, p in zs.backbone.model.named_parameters():
            if n != "logit_scale":
                deltas[n] = 0.01 * torch.randn_like(p)
                p.add_(deltas[n])
    zs.backbone.model.requires_grad_(True)
    zs.backbone.model.logit_scale.requires_grad_(False)
    value = step.l2()
    value.backward()
    assert float(value.detach()) == pytest.approx(sum(float((d.double() ** 2).sum()) for d in deltas.values()), rel=1e-4)
    for n, p in zs.backbone.model.named_parameters():
        if n in deltas:
            assert torch.allclose(p.grad, 2 * deltas[n], atol=1e-6), n


def test_teacher_is_the_initial_clip_and_reference_checks(tiny_clip, reference, tmp_path):
    cfg = compose(["method=zscl", *TINY])
    problems = ZSCL.config_problems(cfg.optim, type(tiny_clip), ref_images={"path": str(tmp_path / "nope")},
                                    ref_texts={"path": str(tmp_path / "no.tsv")})
    assert any(p.startswith("method.ref_images.path=") and "ImageNet" in p for p in problems)
    assert any(p.startswith("method.ref_texts.path=") and "Validation_GCC-1.1.0-Validation.tsv" in p for p in problems)
    assert ZSCL.config_problems(cfg.optim, type(tiny_clip), lambda_img=0, lambda_txt=0,
                                ref_images={"path": None}) == []  # no distillation: no reference data needed
    assert any("method.temperature" in p for p in ZSCL.config_problems(
        cfg.optim, type(tiny_clip), temperature=0, ref_images={"path": reference[0]}, ref_texts={"path": reference[1]}))


def _hash(module) -> str:
    h = hashlib.sha256()
    for t in module.state_dict().values():
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_zscl_learns_on_synthetic_mtil(tmp_path, reference):
    res = run_tiny(tmp_path, ["method=zscl", *TINY, f"method.ref_images.path={reference[0]}",
                              f"method.ref_texts.path={reference[1]}", "method.ref_images.batch_size=8",
                              "method.we_every=4", "optim.iterations=30", "method.lambda_l2=0.01"])
    m = np.array(res["accuracy_matrix"], dtype=float)
    assert m.shape == (3, 3) and not np.isnan(m).any()
    assert {"transfer", "avg", "last"} <= set(res["metrics"])
    s = res["method_summary"]
    assert s["reference_images"] == 32 and s["reference_texts"] == 20 and s["we_every"] == 4
    assert all(t["weight_ensemble_sets"] == 9 for t in s["tasks"])  # θ^start + steps 0, 4, ..., 28
    chance = [25.0, 100 / 3, 20.0]
    assert sum(m[i, i] > chance[i] + 1 for i in range(3)) >= 2
