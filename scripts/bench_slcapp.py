"""Stage-1 training-step time of SLCA++ relative to SLCA on the same ViT (docs/slca_protocol.md#slca).

Both methods are built by clcli (``clcli.methods.slca.SLCA``, with and without ``method.lora``) on
the same random-init timm ViT; each timed step is what their stage 1 does: forward through the backbone
and the new head, the stage-1 loss (CE; SLCA++ symmetric CE), backward, SGD step over the method's own
parameter groups. Steps alternate between the two methods in rounds so that machine noise hits both
alike. Prints the per-step times, the ratios ``slcapp/slca`` per round and their median, and the
trainable parameter counts.

    python scripts/bench_slcapp.py [--model vit_small_patch16_224] [--image-size 64] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from clcli.data.scenario import Task
from clcli.engine import Runtime
from clcli.methods.slca import SLCA, symmetric_ce
from clcli.models.timm_backbone import TimmBackbone

CA = dict(enabled=True, epochs=5, samples_per_class=256, lr=0.01, momentum=0.9, weight_decay=5e-4,
          logit_norm_tau=0.1, mean_scaling=True, buggy_task_id=True)
LORA = dict(rank=4, scale=0.8, targets=["qkv"], svd_init=True, lr_first_task=5e-3, lr=1e-3)


def build(model: str, image_size: int, slcapp: bool, device) -> tuple[SLCA, torch.optim.Optimizer]:
    torch.manual_seed(0)
    bb = TimmBackbone(model, reinit_final_norm=True, model_kwargs=dict(img_size=image_size))
    optim = OmegaConf.create(dict(lr=dict(representation=1e-3 if slcapp else 1e-4, classifier=0.01),
                                  optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9,
                                             "weight_decay": 5e-4},
                                  epochs=1, batch_size=32, schedule="multistep", milestones=[1], gamma=0.1))
    m = SLCA(bb, optim, Runtime(device=device), ca=CA, stats=dict(ridge=1e-4, batch_size=64),
             lora=LORA if slcapp else None, loss=dict(ce_weight=1.0, rce_weight=0.1 if slcapp else 0.0),
             cosine_from_milestones=slcapp)
    task = Task(0, "t0", range(0, 10), list(range(10)), [str(i) for i in range(10)], None, None, None)
    m.begin_task(task)
    from clcli import optim as optim_lib

    opt = optim_lib.make_optimizer(optim, m._stage1_groups(task, m.heads.heads[-1]))
    m.backbone.train()
    return m, opt


def step(m: SLCA, opt, x, y) -> None:
    loss = symmetric_ce(m.heads.heads[-1](m.backbone(x)), y, **m.loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    methods = {name: build(args.model, args.image_size, name == "slcapp", dev) for name in ("slca", "slcapp")}
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(dev)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(dev)
    for m, opt in methods.values():  # warm-up
        for _ in range(2):
            step(m, opt, x, y)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, (m, opt) in methods.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                step(m, opt, x, y)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / args.steps)
    ratios = [a / b for a, b in zip(times["slcapp"], times["slca"])]
    print(f"model {args.model} img {args.image_size} batch {args.batch_size} device {dev} threads {torch.get_num_threads()}")
    for name, (m, _) in methods.items():
        print(f"{name:7s} step {statistics.median(times[name]) * 1000:8.1f} ms (median of {args.rounds} rounds)  "
              f"trainable backbone parameters {m.summary()['trainable_backbone_parameters']:,}")
    print("ratios slcapp/slca per round: " + " ".join(f"{r:.3f}" for r in ratios))
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
