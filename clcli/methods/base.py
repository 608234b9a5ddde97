"""The method protocol the training loop relies on (see DESIGN.md "Core objects")."""
from __future__ import annotations

from typing import Protocol

import torch

from clcli.data.scenario import Scenario, Task


class Method(Protocol):
    """A continual learner. The loop calls, for every task in order::

        begin_task(task); train_task(task); end_task(task)
        ... evaluation through predict() ...

    ``predict(images, candidates)`` returns logits ``[B, len(candidates)]`` over the contiguous
    global label range ``candidates`` (all seen classes for class-incremental scenarios, the
    evaluated dataset's classes for MTIL). ``state_dict()`` holds everything needed to continue
    after the last finished task (per-task checkpoints and resume); ``summary()`` returns facts worth
    recording in results.json (e.g. parameter counts).

    Optionally, a static ``config_problems(optim, **method_keys) -> list[str]`` checks the method's
    own keys without a backbone; ``clcli validate`` (``config.check_config``) and the constructor
    both run it, so a bad key is reported before anything is loaded.
    """

    def prepare_scenario(self, scenario: Scenario) -> Scenario: ...

    def begin_task(self, task: Task) -> None: ...

    def train_task(self, task: Task) -> None: ...

    def end_task(self, task: Task) -> None: ...

    def predict(self, images: torch.Tensor, candidates: range) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def summary(self) -> dict: ...
