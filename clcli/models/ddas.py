"""MoE-Adapters' Distribution-Discriminative Auto-Selector (DDAS), docs/moe_adapters.md#ddas.

An Expert-Gate-style selector: one small autoencoder per learned task on features of a frozen
extractor, plus autoencoder 0 trained on a generic image set (TinyImageNet in the reference). An
evaluation batch (or sample) goes to the task of the autoencoder that reconstructs it best; if the
best reconstruction error is above ``threshold``, or autoencoder 0 wins, it goes to zero-shot CLIP.

- Features (frozen, never trained): ``alexnet_conv5``, torchvision AlexNet with ImageNet weights
  (a user-provided file), ``features[:-2]`` = conv5 before its ReLU and pooling, flattened (256×13×13
  = 43,264 values for a 224 image), computed on the CLIP-normalised image and passed through a
  sigmoid; or ``pixels``: 8×8 average-pooled RGB (192 values) through a sigmoid, the test stand-in
  (its threshold must be calibrated, see ``threshold: auto``).
- Autoencoder: ``Linear(F→code) → ReLU → Linear(code→F) → sigmoid`` (43264→100→43264: 8,696,164
  parameters); score = MSE averaged over the batch and all features (``batch`` granularity) or over
  each sample's features (``sample``).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ALEXNET_FILE", "ALEXNET_URL", "AutoEncoder", "DDAS", "alexnet_weights_path", "build_features"]

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
FEATURES = ("alexnet_conv5", "pixels")


def alexnet_weights_path(path: str | None) -> Path:
    """The AlexNet weights file: ``path``, or torchvision's hub cache
    (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``, ``TORCH_HOME`` default ``~/.cache/torch``)."""
    if path:
        return Path(path).expanduser()
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(torch_home).expanduser() / "hub" / "checkpoints" / ALEXNET_FILE


class PixelFeatures(nn.Module):
    """8×8 average-pooled RGB through a sigmoid: 192 values (the test stand-in extractor)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.adaptive_avg_pool2d(images.float(), 8).flatten(1))


class AlexNetConv5(nn.Module):
    """AlexNet ``features[:-2]`` (conv5 before ReLU and max-pool), flattened, through a sigmoid."""

    def __init__(self, weights: Path):
        super().__init__()
        from torchvision.models import alexnet

        net = alexnet(weights=None)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.body = net.features[:-2]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen extractor: always eval

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(images.float()).flatten(1))


def build_features(kind: str, alexnet_weights: str | None = None) -> nn.Module:
    if kind == "pixels":
        return PixelFeatures()
    if kind == "alexnet_conv5":
        return AlexNetConv5(alexnet_weights_path(alexnet_weights))
    raise ValueError(f"unknown DDAS features {kind!r} (known: {', '.join(FEATURES)})")


class AutoEncoder(nn.Module):
    """``sigmoid(dec(relu(enc(f))))``; PyTorch's default Linear initialisation."""

    def __init__(self, dim: int, code: int):
        super().__init__()
        self.enc = nn.Linear(dim, code)
        self.dec = nn.Linear(code, dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec(F.relu(self.enc(f))))

    def errors(self, f: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction MSE ``[N]`` (mean over features)."""
        return (self(f) - f).pow(2).mean(dim=1)


class DDAS(nn.Module):
    """Autoencoder 0 (generic images) and one autoencoder per learned task on frozen features.

    ``aes["0"]`` is autoencoder 0, ``aes[str(t + 1)]`` task t's. ``select`` returns task indices
    (``-1`` = zero-shot CLIP). Only trained autoencoders compete (autoencoder 0 and the learned tasks;
    the reference also lets untrained future ones compete, docs/moe_adapters.md#ddas).
    """

    def __init__(self, features: nn.Module, dim: int, code: int, threshold: float | None):
        super().__init__()
        self.features = features
        self.features.requires_grad_(False)
        self.dim, self.code = int(dim), int(code)
        self.aes = nn.ModuleDict()
        self.threshold = threshold  # None until calibrated (threshold: auto)
        self.calibration: dict[int, float] = {}  # task -> largest in-distribution batch error (auto)

    def add(self, key: int, device: torch.device | str = "cpu") -> AutoEncoder:
        """A fresh autoencoder under ``key`` (0: generic images; t + 1: task t)."""
        ae = AutoEncoder(self.dim, self.code).to(device)
        self.aes[str(key)] = ae
        return ae

    @property
    def tasks(self) -> list[int]:
        """Learned tasks with an autoencoder (keys ≥ 1, minus one)."""
        return sorted(int(k) - 1 for k in self.aes if k != "0")

    @torch.no_grad()
    def errors(self, images: torch.Tensor, per_sample: bool) -> tuple[list[int], torch.Tensor]:
        """Candidate keys (0 and the learned tasks + 1) and their errors: ``[K]`` (batch mean) or
        ``[N, K]`` (per sample)."""
        f = self.features(images)
        keys = sorted(int(k) for k in self.aes)
        errs = torch.stack([self.aes[str(k)].errors(f) for k in keys], dim=1)  # [N, K]
        return keys, errs if per_sample else errs.mean(dim=0)

    def select(self, images: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """Selected task per batch (0-dim) or per sample (``[N]``); ``-1`` = zero-shot CLIP:
        autoencoder 0 won, or the lowest error is above the threshold."""
        if self.threshold is None:
            raise RuntimeError("DDAS threshold not calibrated yet (threshold: auto needs a learned task)")
        keys, errs = self.errors(images, per_sample)
        best, arg = errs.min(dim=-1)
        key = torch.as_tensor(keys, device=arg.device)[arg]
        key = torch.where(best > self.threshold, torch.zeros_like(key), key)
        return key - 1


def train_autoencoder(ae: AutoEncoder, features: nn.Module, loader, steps: int, lr: float, weight_decay: float,
                      decay_every_epochs: int, device: torch.device) -> list[float]:
    """Adam (``lr``, ``weight_decay``), lr ×0.1 every ``decay_every_epochs`` passes over ``loader``;
    ``steps`` steps, re-iterating ``loader`` when it runs out (docs/moe_adapters.md#ddas). Returns the
    loss of every step."""
    opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = max(len(loader), 1)
    losses: list[float] = []
    ae.train()
    while len(losses) < steps:
        for x, _ in loader:
            s = len(losses)
            if s >= steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr * 0.1 ** ((s // per_epoch) // decay_every_epochs)
            with torch.no_grad():
                f = features(x.to(device))
            loss = F.mse_loss(ae(f), f)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"DDAS autoencoder loss is not finite at step {s}")
    ae.eval()
    return losses
