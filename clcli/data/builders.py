"""Data configs become objects with ``problems()`` (cheap checks) and ``build(backbone)``.

``cfg.data`` names one of these classes in its ``_target_``; Hydra instantiates it (and its
``source``) without touching any image, so ``clcli validate`` can report a missing dataset before
weights or data are loaded.
"""
from __future__ import annotations

from clcli.data.base import Source
from clcli.data.scenario import CLASS_INCREMENTAL, Scenario, build_class_incremental, task_sizes
from clcli.data.transforms import RECIPES, build_transforms


class ClassIncrementalData:
    """A class-incremental benchmark: one source cut into tasks by class (SLCA protocol).

    ``initial_increment`` classes in the first task, then ``increment`` per task, the remainder
    last; ``num_tasks`` (optional) states the expected count so a mistake is caught early.
    """

    kind = CLASS_INCREMENTAL  # what it builds, known before building (method/scenario checks in validate)

    def __init__(self, name: str, source: Source, initial_increment: int, increment: int,
                 class_order_seed: int, shuffle_classes: bool = True, transform: str = "backbone",
                 num_tasks: int | None = None):
        self.name, self.source = name, source
        self.initial_increment, self.increment = initial_increment, increment
        self.class_order_seed, self.shuffle_classes = class_order_seed, shuffle_classes
        self.transform, self.num_tasks = transform, num_tasks

    def problems(self) -> list[str]:
        out = list(self.source.problems())
        n = self.source.info.num_classes
        if self.initial_increment < 1 or self.increment < 1:
            out.append(f"data.initial_increment / data.increment must be >= 1 (got {self.initial_increment} / {self.increment}).")
        elif self.initial_increment > n:
            out.append(f"data.initial_increment={self.initial_increment} exceeds the {n} classes of {self.name}.")
        elif self.num_tasks is not None:
            sizes = task_sizes(n, self.initial_increment, self.increment)
            if len(sizes) != self.num_tasks:
                out.append(
                    f"data: {n} classes split as initial_increment={self.initial_increment}, "
                    f"increment={self.increment} give {len(sizes)} tasks {sizes}, but data.num_tasks={self.num_tasks}."
                )
        if self.transform not in RECIPES:
            out.append(f"data.transform: unknown recipe '{self.transform}' (known: {', '.join(RECIPES)}).")
        return out

    def build(self, backbone) -> Scenario:
        train_tf, test_tf = build_transforms(self.transform, backbone)
        return build_class_incremental(
            self.source, name=self.name, initial_increment=self.initial_increment, increment=self.increment,
            class_order_seed=self.class_order_seed, shuffle_classes=self.shuffle_classes,
            train_transform=train_tf, test_transform=test_tf,
        )
