"""User-facing errors: one clear paragraph (what, where, how to fix), no traceback.

The CLI catches :class:`ClcliError` and prints its message; set ``HYDRA_FULL_ERROR=1`` to see the
traceback as well.
"""
from __future__ import annotations


class ClcliError(RuntimeError):
    """An error caused by input the user can fix (config, files, data)."""


class ConfigError(ClcliError):
    """The composed configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"The configuration has {len(self.problems)} problem(s):\n{lines}")


class DataError(ClcliError):
    """A dataset is missing, incomplete or unreadable."""


class BackboneError(ClcliError):
    """Backbone weights cannot be found or loaded."""


class DivergenceError(ClcliError):
    """Training produced a non-finite or exploding loss: a training outcome, not bad input. The run
    loop records it (``status: diverged`` with ``details``) instead of letting it escape.

    ``details``: where (the loop), epoch and step (1-based), the loss and the reason."""

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.details = {k: v for k, v in details.items() if v is not None}


class CheckpointError(ClcliError):
    """A checkpoint or results file is corrupted, foreign or incompatible with the run."""
