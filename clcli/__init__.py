"""clcli: a config-driven experiment CLI for continual learning on pre-trained models.

Reproduces SLCA (Zhang et al., ICCV 2023, arXiv 2303.05118) and DIKI (Tang et al., ECCV 2024,
arXiv 2407.05342) and the baselines they compare against.
"""
import os

__version__ = "0.1.0"

# Idle OpenMP workers of PyTorch's libgomp spin ~300,000 pause instructions (~10 ms here) after every
# parallel op before sleeping. The classifier alignment interleaves multi-threaded matmuls with noise
# filled by Python threads (clcli.noise), which then share the cores with the spinning workers: at 800
# classes sampling took 1.50 s per epoch instead of 1.19 s. 30,000 keeps the spin longer than the gap
# between two ops of a training step (ViT-Tiny step time unchanged, 128 vs 130 ms) and shorter than the
# noise fill. libgomp reads the variable when torch is first imported, so it is set here, before any
# torch import; a value the user set wins (README, "Statistics, alignment and run directories at scale").
os.environ.setdefault("GOMP_SPINCOUNT", "30000")
