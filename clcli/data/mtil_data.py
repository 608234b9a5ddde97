"""MTIL data configs: ``problems()`` (cheap, no image touched) + ``build(backbone)`` -> Scenario.

MTIL (the domain-class incremental benchmark of ZSCL, as run by DIKI: Tang et al., "Mind the
Interference", ECCV 2024, arXiv 2407.05342; docs/diki_mtil_protocol.md#datasets-and-orders) is one
task per dataset, each with its own classes, class names and prompt template. After every task *all*
datasets are evaluated (future ones included) over their own classes, giving the T×T matrix of
Transfer / Avg / Last (docs/metrics.md#mtil-transfer).

- :class:`MTILData` (``data=mtil``, ``mtil_order2``, ``mtil_fewshot``): the eleven real datasets of
  :mod:`clcli.data.mtil` under ``data_dir`` (CoOp splits, DIKI's class names and first templates),
  in order I, order II, the 8-dataset few-shot order, or an explicit list.
- :class:`SyntheticMTILData` (``data=synthetic_mtil``): a few generated "datasets", each with its own
  class-name prefix, seed and template, and a val split — the whole MTIL pipeline on CPU in seconds.

Both use the backbone's deterministic test transform for every split
(docs/diki_mtil_protocol.md#preprocessing: DIKI trains without augmentation).
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from typing import Any

from clcli.data import mtil
from clcli.data.base import SourceInfo, SplitData
from clcli.data.scenario import DOMAIN_CLASS_INCREMENTAL, Scenario, build_domain_incremental
from clcli.data.synthetic import SyntheticSource

log = logging.getLogger("clcli")

# The MTIL protocols (docs/diki_mtil_protocol.md#the-protocol-choice): which prompts evaluate and which
# splits train/test. ``diki`` (default): DIKI's single first template and CoOp splits. ``zscl``: ZSCL's
# template ensemble at evaluation (training keeps the first template) and ZSCL's splits
# (clcli.data.mtil_zscl: torchvision's train / test of every dataset, no val).
PROTOCOLS = ("diki", "zscl")


def protocol_problems(protocol) -> list[str]:
    if protocol not in PROTOCOLS:
        return [f"data.protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}. diki = single template "
                "and CoOp splits (DIKI's protocol); zscl = template ensemble at evaluation and ZSCL's splits "
                "(the protocol of the published ZSCL / MoE-Adapters / Continual-FT rows)."]
    return []


def _apply_protocol(scenario: Scenario, protocol: str, ensembles: dict[str, Sequence[str]],
                    splits: dict[str, str], class_names: dict[str, str] | None = None) -> Scenario:
    """Give every task its evaluation templates under ``protocol`` and record the protocol in the
    scenario (results.json ``scenario.protocol``; ``clcli table`` shows it). ``class_names``: where
    each dataset's names come from under ``zscl`` (``zscl`` or ``coop`` where ZSCL's list is unknown)."""
    for task in scenario.tasks:
        task.eval_templates = list(ensembles[task.name]) if protocol == "zscl" else None
    scenario.protocol = {"name": protocol, "eval_templates": "ensemble" if protocol == "zscl" else "first",
                         "splits": dict(splits)}
    if class_names is not None:
        scenario.protocol["class_names"] = dict(class_names)
    return scenario


def _eval_transform(backbone):
    """The backbone's deterministic transform: CLIP's ``transform(False)`` (its *val* preprocessing);
    a timm backbone's test-time recipe otherwise."""
    if hasattr(backbone, "transform"):
        return backbone.transform(False)
    from clcli.data.transforms import build_transforms

    return build_transforms("backbone", backbone)[1]


class FewShotView:
    """A source seen through the few-shot protocol (docs/diki_mtil_protocol.md#few-shot-draws):
    ``shots`` training items per class and ``min(shots, 4)`` validation items per class, drawn by the
    reference's rule (:func:`clcli.data.mtil.few_shot_reference`) from ``rng`` — by default a private
    ``random.Random(seed)``; :class:`MTILData` passes one stream shared by all datasets, drawn in
    training order, train before val, as the reference's global ``random`` is. The test split is
    untouched. Subsets are drawn once and cached, so train and val stay fixed for the whole run."""

    def __init__(self, source: Any, shots: int, seed: int, rng: random.Random | None = None):
        self.source, self.shots, self.seed = source, int(shots), int(seed)
        self.rng = rng if rng is not None else random.Random(self.seed)  # shared across datasets by MTILData
        self._cache: dict[str, SplitData] = {}

    @property
    def info(self) -> SourceInfo:
        return self.source.info

    def problems(self) -> list[str]:
        return self.source.problems()

    def load(self, split: str) -> SplitData:
        if split == "test":
            return self.source.load("test")
        if split not in self._cache:
            shots = self.shots if split == "train" else mtil.fewshot_val_shots(self.shots)
            # The reference's rule and stream: train, then val, from one RNG (few_shot_reference).
            self._cache[split] = mtil.few_shot_reference(self.source.load(split), shots, self.rng)
        return self._cache[split]


class MTILData:
    """The MTIL dataset sequence: one task per dataset, CoOp splits, DIKI's protocol
    (docs/diki_mtil_protocol.md#datasets-and-orders).

    Args:
        name: scenario name recorded in results (``mtil_order1``, ``mtil_order2``, ``mtil_fewshot``).
        order: ``"I"``, ``"II"`` (order I permuted by [9, 6, 7, 8, 5, 10, 0, 1, 3, 4, 2]), ``"FS"``
            (order I without EuroSAT, MNIST, OxfordPet: the 8 MTIL-FS datasets) or an explicit list of
            dataset names from :data:`clcli.data.mtil.MTIL_DATASETS`.
        num_shots: ``-1`` = full training sets; ``k >= 1`` = ``k`` training and ``min(k, 4)``
            validation images per class (MTIL-FS: 16), test sets untouched.
        few_shot_seed: seed of the few-shot draws: one ``random.Random(few_shot_seed)`` stream for all
            datasets in training order, train then val of each (the reference: 42;
            docs/diki_mtil_protocol.md#few-shot-draws). ``${seed}`` draws per run seed, so that a
            spread over seeds includes sampling variance.
        split_seed: seed of the per-class 80/20 train/val split of CIFAR100 and MNIST (drawn once; the
            reference re-draws it per construction, docs/diki_mtil_protocol.md#splits-and-data-layout).
        data_dir: folder holding one sub-folder per dataset (config ``paths.data_dir``).
        dirs: sub-folder of each dataset (defaults: CoOp's names, :data:`clcli.data.mtil.MTIL_DEFAULT_DIRS`);
            entries given here replace the defaults one by one.
        with_val: load the val splits (DIKI keeps the best epoch by val accuracy,
            docs/diki_mtil_protocol.md#training).
        download: let torchvision download CIFAR100 / MNIST on first use (the other nine datasets must
            be prepared by hand; ``clcli validate`` prints the layout and where to get each).
        protocol: ``diki`` (single template, CoOp splits) or ``zscl`` (template ensemble at evaluation,
            :data:`clcli.data.mtil.ZSCL_TEMPLATES`; ZSCL's train / test of every dataset, no val,
            :mod:`clcli.data.mtil_zscl`; the source of each dataset's class names is recorded in
            results.json ``scenario.protocol.class_names``). docs/diki_mtil_protocol.md#the-protocol-choice.
    """

    kind = DOMAIN_CLASS_INCREMENTAL

    def __init__(self, name: str, order: str | Sequence[str] = "I", num_shots: int = -1, few_shot_seed: int = 42,
                 split_seed: int = 42, data_dir: str = "data", dirs: dict | None = None, with_val: bool = True,
                 download: bool = False, protocol: str = "diki"):
        self.protocol = protocol
        self.name = name
        self.order = order if isinstance(order, str) else [str(d) for d in order]
        self.num_shots, self.few_shot_seed, self.split_seed = num_shots, few_shot_seed, split_seed
        self.data_dir = os.fspath(data_dir)
        self.dirs = {**mtil.MTIL_DEFAULT_DIRS, **{str(k): str(v) for k, v in dict(dirs or {}).items()}}
        self.with_val, self.download = with_val, download

    @property
    def datasets(self) -> list[str]:
        """Dataset names in training order ([] when ``order`` is invalid; see :meth:`problems`)."""
        if isinstance(self.order, str):
            return list(mtil.MTIL_ORDERS.get(self.order, ()))
        return list(self.order)

    def _static_problems(self) -> list[str]:
        out = []
        if isinstance(self.order, str) and self.order not in mtil.MTIL_ORDERS:
            out.append(f"data.order: unknown order {self.order!r} (known: {', '.join(mtil.MTIL_ORDERS)}, "
                       "or a list of dataset names).")
        names = self.datasets
        unknown = [d for d in names if d not in mtil.MTIL_DATASETS]
        if unknown:
            out.append(f"data.order: unknown dataset(s) {unknown} (known: {', '.join(mtil.MTIL_DATASETS)}).")
        dupes = sorted({d for d in names if names.count(d) > 1})
        if dupes:
            out.append(f"data.order: dataset(s) {dupes} appear more than once.")
        out += protocol_problems(self.protocol)
        if not names and not out:
            out.append("data.order: the dataset list is empty.")
        extra = sorted(set(self.dirs) - set(mtil.MTIL_DATASETS))
        if extra:
            out.append(f"data.dirs: unknown dataset(s) {extra} (known: {', '.join(mtil.MTIL_DATASETS)}).")
        if isinstance(self.num_shots, bool) or not isinstance(self.num_shots, int) or \
                (self.num_shots != -1 and self.num_shots < 1):
            out.append(f"data.num_shots: -1 (full training sets) or an integer >= 1, got {self.num_shots!r}.")
        return out

    @property
    def _splits(self) -> str:
        return "zscl" if self.protocol == "zscl" else "coop"

    def _sources(self) -> list[tuple[str, Any]]:
        return [(d, mtil.make_mtil_source(d, self.data_dir, root=os.path.join(self.data_dir, self.dirs[d]),
                                          split_seed=self.split_seed, download=self.download, splits=self._splits))
                for d in self.datasets]

    def problems(self) -> list[str]:
        """Config mistakes, then every missing dataset folder / split file with its layout (stats
        paths only)."""
        out = self._static_problems()
        if out:
            return out
        for _, source in self._sources():
            out.extend(source.problems())
        return out

    def build(self, backbone) -> Scenario:
        sources = []
        rng = random.Random(self.few_shot_seed)  # one stream, datasets in training order (the reference)
        for d, source in self._sources():
            if self.num_shots != -1:
                source = FewShotView(source, self.num_shots, self.few_shot_seed, rng=rng)
                source.load("train")  # draw now, in order: train, then val, dataset after dataset
                if self._splits == "coop":  # ZSCL's splits have no val
                    source.load("val")
            sources.append((d, source, None))
        splits = {d: self._splits for d in self.datasets}
        names = None
        if self._splits == "zscl":
            from clcli.data.mtil_zscl import ZSCL_SPLITS

            names = {d: ZSCL_SPLITS[d].class_names for d in self.datasets}
        scenario = build_domain_incremental(sources, name=self.name, transform=_eval_transform(backbone),
                                            with_val=self.with_val and self._splits == "coop")
        return _apply_protocol(scenario, self.protocol, mtil.ZSCL_TEMPLATES, splits, names)


# Each synthetic dataset differs from the others in prompts (prefix, template) and image statistics
# (seed), the way MTIL's datasets differ in domain: enough for the Gaussians to tell them apart.
DEFAULT_SYNTHETIC_DATASETS = (
    {"name": "leaves", "num_classes": 4, "name_prefix": "leaf_", "seed": 101,
     "template": "a photo of a {c}, a type of leaf."},
    {"name": "minerals", "num_classes": 3, "name_prefix": "mineral_", "seed": 202,
     "template": "a close-up photo of {c} mineral."},
    {"name": "signals", "num_classes": 5, "name_prefix": "signal_", "seed": 303,
     "template": 'a photo of the signal: "{c}".'},
)


class SyntheticMTILData:
    """A small MTIL-like sequence of generated datasets (tests and smoke runs, ``data=synthetic_mtil``).

    ``datasets``: list of ``{name, num_classes, name_prefix, seed, template}``; every dataset gets
    ``train_per_class`` / ``val_per_class`` / ``test_per_class`` images of ``image_size`` pixels with
    pixel noise ``noise`` (:class:`clcli.data.synthetic.SyntheticSource`).
    """

    kind = DOMAIN_CLASS_INCREMENTAL

    def __init__(self, name: str = "synthetic_mtil", datasets: Sequence[dict] | None = None,
                 train_per_class: int = 16, val_per_class: int = 4, test_per_class: int = 8,
                 image_size: int = 32, noise: float = 0.25, with_val: bool = True, protocol: str = "diki"):
        self.name, self.protocol = name, protocol
        self.datasets = [dict(d) for d in (datasets if datasets is not None else DEFAULT_SYNTHETIC_DATASETS)]
        self.train_per_class, self.val_per_class, self.test_per_class = train_per_class, val_per_class, test_per_class
        self.image_size, self.noise, self.with_val = image_size, noise, with_val

    def problems(self) -> list[str]:
        out = []
        if not self.datasets:
            out.append("data.datasets: empty.")
        names = [d.get("name") for d in self.datasets]
        if len(set(names)) != len(names):
            out.append(f"data.datasets: names must be distinct, got {names}.")
        for d in self.datasets:
            missing = [k for k in ("name", "num_classes", "seed", "template") if k not in d]
            if missing:
                out.append(f"data.datasets: entry {d} lacks {missing}.")
            elif "{c}" not in str(d["template"]):
                out.append(f"data.datasets.{d['name']}.template: needs a {{c}} placeholder, got {d['template']!r}.")
        if self.with_val and self.val_per_class < 1:
            out.append("data.val_per_class: must be >= 1 when data.with_val is true.")
        if self.train_per_class < 2 or self.test_per_class < 1:
            out.append("data.train_per_class must be >= 2 and data.test_per_class >= 1.")
        return out + protocol_problems(self.protocol)

    def ensembles(self) -> dict[str, list[str]]:
        """Each dataset's evaluation templates under ``protocol=zscl``: its ``ensemble`` list, or by
        default its template plus two generic ones (a stand-in for ZSCL's lists)."""
        return {str(d["name"]): list(d.get("ensemble") or [str(d["template"]), "a photo of the {c}.", "an image of a {c}."])
                for d in self.datasets}

    def sources(self) -> list[tuple[str, SyntheticSource]]:
        return [
            (str(d["name"]), SyntheticSource(
                num_classes=int(d["num_classes"]), train_per_class=self.train_per_class,
                test_per_class=self.test_per_class, val_per_class=self.val_per_class if self.with_val else 0,
                image_size=self.image_size, noise=self.noise, seed=int(d["seed"]), name=str(d["name"]),
                name_prefix=str(d.get("name_prefix", "")), templates=[str(d["template"])],
            ))
            for d in self.datasets
        ]

    def build(self, backbone) -> Scenario:
        scenario = build_domain_incremental([(n, s, None) for n, s in self.sources()], name=self.name,
                                            transform=_eval_transform(backbone), with_val=self.with_val)
        return _apply_protocol(scenario, self.protocol, self.ensembles(), {n: "synthetic" for n, _ in self.sources()})
