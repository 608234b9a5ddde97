"""SLCA behaviour (docs/slca_protocol.md#overview) on a tiny ViT and generated images."""
import copy
import re

import pytest
import torch
from omegaconf import OmegaConf

from clcli import optim as optim_lib
from clcli.data.scenario import build_class_incremental
from clcli.data.synthetic import SyntheticSource
from clcli.data.transforms import build_transforms
from clcli.engine import Runtime
from clcli.errors import ConfigError
from clcli.methods.base import EvalBatch
from clcli.methods.slca import SLCA, ca_mean_scale, logit_norm_loss
from clcli.models.heads import TaskHeads
from clcli.models.timm_backbone import TimmBackbone

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "weight_decay": 5e-4}  # optim/optimizer/sgd
CA = dict(enabled=True, epochs=2, samples_per_class=16, lr=0.01, momentum=0.9, weight_decay=5e-4,
          logit_norm_tau=0.1, mean_scaling=True, buggy_task_id=True)


def _setup(ca=CA, lr_rep=1e-3):
    torch.manual_seed(0)
    bb = TimmBackbone("vit_tiny_patch16_224", reinit_final_norm=True,
                      model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    src = SyntheticSource(num_classes=4, train_per_class=8, test_per_class=4, image_size=16)
    tr, te = build_transforms("upscale", bb)
    sc = build_class_incremental(src, name="s", initial_increment=2, increment=2, class_order_seed=1993,
                                 shuffle_classes=True, train_transform=tr, test_transform=te)
    optim = OmegaConf.create(dict(lr=dict(representation=lr_rep, classifier=0.05), optimizer=SGD,
                                  epochs=2, batch_size=8, schedule="multistep", milestones=[1], gamma=0.1))
    # chance_loss_ratio=0: two epochs on 16 images need not beat chance; these tests check mechanics
    m = SLCA(bb, optim, Runtime(chance_loss_ratio=0.0), ca=ca, stats=dict(ridge=1e-4, batch_size=8))
    return m, sc


def test_fresh_final_norm():
    bb = TimmBackbone("vit_tiny_patch16_224", reinit_final_norm=True,
                      model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    assert bb.model.norm.eps == 1e-5 and torch.all(bb.model.norm.weight == 1) and torch.all(bb.model.norm.bias == 0)
    assert bb.model.blocks[0].norm1.eps == 1e-6
    assert bb(torch.randn(3, 3, 32, 32)).shape == (3, 32)


def test_new_head_init_and_old_heads_frozen():
    torch.manual_seed(0)
    heads = TaskHeads(768)
    heads.add_task(10)
    h1 = heads.add_task(200)
    assert torch.all(h1.bias == 0) and abs(h1.weight.std().item() - 0.02) < 0.002
    assert not any(p.requires_grad for p in heads.heads[0].parameters())
    assert all(p.requires_grad for p in h1.parameters())
    assert heads.slices() == [(0, 10), (10, 210)]


def test_stage1_step_is_ce_over_the_new_head_and_old_heads_stay(monkeypatch):
    """Runs the method's own training step (captured from its call to fit) on one batch."""
    import clcli.methods.slca as slca_module

    m, sc = _setup(ca=dict(CA, enabled=False))
    t0, t1 = sc.tasks
    m.begin_task(t0); m.train_task(t0); m.end_task(t0)
    old = copy.deepcopy(m.heads.heads[0].state_dict())
    m.begin_task(t1)
    steps = []
    real_fit = slca_module.fit
    monkeypatch.setattr(slca_module, "fit", lambda step, *a, **k: (steps.append(step), real_fit(step, *a, **k))[1])
    m.train_task(t1)
    for k, v in m.heads.heads[0].state_dict().items():  # the old head never moved
        assert torch.equal(v, old[k])
    x = torch.stack([t1.train[i][0] for i in range(4)])
    y = torch.tensor([t1.train[i][1] for i in range(4)])  # global labels 2..3
    m.backbone.zero_grad(set_to_none=True); m.heads.zero_grad(set_to_none=True)
    loss = steps[0](x, y)
    with torch.no_grad():
        z = m.heads(m.backbone(x))
    expected = torch.nn.functional.cross_entropy(z[:, 2:4], y - 2)  # the new head's columns, local targets
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(expected, torch.nn.functional.cross_entropy(z[:, :4], y), atol=1e-3)  # not over all seen
    loss.backward()
    assert m.heads.heads[0].weight.grad is None and m.heads.heads[1].weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())  # the slow learner learns


def test_alignment_trains_a_copy_and_recall_restores_stage1_heads():
    m, sc = _setup()
    t0, t1 = sc.tasks
    for t in (t0, t1):
        m.begin_task(t); m.train_task(t)
        backup = copy.deepcopy(m.heads.state_dict())
        bb_before = copy.deepcopy(m.backbone.state_dict())
        m.end_task(t)
    assert m.aligned is not None  # CA ran at task 1 (never at task 0)
    for k, v in m.heads.state_dict().items():
        assert torch.equal(v, backup[k])  # stage-1 heads untouched by CA
    assert any(not torch.equal(v, m.aligned.state_dict()[k]) for k, v in backup.items())
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, bb_before[k])  # CA never changes the backbone
    assert set(m.stats.keys) == {0, 1, 2, 3}
    # predictions use the aligned heads; the next task starts from the stage-1 heads (recall)
    x = torch.stack([t1.test[i][0] for i in range(3)])
    with torch.no_grad():
        assert torch.allclose(m.predict(EvalBatch(x, t1, range(0, 4))), m.aligned(m.backbone(x)))
    from clcli.data.scenario import Task
    m.begin_task(Task(2, "t2", range(4, 6), [0, 1], ["a", "b"], t0.train, t0.train_plain, t0.test))
    assert m.aligned is None
    for k, v in backup.items():
        assert torch.equal(m.heads.state_dict()[k], v)


def test_non_finite_alignment_loss_is_a_divergence_error_naming_task_epoch_step():
    """A non-finite CA loss stops with a DivergenceError (recorded as a diverged outcome by the run
    loop, no traceback) that names the task, the alignment epoch and step, and the keys to change."""
    from clcli.errors import DivergenceError

    m, sc = _setup(ca=dict(CA, lr=1e30))
    t0, t1 = sc.tasks
    m.begin_task(t0); m.train_task(t0); m.end_task(t0)
    m.begin_task(t1); m.train_task(t1)
    with pytest.raises(DivergenceError) as err:
        m.end_task(t1)
    msg = str(err.value)
    assert "Classifier alignment diverged in task 1 (task1), alignment epoch 1/2, step " in msg
    assert re.search(r"step [2-4]/4: loss = (nan|inf)", msg), msg  # the 1e30 step blows up the next loss
    assert "method.ca.lr (now 1e+30)" in msg and "method.stats.ridge (now 0.0001" in msg


def test_no_alignment_at_task0():
    m, sc = _setup()
    t0 = sc.tasks[0]
    m.begin_task(t0); m.train_task(t0); m.end_task(t0)
    assert m.aligned is None and m.stats.keys == [0, 1]


def test_statistics_use_test_transform_in_eval_mode():
    m, sc = _setup()
    t0 = sc.tasks[0]
    m.begin_task(t0); m.train_task(t0); m.end_task(t0)
    m.backbone.eval()
    with torch.no_grad():
        xs = [t0.train_plain[i] for i in range(len(t0.train_plain))]
        f = m.backbone(torch.stack([x for x, _ in xs])).double()
        y = torch.tensor([label for _, label in xs])
    for c in (0, 1):
        ref = torch.cov(f[y == c].T) + 1e-4 * torch.eye(f.shape[1], dtype=torch.float64)
        assert torch.allclose(m.stats.cov[c].double(), ref, atol=1e-5)
        assert torch.allclose(m.stats.mean[c], f[y == c].mean(0), atol=1e-5)


def test_logit_norm_keeps_argmax_and_uses_mean_task_norm():
    torch.manual_seed(0)
    z = torch.randn(64, 10) * 3
    slices = [(0, 4), (4, 10)]
    n = torch.stack([z[:, a:b].norm(dim=1) + 1e-7 for a, b in slices], 1).mean(1)
    assert torch.equal((z / n[:, None] / 0.1).argmax(1), z.argmax(1))
    y = torch.randint(0, 10, (64,))
    ref = torch.nn.functional.cross_entropy(z / n[:, None] / 0.1, y)
    assert torch.allclose(logit_norm_loss(z, y, slices, 0.1), ref)
    assert torch.allclose(logit_norm_loss(z, y, slices, 0.0), torch.nn.functional.cross_entropy(z, y))


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_ca_cosine_lr_per_epoch():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = optim_lib.sgd([([p], 0.01)], momentum=0.9, weight_decay=5e-4)
    sched = optim_lib.scheduler(opt, "cosine", 5, 1)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.01, 0.009045, 0.006545, 0.003455, 0.000955], abs=1e-6)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_stage1_multistep_lrs():
    ps = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = optim_lib.sgd([([ps[0]], 1e-4), ([ps[1]], 1e-2)], momentum=0.9, weight_decay=5e-4)
    sched = optim_lib.scheduler(opt, "multistep", 20, 40, milestones=[18])
    seen = []
    for _ in range(20):
        seen.append(tuple(g["lr"] for g in opt.param_groups))
        sched.step()
    assert seen[0] == pytest.approx((1e-4, 1e-2)) and seen[17] == pytest.approx((1e-4, 1e-2))
    assert seen[18] == pytest.approx((1e-5, 1e-3)) and seen[19] == pytest.approx((1e-5, 1e-3))
    assert opt.param_groups[0]["weight_decay"] == 5e-4


def test_mean_scale_and_cars_task_id_bug():
    task_of = [c // 2 for c in range(6)]
    s = ca_mean_scale(list(range(6)), 2, task_of, 2, buggy_task_id=False)
    assert s.tolist() == pytest.approx([0.9 + 0.1 / 3] * 2 + [0.9 + 0.2 / 3] * 2 + [1.0] * 2)
    # Cars, final task (T=9, current task size 16): class 19 -> t_id 1, classes 160..195 -> 10..12
    cars_task_of = [min(c // 20, 9) for c in range(196)]
    bug = ca_mean_scale(list(range(196)), 9, cars_task_of, 16, buggy_task_id=True)
    assert bug[19] == pytest.approx(0.9 + 0.1 * 2 / 10)
    assert bug.max().item() == pytest.approx(1.03)
    fixed = ca_mean_scale(list(range(196)), 9, cars_task_of, 16, buggy_task_id=False)
    assert fixed.max().item() <= 1.0 + 1e-12


def test_ca_sample_volume_and_steps(monkeypatch):
    m, sc = _setup(ca=dict(CA, epochs=3, samples_per_class=16))
    steps = []
    orig = torch.optim.SGD.step

    def counting(self, *a, **k):
        steps.append(1)
        return orig(self, *a, **k)

    t0, t1 = sc.tasks
    m.begin_task(t0); m.train_task(t0); m.end_task(t0)
    m.begin_task(t1); m.train_task(t1)
    monkeypatch.setattr(torch.optim.SGD, "step", counting)
    m.end_task(t1)
    assert len(steps) == 3 * 4  # ca.epochs x C steps (C = 4 seen classes), 16 samples each


def test_frozen_backbone_never_changes():
    m, sc = _setup(ca=dict(CA, enabled=False), lr_rep=0.0)
    before = copy.deepcopy(m.backbone.state_dict())
    t0 = sc.tasks[0]
    m.begin_task(t0); m.train_task(t0)
    assert not any(p.requires_grad for p in m.backbone.parameters())
    for k, v in m.backbone.state_dict().items():
        assert torch.equal(v, before[k])


def test_the_constructor_runs_slcas_own_checks():
    with pytest.raises(ConfigError) as info:
        _setup(ca={**{k: v for k, v in CA.items() if k != "samples_per_class"}, "samples_per_clas": 16})
    assert any("method.ca.samples_per_clas: unknown key" in p and "Did you mean method.ca.samples_per_class?" in p
               for p in info.value.problems)
    assert any(p.startswith("method.ca.samples_per_class: missing") for p in info.value.problems)
