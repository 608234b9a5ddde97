"""Feature cache of SLCA's frozen-backbone baseline (issue 7; ``clcli.cache.FrozenEvalFeatures.among``).

References are independent of the cache: the same run with ``method.feature_cache=off`` (every test
set re-encoded at every stage) and hand-counted numbers of encoded images and batches.
"""
from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from clcli.cache import FeatureCache, FrozenEvalFeatures
from clcli.engine import Runtime
from clcli.models.timm_backbone import TimmBackbone
from conftest import compose, run_tiny

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

    assert cached["accuracy_matrix"] == off["accuracy_matrix"]  # logits: bit-identical in test_among_* below
    # Without the cache, stage t re-encodes the test sets of tasks 0..t-1: that is all it saves.
    repeats = sum(sum(TASK_SIZES[:t]) for t in range(len(TASK_SIZES)))
    assert images_off - images_cached == repeats == 72
    report = cached["method_summary"]["feature_cache"]
    batches = [math.ceil(n / EVAL_BS) for n in TASK_SIZES]
    assert report == {"mode": "memory", "feature": "forward", "datasets_encoded": 3, "disk_reads": 0,
                      "batches_served": sum(sum(batches[: t + 1]) for t in range(3)), "batches_encoded": 0}
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


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_among_finds_the_test_set_by_hashes_and_encodes_anything_else(scenario, amp):
    """Logits through a head (as SLCA.predict computes them) are bit-identical with and without the
    cache, also under autocast, where the cache holds the bf16 features as float32."""
    backbone = tiny_backbone()
    head = torch.nn.Linear(backbone.feature_dim, 4)
    rt = Runtime(eval_batch_size=EVAL_BS, amp_dtype=amp)
    frozen = FrozenEvalFeatures(FeatureCache("memory"), backbone, rt, feature="forward")
    frozen.tasks = list(scenario.tasks)
    seen = range(0, scenario.tasks[1].labels.stop)  # after task 1: tasks 0 and 1 are candidates
    batches = [torch.stack([t.test[i][0] for i in range(s, min(s + EVAL_BS, len(t.test)))])
               for t in scenario.tasks[:2] for s in range(0, len(t.test), EVAL_BS)]
    x2 = torch.stack([scenario.tasks[2].test[i][0] for i in range(EVAL_BS)])
    flipped = batches[0].flip(0)
    with torch.inference_mode(), rt.autocast():
        for x in batches:
            assert torch.equal(head(frozen.among(x, seen)), head(backbone(x)))
        assert frozen.cache.counts["computed"] == 2  # both candidate test sets, once each
        # task 2 is not a candidate yet; its batch and a reordered batch are encoded, not served
        for x in (x2, flipped):
            assert torch.equal(head(frozen.among(x, seen)), head(backbone(x)))
    if amp is not None:  # outside autocast: not the context the entries were computed in, so encoded
        with torch.inference_mode():
            assert torch.equal(frozen.among(batches[0], seen), backbone(batches[0]))
    report = frozen.report()
    assert (report["batches_served"], report["batches_encoded"], report["datasets_encoded"]) == \
        (6, 2 + (amp is not None), 2)


def test_key_depends_on_train_mode_and_feature(scenario):
    backbone = tiny_backbone()
    cache = FeatureCache("memory")
    task = scenario.tasks[0]

    def key(feature="forward"):
        return cache.key(backbone, task.test, name=task.name, split="test", device=torch.device("cpu"),
                         amp_dtype=None, batch_size=EVAL_BS, feature=feature)

    k_eval = key()
    backbone.train()
    assert FeatureCache.digest(key()) != FeatureCache.digest(k_eval)
    backbone.eval()
    assert key() == k_eval
    channels_last = cache.key(backbone, task.test, name=task.name, split="test", device=torch.device("cpu"),
                              amp_dtype=None, batch_size=EVAL_BS, feature="forward", channels_last=True)
    assert FeatureCache.digest(channels_last) != FeatureCache.digest(k_eval)
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
