"""Training-step overhead: clcli's ``engine.fit`` (progress bars, loss guard, scheduler) vs a bare
PyTorch loop over the same model, data and optimizer. Both use the same in-memory tensors. The last
line is ``ratio: <bare time / clcli time>`` (1.0 = no overhead; target >= 0.91, i.e. <= 10%).

    python scripts/bench_train.py [--model vit_small_patch16_224] [--image-size 64] [--steps 30] [--amp bf16]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from clcli import optim as optim_lib
from clcli.engine import Runtime, fit
from clcli.models.timm_backbone import TimmBackbone


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    n = args.steps * args.batch_size
    x_all = torch.rand(n, 3, args.image_size, args.image_size)
    y_all = torch.randint(0, 10, (n,))
    data = torch.utils.data.TensorDataset(x_all, y_all)

    def build():
        torch.manual_seed(0)
        bb = TimmBackbone(args.model, model_kwargs=dict(img_size=args.image_size)).to(dev)
        head = torch.nn.Linear(bb.feature_dim, 10).to(dev)
        opt = optim_lib.sgd([(bb.parameters(), 1e-4), (head.parameters(), 1e-2)], momentum=0.9, weight_decay=5e-4)
        return bb, head, opt

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def ctx():
        return torch.autocast(dev.type, dtype=amp) if amp is not None else torch.autocast(dev.type, enabled=False)

    # warm-up both code paths once (allocator, kernels)
    bb, head, opt = build()
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    for i, (x, y) in enumerate(loader):
        if i == 2:
            break
        with ctx():
            loss = F.cross_entropy(head(bb(x.to(dev))), y.to(dev))
        opt.zero_grad(); loss.backward(); opt.step()

    def bare() -> float:
        bb, head, opt = build()
        sync(); t0 = time.perf_counter()
        for x, y in loader:
            with ctx():
                loss = F.cross_entropy(head(bb(x.to(dev))), y.to(dev))
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        sync()
        return time.perf_counter() - t0

    def ours() -> float:
        bb, head, opt = build()
        rt = Runtime(device=dev, amp_dtype=amp)
        sched = optim_lib.scheduler(opt, "multistep", 1, len(loader), milestones=[1])
        sync(); t0 = time.perf_counter()
        with rt.live():
            fit(lambda x, y: F.cross_entropy(head(bb(x)), y), loader, epochs=1, optimizer=opt, scheduler=sched,
                rt=rt, where="bench", num_classes=10)
        sync()
        return time.perf_counter() - t0

    # alternate the two loops and keep each one's best time: load changes on a shared machine hit both
    t_bare, t_ours = float("inf"), float("inf")
    for _ in range(args.repeats):
        t_bare = min(t_bare, bare())
        t_ours = min(t_ours, ours())
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    print(f"device: {dev}; {args.model} at {args.image_size}px, batch {args.batch_size}, {args.steps} steps, amp {args.amp}")
    print(f"bare loop: {t_bare:.2f} s ({n / t_bare:.1f} img/s); clcli fit: {t_ours:.2f} s ({n / t_ours:.1f} img/s); "
          f"peak GPU memory {peak:.0f} MB")
    print(f"ratio: {t_bare / t_ours:.2f}")


if __name__ == "__main__":
    main()
