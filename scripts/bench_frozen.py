"""Evaluation of SLCA's frozen-backbone baseline over a whole run: cached test features vs re-encoding.

A class-incremental run of T tasks evaluates, after task t, the test sets of tasks 0..t: T(T+1)/2
test-set encodings. With a frozen backbone (``method=frozen``, ``optim.lr.representation: 0``) the
features never change, so ``method.feature_cache=memory`` encodes each test set once (T encodings)
and serves later stages from the cache, keyed by each eval batch's test set and loader position
(``clcli.cache.FrozenEvalFeatures``).

Both runs evaluate the same method state (a random timm ViT, one random head per task) after every
task with ``engine.evaluate``; the cached run's time includes filling the cache. Logits of every batch
are asserted bit-identical. The last line is ``ratio: <re-encode / cached>``.

    python scripts/bench_frozen.py [--tasks 10] [--classes-per-task 4] [--test-per-class 8]
                                   [--model vit_small_patch16_224 --image-size 64] [--batch-size 32]
                                   [--device cpu] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from omegaconf import OmegaConf

from clcli.data.scenario import build_class_incremental
from clcli.data.synthetic import SyntheticSource
from clcli.data.transforms import build_transforms
from clcli.engine import Runtime, evaluate
from clcli.evaluation import AccuracyMatrix
from clcli.methods.slca import SLCA
from clcli.models.timm_backbone import TimmBackbone

OPTIM = {"lr": {"representation": 0.0, "classifier": 0.05},
         "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "weight_decay": 5e-4},
         "epochs": 1, "batch_size": 32, "schedule": "multistep", "milestones": [1], "gamma": 0.1}
METHOD = {"ca": {"enabled": False}, "stats": {"ridge": 1e-4, "batch_size": 64}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=10)  # Split CIFAR-100 has 10
    ap.add_argument("--classes-per-task", type=int, default=4)
    ap.add_argument("--test-per-class", type=int, default=8)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="eval.batch_size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    torch.manual_seed(0)
    backbone = TimmBackbone(args.model, model_kwargs=dict(img_size=args.image_size), reinit_final_norm=True).eval()
    n_classes = args.tasks * args.classes_per_task
    source = SyntheticSource(num_classes=n_classes, train_per_class=2, test_per_class=args.test_per_class,
                             image_size=args.image_size, seed=0)
    train_t, test_t = build_transforms("upscale", backbone)
    scenario = build_class_incremental(source, name="bench", initial_increment=args.classes_per_task,
                                       increment=args.classes_per_task, class_order_seed=1993, shuffle_classes=True,
                                       train_transform=train_t, test_transform=test_t)
    T = len(scenario)

    def run(mode: str) -> tuple[float, list[torch.Tensor], AccuracyMatrix, SLCA]:
        rt = Runtime(device=dev, eval_batch_size=args.batch_size)
        method = SLCA(backbone, OmegaConf.create(OPTIM), rt, ca=METHOD["ca"], stats=METHOD["stats"], feature_cache=mode)
        method.prepare_scenario(scenario)
        logits: list[torch.Tensor] = []
        real = method.predict
        method.predict = lambda batch: logits.append(real(batch).cpu()) or logits[-1]
        matrix = AccuracyMatrix(T)
        elapsed = 0.0
        for task in scenario.tasks:
            torch.manual_seed(100 + task.index)  # per task, as clcli.train does
            method.begin_task(task)  # a random head per task: the evaluation is what is measured
            sync(dev)
            t0 = time.perf_counter()
            evaluate(method, scenario, task.index, matrix, rt)
            sync(dev)
            elapsed += time.perf_counter() - t0
        return elapsed, logits, matrix, method

    n_test = sum(len(t.test) for t in scenario.tasks)
    print(f"{args.model} at {args.image_size}px, device {dev}, threads {args.threads}: {T} tasks x "
          f"{args.classes_per_task} classes, {n_test} test images, eval batch {args.batch_size}")
    with torch.inference_mode():  # warm-up (kernel selection, allocator) outside both timings
        backbone.to(dev)(torch.stack([scenario.tasks[0].test[i][0] for i in range(min(args.batch_size, 4))]).to(dev))
    t_off, logits_off, m_off, _ = run("off")
    t_mem, logits_mem, m_mem, cached = run("memory")
    assert m_off.state_dict() == m_mem.state_dict(), "accuracy counts differ"
    assert len(logits_off) == len(logits_mem) and all(torch.equal(a, b) for a, b in zip(logits_off, logits_mem)), \
        "logits differ"
    report = cached.frozen.report()
    first_pass = sum(-(-len(t.test) // args.batch_size) for t in scenario.tasks)  # fills the cache
    assert report["datasets_encoded"] == T and report["batches_encoded"] == first_pass, report
    print(f"re-encode every stage: {t_off:.3f} s ({T * (T + 1) // 2} test-set encodings)")
    print(f"cached (fill included): {t_mem:.3f} s ({report['datasets_encoded']} encodings, "
          f"{report['batches_served']} batches served)")
    print(f"{len(logits_mem)} eval batches, logits bit-identical, accuracy counts identical; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    print(f"ratio: {t_off / t_mem:.2f}")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


if __name__ == "__main__":
    main()
