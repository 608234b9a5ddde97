"""GaussianStats against torch.cov / MultivariateNormal (SLCA §5.2, §10; DIKI §4)."""
import math

import pytest
import torch

from clcli.stats import GaussianStats


def _data(n=300, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g)
    x = torch.randn(n, d, generator=g) @ A.T + torch.arange(d, dtype=torch.float32)
    return x


def test_streaming_stats_equal_torch_cov_plus_ridge():
    x = _data()
    keys = torch.tensor([0, 1, 2]).repeat(100)
    s = GaussianStats(6, ridge=1e-4, cov_dtype=torch.float64)
    for chunk in range(0, 300, 64):  # several batches, mixed keys
        s.update(x[chunk:chunk + 64], keys[chunk:chunk + 64])
    s.finalize()
    for k in range(3):
        xk = x[keys == k].double()
        ref = torch.cov(xk.T) + 1e-4 * torch.eye(6, dtype=torch.float64)
        assert torch.allclose(s.mean[k], xk.mean(0), atol=1e-10)
        assert torch.allclose(s.cov[k], ref, atol=1e-9)
        assert torch.equal(s.cov[k], s.cov[k].T)


def test_default_cov_is_float32_and_pd_with_fewer_samples_than_dims():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 32, generator=g)  # N < D: singular sample covariance
    s = GaussianStats(32, ridge=1e-4)
    s.update(x, torch.zeros(10, dtype=torch.long))
    s.finalize()
    assert s.cov[0].dtype == torch.float32
    torch.linalg.cholesky(s.cov[0].double())  # positive definite thanks to the ridge


def test_old_keys_never_recomputed():
    x = _data()
    s = GaussianStats(6, ridge=1e-4)
    s.update(x[:100], torch.zeros(100, dtype=torch.long))
    s.finalize()
    mean0, cov0 = s.mean[0].clone(), s.cov[0].clone()
    # a later task brings more samples of key 0 (and a new key 1): key 0 keeps its statistics
    s.update(x[100:], torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(150, dtype=torch.long)]))
    s.finalize()
    assert torch.equal(s.mean[0], mean0) and torch.equal(s.cov[0], cov0)
    assert s.keys == [0, 1]
    assert torch.allclose(s.mean[1], x[150:].double().mean(0))


def test_samples_match_target_moments_and_mean_scale():
    x = _data(n=400)
    s = GaussianStats(6, ridge=1e-4)
    s.update(x, torch.zeros(400, dtype=torch.long))
    s.update(x[:200] * 2, torch.ones(200, dtype=torch.long))
    s.finalize()
    g = torch.Generator().manual_seed(0)
    feats, labels = s.sample([0, 1], 20000, mean_scale=torch.tensor([1.0, 0.5]), generator=g)
    assert feats.shape == (40000, 6) and labels.tolist()[:1] == [0] and labels.tolist()[-1] == 1
    for k, scale in ((0, 1.0), (1, 0.5)):
        fk = feats[labels == k].double()
        target_mean = s.mean[k] * scale
        sd = s.cov[k].double().diagonal().sqrt()
        assert ((fk.mean(0) - target_mean).abs() < 4 * sd / math.sqrt(20000)).all()
        rel = (torch.cov(fk.T) - s.cov[k].double()).abs().max() / s.cov[k].double().abs().max()
        assert rel < 0.05
    # same distribution as the reference's MultivariateNormal: compare moments of both samplers
    mvn = torch.distributions.MultivariateNormal(s.mean[0].float(), s.cov[0])
    ref = mvn.sample((20000,)).double()
    assert (ref.mean(0) - feats[labels == 0].double().mean(0)).abs().max() < 0.2
    assert (torch.cov(ref.T) - torch.cov(feats[labels == 0].double().T)).abs().max() / s.cov[0].abs().max() < 0.06


def test_log_prob_matches_multivariate_normal():
    x = _data(n=200)
    s = GaussianStats(6, ridge=1e-7)
    s.update(x, torch.tensor([0, 1]).repeat(100))
    s.finalize()
    q = _data(n=17, seed=3)
    lp = s.log_prob(q, [0, 1])
    for j, k in enumerate([0, 1]):
        ref = torch.distributions.MultivariateNormal(s.mean[k], s.cov[k].double()).log_prob(q.double())
        assert torch.allclose(lp[:, j], ref, rtol=1e-6, atol=1e-6)


def test_near_singular_covariance_gets_jitter_not_a_crash():
    s = GaussianStats(8, ridge=0.0)
    x = torch.zeros(5, 8)
    x[:, 0] = torch.arange(5.0)  # rank-1 covariance, ridge 0: Cholesky fails without jitter
    s.update(x, torch.zeros(5, dtype=torch.long))
    s.finalize()
    assert 0 in s.jitter and s.jitter[0] > 0
    feats, _ = s.sample([0], 10)
    assert torch.isfinite(feats).all()


def test_state_dict_roundtrip():
    x = _data()
    s = GaussianStats(6, ridge=1e-4)
    s.update(x, torch.tensor([0, 1, 2]).repeat(100))
    s.finalize()
    t = GaussianStats(6, ridge=0.5)
    t.load_state_dict(s.state_dict())
    assert t.ridge == 1e-4 and t.keys == [0, 1, 2]
    assert torch.equal(t.cholesky([0, 1, 2]), s.cholesky([0, 1, 2]))


# ---------------------------------------------------------------- float32 storage and sampling


def _fitted(d=48, keys=(0, 1), n=400, ridge=1e-4, cov_dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    s = GaussianStats(d, ridge=ridge, cov_dtype=cov_dtype)
    for k in keys:
        A = torch.randn(d, d, generator=g) / d**0.5
        s.update(torch.randn(n, d, generator=g) @ A.T + k, torch.full((n,), k))
    s.finalize()
    return s


def test_covariances_and_factors_are_float32_and_factor_is_the_reference_one():
    """One float32 factor per class: the float64 Cholesky of the stored float32 covariance, rounded
    (what clcli sampled with before); within float32 rounding of the factor ``MultivariateNormal``
    computes from the float32 covariance (|diff| <= 1e-5 x max|L|)."""
    s = _fitted()
    for k in s.keys:
        assert s.cov[k].dtype == torch.float32 and s._chol[k].dtype == torch.float32
        assert torch.equal(s._chol[k], torch.linalg.cholesky(s.cov[k].double()).float())
        ref = torch.distributions.MultivariateNormal(s.mean[k].float(), s.cov[k]).scale_tril
        assert (s._chol[k] - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert s.mean[0].dtype == torch.float64  # means stay float64 (float32 mean -> float64, as the reference)


def _reference_noise(seed_generator: torch.Generator, keys: int, n: int, d: int) -> torch.Tensor:
    """The documented noise of one CPU ``sample`` call, rebuilt by hand: one draw of the seed from the
    generator, then key i's noise is ``randn(n, d)`` from a fresh CPU generator seeded seed + i."""
    seed = int(torch.randint(0, 2**32, (1,), generator=seed_generator).item())
    return torch.stack([torch.randn(n, d, generator=torch.Generator().manual_seed(seed + i)) for i in range(keys)])


def test_same_noise_gives_the_reference_samples_within_float32_rounding():
    """With the noise rebuilt independently (``_reference_noise``), the samples are the reference's
    ``MultivariateNormal.rsample`` formula loc + scale_tril·ε (the reference's own float32 factor) up to
    float32 rounding: |diff| <= 1e-5 x max|x|; and the float64 product with clcli's factor to 1e-6."""
    s = _fitted()
    n = 33  # n·D not a multiple of 16: noise is per key, not one stream cut into runs
    scale = torch.tensor([0.95, 1.0], dtype=torch.float64)
    ours, labels = s.sample([0, 1], n, mean_scale=scale, generator=torch.Generator().manual_seed(5))
    eps = _reference_noise(torch.Generator().manual_seed(5), 2, n, 48)
    assert ours.dtype == torch.float32 and labels.tolist() == [0] * n + [1] * n
    for i, k in enumerate((0, 1)):
        mvn = torch.distributions.MultivariateNormal((s.mean[k] * scale[k]).float(), s.cov[k])
        ref = mvn.loc + eps[i] @ mvn.scale_tril.T
        assert (ours[i * n:(i + 1) * n] - ref).abs().max() <= 1e-5 * ref.abs().max()
        dense = s.mean[k] * scale[k] + eps[i].double() @ s._chol[k].double().T
        assert (ours[i * n:(i + 1) * n].double() - dense).abs().max() <= 1e-6 * dense.abs().max()


def test_draws_do_not_depend_on_threads_or_runs_and_take_one_global_draw(monkeypatch):
    """The same seed gives bit-identical noise with 1, 2 or 3 threads and with runs of 1 key or of
    every key; and a call takes exactly one draw from the global RNG (so an epoch loop and its resume
    stay in step with the rest of the run's random stream)."""
    import clcli.stats as stats_mod

    s = _fitted(d=16, keys=(0, 1, 2, 3, 4))
    keys = [3, 0, 1, 2, 4]  # runs of consecutive rows broken by the order
    threads = torch.get_num_threads()
    results = []
    try:
        for t, chunk in ((1, 64), (2, 64), (3, 2), (2, 1)):
            torch.set_num_threads(t)
            monkeypatch.setattr(stats_mod, "SAMPLE_CHUNK", chunk)
            results.append(s.sample(keys, 7, generator=torch.Generator().manual_seed(11))[0])
    finally:
        torch.set_num_threads(threads)
    eps = _reference_noise(torch.Generator().manual_seed(11), 5, 7, 16)
    for i, k in enumerate(keys):  # each row against its own dense product: no batching order involved
        dense = s.mean[k] + eps[i].double() @ s._chol[k].double().T
        for x in results:
            assert (x[i * 7:(i + 1) * 7].double() - dense).abs().max() <= 1e-6 * dense.abs().max()
    for x in results[1:]:
        assert torch.allclose(x, results[0], rtol=0, atol=1e-6 * results[0].abs().max())
    torch.manual_seed(3)
    s.sample(keys, 7)
    after = torch.rand(4)
    torch.manual_seed(3)
    torch.randint(0, 2**32, (1,))
    assert torch.equal(torch.rand(4), after)


def test_noise_streams_are_standard_normal_and_uncorrelated():
    """``fill_normal`` streams: each row mean 0 and variance 1, and neighbouring streams (seeds s and
    s + 1) uncorrelated, all within 5 standard errors (N = 40000 per row); bit-identical for 1 and 2
    threads."""
    from clcli.noise import fill_normal

    N = 40000
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        buf = fill_normal(torch.empty(6, N), seed=2**32 - 3, first=0)  # seeds wrap around 2^32
        torch.set_num_threads(1)
        assert torch.equal(fill_normal(torch.empty(6, N), seed=2**32 - 3, first=0), buf)
    finally:
        torch.set_num_threads(threads)
    x = buf.double()
    se = 1 / math.sqrt(N)
    assert (x.mean(1).abs() < 5 * se).all()
    assert ((x.var(1) - 1).abs() < 5 * math.sqrt(2) * se).all()
    corr = torch.corrcoef(x)
    assert (corr - torch.eye(6, dtype=torch.float64)).abs().max() < 5 * se
    assert torch.equal(buf[3], torch.randn(N, generator=torch.Generator().manual_seed(0)))  # row 3: seed 2^32 -> 0


def test_log_prob_with_float32_factors_matches_float64_multivariate_normal():
    """Float32 factors (SLCA-like storage) against float64 MultivariateNormal of the same float32
    covariance: relative error of the log-density below 1e-4."""
    s = _fitted(ridge=1e-3)
    q = torch.randn(20, 48, generator=torch.Generator().manual_seed(4)) + 0.5
    lp = s.log_prob(q, [0, 1])
    for j in (0, 1):
        ref = torch.distributions.MultivariateNormal(s.mean[j], s.cov[j].double()).log_prob(q.double())
        assert torch.allclose(lp[:, j], ref, rtol=1e-4, atol=0)


def test_partial_states_merge_back_to_the_full_state():
    """Partial states (subsets of keys) plus a stub give back the full statistics; whole blocks are
    written as the stored tensors themselves, never as stacked copies."""
    from clcli.stats import is_state, merge_states, stub_state

    s = _fitted(d=8, keys=(0, 1, 2))  # one block (finalized together)
    s.update(torch.randn(30, 8), torch.full((30,), 3))
    s.finalize()  # a second block
    s.jitter[1] = 1e-6
    full = s.state_dict()
    assert is_state(full) and full["keys"] == [0, 1, 2, 3] and [b["keys"] for b in full["blocks"]] == [[0, 1, 2], [3]]
    assert full["blocks"][0]["cov"].data_ptr() == s.cov[0].data_ptr()  # the block itself, no copy
    parts = [s.state_dict(keys=[3, 2]), s.state_dict(keys=[0, 1])]
    assert parts[0]["keys"] == [2, 3] and parts[0]["blocks"][0]["cov"].shape == (1, 8, 8)  # a cut block: its rows
    assert parts[1]["jitter"] == {1: 1e-6} and parts[0]["jitter"] == {}
    stub = stub_state(full)
    assert "blocks" not in stub and stub["keys"] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="stored apart"):
        GaussianStats(8, 1e-4).load_state_dict(stub)
    merged = merge_states(stub, iter(parts))
    assert merged["keys"] == [0, 1, 2, 3] and merged["jitter"] == {1: 1e-6}
    t = GaussianStats(8, 1.0)
    t.load_state_dict(merged)
    assert t.keys == [0, 1, 2, 3] and t.ridge == 1e-4
    for k in range(4):
        assert torch.equal(t.mean[k], s.mean[k]) and torch.equal(t.cov[k], s.cov[k])
    assert torch.equal(t.cholesky([0, 1, 2, 3]), s.cholesky([0, 1, 2, 3]))
    with pytest.raises(KeyError):
        merge_states(stub, iter(parts[:1]))  # keys 0 and 1 are in no part


def test_previous_stacked_state_format_still_loads():
    s = _fitted(d=8, keys=(0, 1))
    old = {"dim": 8, "ridge": 1e-4, "keys": [0, 1], "mean": torch.stack([s.mean[0], s.mean[1]]),
           "cov": torch.stack([s.cov[0], s.cov[1]]), "jitter": {}}
    t = GaussianStats(8, 1.0)
    t.load_state_dict(old)
    assert torch.equal(t.cholesky([0, 1]), s.cholesky([0, 1])) and t.ridge == 1e-4


def test_sample_refills_the_given_buffer_with_fresh_draws():
    s = _fitted(d=16)
    x, _ = s.sample([0, 1], 8)
    first = x.clone()
    y, _ = s.sample([0, 1], 8, out=x)
    assert y.data_ptr() == x.data_ptr() and not torch.equal(y, first)
    z, _ = s.sample([1], 8, out=x)  # another shape: a new tensor, the buffer untouched
    assert z.data_ptr() != x.data_ptr() and z.shape == (8, 16)


def test_lower_matmul_equals_the_dense_product_for_any_width():
    """The column-blocked product over the lower triangle equals e @ L.mT (float64: exactly the same
    non-zero terms), also when D is not a multiple of the block count; ``out`` is wholly written."""
    from clcli.stats import lower_matmul

    g = torch.Generator().manual_seed(0)
    for d in (1, 5, 50):
        L = torch.randn(3, d, d, generator=g, dtype=torch.float64).tril()
        e = torch.randn(3, 7, d, generator=g, dtype=torch.float64)
        dense = e @ L.mT
        out = torch.full((3, 7, d), float("nan"), dtype=torch.float64)
        torch.testing.assert_close(lower_matmul(e, L, out=out), dense, rtol=1e-12, atol=1e-12)


def test_importing_clcli_sets_the_openmp_spin_before_torch_and_keeps_a_user_value():
    """``import clcli`` sets GOMP_SPINCOUNT (read by libgomp when torch loads, so clcli/__init__ must not
    import torch first) unless the user set it."""
    import os
    import subprocess
    import sys

    code = "import sys, os, clcli; print('torch' in sys.modules, os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "30000"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "7"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["False", "7"]
