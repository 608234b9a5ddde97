"""Feature cache of SLCA's frozen-backbone baseline (``clcli.cache.FrozenEvalFeatures``), and SLCA's
prediction ignoring the task named by the evaluation context.

References are independent of the cache: the same run with ``method.feature_cache=off`` (every test
set re-encoded at every stage) and hand-counted numbers of encoded images and batches.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import compose, run_tiny
from hydra.utils import instantiate

from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.engine import Runtime
from clcli.methods.base import EvalBatch
from clcli.models.timm_backbone import TimmBackbone

EVAL_BS = 10  # synthetic test sets hold 24 images: batches of 10, 10 and 4
TASK_SIZES = [24, 24, 24]  # test images per task (data=synthetic: 2 classes x 12)
FROZEN = ["method=frozen", "data=synthetic", "backbone=tiny_vit", "device=cpu", f"eval.batch_size={EVAL_BS}",
          "optim.epochs=2", "optim.milestones=[1]",
          "guard.chance_loss_ratio=0"]  # a random-init frozen tiny ViT learns little: only the cache is tested


class CountingForward:
    """Counts the images every TimmBackbone.forward call sees (training, statistics and evaluation)."""

    def __init__(self, monkeypatch):
        self.images = 0
        original = TimmBackbone.forward

        def forward(backbone, x):
            self.images += x.shape[0]
            return original(backbone, x)

        monkeypatch.setattr(TimmBackbone, "forward", forward)


def test_frozen_eval_encodes_each_test_set_once_with_identical_results(tmp_path, monkeypatch):
    counter = CountingForward(monkeypatch)
    off = run_tiny(tmp_path, FROZEN + ["method.feature_cache=off"], "off")
    images_off, counter.images = counter.images, 0
    cached = run_tiny(tmp_path, FROZEN, "memory")
    images_cached = counter.images

    assert cached["accuracy_matrix"] == off["accuracy_matrix"]  # logits: bit-identical in test_cache_* below
    # Without the cache, stage t re-encodes the test sets of tasks 0..t-1: that is all it saves.
    repeats = sum(sum(TASK_SIZES[:t]) for t in range(len(TASK_SIZES)))
    assert images_off - images_cached == repeats == 72
    report = cached["method_summary"]["feature_cache"]
    batches = [math.ceil(n / EVAL_BS) for n in TASK_SIZES]
    # stage t encodes task t's test set (3 batches) and serves tasks 0..t-1 from the cache
    assert report == {"mode": "memory", "feature": "forward", "datasets_encoded": 3, "disk_reads": 0,
                      "batches_served": sum(sum(batches[:t]) for t in range(3)), "batches_encoded": sum(batches)}
    assert "feature_cache" not in off["method_summary"]


def test_disk_cache_serves_a_later_run_and_a_trained_backbone_ignores_it(tmp_path, monkeypatch):
    disk = ["method.feature_cache=disk", f"method.feature_cache_dir={tmp_path / 'features'}"]
    first = run_tiny(tmp_path, FROZEN + disk, "first")
    assert len(list((tmp_path / "features").glob("*.pt"))) == 3
    counter = CountingForward(monkeypatch)
    second = run_tiny(tmp_path, FROZEN + disk, "second")
    report = second["method_summary"]["feature_cache"]
    assert (report["datasets_encoded"], report["disk_reads"], report["batches_encoded"]) == (0, 3, 0)
    # no test image is encoded at all, only the train images: 2 epochs x 48 per task (no statistics:
    # method=frozen has no alignment)
    assert counter.images == 3 * 2 * 48
    assert second["accuracy_matrix"] == first["accuracy_matrix"]

    slow = run_tiny(tmp_path, ["method=slow_learner", "data=synthetic", "backbone=tiny_vit", "device=cpu"] + disk, "slow")
    assert "feature_cache" not in slow["method_summary"]  # the backbone trains: nothing to cache
    assert len(list((tmp_path / "features").glob("*.pt"))) == 3


def tiny_backbone() -> TimmBackbone:
    torch.manual_seed(0)
    return instantiate(compose(["backbone=tiny_vit"]).backbone).eval()


@pytest.fixture(scope="module")
def scenario():
    cfg = compose(["data=synthetic", "backbone=tiny_vit"])
    return instantiate(cfg.data).build(tiny_backbone())


def loader_batches(task, rt):
    """``task``'s test set as engine.evaluate presents it: loader batches named by their position."""
    return [(j, x) for j, (x, _) in enumerate(rt.loader(task.test, rt.eval_batch_size, shuffle=False))]


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_cache_serves_batches_named_by_test_set_and_position(scenario, amp):
    """Logits through a head (as SLCA.predict computes them) are bit-identical with and without the
    cache, also under autocast, where the cache holds the bf16 features as float32."""
    backbone = tiny_backbone()
    head = torch.nn.Linear(backbone.feature_dim, 4)
    rt = Runtime(eval_batch_size=EVAL_BS, amp_dtype=amp)
    frozen = FrozenEvalFeatures(FeatureCache("memory"), backbone, rt, feature="forward")
    seen = range(0, scenario.tasks[1].labels.stop)  # after task 1: tasks 0 and 1 are evaluated
    with torch.inference_mode(), rt.autocast():
        for _ in range(2):  # the first pass encodes, the second is served
            for task in scenario.tasks[:2]:
                for j, x in loader_batches(task, rt):
                    assert torch.equal(head(frozen(EvalBatch(x, task, seen, j))), head(backbone(x)))
        assert frozen.cache.counts["computed"] == 2  # both test sets, once each
    x0 = loader_batches(scenario.tasks[0], rt)[0][1]
    if amp is not None:  # outside autocast: not the state the entries were computed in, so encoded
        with torch.inference_mode():
            assert torch.equal(frozen(EvalBatch(x0, scenario.tasks[0], seen, 0)), backbone(x0))
    report = frozen.report()
    assert (report["batches_served"], report["batches_encoded"], report["datasets_encoded"]) == \
        (6, 6 + (amp is not None), 2)


def test_slca_logits_do_not_depend_on_the_task_in_the_context(scenario):
    """Class-incremental prediction scores all seen classes from the image alone: the same batch
    named as coming from any task (no loader position, so no cache) gives the same logits, equal to
    the heads on the backbone's features; the frozen method's cached logits equal them too."""
    seen = range(0, scenario.tasks[-1].labels.stop)
    task = scenario.tasks[1]
    for method_name in ("slow_learner", "frozen"):
        cfg = compose(["data=synthetic", "backbone=tiny_vit", f"method={method_name}"])
        rt = Runtime(eval_batch_size=EVAL_BS)
        method = instantiate(cfg.method, _partial_=True)(backbone=tiny_backbone(), optim=cfg.optim, runtime=rt)
        torch.manual_seed(1)
        for t in scenario.tasks:
            method.begin_task(t)  # random heads for every task
        with torch.inference_mode():
            for j, x in loader_batches(task, rt):
                reference = method.heads(method.backbone(x))[:, seen.start : seen.stop]
                for named in scenario.tasks:
                    assert torch.equal(method.predict(EvalBatch(x, named, seen, after=2)), reference)
                for _ in range(2):  # truthful context: the first call fills the cache, the second is served
                    assert torch.equal(method.predict(EvalBatch(x, task, seen, j, after=2)), reference)
        if method_name == "frozen":
            assert method.frozen.report()["batches_served"] == len(loader_batches(task, rt))


def test_key_depends_on_train_mode_and_feature(scenario):
    backbone = tiny_backbone()
    cache = FeatureCache("memory")
    task = scenario.tasks[0]

    def key(feature="forward", channels_last=False):
        rt = Runtime(eval_batch_size=EVAL_BS, channels_last=channels_last)
        return cache.key(backbone, task.test, rt, name=task.name, split="test", feature=feature)

    k_eval = key()
    backbone.train()
    assert FeatureCache.digest(key()) != FeatureCache.digest(k_eval)
    backbone.eval()
    assert key() == k_eval
    assert FeatureCache.digest(key(channels_last=True)) != FeatureCache.digest(k_eval)
    backbone.model.compile()  # perf.compile: other kernels, another key (nothing runs here)
    assert key()["backbone"]["compiled"] and not k_eval["backbone"]["compiled"]
    assert FeatureCache.digest(key("features")) != FeatureCache.digest(k_eval)
    with pytest.raises(ValueError, match="unknown feature"):
        key("logits")


def test_feature_cache_config_is_checked_by_validate_and_the_constructor():
    from clcli.config import check_config
    from clcli.errors import ConfigError

    assert compose(FROZEN).method.feature_cache == "memory"
    cfg = compose(FROZEN + ["method.feature_cache=ram"])
    message = "method.feature_cache: expected one of memory, disk, off, got 'ram'."
    assert message in check_config(cfg)
    with pytest.raises(ConfigError, match="got 'ram'"):
        instantiate(cfg.method, _partial_=True)(backbone=tiny_backbone(), optim=cfg.optim, runtime=Runtime())
