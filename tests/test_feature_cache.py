"""Frozen-feature cache (clcli/cache.py; docs/diki_mtil_protocol.md#exact-speed-ups): keys, exactness, fallbacks.

Everything on the random-init ``tiny-clip`` and ``data=synthetic_mtil`` on CPU.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from the tests

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from clcli.cache import FeatureCache
from clcli.data.images import ImageDataset
from clcli.engine import Runtime, evaluate
from clcli.errors import ConfigError
from clcli.evaluation import AccuracyMatrix
from clcli.methods.base import EvalBatch
from clcli.methods.clip_baselines import ZeroShotCLIP
from clcli.methods.diki import DIKI
from clcli.models.clip import clip_backbone

CONF = str(Path(__file__).resolve().parents[1] / "conf")
OPTIM = {"lr": {"representation": 5.0},
         "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.0, "weight_decay": 0.0},
         "epochs": 1, "batch_size": 32, "schedule": "cosine_steps", "final_lr_ratio": 1.0e-3}
EVAL_BS = 10  # several batches per synthetic test set (24-40 images), partial last batches


@pytest.fixture(scope="module")
def backbone(tiny_clip):
    return tiny_clip


@pytest.fixture(scope="module")
def scenario(synthetic_mtil):
    return synthetic_mtil


def make_diki(backbone, scenario, mode="memory", eval_bs=EVAL_BS, **kw) -> DIKI:
    m = DIKI(backbone=backbone, optim=OmegaConf.create(OPTIM), runtime=Runtime(eval_batch_size=eval_bs),
             feature_cache=mode, **kw)
    m.prepare_scenario(scenario)
    return m


def learn_all(method: DIKI, scenario, seed: int = 3) -> None:
    """Gaussians for every task and random residual values (so that tasks and weights matter)."""
    torch.manual_seed(seed)
    for t in scenario.tasks:
        method.begin_task(t)
        with torch.no_grad():
            for p in method.model.residual_parameters(t.index):
                p[1].normal_(0.0, 0.5)


def share_learning(dst: DIKI, src: DIKI) -> None:
    dst.model, dst.stats = src.model, src.stats


def recording(method: DIKI) -> list[torch.Tensor]:
    log: list[torch.Tensor] = []
    real = method.predict

    def predict(batch):
        out = real(batch)
        log.append(out)
        return out

    method.predict = predict
    return log


def count_frozen_passes(monkeypatch, backbone) -> dict:
    calls = {"images": 0}
    real = backbone.features

    def spy(images):
        calls["images"] += images.shape[0]
        return real(images)

    monkeypatch.setattr(backbone, "features", spy)
    return calls


def key_of(cache, backbone, ds, name="leaves", split="test", batch_size=EVAL_BS, amp_dtype=None):
    rt = Runtime(eval_batch_size=batch_size, amp_dtype=amp_dtype)
    return FeatureCache.digest(cache.key(backbone, ds, rt, name=name, split=split))


def first_pass_batches(scenario, batch_size=EVAL_BS) -> int:
    """Eval batches of one evaluation of every test set: the ones that fill the cache."""
    return sum(-(-len(t.test) // batch_size) for t in scenario.tasks)


# ------------------------------------------------------------------ keys


def test_key_is_stable_and_covers_weights_transform_data_and_context(backbone, scenario):
    ds = scenario.tasks[0].test
    cache = FeatureCache()
    k0 = key_of(cache, backbone, ds)
    assert key_of(cache, backbone, ds) == k0 and key_of(FeatureCache(), backbone, ds) == k0  # memo-independent
    same_data = ImageDataset(ds.split.subset(np.arange(len(ds))), ds.labels.copy(), ds.transform)
    assert key_of(cache, backbone, same_data) == k0  # content, not object identity

    # weights: an in-place change is seen (version counter), restoring the bytes restores the key
    p = backbone.model.visual.conv1.weight
    saved = p.detach().clone()
    with torch.no_grad():
        p.add_(1e-3)
    try:
        assert key_of(cache, backbone, ds) != k0
    finally:
        with torch.no_grad():
            p.copy_(saved)
    assert key_of(cache, backbone, ds) == k0
    torch.manual_seed(123)  # same architecture and (absent) tag, other random weights
    assert key_of(cache, clip_backbone(model_name="tiny-clip", precision="fp32"), ds) != k0

    # transform
    from torchvision import transforms as T

    other = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert key_of(cache, backbone, ds.with_transform(other)) != k0

    # data: one pixel, the labels, the length
    items = ds.split.items.copy()
    items[3, 0, 0, 0] ^= 1
    pixel = ImageDataset(type(ds.split)(items, ds.split.labels), ds.labels, ds.transform)
    assert key_of(cache, backbone, pixel) != k0
    labels = ds.labels.copy()
    labels[[0, -1]] = labels[[-1, 0]]
    assert key_of(cache, backbone, ImageDataset(ds.split, labels, ds.transform)) != k0
    shorter = ImageDataset(ds.split.subset(np.arange(len(ds) - 1)), ds.labels[:-1], ds.transform)
    assert key_of(cache, backbone, shorter) != k0

    # name, split and computation context
    assert key_of(cache, backbone, ds, name="minerals") != k0
    assert key_of(cache, backbone, ds, split="train") != k0
    assert key_of(cache, backbone, ds, batch_size=EVAL_BS + 1) != k0
    assert key_of(cache, backbone, ds, amp_dtype=torch.bfloat16) != k0


def test_key_of_file_items_follows_the_files(backbone, tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(paths[-1])
    from clcli.data.base import SplitData

    ds = ImageDataset(SplitData(paths, np.arange(3)), np.arange(3), backbone.transform(False))
    k0 = key_of(FeatureCache(), backbone, ds)
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(paths[1])  # same path, new content
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert key_of(FeatureCache(), backbone, ds) != k0
    weird = ImageDataset(SplitData([object()] * 3, np.arange(3)), np.arange(3), None)
    assert FeatureCache().key(backbone, weird, Runtime(eval_batch_size=2), name="x", split="test") is None


# ------------------------------------------------------------------ DIKI: cached == uncached


@pytest.mark.parametrize("task_select", ["batch", "sample"])
def test_diki_cached_predictions_equal_uncached(backbone, scenario, monkeypatch, task_select):
    cal = {"task_select": task_select}
    cached = make_diki(backbone, scenario, "memory", calibration=cal)
    plain = make_diki(backbone, scenario, "off", calibration=cal)
    learn_all(plain, scenario)
    share_learning(cached, plain)
    log_c, log_p = recording(cached), recording(plain)
    T = len(scenario)
    mats = {"c": AccuracyMatrix(T), "p": AccuracyMatrix(T)}
    calls = count_frozen_passes(monkeypatch, backbone)
    n_test = sum(len(t.test) for t in scenario.tasks)
    for after in range(T):  # the T x T protocol of engine.evaluate
        before = calls["images"]
        evaluate(cached, scenario, after, mats["c"], cached.rt)
        # stage 0 fills the cache (one frozen pass per test set), later stages encode nothing frozen
        assert calls["images"] - before == (n_test if after == 0 else 0)
        evaluate(plain, scenario, after, mats["p"], plain.rt)
    assert len(log_c) == len(log_p) == T * first_pass_batches(scenario)
    assert all(torch.equal(a, b) for a, b in zip(log_c, log_p))  # bit-identical logits
    assert mats["c"].state_dict() == mats["p"].state_dict()
    report = cached.frozen.report()
    assert report["datasets_encoded"] == T and report["batches_encoded"] == first_pass_batches(scenario)
    assert report["batches_served"] == len(log_c) - first_pass_batches(scenario)


def test_only_batches_named_by_the_evaluator_are_served(backbone, scenario):
    """A batch with a loader position is stored, then served; a batch without one, of another size,
    under another autocast state, or after the weights changed is encoded (and equals the uncached
    method's logits bit for bit)."""
    cached, plain = make_diki(backbone, scenario, "memory"), make_diki(backbone, scenario, "off")
    learn_all(plain, scenario)
    share_learning(cached, plain)
    task = scenario.tasks[2]
    first = torch.stack([task.test[i][0] for i in range(EVAL_BS)])

    def same(images, **where):
        batch = EvalBatch(images, task, task.labels, **where)
        return torch.equal(cached.predict(batch), plain.predict(batch))

    def counts():
        r = cached.frozen.report()
        return r["batches_served"], r["batches_encoded"]

    assert same(first, batch_index=0) and counts() == (0, 1)  # stored
    assert same(first, batch_index=0) and counts() == (1, 1)  # served
    nudged = first.clone()
    nudged[4, 0, 5, 5] += 1e-3
    strided = torch.stack([task.test[i][0] for i in range(0, len(task.test), 3)])
    for images in (nudged, strided, first[torch.randperm(EVAL_BS)]):  # no position: never served
        assert same(images)
    assert same(first[:7], batch_index=0) and same(first[:7], batch_index=1)  # not the loader batch's size
    assert counts() == (1, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # not the state the entry was computed in
        assert same(first, batch_index=0)
    assert counts() == (1, 7)
    assert same(first, batch_index=0) and counts() == (2, 7)
    p = backbone.model.visual.conv1.weight
    saved = p.detach().clone()
    try:
        with torch.no_grad():
            p.add_(1e-3)  # the entry is stale: batch 0 of the next pass replaces it
        assert same(first, batch_index=0) and counts() == (2, 8)
        assert same(first, batch_index=0) and counts() == (3, 8)
    finally:
        with torch.no_grad():
            p.copy_(saved)


def test_direct_calls_do_not_fill_the_cache(backbone, scenario, monkeypatch):
    cached = make_diki(backbone, scenario, "memory", eval_bs=256)
    learn_all(cached, scenario)
    calls = count_frozen_passes(monkeypatch, backbone)
    task = scenario.tasks[1]
    images = torch.stack([task.test[i][0] for i in range(5)])
    for _ in range(2):
        cached.predict(EvalBatch(images, task, task.labels))
    assert calls["images"] == 10 and cached.frozen.report()["batches_served"] == 0


def test_disk_cache_serves_gaussians_and_eval_without_frozen_passes(backbone, scenario, monkeypatch, tmp_path):
    d = tmp_path / "features"
    first = make_diki(backbone, scenario, "disk", feature_cache_dir=str(d))
    ref = make_diki(backbone, scenario, "off")
    learn_all(first, scenario)
    learn_all(ref, scenario)
    for k in ref.stats.keys:  # the Gaussians from the cache path are the streamed ones, bit for bit
        assert torch.equal(first.stats.mean[k], ref.stats.mean[k]) and torch.equal(first.stats.cov[k], ref.stats.cov[k])
    T = len(scenario)
    log_ref = recording(ref)
    evaluate(first, scenario, T - 1, AccuracyMatrix(T), first.rt)  # writes the test entries
    assert first.features.counts["disk_writes"] == 2 * T  # train (Gaussians) + test per dataset
    assert len(list(d.glob("*.pt"))) == 2 * T

    second = make_diki(backbone, scenario, "disk", feature_cache_dir=str(d))
    log_second = recording(second)
    calls = count_frozen_passes(monkeypatch, backbone)
    learn_all(second, scenario)  # same seed: same residual values
    for k in ref.stats.keys:
        assert torch.equal(second.stats.mean[k], ref.stats.mean[k]) and torch.equal(second.stats.cov[k], ref.stats.cov[k])
    evaluate(second, scenario, T - 1, AccuracyMatrix(T), second.rt)
    assert calls["images"] == 0 and second.features.counts["disk_reads"] == 2 * T
    share_learning(ref, second)
    evaluate(ref, scenario, T - 1, AccuracyMatrix(T), ref.rt)
    assert all(torch.equal(a, b) for a, b in zip(log_second, log_ref))

    # a broken or foreign file is recomputed, never trusted
    for i, path in enumerate(sorted(d.glob("*.pt"))):
        if i % 2:
            path.write_bytes(b"not a checkpoint")
        else:
            blob = torch.load(path, weights_only=True)
            key = blob["key"].replace('"split": "test"', '"split": "other"')
            blob["key"] = key.replace('"split": "train"', '"split": "other"')
            torch.save(blob, path)
    third = make_diki(backbone, scenario, "disk", feature_cache_dir=str(d))
    learn_all(third, scenario)
    evaluate(third, scenario, T - 1, AccuracyMatrix(T), third.rt)
    assert third.features.counts["disk_reads"] == 0 and third.features.counts["computed"] == 2 * T
    for k in ref.stats.keys:
        assert torch.equal(third.stats.cov[k], ref.stats.cov[k])


def test_fp16_backbone_features_stored_as_fp16_and_served_exactly(scenario):
    torch.manual_seed(0)
    bb16 = clip_backbone(model_name="tiny-clip", precision="fp32")
    bb16.model.half()
    bb16.precision = "fp16"
    cache = FeatureCache()
    rt = Runtime(eval_batch_size=EVAL_BS)
    ds = scenario.tasks[0].test
    features = cache.features(bb16, ds, rt, name="leaves", split="test")
    assert features.dtype == torch.float16 and len(features) == len(ds)
    for stored, (x, _) in zip(features.split(EVAL_BS), rt.loader(ds, EVAL_BS, shuffle=False)):
        assert torch.equal(stored.float(), bb16.features(x).float())


# ------------------------------------------------------------------ config


def test_config_keys_and_refusals(backbone, tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["method=diki", "data=synthetic_mtil", "backbone=tiny_clip"])
    assert cfg.method.feature_cache == "memory"
    assert cfg.method.feature_cache_dir == f"{cfg.paths.cache_dir}/features"
    with pytest.raises(ConfigError, match="feature_cache"):
        DIKI(backbone=backbone, optim=OmegaConf.create(OPTIM), runtime=Runtime(), feature_cache="ram")
    with pytest.raises(ConfigError, match="feature_cache_dir"):
        DIKI(backbone=backbone, optim=OmegaConf.create(OPTIM), runtime=Runtime(), feature_cache="disk")


def test_sharded_evaluation_gets_its_own_block(backbone, scenario, monkeypatch):
    """Multi-process evaluation (``clcli.distributed``): each rank predicts a contiguous block of a
    test set, so its cache entry is that block's loader batches. Simulated as rank 1 of 3."""
    import inspect

    distributed = pytest.importorskip("clcli.distributed")
    if "shard" not in inspect.signature(Runtime.loader).parameters:
        pytest.skip("engine without sharded evaluation")
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "all_reduce_ints", lambda *v: tuple(int(x) for x in v))
    cached, plain = make_diki(backbone, scenario, "memory", eval_bs=4), make_diki(backbone, scenario, "off", eval_bs=4)
    learn_all(plain, scenario)
    share_learning(cached, plain)
    log_c, log_p = recording(cached), recording(plain)
    T = len(scenario)
    calls = count_frozen_passes(monkeypatch, backbone)
    for after in range(T):
        evaluate(cached, scenario, after, AccuracyMatrix(T), cached.rt)
        evaluate(plain, scenario, after, AccuracyMatrix(T), plain.rt)
    blocks = [distributed.piece(len(t.test), 1, 3) for t in scenario.tasks]
    rows = sum(b - a for a, b in blocks)
    assert calls["images"] == rows * (T + 1)  # plain: every stage; cached: its blocks once
    assert all(torch.equal(a, b) for a, b in zip(log_c, log_p))
    fill = sum(-(-(b - a) // 4) for a, b in blocks)  # this rank's batches of every test set
    report = cached.frozen.report()
    assert (report["datasets_encoded"], report["batches_encoded"], report["batches_served"]) == (T, fill, len(log_c) - fill)


def test_zeroshot_encodes_each_test_set_once_per_run(backbone, scenario, monkeypatch):
    """Zero-shot CLIP over the T x T protocol: stage 0 encodes every test set, later stages nothing;
    logits bit-identical to the uncached method."""
    cached = ZeroShotCLIP(backbone, None, Runtime(eval_batch_size=EVAL_BS), feature_cache="memory")
    plain = ZeroShotCLIP(backbone, None, Runtime(eval_batch_size=EVAL_BS), feature_cache="off")
    for m in (cached, plain):
        m.prepare_scenario(scenario)
    log_c, log_p = recording(cached), recording(plain)
    calls = count_frozen_passes(monkeypatch, backbone)
    T = len(scenario)
    mats = {"c": AccuracyMatrix(T), "p": AccuracyMatrix(T)}
    n_test = sum(len(t.test) for t in scenario.tasks)
    for after in range(T):
        before = calls["images"]
        evaluate(cached, scenario, after, mats["c"], cached.rt)
        assert calls["images"] - before == (n_test if after == 0 else 0)
        before = calls["images"]
        evaluate(plain, scenario, after, mats["p"], plain.rt)
        assert calls["images"] - before == n_test  # the uncached method re-encodes every stage
    assert len(log_c) == len(log_p) and all(torch.equal(a, b) for a, b in zip(log_c, log_p))
    assert mats["c"].state_dict() == mats["p"].state_dict()
    with pytest.raises(ConfigError, match="method.feature_cache"):
        ZeroShotCLIP(backbone, None, Runtime(), feature_cache="sometimes")


def test_a_disk_hit_leaves_the_training_that_follows_unchanged(tmp_path):
    """Skipping the frozen pass for a task's Gaussian (read from disk) must not shift the RNG that
    the task's training shuffles with: unshuffled loaders use a private generator (engine.Runtime.loader)."""
    from conftest import run_tiny

    base = ["method=diki", "data=synthetic_mtil", "backbone=tiny_clip", "device=cpu"]
    disk = ["method.feature_cache=disk", f"method.feature_cache_dir={tmp_path / 'features'}"]
    off = run_tiny(tmp_path, base + ["method.feature_cache=off"], "off")
    run_tiny(tmp_path, base + disk, "fill")
    hit = run_tiny(tmp_path, base + disk, "hit")
    assert hit["method_summary"]["feature_cache"]["disk_reads"] == 6  # train and test set of 3 datasets
    assert hit["method_summary"]["feature_cache"]["datasets_encoded"] == 0
    assert hit["accuracy_matrix"] == off["accuracy_matrix"]
    assert [t["train_loss"] for t in hit["method_summary"]["tasks"]] == [t["train_loss"] for t in off["method_summary"]["tasks"]]
