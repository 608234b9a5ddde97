"""The classifier-alignment stage shared by SLCA and the prompt methods (clcli/alignment.py,
docs/slca_protocol.md#classifier-alignment, docs/prompt_baselines.md#classifier-alignment-on-prompts):
statistics of any feature function, alignment of a copy, and the ``method.ca`` key checks."""
from types import SimpleNamespace

import torch

from clcli.alignment import CA_KEYS, align, ca_config_problems, fit_statistics
from clcli.engine import Runtime
from clcli.models.heads import TaskHeads
from clcli.stats import GaussianStats

CA = dict(enabled=True, epochs=3, samples_per_class=8, lr=0.01, momentum=0.9, weight_decay=5e-4, logit_norm_tau=0.1,
          mean_scaling=True, buggy_task_id=False)
STATS = dict(ridge=1e-4, batch_size=5)


def test_statistics_of_any_feature_function_equal_torch_cov():
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.arange(4).repeat_interleave(10)
    proj = torch.randn(6, 3)
    stats = GaussianStats(3, ridge=1e-4)
    fit_statistics(stats, lambda images: images @ proj + 1.0, torch.utils.data.TensorDataset(x, y), Runtime(), batch_size=7)
    f = (x @ proj + 1.0).double()
    assert stats.keys == [0, 1, 2, 3]
    for c in range(4):
        assert torch.allclose(stats.mean[c], f[y == c].mean(0), atol=1e-6)
        assert torch.allclose(stats.cov[c].double(), torch.cov(f[y == c].T) + 1e-4 * torch.eye(3, dtype=torch.float64), atol=1e-5)


def test_align_trains_a_copy_for_every_seen_class_and_leaves_the_heads(monkeypatch):
    torch.manual_seed(0)
    heads = TaskHeads(4)
    heads.add_task(2); heads.add_task(2)
    stats = GaussianStats(4, ridge=1e-4)
    feats = torch.randn(80, 4) + torch.arange(4).repeat_interleave(20)[:, None].float()  # four separated classes
    stats.update(feats, torch.arange(4).repeat_interleave(20))
    stats.finalize()
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    steps = []
    real = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (steps.append(1), real(self, *a, **k))[1])
    task = SimpleNamespace(index=1, name="t1", labels=range(2, 4), num_classes=2)
    aligned = align(heads, stats, CA, task, [0, 0, 1, 1], Runtime())
    assert len(steps) == 3 * 4  # epochs x seen classes, one batch of samples_per_class each
    assert all(torch.equal(v, before[k]) for k, v in heads.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in aligned.state_dict().items())
    assert not any(p.requires_grad for p in aligned.parameters())


def test_ca_key_checks_take_the_methods_extra_keys():
    assert ca_config_problems(CA, STATS) == []
    assert any("method.ca.feature_path: unknown key" in p for p in ca_config_problems({**CA, "feature_path": "x"}, STATS))
    assert ca_config_problems({**CA, "feature_path": "x"}, STATS, (*CA_KEYS, "feature_path")) == []
    missing = ca_config_problems(CA, STATS, (*CA_KEYS, "feature_path"))
    assert missing == ["method.ca.feature_path: missing; classifier alignment (method.ca.enabled) needs it."]
    assert ca_config_problems({"enabled": False}, STATS, (*CA_KEYS, "feature_path")) == []  # nothing else is read
    assert any("method.stats.ridge: must be > 0" in p for p in ca_config_problems(CA, {**STATS, "ridge": 0}))
