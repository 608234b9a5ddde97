"""DIKI evaluation of one stage with cached frozen features vs recomputing them
(docs/diki_mtil_protocol.md#exact-speed-ups).

T synthetic datasets (own classes, prompts and images) on a randomly initialised CLIP; T tasks are
"learned" (Gaussians fitted on the frozen train features, random residual values), then the stage
after the last task evaluates every dataset with ``engine.evaluate`` — once with
``method.feature_cache=off`` (a frozen and a residual image pass per batch, the reference) and once
with ``memory`` (warm: the frozen pass comes from the cache; the one-off fill is timed separately).
Logits of every batch are asserted bit-identical. The last line is ``ratio: <recompute / cached>``.

    python scripts/bench_diki.py [--datasets 4] [--classes 10] [--test-per-class 32] [--batch-size 128]
                                 [--model tiny-clip | --width 128 --layers 4 --image-size 64 --patch 8]
                                 [--device cpu] [--threads 1] [--repeats 3]

``--model`` names any open_clip architecture (random init); without it a small QuickGELU CLIP of
``--width``/``--layers``/``--image-size``/``--patch`` is registered (the default is larger than the
32-px test ``tiny-clip``, whose forward pass is so small that image decoding dominates everything).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from omegaconf import OmegaConf

from clcli.data.scenario import build_domain_incremental
from clcli.data.synthetic import SyntheticSource
from clcli.engine import Runtime, evaluate
from clcli.evaluation import AccuracyMatrix
from clcli.methods.diki import DIKI
from clcli.models.clip import clip_backbone

OPTIM = {"lr": {"representation": 5.0},
         "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.0, "weight_decay": 0.0},
         "epochs": 1, "batch_size": 32, "schedule": "cosine_steps", "final_lr_ratio": 1.0e-3}


def register_arch(width: int, layers: int, image_size: int, patch: int) -> str:
    import open_clip

    name = f"bench-clip-w{width}-l{layers}-i{image_size}-p{patch}"
    if name not in open_clip.list_models():
        cfg = {"embed_dim": max(32, width // 2), "quick_gelu": True,
               "vision_cfg": {"image_size": image_size, "patch_size": patch, "width": width, "layers": layers,
                              "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": max(1, width // 32),
                            "layers": layers}}
        path = Path(tempfile.mkdtemp(prefix="clcli-bench-")) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", type=int, default=4)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=8)
    ap.add_argument("--test-per-class", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128, help="eval.batch_size")
    ap.add_argument("--model", default=None, help="an open_clip architecture (e.g. tiny-clip); default: registered")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    torch.manual_seed(0)
    model = args.model or register_arch(args.width, args.layers, args.image_size, args.patch)
    backbone = clip_backbone(model_name=model, precision=args.precision)
    size = int(backbone.model.visual.image_size[0]) if isinstance(backbone.model.visual.image_size, (tuple, list)) \
        else int(backbone.model.visual.image_size)
    sources = [(f"set{k}", SyntheticSource(num_classes=args.classes, train_per_class=args.train_per_class,
                                           test_per_class=args.test_per_class, image_size=size, seed=100 + k,
                                           name=f"set{k}", name_prefix=f"s{k}_",
                                           templates=[f"a photo of a {{c}}, kind {k}."]), None)
               for k in range(args.datasets)]
    scenario = build_domain_incremental(sources, name="bench", transform=backbone.transform(False), with_val=False)
    T = len(scenario)

    def make(mode: str) -> DIKI:
        rt = Runtime(device=dev, eval_batch_size=args.batch_size)
        m = DIKI(backbone=backbone, optim=OmegaConf.create(OPTIM), runtime=rt, feature_cache=mode)
        m.prepare_scenario(scenario)
        return m

    cached, recompute = make("memory"), make("off")
    torch.manual_seed(1)
    for task in scenario.tasks:
        recompute.begin_task(task)
        with torch.no_grad():  # "learned" residuals: random values so that tasks and weights matter
            for p in recompute.model.residual_parameters(task.index):
                p[1].normal_(0.0, 0.5)
    cached.model, cached.stats = recompute.model, recompute.stats  # the same residuals and Gaussians

    logs: dict[str, list[torch.Tensor]] = {}

    def record(method: DIKI, name: str) -> None:
        real = method.predict

        def predict(batch):
            out = real(batch)
            logs.setdefault(name, []).append(out.detach().cpu())
            return out

        method.predict = predict

    record(cached, "cached")
    record(recompute, "recompute")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def stage(method: DIKI) -> tuple[float, AccuracyMatrix]:
        matrix = AccuracyMatrix(T)
        sync()
        t0 = time.perf_counter()
        evaluate(method, scenario, T - 1, matrix, method.rt)
        sync()
        return time.perf_counter() - t0, matrix

    n_test = sum(len(t.test) for t in scenario.tasks)
    print(f"model {model} ({args.precision}, {size}px), device {dev}, threads {args.threads}: "
          f"{T} datasets x {args.classes} classes, {n_test} test images, eval batch {args.batch_size}")
    t_fill, m_fill = stage(cached)  # first stage: fills the cache (one frozen pass per test set)
    print(f"first stage with an empty cache (fill included): {t_fill:.3f} s")
    times = {"recompute": [], "cached": []}
    reference = None
    for _r in range(args.repeats):
        for name, method in (("recompute", recompute), ("cached", cached)):
            logs[name] = []
            t, matrix = stage(method)
            times[name].append(t)
            if reference is None:
                reference = matrix.state_dict()
            assert matrix.state_dict() == reference, "accuracy counts differ"
        assert len(logs["cached"]) == len(logs["recompute"])
        assert all(torch.equal(a, b) for a, b in zip(logs["cached"], logs["recompute"])), "logits differ"
    assert m_fill.state_dict() == reference
    report = cached.frozen.report()  # the fill stage encodes every batch once, the repeats are served
    assert report["datasets_encoded"] == T and report["batches_encoded"] == len(logs["cached"]) and \
        report["batches_served"] == args.repeats * len(logs["cached"]), report
    rec, cac = statistics.median(times["recompute"]), statistics.median(times["cached"])
    print(f"recompute frozen features: {rec:.3f} s (median of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in times['recompute'])})")
    print(f"cached frozen features:    {cac:.3f} s (median of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in times['cached'])})")
    print(f"{len(logs['cached'])} batches per stage, logits bit-identical, accuracy counts identical")
    print(f"ratio: {rec / cac:.2f}")


if __name__ == "__main__":
    main()
