"""Tasks and scenarios: how sources are cut into a sequence of tasks.

Labels are *global* everywhere: in a class-incremental scenario the class at position ``i`` of the
class order gets label ``i`` (SLCA protocol, docs/slca_protocol.md#class-order-and-seeds), so task
``k`` owns a contiguous label range. In the MTIL (domain-class incremental) scenario each dataset is a
task whose classes get the next free range of labels; classification is over the evaluated dataset's
own classes (docs/diki_mtil_protocol.md#class-names-and-prompt-templates).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from clcli.data.base import Source, SplitData
from clcli.data.images import ImageDataset
from clcli.evaluation import CLASS_INCREMENTAL, DOMAIN_CLASS_INCREMENTAL, AccuracyMatrix, ScenarioKind, outcome_metrics

__all__ = ["CLASS_INCREMENTAL", "DOMAIN_CLASS_INCREMENTAL", "Scenario", "ScenarioKind", "Task"]


@dataclass
class Task:
    """One step of a scenario.

    ``labels`` is the global label range of the task; ``class_ids`` the source's original class ids
    in label order; ``train`` uses the train transform, ``train_plain`` the same images with the test
    transform (for statistics), ``test`` (and ``val`` where the source has one) the test transform.
    """

    index: int
    name: str
    labels: range
    class_ids: list[int]
    class_names: list[str]
    train: ImageDataset
    train_plain: ImageDataset
    test: ImageDataset
    val: ImageDataset | None = None
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}."])
    # Evaluation prompts: None = the first template (DIKI's protocol); a list = the template ensemble
    # (ZSCL's protocol, docs/diki_mtil_protocol.md#the-protocol-choice). Training always uses the first.
    eval_templates: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def prompts(self) -> list[str]:
        """The task's class prompts with its first template, ``_`` replaced by spaces
        (docs/diki_mtil_protocol.md#class-names-and-prompt-templates)."""
        return [self.templates[0].format(c=name).replace("_", " ") for name in self.class_names]

    def eval_prompt_sets(self) -> list[list[str]]:
        """The class prompts the evaluation classifier averages over, one list per template: just
        ``[prompts()]`` unless the protocol sets ``eval_templates`` (the ensemble)."""
        if not self.eval_templates:
            return [self.prompts()]
        return [[t.format(c=name).replace("_", " ") for name in self.class_names] for t in self.eval_templates]


@dataclass
class Scenario:
    """An ordered list of tasks plus what its :class:`~clcli.evaluation.ScenarioKind` says: which tasks
    are evaluated after each task, over which labels, and with which metrics."""

    name: str
    kind: ScenarioKind
    tasks: list[Task]
    class_order: list[int]  # source class ids in label order (CIL); [] where not meaningful
    protocol: dict | None = None  # MTIL: which protocol (templates, splits) the data follow; in the manifest

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    @property
    def num_labels(self) -> int:
        return self.tasks[-1].labels.stop

    def eval_tasks(self, after: int) -> list[Task]:
        """Tasks evaluated after training task ``after``: the seen ones for class-incremental
        learning, all of them for MTIL (zero-shot transfer to future tasks is measured)."""
        return list(self.tasks) if self.kind.evaluates_future_tasks else self.tasks[: after + 1]

    def candidates(self, after: int, task: Task) -> range:
        """Labels the prediction for ``task``'s test images is chosen from after training ``after``:
        all seen classes (class-incremental), or the evaluated dataset's own classes (MTIL)."""
        return task.labels if self.kind.task_label_space else range(0, self.tasks[after].labels.stop)

    def metrics(self, matrix: AccuracyMatrix, finished: int) -> dict:
        """results.json's ``metrics`` (and ``partial_metrics`` when only ``finished`` tasks ran)."""
        return outcome_metrics(self.kind, matrix, finished)

    def joint(self) -> Scenario:
        """All tasks merged into one (joint training, the upper bound)."""
        first = self.tasks[0]
        merged = Task(
            index=0,
            name="joint",
            labels=range(0, self.num_labels),
            class_ids=[c for t in self.tasks for c in t.class_ids],
            class_names=[n for t in self.tasks for n in t.class_names],
            train=_concat([t.train for t in self.tasks]),
            train_plain=_concat([t.train_plain for t in self.tasks]),
            test=_concat([t.test for t in self.tasks]),
            templates=first.templates,
        )
        return Scenario(self.name + "/joint", self.kind, [merged], self.class_order)

    def manifest(self) -> dict:
        """What results.json records about the scenario (class order and per-task classes)."""
        return {
            "name": self.name,
            "kind": self.kind.name,
            "class_order": list(map(int, self.class_order)),
            **({"protocol": self.protocol} if self.protocol else {}),
            "tasks": [
                {
                    "index": t.index,
                    "name": t.name,
                    "labels": [t.labels.start, t.labels.stop],
                    "class_ids": list(map(int, t.class_ids)),
                    "num_train": len(t.train),
                    "num_test": len(t.test),
                }
                for t in self.tasks
            ],
        }


def _concat(datasets: Sequence[ImageDataset]) -> ImageDataset:
    items: list = []
    for d in datasets:
        items.extend(list(d.split.items))
    labels = np.concatenate([d.labels for d in datasets])
    split = SplitData(items, np.concatenate([d.split.labels for d in datasets]))
    return ImageDataset(split, labels, datasets[0].transform)


def class_order(num_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    """SLCA class order: ``numpy.random.seed(seed); numpy.random.permutation(n)``
    (docs/slca_protocol.md#class-order-and-seeds).

    A private ``RandomState`` gives the same MT19937 stream as the legacy global RNG without
    touching global state.
    """
    if not shuffle:
        return list(range(num_classes))
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def task_sizes(num_classes: int, initial: int, increment: int) -> list[int]:
    """``[initial] + [increment]*k + [remainder]`` (Cars-196 with 20/20: nine 20s and a 16)."""
    sizes = [initial]
    while sum(sizes) < num_classes:
        sizes.append(min(increment, num_classes - sum(sizes)))
    return sizes


def build_class_incremental(
    source: Source,
    *,
    name: str,
    initial_increment: int,
    increment: int,
    class_order_seed: int,
    shuffle_classes: bool,
    train_transform: Callable,
    test_transform: Callable,
) -> Scenario:
    """Split a source into class-incremental tasks with the SLCA class order and label remap."""
    n = source.info.num_classes
    order = class_order(n, class_order_seed, shuffle_classes)
    label_of = np.empty(n, dtype=np.int64)
    label_of[np.asarray(order)] = np.arange(n)
    train_split, test_split = source.load("train"), source.load("test")
    names = source.info.class_names or [str(c) for c in range(n)]
    tasks, start = [], 0
    for k, size in enumerate(task_sizes(n, initial_increment, increment)):
        labels = range(start, start + size)
        ids = order[start : start + size]
        train = _select(train_split, label_of, labels)
        test = _select(test_split, label_of, labels)
        tasks.append(
            Task(
                index=k,
                name=f"task{k}",
                labels=labels,
                class_ids=ids,
                class_names=[names[c] for c in ids],
                train=ImageDataset(train, label_of[train.labels], train_transform),
                train_plain=ImageDataset(train, label_of[train.labels], test_transform),
                test=ImageDataset(test, label_of[test.labels], test_transform),
                templates=source.info.templates,
            )
        )
        start += size
    return Scenario(name, CLASS_INCREMENTAL, tasks, order)


def _select(split: SplitData, label_of: np.ndarray, labels: range) -> SplitData:
    glob = label_of[split.labels]
    keep = np.flatnonzero((glob >= labels.start) & (glob < labels.stop))
    return split.subset(keep)


def build_domain_incremental(
    sources: Sequence[tuple[str, Source, SplitData | None]],
    *,
    name: str,
    transform: Callable,
    with_val: bool,
) -> Scenario:
    """One task per source (MTIL). ``sources`` holds ``(name, source, train_override)`` where
    ``train_override`` replaces the source's train split (few-shot subsets)."""
    tasks, start = [], 0
    for k, (task_name, source, train_override) in enumerate(sources):
        n = source.info.num_classes
        labels = range(start, start + n)
        train = train_override if train_override is not None else source.load("train")
        test = source.load("test")
        val = source.load("val") if with_val else None
        tasks.append(
            Task(
                index=k,
                name=task_name,
                labels=labels,
                class_ids=list(range(n)),
                class_names=list(source.info.class_names),
                train=ImageDataset(train, train.labels + start, transform),
                train_plain=ImageDataset(train, train.labels + start, transform),
                test=ImageDataset(test, test.labels + start, transform),
                val=ImageDataset(val, val.labels + start, transform) if val is not None else None,
                templates=list(source.info.templates),
            )
        )
        start += n
    return Scenario(name, DOMAIN_CLASS_INCREMENTAL, tasks, [])
