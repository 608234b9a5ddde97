"""clcli: a config-driven experiment CLI for continual learning on pre-trained models.

Reproduces SLCA (Zhang et al., ICCV 2023, arXiv 2303.05118) and DIKI (Tang et al., ECCV 2024,
arXiv 2407.05342) and the baselines they compare against.
"""
__version__ = "0.1.0"
