"""Representation probe: how good is the continually learned representation, apart from the
incremental classifier (the SLCA paper's "further evaluation of representation";
docs/slca_protocol.md#representation-probe).

After each task t, the backbone is frozen as it is; a multinomial logistic regression is trained on
its features of the train images (test transform, eval mode) of *all* classes seen so far, and scored
on the test images of those classes over all seen classes, exactly as the incremental classifier is
scored. Its accuracy is an upper reference for what any classifier on these features could do with
access to all old data; the gap to the incremental classifier is what the classifier (not the
representation) loses.

The regression is scikit-learn's ``LogisticRegression(C=C)`` objective, ``C·Σ_i CE_i + ½‖W‖²``
(intercept not penalized), divided by ``C·N``, on features standardized with the train mean and
(population) std, solved to convergence with full-batch L-BFGS in float64 (the problem is convex, so
the solution does not depend on the solver).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clcli.config import dict_key_problems, number_problem
from clcli.engine import Runtime, extract_features
from clcli.evaluation import AccuracyMatrix, cil_metrics

# ``method.probe`` keys and their values when not given (``+method.probe.enabled=true`` is enough).
PROBE_DEFAULTS = {"enabled": False, "C": 1.0, "max_iter": 500, "standardize": True, "batch_size": 256}


def probe_config_problems(probe) -> list[str]:
    """Problems of ``method.probe`` (null = no probe)."""
    if probe is None:
        return []
    probe = dict(probe)
    problems = dict_key_problems(probe, PROBE_DEFAULTS, "method.probe", required=False)
    for key in ("enabled", "standardize"):
        if key in probe and not isinstance(probe[key], bool):
            problems.append(f"method.probe.{key}: expected true or false, got {probe[key]!r}.")
    for key, rule in (("C", dict(minimum=0, strict=True)), ("max_iter", dict(minimum=1, integer=True)),
                      ("batch_size", dict(minimum=1, integer=True))):
        if key in probe:
            problems += number_problem(f"method.probe.{key}", probe[key], **rule)
    return problems


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression ``(W [K, D], b [K])`` minimizing
    ``mean_i CE(x_i·Wᵀ + b, y_i) + ‖W‖²/(2·C·N)`` by full-batch L-BFGS (strong Wolfe) in float64."""
    x = x.double()
    n, d = x.shape
    W = torch.zeros(num_classes, d, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")
    reg = 1.0 / (2.0 * C * n)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W.T + b, y) + reg * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


class RepresentationProbe:
    """The probe of one run: its per-task counts (``AccuracyMatrix``, resumable) and :meth:`run`."""

    def __init__(self, cfg: dict, scenario):
        self.cfg = {**PROBE_DEFAULTS, **dict(cfg)}
        self.scenario = scenario
        self.matrix = AccuracyMatrix(len(scenario))

    def _features(self, backbone, datasets, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
        fs, ys = [], []
        for ds in datasets:
            for f, y in extract_features(backbone, ds, rt, batch_size=self.cfg["batch_size"], description="probe"):
                fs.append(f.double())
                ys.append(y)
        return torch.cat(fs), torch.cat(ys)

    def run(self, backbone, after: int, rt: Runtime) -> None:
        """Fit the probe on the train images of tasks 0..``after`` and record its test counts in row
        ``after`` (one column per seen task). ``backbone`` is in eval mode."""
        seen = self.scenario.tasks[: after + 1]
        x, y = self._features(backbone, [t.train_plain for t in seen], rt)
        mean = x.mean(0) if self.cfg["standardize"] else torch.zeros_like(x[0])
        std = x.std(0, unbiased=False).clamp_min(1e-12) if self.cfg["standardize"] else torch.ones_like(x[0])
        num_classes = seen[-1].labels.stop
        W, b = fit_logistic((x - mean) / std, y, num_classes, float(self.cfg["C"]), int(self.cfg["max_iter"]))
        for task in seen:
            xt, yt = self._features(backbone, [task.test], rt)
            pred = (((xt - mean) / std) @ W.T + b).argmax(1)
            self.matrix.record(after, task.index, int((pred == yt).sum()), len(yt))

    def results(self) -> dict:
        """``probe_matrix`` (percent, null where not evaluated), ``probe_counts`` and, when every task
        was probed, ``metrics.probe_last`` / ``metrics.probe_inc`` (same definitions as Last-/Inc-Acc)."""
        pct = self.matrix.percent()
        out = {"probe_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in pct],
               "probe_counts": self.matrix.state_dict()}
        done = bool((self.matrix.total > 0).any(1).all())
        m = cil_metrics(self.matrix) if done else None
        out["metrics"] = {"probe_last": m["last_acc"] if m else None, "probe_inc": m["inc_acc"] if m else None}
        return out

    def state_dict(self) -> dict:
        return self.matrix.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.matrix.load_state_dict(state)
