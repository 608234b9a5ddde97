"""``+debug=fast`` and ``limit_batches``: every shipped method runs end to end in seconds, and the
limits cut exactly the batches they name."""
from __future__ import annotations

import pytest
import torch
from conftest import CONF, run_tiny

from clcli.engine import Runtime, evaluate, fit
from clcli.evaluation import AccuracyMatrix

TINY_CIL = ["data=synthetic", "backbone=tiny_vit", "device=cpu"]
TINY_MTIL = ["data=synthetic_mtil", "backbone=tiny_clip", "device=cpu"]
# Each shipped method on the tiny benchmark of its kind. A new conf/method file must be added here
# (test_every_shipped_method_is_covered), so that +debug=fast is checked for it too.
METHODS = {m: [*TINY_CIL, f"method={m}"] for m in ("slca", "slow_learner", "seq_ft", "frozen", "joint")}
METHODS |= {m: [*TINY_MTIL, f"method={m}"] for m in ("diki", "zeroshot", "clip_ft")}
METHODS["moe_adapters"] = ["experiment=diki/moe_adapters_tiny"]  # stand-in selector weights (docs/moe_adapters.md)
METHODS["zscl"] = ["experiment=diki/tiny_zscl"]  # stand-in reference images and texts (docs/diki_mtil_protocol.md)
METHODS["slcapp"] = [*TINY_CIL, "method=slcapp"]
METHODS |= {m: [*TINY_CIL, f"method={m}", "backbone.model_kwargs.depth=6"] for m in ("l2p", "dualprompt", "coda_prompt")}
METHODS["coda_prompt"].append("method.prompt.pool_size=6")  # pool_size / tasks components per task: 3 tiny tasks


def test_every_shipped_method_is_covered():
    assert sorted(p.stem for p in (CONF / "method").glob("*.yaml")) == sorted(METHODS)


def test_fit_stops_after_the_limit_every_epoch():
    data = torch.utils.data.TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # 5 batches
    model = torch.nn.Linear(3, 2)
    seen = []

    def step(x, y):
        seen.append(len(y))
        return torch.nn.functional.cross_entropy(model(x), y)

    rt = Runtime(limit_train_batches=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = fit(step, loader, epochs=3, optimizer=opt, scheduler=None, rt=rt, where="toy", num_classes=2)
    assert seen == [4, 4] * 3 and len(history) == 3
    rt.limit_train_batches = None
    seen.clear()
    fit(step, loader, epochs=1, optimizer=opt, scheduler=None, rt=rt, where="toy", num_classes=2)
    assert seen == [4] * 5


def test_evaluate_scores_only_the_first_batches(synthetic_mtil):
    class Constant:  # predicts the first candidate everywhere
        def predict(self, batch):
            return torch.zeros(len(batch.images), len(batch.candidates))

    rt = Runtime(eval_batch_size=3, limit_eval_batches=2)
    matrix = AccuracyMatrix(len(synthetic_mtil))
    evaluate(Constant(), synthetic_mtil, 0, matrix, rt)
    counts = matrix.state_dict()
    for task in synthetic_mtil.tasks:  # 2 batches of 3 images per test set, scored against their labels
        labels = torch.stack([task.test[i][1] if torch.is_tensor(task.test[i][1]) else torch.tensor(task.test[i][1])
                              for i in range(6)])
        expected_correct = int((labels == task.labels.start).sum())
        assert (counts["correct"][0][task.index], counts["total"][0][task.index]) == (expected_correct, 6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_debug_fast_runs_every_method(tmp_path, method):
    results = run_tiny(tmp_path, [*METHODS[method], "+debug=fast", "eval.batch_size=4"], method)
    assert results["status"] == "complete"
    assert results["config"]["optim"]["epochs"] == 1
    totals = results["counts"]["total"]
    evaluated = [v for row in totals for v in row if v >= 0]  # -1: not evaluated (a future task)
    assert evaluated and all(v == 8 for v in evaluated)  # 2 eval batches of 4 images per test set
