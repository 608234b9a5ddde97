"""Cost per MTIL method in one run: trainable parameters and training-step time relative to DIKI.

Every method trains task 0 of ``data=synthetic_mtil`` on the same backbone, batch size and device, for
about the same number of optimizer steps; the time of ``train_task`` divided by its steps is the step
time, printed as a ratio to DIKI's (measured in this same process, so machine load affects all alike).
Trainable parameters are those of the method on that backbone; ``--arch ViT-B-16-quickgelu`` adds the
counts on the real architecture (random init, no weights needed). See docs/diki_mtil_protocol.md
(sections ZSCL and Continual-FT) for what each step computes.

    python scripts/bench_mtil.py                       # tiny_clip on CPU
    python scripts/bench_mtil.py backbone=clip_vit_b16 device=cuda --steps 20
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent

METHODS = {  # method -> overrides (each trains task 0 for about --steps steps at --batch)
    "diki": ["method=diki", "method.select_best_on_val=false"],
    "clip_ft": ["method=clip_ft", "optim=synthetic_mtil_zscl", "method.augment=zscl_rrc"],
    "zscl": ["method=zscl", "optim=synthetic_mtil_zscl", "method.ref_images.standin=64", "method.ref_texts.standin=200",
             "method.ref_images.path=null", "method.ref_texts.path=null"],
    "moe_adapters": ["method=moe_adapters", "optim=synthetic_mtil_zscl"],
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def measure(name: str, extra: list[str], args) -> dict | None:
    import torch

    from clcli.engine import seed_everything
    from clcli.train import build

    if not (REPO / "conf" / "method" / f"{name}.yaml").is_file():
        return None
    batch = [f"optim.batch_size={args.batch}", "data=synthetic_mtil", "backbone=tiny_clip", "device=cpu"]
    if name == "zscl":  # as many reference images per step as task images (ZSCL: 64 + 64)
        extra = extra + [f"method.ref_images.batch_size={args.batch}"]
    over = batch + extra + args.overrides
    cfg = compose(over)
    from omegaconf import open_dict

    with open_dict(cfg):
        if cfg.optim.get("iterations") is not None:
            cfg.optim.iterations = args.steps - 1  # steps 0..iterations
            cfg.optim.warmup = min(cfg.optim.get("warmup") or 0, args.steps - 1)
    built = build(cfg, torch.device(cfg.device if cfg.device != "auto" else "cpu"))
    method, task = built.method, built.scenario.tasks[0]
    if cfg.optim.get("iterations") is None:  # epoch-based (DIKI): as many epochs as give >= --steps steps
        per_epoch = -(-len(task.train) // args.batch)
        with open_dict(cfg):
            cfg.optim.epochs = max(1, round(args.steps / per_epoch))
        steps = cfg.optim.epochs * per_epoch
    else:
        steps = args.steps
    seed_everything(0)
    method.begin_task(task)
    if name == "zscl":  # one-off per run (teacher text features): not part of the step time
        method.reference_texts()
    start = time.perf_counter()
    method.train_task(task)
    seconds = time.perf_counter() - start
    summary = method.summary()
    trainable = summary.get("trainable_parameters", summary.get("residual_parameters_per_task"))
    if isinstance(trainable, dict):
        trainable = next(iter(trainable.values()))
    return {"method": name, "trainable": trainable, "steps": steps, "step_s": seconds / steps}


def arch_counts(arch: str) -> dict[str, int]:
    """Trainable parameters per task on ``arch`` (random init): full fine-tuning = all but the
    logit scale; DIKI = its residual keys/values in the first 8 blocks of both towers."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=None)
    full = sum(p.numel() for n, p in model.named_parameters() if n != "logit_scale")
    v, t = model.visual.transformer.width, model.transformer.width
    return {"clip_ft": full, "zscl": full, "diki": 8 * 2 * 8 * v + 8 * 2 * 8 * t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per method (default 16)")
    ap.add_argument("--batch", type=int, default=8, help="task images per step, every method (default 8)")
    ap.add_argument("--arch", default=None, help="also count trainable parameters on this open_clip architecture")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every method (e.g. backbone=..., device=...)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    rows = [r for name, extra in METHODS.items() if (r := measure(name, extra, args)) is not None]
    base = next(r["step_s"] for r in rows if r["method"] == "diki")
    counts = arch_counts(args.arch) if args.arch else {}
    print(f"{'method':<14}{'trainable':>12}{'steps':>7}{'s/step':>10}{'vs DIKI':>9}" +
          (f"{'trainable ' + args.arch:>34}" if counts else ""))
    for r in rows:
        extra = f"{counts.get(r['method'], ''):>34}" if counts else ""
        print(f"{r['method']:<14}{r['trainable']:>12,}{r['steps']:>7}{r['step_s']:>10.4f}{r['step_s'] / base:>8.2f}x{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
