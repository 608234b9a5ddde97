"""Class orders, task splits and the digits source against the SLCA reference protocol
(docs/slca_protocol.md: class order)."""
import json
from pathlib import Path

import numpy as np
import pytest

from clcli.data.cil import Digits, stratified_split
from clcli.data.scenario import class_order, task_sizes
from clcli.data.synthetic import SyntheticSource

# The 12 class orders (4 benchmarks x seeds 1993/1996/1997) the SLCA reference produces.
ORDERS = json.loads((Path(__file__).resolve().parent / "data" / "slca_class_orders.json").read_text())


def test_class_order_first_entries_from_spec():
    assert class_order(100, 1993)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert class_order(200, 1993)[:10] == [168, 136, 51, 9, 183, 101, 171, 99, 42, 159]
    assert class_order(196, 1993)[:10] == [59, 134, 162, 9, 42, 72, 118, 99, 109, 79]
    assert class_order(100, 1996)[:5] == [35, 18, 40, 85, 63]
    assert class_order(200, 1997)[:5] == [76, 153, 53, 4, 197]
    assert class_order(196, 1996)[:5] == [173, 6, 195, 94, 134]


def test_all_twelve_orders_equal_the_reference():
    n = {"cifar100_224": 100, "imagenet-r": 200, "cub200_224": 200, "cars196_224": 196}
    for key, by_seed in ORDERS.items():
        for seed, order in by_seed.items():
            assert class_order(n[key], int(seed)) == order, (key, seed)


def test_class_order_leaves_global_numpy_state_alone():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    class_order(100, 1993)
    assert np.random.rand() == expected


@pytest.mark.parametrize("n,init,inc,sizes", [
    (100, 10, 10, [10] * 10),          # Split CIFAR-100
    (200, 20, 20, [20] * 10),          # ImageNet-R, CUB-200
    (196, 20, 20, [20] * 9 + [16]),    # Cars-196: 9 x 20 + 16
    (10, 2, 2, [2] * 5),               # split_digits
])
def test_task_sizes(n, init, inc, sizes):
    assert task_sizes(n, init, inc) == sizes
    assert sum(task_sizes(n, init, inc)) == n


def test_labels_are_positions_in_the_class_order():
    from clcli.data.scenario import build_class_incremental

    src = SyntheticSource(num_classes=6, train_per_class=3, test_per_class=2, image_size=8)
    sc = build_class_incremental(src, name="s", initial_increment=2, increment=2, class_order_seed=1993,
                                 shuffle_classes=True, train_transform=None, test_transform=None)
    order = class_order(6, 1993)
    for task in sc:
        assert task.class_ids == order[task.labels.start:task.labels.stop]
        # every image of original class order[i] carries label i
        for split in (task.train, task.test):
            for orig, lab in zip(split.split.labels, split.labels):
                assert order[lab] == orig
    assert [t.labels for t in sc] == [range(0, 2), range(2, 4), range(4, 6)]


def test_stratified_split_is_fixed_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 30, 7])
    tr, te = stratified_split(labels, 0.3, seed=0)
    tr2, te2 = stratified_split(labels, 0.3, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert set(tr).isdisjoint(te) and len(tr) + len(te) == len(labels)
    for c, n in enumerate([10, 20, 30, 7]):
        assert (labels[te] == c).sum() == round(0.3 * n)


def test_digits_source_split():
    pytest.importorskip("sklearn")
    d = Digits()
    tr, te = d.load("train"), d.load("test")
    assert len(tr) + len(te) == 1797
    assert tr.items.shape[1:] == (8, 8) and tr.items.dtype == np.uint8
    # stratified: every class has ~30% of its images in test
    for c in range(10):
        n_c = (tr.labels == c).sum() + (te.labels == c).sum()
        assert (te.labels == c).sum() == round(0.3 * n_c)
    # fixed: a second object gives the same images; independent of the class-order seed
    assert np.array_equal(Digits().load("test").items, te.items)


def test_the_scenario_kind_decides_evaluation_metrics_and_headline():
    from clcli.data.scenario import CLASS_INCREMENTAL, DOMAIN_CLASS_INCREMENTAL, Scenario, Task
    from clcli.evaluation import AccuracyMatrix, scenario_kind
    from clcli.report import headline

    tasks = [Task(i, f"t{i}", range(2 * i, 2 * i + 2), [], [], [], [], []) for i in range(2)]
    cil, mtil = Scenario("c", CLASS_INCREMENTAL, tasks, []), Scenario("m", DOMAIN_CLASS_INCREMENTAL, tasks, [])
    assert [t.index for t in cil.eval_tasks(0)] == [0] and [t.index for t in mtil.eval_tasks(0)] == [0, 1]
    assert cil.candidates(0, tasks[0]) == range(0, 2) and cil.candidates(1, tasks[0]) == range(0, 4)
    assert mtil.candidates(1, tasks[0]) == range(0, 2) and mtil.candidates(0, tasks[1]) == range(2, 4)
    matrix = AccuracyMatrix(2)
    for after, task, correct in ((0, 0, 9), (0, 1, 5), (1, 0, 8), (1, 1, 7)):
        matrix.record(after, task, correct, 10)
    assert cil.metrics(matrix, 2)["metrics"]["last_acc"] == 75.0
    assert mtil.metrics(matrix, 2)["metrics"]["transfer"] == 50.0  # task 1 before it was trained
    stopped = mtil.metrics(matrix, 1)  # a run that finished one task: null headline, partial metrics
    assert stopped["metrics"] == {"transfer": None, "avg": None, "last": None} and stopped["finished_tasks"] == 1
    # results.json keeps the kind's name; old files are read by it, an unknown kind as class-incremental
    assert mtil.manifest()["kind"] == "domain_class_incremental"
    assert scenario_kind("domain_class_incremental") is DOMAIN_CLASS_INCREMENTAL
    assert scenario_kind("future_kind") is CLASS_INCREMENTAL
    res = {"metrics": {"transfer": 1.0, "avg": 2.0, "last": 3.0}, "scenario": {"kind": "domain_class_incremental"}}
    assert headline(res) == {"transfer": 1.0, "avg": 2.0, "last": 3.0}
