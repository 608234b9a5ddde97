"""Continual-learning methods. Each is built by Hydra from ``cfg.method`` (its ``_target_``) as

    instantiate(cfg.method, _partial_=True)(backbone=backbone, optim=cfg.optim, runtime=rt)

and follows the protocol in :mod:`clcli.methods.base`."""
