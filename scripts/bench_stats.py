"""Class statistics: clcli's one pass (float64 sums per class, inference mode) vs the SLCA reference's
one loader per class + ``torch.cov`` (docs/slca_protocol.md#class-statistics), next to a bare
forward pass over the same data. The last line is ``ratio: <baseline / clcli>``; the line before
gives clcli's throughput relative to the bare forward pass (target >= 0.9).

    python scripts/bench_stats.py [--classes 20] [--per-class 64] [--image-size 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from clcli.engine import Runtime, extract_features
from clcli.models.timm_backbone import TimmBackbone
from clcli.stats import GaussianStats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    bb = TimmBackbone("vit_small_patch16_224", model_kwargs=dict(img_size=args.image_size)).to(dev).eval()
    C, N = args.classes, args.per_class
    images = torch.rand(C * N, 3, args.image_size, args.image_size)
    labels = torch.arange(C).repeat_interleave(N)
    rt = Runtime(device=dev, eval_batch_size=args.batch_size)

    class Tensors(torch.utils.data.Dataset):
        def __init__(self, idx):
            self.idx = idx

        def __len__(self):
            return len(self.idx)

        def __getitem__(self, i):
            j = self.idx[i]
            return images[j], int(labels[j])

    everything = Tensors(list(range(len(labels))))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # bare forward pass
    sync(); t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in torch.utils.data.DataLoader(everything, batch_size=args.batch_size):
            bb(x.to(dev))
    sync(); t_bare = time.perf_counter() - t0

    # clcli: one pass, streaming float64 sums
    sync(); t0 = time.perf_counter()
    stats = GaussianStats(bb.feature_dim, ridge=1e-4)
    for f, y in extract_features(bb, everything, rt):
        stats.update(f, y)
    stats.finalize()
    sync(); t_ours = time.perf_counter() - t0

    # reference: per class a loader, features with autograd, torch.cov in float64 on CPU
    sync(); t0 = time.perf_counter()
    ref = {}
    for c in range(C):
        idx = (labels == c).nonzero().flatten().tolist()
        feats = [bb(x.to(dev)).detach().cpu() for x, _ in torch.utils.data.DataLoader(Tensors(idx), batch_size=args.batch_size)]
        f = torch.cat(feats).double()
        ref[c] = (f.mean(0), torch.cov(f.T) + 1e-4 * torch.eye(f.shape[1], dtype=torch.float64))
    sync(); t_base = time.perf_counter() - t0

    err = max((stats.cov[c].double() - ref[c][1]).abs().max().item() for c in range(C))
    print(f"device: {dev}; {C} classes x {N} images at {args.image_size}px, ViT-S/16 features ({bb.feature_dim}-d)")
    print(f"max |cov clcli - cov reference| = {err:.2e}")
    print(f"bare forward: {t_bare:.2f} s; clcli one pass: {t_ours:.2f} s; reference per-class loaders: {t_base:.2f} s")
    print(f"clcli throughput / bare forward: {t_bare / t_ours:.2f}")
    print(f"ratio: {t_base / t_ours:.2f}")


if __name__ == "__main__":
    main()
