"""The method protocol the training loop relies on, and the
evaluation context every ``predict`` call receives."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from clcli.data.scenario import Scenario, Task


@dataclass(frozen=True)
class EvalBatch:
    """One evaluation batch and what the evaluator knows about it (built by ``engine.evaluate``).

    ``images``: the batch on the run's device; ``task``: the task whose test set it comes from;
    ``candidates``: the contiguous global label range to score; ``batch_index``: its position in the
    evaluator's unshuffled loader of ``task.test`` (this rank's block in a multi-process run), or
    None for a batch that is not such a loader batch (a direct call); ``after``: the last trained task.

    ``task`` and ``batch_index`` name the batch so that a cache can serve it exactly; they are not
    a prediction input. A class-incremental method must not use the task identity to predict (that
    would be task-incremental evaluation); an MTIL method may, because there the evaluated dataset
    and its label space are given by the protocol (``candidates`` is ``task.labels``).
    """

    images: torch.Tensor
    task: Task
    candidates: range
    batch_index: int | None = None
    after: int | None = None


class Method(Protocol):
    """A continual learner. The loop calls, for every task in order::

        begin_task(task); train_task(task); end_task(task)
        ... evaluation through predict() ...

    ``predict(batch)`` (an :class:`EvalBatch`) returns logits ``[B, len(batch.candidates)]`` over
    the contiguous global label range ``batch.candidates`` (all seen classes for class-incremental
    scenarios, the evaluated dataset's classes for MTIL); the batch's task and position serve caching
    and bookkeeping, and a class-incremental method must not predict from them. ``state_dict()``
    holds everything needed to continue after the last finished task (per-task checkpoints and
    resume); ``summary()`` returns facts worth recording in results.json (e.g. parameter counts).

    Optionally, a static ``config_problems(optim, backbone, **method_keys) -> list[str]`` checks what
    the method owns without building anything: its own keys (nested ones too), the ``optim`` keys only
    it reads (``lr.classifier`` for a method with heads), and the backbone *class* it is given (None
    when unknown), e.g. CLIP methods refuse a timm backbone. ``clcli validate`` also passes the
    backbone's config node as ``backbone_cfg`` (the prompt methods and SLCA++ read its ``model_name``
    to refuse a CNN); a method that does not read it takes ``**_``. ``clcli validate``
    (``config.check_config``) and the constructor both run it, so a bad key is reported before
    anything is loaded.
    """

    def prepare_scenario(self, scenario: Scenario) -> Scenario: ...

    def begin_task(self, task: Task) -> None: ...

    def train_task(self, task: Task) -> None: ...

    def end_task(self, task: Task) -> None: ...

    def predict(self, batch: EvalBatch) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def summary(self) -> dict: ...
