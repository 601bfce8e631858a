"""Core metrics against slower sources of truth: scipy's sqrtm, closed forms, known score values."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from scm_mm.metrics import (
    FeatureStats,
    frechet_distance,
    inception_score,
    knn_radii,
    precision_recall,
)


def random_gaussian(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return rng.normal(size=d), a @ a.T / (rank or d)


def frechet_scipy(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    (mu1, s1), (mu2, s2) = random_gaussian(rng, d), random_gaussian(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_scipy(mu1, s1, mu2, s2), rel=1e-8, abs=1e-10)
    # tensors work too, in any dtype
    t = [torch.from_numpy(a).float() for a in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == pytest.approx(frechet_scipy(mu1, s1, mu2, s2), rel=1e-4)


def test_frechet_diagonal_closed_form():
    """For diagonal covariances: ||mu1 - mu2||^2 + sum_i (s1_i - s2_i)^2, with s the standard deviations."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    sd1, sd2 = rng.uniform(0.1, 2, size=7), rng.uniform(0.1, 2, size=7)
    expected = ((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_singular_covariances_against_low_rank_formula():
    """Rank-deficient covariances (fewer samples than dimensions, as FID on small sets). For S1 = A A^T,
    the nonzero eigenvalues of S1 S2 are those of the small, full-rank A^T S2 A: an exact reference."""
    rng = np.random.default_rng(1)
    d, r = 60, 8
    a, b = rng.normal(size=(d, r)), rng.normal(size=(d, r))
    s1, s2, mu = a @ a.T, b @ b.T, np.zeros(d)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a.T @ s2 @ a), 0, None)).sum()
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0, abs=1e-10)


def test_feature_stats_batches_and_merge_match_numpy():
    x = torch.randn(300, 6, dtype=torch.float64) * 3 + 1e4  # large mean: the centered update keeps precision
    a = FeatureStats()
    for b in x[:170].split(37):
        a.update(b)
    b = FeatureStats().update(x[170:])
    a.merge(b)
    assert a.num == 300
    np.testing.assert_allclose(a.mu.numpy(), x.numpy().mean(0), rtol=1e-14)
    np.testing.assert_allclose(a.sigma.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-9)


def test_feature_stats_round_trip(tmp_path):
    s = FeatureStats().update(torch.randn(20, 4))
    for loaded in (FeatureStats.from_dict(s.to_dict()),
                   FeatureStats.from_dict({k: v.numpy() for k, v in s.to_dict().items()})):
        assert loaded.num == 20
        assert torch.equal(loaded.mu, s.mu) and torch.allclose(loaded.sigma, s.sigma, rtol=1e-15)
    s.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(tmp_path / "ref.npz")
    assert loaded.num == 20 and torch.equal(loaded.mu, s.mu)
    assert loaded.frechet_distance(s) == pytest.approx(0, abs=1e-10)
    # merging after a reload equals accumulating everything at once
    y = torch.randn(9, 4)
    loaded.update(y)
    np.testing.assert_allclose(loaded.sigma.numpy(), FeatureStats().merge(s).update(y).sigma.numpy(), rtol=1e-12)
    # pytorch-fid .npz files hold only mu and sigma: fine for FID, not for merging
    fid_only = FeatureStats.from_dict({"mu": s.mu.numpy(), "sigma": s.sigma.numpy()})
    assert fid_only.frechet_distance(s) == pytest.approx(0, abs=1e-10)
    with pytest.raises(ValueError):
        fid_only.update(y)


def test_inception_score_known_values():
    k, splits = 7, 5
    assert inception_score(torch.zeros(100, k), splits=splits) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = torch.eye(k).repeat(splits * 3, 1)  # each split holds every class 3 times
    mean, std = inception_score(probs=one_hot, splits=splits)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    mean, _ = inception_score(one_hot * 1e4, splits=splits)  # near one-hot logits
    assert mean == pytest.approx(k, rel=1e-9)
    # a single class everywhere: no diversity
    assert inception_score(probs=torch.eye(k)[[2] * 50], splits=5)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        inception_score(torch.zeros(4, 3), splits=10)


def test_inception_score_matches_direct_formula():
    p = torch.softmax(torch.randn(40, 5, dtype=torch.float64) * 2, 1)
    py = p.mean(0)
    expected = float(torch.exp((p * (p.log() - py.log())).sum(1).mean()))
    assert inception_score(probs=p, splits=1)[0] == pytest.approx(expected, rel=1e-12)
    assert inception_score(p.log(), splits=1)[0] == pytest.approx(expected, rel=1e-12)


def test_knn_radii_match_brute_force():
    x = torch.randn(50, 3)
    d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    expected = d.sort(1).values[:, 3]  # column 0 is the sample itself
    torch.testing.assert_close(knn_radii(x, k=3, batch_size=7), expected, rtol=1e-5, atol=1e-5)


def test_precision_recall_identical_and_disjoint():
    x = torch.randn(200, 8)
    assert precision_recall(x, x.clone(), batch_size=64) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, batch_size=64) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    """Real data has 10 well separated modes; fakes from 5 of them: precise, but half the recall."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 2, generator=gen) * 50
    real = centers.repeat_interleave(200, 0) + torch.randn(2000, 2, generator=gen)
    fake = centers[:5].repeat_interleave(400, 0) + torch.randn(2000, 2, generator=gen)
    precision, recall = precision_recall(real, fake, k=3, batch_size=256)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.03)
    # cached real radii give the same answer
    assert precision_recall(real, fake, real_radii=knn_radii(real)) == (precision, recall)


def test_feature_scores_of_a_few_samples():
    """Fewer samples than IS splits or than precision/recall's neighbour rank k: the splits shrink to one
    sample each and precision and recall are nan, instead of an evaluation of 3 samples failing."""
    from scm_mm.metrics.classifier import feature_scores

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, generator=g)
    scores = feature_scores(torch.randn(3, 8, generator=g), logits, torch.randn(20, 8, generator=g), k=3)
    assert (scores["is_mean"], scores["is_std"]) == pytest.approx(inception_score(logits, splits=3))
    assert math.isnan(scores["precision"]) and math.isnan(scores["recall"]) and math.isfinite(scores["frechet"])
