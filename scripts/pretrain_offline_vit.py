"""Make an offline stand-in for a pre-trained small ViT: distil ImageNet EfficientNet-Lite0 into the
32-px ViT of ``conf/backbone/offline_vit.yaml`` on random crops of scikit-image's sample photos.

Why: the prompt methods and SLCA++ need a ViT, and no pre-trained ViT weights can be fetched offline;
a random ViT's features barely depend on the image. This is *not* a pre-trained ViT: it learns, without
labels, to reproduce the teacher's pooled 1280-d pre-logits features on 19 unrelated photos (no
digits, no text), through a linear projection that is thrown away afterwards.

    OMP_NUM_THREADS=1 python scripts/pretrain_offline_vit.py --minutes 10   # 1 thread on a shared machine
    # -> <paths.cache_dir>/offline_vit/vit6_p8_32_effnet_lite0_distilled.pth (+ .json sidecar)
    clcli train method=frozen data=split_digits backbone=offline_vit

The student's architecture and the output path come from ``conf/backbone/offline_vit.yaml``
(``--override backbone.model_kwargs.depth=1`` etc. change them, as on the clcli command line); the
teacher is built by clcli's own ``backbone=efficientnet_lite0`` config (package weights).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Photos bundled with scikit-image (no download). 'text' and 'page' are left out: they show characters.
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "moon", "rocket", "hubble_deep_field",
          "immunohistochemistry", "colorwheel", "retina", "horse", "grass", "gravel", "brick", "logo", "cell",
          "clock", "microaneurysms")


def load_photos(names=PHOTOS):
    """The sample photos as RGB PIL images (grey and binary ones replicated to 3 channels)."""
    import skimage.data
    from PIL import Image

    out = []
    for name in names:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # noqa: BLE001 - a photo that needs a download, or a missing name
            raise SystemExit(f"--photos: skimage.data.{name}() cannot be loaded offline ({type(exc).__name__}: "
                             f"{exc}). Drop it from --photos.") from exc
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        out.append(Image.fromarray(arr[..., :3]))
    return out


def compose_backbone(name: str, overrides: list[str]):
    """``cfg.backbone`` for ``backbone=<name>`` composed from clcli's configs (paths resolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from clcli.cli import _config_dir

    with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"backbone={name}", *overrides])
    return OmegaConf.to_container(cfg.backbone, resolve=True)


def build_backbone(bcfg: dict, **replace):
    """A :class:`clcli.models.timm_backbone.TimmBackbone` from a composed backbone config."""
    from hydra.utils import instantiate

    return instantiate({**bcfg, **replace}, _convert_="all")


class CropMaker:
    """Random crops of the photos, each as the teacher's and the student's normalized input.

    A crop: random resized crop (``scale``), flip, colour jitter, grey with probability ``p_gray``
    (digits are grey), and with probability ``p_lowres`` a down- and up-sampling to 8-16 px (digits
    are 8x8 images upscaled). Both inputs come from the same crop, resized to each model's size."""

    def __init__(self, photos, teacher, student, scale=(0.05, 1.0), p_gray=0.3, p_lowres=0.25):
        from torchvision import transforms as T

        self.photos, self.p_lowres = photos, p_lowres
        base = max(teacher.input_size, student.input_size)
        self.base = base
        self.augment = T.Compose([
            T.RandomResizedCrop(base, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p_gray),
        ])
        bicubic = T.InterpolationMode.BICUBIC
        self.to_teacher = T.Compose([T.Resize((teacher.input_size,) * 2, interpolation=bicubic), T.ToTensor(),
                                     T.Normalize(teacher.mean, teacher.std)])
        self.to_student = T.Compose([T.Resize((student.input_size,) * 2, interpolation=bicubic), T.ToTensor(),
                                     T.Normalize(student.mean, student.std)])

    def crop(self):
        from PIL import Image

        img = self.augment(random.choice(self.photos))
        if random.random() < self.p_lowres:
            side = random.randint(8, 16)
            img = img.resize((side, side), Image.BICUBIC).resize((self.base, self.base), Image.BICUBIC)
        return self.to_teacher(img), self.to_student(img)

    def batch(self, n: int):
        pairs = [self.crop() for _ in range(n)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def distill_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """``cosine``: mean 1 - cos(pred, target); ``mse``: MSE of the L2-normalized vectors."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    return F.mse_loss(F.normalize(pred, dim=-1), F.normalize(target, dim=-1))


class Distiller(nn.Module):
    """The student ViT and a linear projection of its class-token feature to the teacher's width;
    its loss compares that with the teacher's per-dimension standardized pooled features. The
    teacher is frozen and not a submodule (its weights are neither trained nor saved)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: str = "cosine"):
        super().__init__()
        self.student, self.loss_kind = student, loss
        self.proj = nn.Linear(student.feature_dim, teacher.feature_dim)
        self._teacher = [teacher.eval().requires_grad_(False)]
        self.register_buffer("mu", torch.zeros(teacher.feature_dim))
        self.register_buffer("sigma", torch.ones(teacher.feature_dim))

    @torch.no_grad()
    def teacher_features(self, teacher_inputs: torch.Tensor) -> torch.Tensor:
        return self._teacher[0](teacher_inputs)

    def standardize(self, feats: torch.Tensor) -> None:
        """Fit the targets' per-dimension mean/std on teacher features: they are post-ReLU6 (all
        positive, mutual cosine near 1), so raw targets would reward predicting their mean."""
        self.mu.copy_(feats.mean(0))
        self.sigma.copy_(feats.std(0).clamp_min(1e-3))

    def standardize_on(self, teacher_inputs: torch.Tensor) -> None:
        self.standardize(self.teacher_features(teacher_inputs))

    def targets(self, teacher_inputs: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        """Standardized targets of ``teacher_inputs`` (or of already computed features ``feats``)."""
        feats = self.teacher_features(teacher_inputs) if feats is None else feats
        return (feats - self.mu) / self.sigma

    def forward(self, student_inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return distill_loss(self.proj(self.student(student_inputs)), targets, self.loss_kind)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget (stops at whichever of --minutes / --steps comes first)")
    p.add_argument("--steps", type=int, default=None, help="number of optimizer steps (default: until --minutes)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW peak lr (linear warm-up, then cosine to 0 at the --steps / --minutes limit)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--loss", choices=("cosine", "mse"), default="cosine")
    p.add_argument("--scale", type=float, nargs=2, default=(0.05, 1.0), metavar=("MIN", "MAX"), help="crop area range")
    p.add_argument("--p-gray", type=float, default=0.3)
    p.add_argument("--p-lowres", type=float, default=0.25)
    p.add_argument("--pool", type=int, default=8192,
                   help="crops made (and the teacher run) once, then sampled for every step (0: fresh crops each "
                        "step). The teacher's pass costs ~5x the student's step: a pool buys many more steps")
    p.add_argument("--standardize-steps", type=int, default=4,
                   help="batches of teacher features whose per-dimension mean/std standardize the targets (0: raw)")
    p.add_argument("--teacher-size", type=int, default=None, help="teacher input px (default: efficientnet_lite0.yaml's, 112)")
    p.add_argument("--photos", nargs="+", default=list(PHOTOS), help="skimage.data names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", type=Path, default=None, help="weights file (default: offline_vit.yaml's checkpoint_path)")
    p.add_argument("--override", nargs="*", default=[],
                   help="clcli overrides for the student, e.g. backbone.model_kwargs.depth=1")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the distillation; return the sidecar record (also written next to the weights)."""
    from clcli.models.timm_backbone import file_sha256
    from clcli.results import atomic_torch_save, atomic_write_text

    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    scfg = compose_backbone("offline_vit", args.override)
    out = Path(args.out or scfg["checkpoint_path"])
    # The student: offline_vit.yaml's ViT, random init (no checkpoint: it is what we make here).
    student = build_backbone(scfg, checkpoint_path=None, checkpoint_hint=None)
    tcfg = compose_backbone("efficientnet_lite0", [f"backbone.input_size={args.teacher_size}"] if args.teacher_size else [])
    teacher = build_backbone(tcfg)
    maker = CropMaker(load_photos(args.photos), teacher, student, args.scale, args.p_gray, args.p_lowres)
    model = Distiller(student, teacher, args.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start, step, losses = time.monotonic(), 0, []

    def lr_at(step: int) -> float:
        """Linear warm-up, then a cosine to 0 over whichever limit (--steps, --minutes) is nearer."""
        warm = min(1.0, (step + 1) / max(1, args.warmup))
        done = (time.monotonic() - train_start) / max(1e-9, start + args.minutes * 60 - train_start)
        if args.steps:
            done = max(done, step / args.steps)
        return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    pool_s = pool_t = None
    if args.pool > 0:
        chunks, feats = [], []
        for i in range(0, args.pool, args.batch_size):
            t_in, s_in = maker.batch(min(args.batch_size, args.pool - i))
            feats.append(model.teacher_features(t_in))
            chunks.append(s_in)
        pool_s, feats = torch.cat(chunks), torch.cat(feats)
        if args.standardize_steps > 0:
            model.standardize(feats)
        pool_t = model.targets(None, feats)
        print(f"pool of {args.pool} crops and teacher features made in {time.monotonic() - start:.0f} s", flush=True)
    elif args.standardize_steps > 0:
        model.standardize_on(torch.cat([maker.batch(args.batch_size)[0] for _ in range(args.standardize_steps)]))
    student.train()
    train_start, order = time.monotonic(), torch.empty(0, dtype=torch.long)
    print(f"distilling {tcfg['model_name']} ({teacher.input_size} px) into {scfg['model_name']} "
          f"{scfg['model_kwargs']} on {len(maker.photos)} photos -> {out}", flush=True)
    while (args.steps is None or step < args.steps) and time.monotonic() - start < args.minutes * 60:
        if pool_s is None:
            t_in, s_in = maker.batch(args.batch_size)
            target = model.targets(t_in)
        else:  # epochs over the pool in a seeded random order
            if len(order) < args.batch_size:
                order = torch.cat([order, torch.randperm(len(pool_s))])
            idx, order = order[:args.batch_size], order[args.batch_size:]
            s_in, target = pool_s[idx], pool_t[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(s_in, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0 or step == 1:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            print(f"step {step:5d}  loss {recent:.4f}  lr {lr_at(step - 1):.2e}  "
                  f"{time.monotonic() - start:6.0f} s", flush=True)
    if not losses:
        raise SystemExit("pretrain_offline_vit: no step ran (--steps 0 or --minutes too small).")

    state = {k: v.detach().clone().contiguous() for k, v in student.model.state_dict().items()}
    atomic_torch_save(state, out)
    digest = file_sha256(out)
    tail = losses[-min(len(losses), args.log_every):]
    record = {
        "what": "stand-in for a pre-trained ViT: EfficientNet-Lite0 (ImageNet, PyPI package) distilled into a "
                "random-init ViT on crops of scikit-image sample photos, no labels; not a real pre-training",
        "student": {"model_name": scfg["model_name"], "model_kwargs": scfg["model_kwargs"],
                    "input_size": student.input_size, "mean": student.mean, "std": student.std},
        "teacher": {"model_name": tcfg["model_name"], "input_size": teacher.input_size,
                    **{k: v for k, v in teacher.weights_identity.items() if k in ("file", "sha256")}},
        "recipe": {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                   for k, v in vars(args).items() if k != "out"},
        "steps": step, "seconds": round(time.monotonic() - start, 1),
        "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
        "weights": str(out), "sha256": digest,
        "torch": torch.__version__,
    }
    atomic_write_text(out.with_suffix(out.suffix + ".json"), json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({step} steps, final loss {record['final_loss']:.4f}, sha256 {digest[:12]})", flush=True)
    return record


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
