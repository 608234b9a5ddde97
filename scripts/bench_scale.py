"""A whole class-incremental SLCA job with many classes, through the real code path (``clcli.train.run``:
statistics, classifier alignment, evaluation, checkpoints), timed and measured task by task.

Generated images and a tiny random ViT whose width is the feature dimension (768 by default, like
ViT-B/16), so that the per-class statistics and the alignment have ImageNet-scale shapes while the
backbone costs little. After every task (at its checkpoint) the table gets: classes seen, stage-1,
statistics + alignment and evaluation time, checkpoint write time, peak RSS so far, current RSS and the
run directory's size, so the growth with tasks and classes shows in one table.

The last line is ``ratio: <bytes the previous checkpoint format writes for this run / bytes in this
run dir>``: the previous format repeated the statistics of every class seen so far in every
task_XX.pt and kept one per task (computed from this run's own files: each task_XX.pt plus the
statistics files up to it).

    python scripts/bench_scale.py [--tasks 10] [--classes-per-task 20] [--dim 768] [--samples 256]
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # clcli from this checkout

from clcli import results  # noqa: E402


def rss_mb() -> tuple[float, float]:
    """(peak RSS so far, current RSS) of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pages = int(Path("/proc/self/statm").read_text().split()[1]) if Path("/proc/self/statm").exists() else 0
    return peak, pages * resource.getpagesize() / 2**20


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--classes-per-task", type=int, default=20)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--samples", type=int, default=256, help="method.ca.samples_per_class")
    ap.add_argument("--ca-epochs", type=int, default=5)
    ap.add_argument("--train-per-class", type=int, default=16)
    ap.add_argument("--test-per-class", type=int, default=4)
    ap.add_argument("--keep", default="last", choices=["last", "all"])
    ap.add_argument("--out", default=None, help="run dir (default: a temporary one, removed at the end)")
    args = ap.parse_args()
    T, K, D = args.tasks, args.classes_per_task, args.dim
    overrides = [
        "data=synthetic", f"data.source.num_classes={T * K}", f"data.initial_increment={K}", f"data.increment={K}",
        f"data.num_tasks={T}", f"data.source.train_per_class={args.train_per_class}",
        f"data.source.test_per_class={args.test_per_class}",
        "backbone=tiny_vit", f"backbone.model_kwargs.embed_dim={D}", "backbone.model_kwargs.depth=1",
        "backbone.model_kwargs.num_heads=4", "backbone.model_kwargs.mlp_ratio=1.0",
        "method=slca", f"method.ca.samples_per_class={args.samples}", f"method.ca.epochs={args.ca_epochs}",
        "optim.epochs=1", "optim.milestones=[1]", "guard.chance_loss_ratio=0",  # one epoch need not beat chance
        "device=cpu", f"checkpoint.keep={args.keep}",
    ]
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from clcli.train import run

    tmp = None if args.out else tempfile.mkdtemp(prefix="bench_scale_")
    run_dir = Path(args.out or tmp) / "run"
    rows: list[dict] = []
    save = results.RunStore.save_checkpoint

    def measured_save(store, task_index, state):  # the loop's last step of every task
        t0 = time.perf_counter()
        out = save(store, task_index, state)
        peak, now = rss_mb()
        rows.append({"task": task_index, "ckpt_s": time.perf_counter() - t0, "peak": peak, "rss": now,
                     "dir": dir_mb(run_dir / "checkpoints"),
                     "main": (store.ckpt_dir / f"task_{task_index:02d}.pt").stat().st_size,
                     "stats": store.stats_path(task_index).stat().st_size if store.stats_path(task_index).exists() else 0})
        return out

    results.RunStore.save_checkpoint = measured_save
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
            with open_dict(cfg):
                del cfg["hydra"]
            t0 = time.perf_counter()
            res = run(cfg, run_dir, choices)
            total = time.perf_counter() - t0
        timings = {t["task"]: t for t in res["timings"]["tasks"]}
        print(f"\nSLCA, {T} tasks x {K} classes, {D}-d features, {args.samples} samples/class x {args.ca_epochs} CA epochs, "
              f"checkpoint.keep={args.keep}, {torch.get_num_threads()} threads")
        print(f"{'task':>4} | {'classes':>7} | {'stage 1 s':>9} | {'stats+CA s':>10} | {'eval s':>6} | {'ckpt s':>6} | "
              f"{'peak RSS MB':>11} | {'RSS MB':>6} | {'run dir MB':>10}")
        for r in rows:
            t = timings[r["task"]]
            print(f"{r['task']:>4} | {K * (r['task'] + 1):>7} | {t['train_s']:>9.2f} | {t['end_task_s']:>10.2f} | "
                  f"{t['eval_s']:>6.2f} | {r['ckpt_s']:>6.2f} | {r['peak']:>11.0f} | {r['rss']:>6.0f} | {r['dir']:>10.1f}")
        ours = sum(p.stat().st_size for p in (run_dir / "checkpoints").iterdir())
        previous = sum(r["main"] + sum(q["stats"] for q in rows[: i + 1]) for i, r in enumerate(rows))
        print(f"total {total:.1f} s; last acc {res['metrics']['last_acc']:.2f}")
        print(f"checkpoints: {ours / 2**20:.1f} MB here; the previous format (full statistics in every task_XX.pt, "
              f"keep=all) writes {previous / 2**20:.1f} MB for the same run")
        print(f"ratio: {previous / ours:.2f}")
    finally:
        results.RunStore.save_checkpoint = save
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
