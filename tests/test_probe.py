"""The representation probe (docs/slca_protocol.md#representation-probe): a logistic regression on the
frozen features of all seen classes after every task, checked against scikit-learn on the same
features; its results in results.json and `clcli table`."""
import numpy as np
import pytest
import torch
from conftest import compose, run_tiny
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression

from clcli.aggregate.group import group_runs
from clcli.aggregate.tables import headline_table
from clcli.config import check_config
from clcli.data.scenario import build_class_incremental
from clcli.data.synthetic import SyntheticSource
from clcli.data.transforms import build_transforms
from clcli.engine import Runtime
from clcli.evaluation import AccuracyMatrix, cil_metrics
from clcli.methods.slca import SLCA
from clcli.models.timm_backbone import TimmBackbone
from clcli.probe import fit_logistic

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "weight_decay": 5e-4}
CA = dict(enabled=True, epochs=1, samples_per_class=8, lr=0.01, momentum=0.9, weight_decay=5e-4,
          logit_norm_tau=0.1, mean_scaling=True, buggy_task_id=True)


def _features(backbone, dataset):
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = np.array([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        return backbone(x).double().numpy(), y


def test_probe_equals_scikit_learn_on_the_same_features():
    """Tolerance: the probe's per-task test counts equal scikit-learn's exactly, and its test
    probabilities agree within 1e-3 (both solve the same convex problem)."""
    torch.manual_seed(0)
    bb = TimmBackbone("vit_tiny_patch16_224", reinit_final_norm=True,
                      model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    src = SyntheticSource(num_classes=6, train_per_class=12, test_per_class=10, image_size=16, noise=0.6)
    tr, te = build_transforms("upscale", bb)
    sc = build_class_incremental(src, name="s", initial_increment=2, increment=2, class_order_seed=1993,
                                 shuffle_classes=True, train_transform=tr, test_transform=te)
    optim = OmegaConf.create(dict(lr=dict(representation=1e-3, classifier=0.05), optimizer=SGD, epochs=1,
                                  batch_size=8, schedule="multistep", milestones=[1], gamma=0.1))
    m = SLCA(bb, optim, Runtime(chance_loss_ratio=0.0), ca=CA, stats=dict(ridge=1e-4, batch_size=8),
             probe=dict(enabled=True, C=0.5))
    sc = m.prepare_scenario(sc)
    t0, t1 = sc.tasks[:2]
    for t in (t0, t1):
        m.begin_task(t); m.train_task(t); m.end_task(t)
    m.backbone.eval()
    parts = [_features(m.backbone, t.train_plain) for t in (t0, t1)]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    mean, std = x.mean(0), x.std(0)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=20000).fit((x - mean) / std, y)
    row = m.probe.matrix
    for t in (t0, t1):
        xt, yt = _features(m.backbone, t.test)
        pred = ref.predict((xt - mean) / std)
        assert row.total[1, t.index] == len(yt) and row.correct[1, t.index] == int((pred == yt).sum())
    # the probabilities of the probe's own solver on the same standardized features
    W, b = fit_logistic(torch.from_numpy((x - mean) / std), torch.from_numpy(y), 4, C=0.5, max_iter=500)
    xt = np.concatenate([_features(m.backbone, t.test)[0] for t in (t0, t1)])
    ours = torch.softmax(torch.from_numpy((xt - mean) / std) @ W.T + b, 1).numpy()
    assert np.abs(ours - ref.predict_proba((xt - mean) / std)).max() < 1e-3
    assert row.total[0, 0] > 0 and row.total[0, 1] == -1  # after task 0 only task 0 was probed


def test_probe_results_in_results_json_and_table(tmp_path):
    res = run_tiny(tmp_path, ["data=synthetic", "backbone=tiny_vit", "device=cpu", "method=slca",
                              "+method.probe.enabled=true"])
    counts = AccuracyMatrix(3)
    counts.load_state_dict(res["probe_counts"])
    m = cil_metrics(counts)
    assert res["metrics"]["probe_last"] == pytest.approx(m["last_acc"]) and res["metrics"]["probe_inc"] == m["inc_acc"]
    assert res["probe_matrix"][0][1] is None and all(v is not None for v in res["probe_matrix"][2])
    assert res["metrics"]["probe_last"] > 100 / 6 + 25  # the probe on 6 classes is well above chance
    res["_path"] = "r"
    table = headline_table(group_runs([res]), "class_incremental")
    row = dict(zip(table.header, table.rows[0]))
    assert row["probe_last"].startswith(f"{res['metrics']['probe_last']:.2f}")


def test_probe_keys_are_checked():
    cfg = compose(["data=synthetic", "backbone=tiny_vit", "device=cpu", "+method.probe.enabled=true",
                   "+method.probe.C=-1", "+method.probe.max_iters=3"])
    problems = check_config(cfg)
    assert any(p.startswith("method.probe.C: must be > 0") for p in problems)
    assert any(p.startswith("method.probe.max_iters: unknown key") and "Did you mean method.probe.max_iter?" in p
               for p in problems)
    assert check_config(compose(["data=synthetic", "backbone=tiny_vit", "device=cpu", "+method.probe.enabled=true"])) == []
