"""Training-step time of MoE-Adapters relative to DIKI, measured in one run (docs/moe_adapters.md#cost).

Both on the same randomly initialised CLIP, the same image batch and the same class prompts:

- DIKI: residual attention of task 0 in the first 8 blocks (all blocks of a shallower model) of both
  towers, CE of 100·cos, backward, plain SGD step over the task's residuals (its training step);
- MoE-Adapters: :class:`clcli.methods.moe_adapters.MoEStep` (experts in every block of both towers,
  noisy top-k router 0, label smoothing 0.2), backward, AdamW step over the trainable experts + router.

Steps alternate between the two (``--repeats`` rounds of ``--steps`` each, after a warm-up), and the
median per-step time of each is reported. The last line is ``ratio: <moe / diki>``.

    python scripts/bench_moe.py [--model tiny-clip | --width 256 --layers 6 --image-size 64 --patch 8]
                                [--batch 64] [--classes 20] [--experts 22] [--bottleneck 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from bench_diki import register_arch  # noqa: E402 (same registered architecture as the DIKI benchmark)

from clcli.methods.clip_baselines import cosine_logits
from clcli.methods.moe_adapters import MoEStep
from clcli.models.clip import clip_backbone
from clcli.models.moe import MoEClip
from clcli.models.residual_attention import DikiClip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="an open_clip architecture (random init); default: registered")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--experts", type=int, default=22)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    name = args.model or register_arch(args.width, args.layers, args.image_size, args.patch)
    backbone = clip_backbone(model_name=name, precision="fp32").to(dev)
    size = backbone.model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    x = torch.randn(args.batch, 3, size, size, device=dev)
    y = torch.randint(0, args.classes, (args.batch,), device=dev)
    tokens = backbone.truncate_tokens(backbone.tokenize([f"a photo of a class{i} thing." for i in range(args.classes)])).to(dev)
    depth = min(8, len(backbone.model.visual.transformer.resblocks))

    diki = DikiClip(backbone, depth_vision=depth, depth_text=min(8, len(backbone.model.transformer.resblocks))).to(dev)
    diki.add_task()
    d_params = diki.residual_parameters(0)
    d_opt = torch.optim.SGD(d_params, lr=0.1)

    def diki_step():
        loss = F.cross_entropy(cosine_logits(diki.encode_image(x, task=0), diki.encode_text(tokens, task=0),
                                             diki.logit_scale), y)
        d_opt.zero_grad(set_to_none=True)
        loss.backward()
        d_opt.step()

    moe = MoEClip(backbone, experts=args.experts, top_k=2, bottleneck=args.bottleneck).to(dev)
    moe.add_task()
    m_params = moe.set_trainable(0)
    m_opt = torch.optim.AdamW(m_params, lr=1e-3, weight_decay=0.0)
    step = MoEStep(moe, tokens, 0, 0, 0.2).to(dev)
    moe.train()

    def moe_step():
        loss = step(x, y)
        m_opt.zero_grad(set_to_none=True)
        loss.backward()
        m_opt.step()

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    for fn in (diki_step, moe_step):  # warm-up
        fn()
    times: dict[str, list[float]] = {"diki": [], "moe": []}
    for _ in range(args.repeats):
        times["diki"].append(timed(diki_step))
        times["moe"].append(timed(moe_step))
    d, m = statistics.median(times["diki"]), statistics.median(times["moe"])
    print(f"model {name} on {dev}, batch {args.batch}, {args.classes} prompts, depth {depth} (DIKI), "
          f"{args.experts} experts r{args.bottleneck} top-2 (MoE)")
    print(f"trainable: diki {sum(p.numel() for p in d_params):,}  moe {sum(p.numel() for p in m_params):,}")
    print(f"step time: diki {d * 1e3:.1f} ms  moe {m * 1e3:.1f} ms (median of {args.repeats} x {args.steps} steps)")
    print(f"ratio: {m / d:.2f}")


if __name__ == "__main__":
    main()
