"""Metric functions on hand-written matrices (docs/metrics.md#last-acc, docs/metrics.md#mtil-transfer)."""
import numpy as np
import pytest

from clcli.evaluation import AccuracyMatrix, cil_metrics, forgetting, inc_acc, mtil_metrics


def test_cil_metrics_from_counts():
    m = AccuracyMatrix(3)
    m.record(0, 0, 90, 100)
    m.record(1, 0, 80, 100); m.record(1, 1, 50, 50)
    m.record(2, 0, 60, 100); m.record(2, 1, 40, 50); m.record(2, 2, 45, 50)
    out = cil_metrics(m)
    # seen-class accuracy pools the seen tasks' test images
    assert out["seen_acc"] == pytest.approx([90.0, 130 / 150 * 100, 145 / 200 * 100])
    assert out["last_acc"] == pytest.approx(72.5)
    assert out["inc_acc"] == pytest.approx(np.mean([90.0, 86.67, 72.5]))  # rounded to 2 decimals first
    # forgetting: task0 best 90 (rows 0..1) -> 60 = 30; task1 best 100 -> 80 = 20; mean 25
    assert out["forgetting"] == pytest.approx(25.0)
    acc = m.percent()
    assert np.isnan(acc[0, 1]) and acc[1, 1] == 100.0


def test_inc_acc_rounds_each_value_first():
    assert inc_acc(np.array([33.333, 66.666])) == pytest.approx((33.33 + 66.67) / 2)


def test_forgetting_single_task_is_zero():
    assert forgetting(np.array([[50.0]])) == 0.0


ZS = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]


def test_mtil_golden_zero_shot_rows():
    out = mtil_metrics(np.array([ZS] * 11))
    assert (out["transfer"], out["avg"], out["last"]) == (69.4, 65.3, 65.3)
    assert out["per_dataset"]["transfer"][0] is None


def test_mtil_hand_matrix():
    a = np.array([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0], [70.0, 80.0, 90.0]])
    out = mtil_metrics(a)
    assert out["per_dataset"]["transfer"] == [None, 20.0, 45.0]  # strictly upper triangle
    assert out["per_dataset"]["avg"] == [40.0, 50.0, 60.0]
    assert out["per_dataset"]["last"] == [70.0, 80.0, 90.0]
    assert (out["transfer"], out["avg"], out["last"]) == (32.5, 50.0, 80.0)


def test_forgetting_uses_the_best_earlier_stage_not_the_stage_it_was_learned():
    # task 0 learned at 50, improves to 80 after task 1 (backward transfer), ends at 40:
    # forgetting = best before the final step (80) - final (40) = 40, not 50 - 40 = 10
    acc = np.array([[50.0, np.nan, np.nan], [80.0, 70.0, np.nan], [40.0, 60.0, 90.0]])
    # task 1: best before the last step 70 -> 60 = 10; mean (40 + 10) / 2
    assert forgetting(acc) == pytest.approx(25.0)
