"""Frechet distance against closed forms, statistics files, feature extractors and
their labels, the reference-statistics cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from layermerge.diffusion import DiffusionTask
from layermerge.fid import (
    FeatureStats,
    FeaturesUnavailableError,
    classifier_features,
    fid_between,
    fid_of_images,
    frechet_distance,
    gaussian_fit,
    inception_features,
    reference_stats,
    trace_sqrt_product,
)

from .helpers import tiny_resnet, write_mnist_like


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


def test_identical_sets_are_at_distance_zero():
    f = np.random.default_rng(0).normal(size=(300, 24)) @ np.random.default_rng(1).normal(
        size=(24, 24)
    )
    mu, sigma = gaussian_fit(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8 * np.trace(sigma))
    # the fit is the usual unbiased one
    assert np.allclose(mu, f.mean(0)) and np.allclose(sigma, np.cov(f, rowvar=False))


def test_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    want = 1.0 + 4.0 + sum((math.sqrt(a) - math.sqrt(b)) ** 2 for a, b in zip(s1, s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-12)


def test_scaled_rotated_covariance_closed_form():
    # S2 = c S1 (same eigenvectors, any rotation): FD = (1 - sqrt c)^2 tr S1
    q = _rotation(16, 3)
    s1 = q @ np.diag(np.linspace(0.1, 5.0, 16)) @ q.T
    c = 2.5
    got = frechet_distance(np.zeros(16), s1, np.zeros(16), c * s1)
    assert got == pytest.approx((1 - math.sqrt(c)) ** 2 * np.trace(s1), rel=1e-10)


def test_non_commuting_2x2_closed_form():
    # for 2x2 PSD matrices: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    want_tr = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    assert trace_sqrt_product(s1, s2) == pytest.approx(want_tr, rel=1e-12)
    mu1, mu2 = np.array([1.0, 2.0]), np.array([-1.0, 0.5])
    want = 4.0 + 2.25 + np.trace(s1) + np.trace(s2) - 2 * want_tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-12)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, rel=1e-12)


def test_singular_covariances_stay_real_and_exact():
    # fewer samples than dimensions: rank-deficient covariances
    rng = np.random.default_rng(5)
    a = rng.normal(size=(10, 40))
    mu, sigma = gaussian_fit(a)
    assert np.linalg.matrix_rank(sigma) == 9
    d0 = frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= d0 < 1e-9 * np.trace(sigma)
    # a pure shift of the same point cloud: FD = |shift|^2
    shift = rng.normal(size=40)
    mu2, sigma2 = gaussian_fit(a + shift)
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(shift @ shift, rel=1e-9)
    b = rng.normal(size=(12, 40)) * 2.0
    mub, sb = gaussian_fit(b)
    d = frechet_distance(mu, sigma, mub, sb)
    assert math.isfinite(d) and d > 0
    assert d == pytest.approx(frechet_distance(mub, sb, mu, sigma), rel=1e-9)
    with pytest.raises(ValueError):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_stats_files_round_trip_without_pickle(tmp_path):
    f = np.random.default_rng(0).normal(size=(50, 6))
    stats = FeatureStats.of(f, "FID (test features)", {"features": {"kind": "test"}})
    path = stats.save(tmp_path / "ref.npz")
    side = json.loads((tmp_path / "ref.npz.json").read_text())
    assert side["label"] == "FID (test features)" and side["n"] == 50
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"mu", "sigma", "n"}
    back = FeatureStats.load(path)
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert fid_between(back, stats).fid == pytest.approx(0.0, abs=1e-9)
    other = FeatureStats.of(f, "FID (other features)", {"features": {"kind": "other"}})
    with pytest.raises(ValueError, match="different feature spaces"):
        fid_between(stats, other)


@pytest.fixture(scope="module")
def classifier():
    return tiny_resnet().eval()


def test_classifier_features_are_the_penultimate_layer(classifier):
    ext = classifier_features(
        classifier, mean=(0.25,), std=(0.5,), name="layermerge:resnet8", data="mnist"
    )
    assert ext.label == (
        "FID (classifier features: layermerge:resnet8 trained on mnist), not comparable to "
        "Inception FID"
    )
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    got = ext(images)
    m = classifier
    with torch.no_grad():
        inputs = ((images + 1) / 2 - 0.25) / 0.5
        x = m.relu(m.bn1(m.conv1(inputs)))
        want = m.pool(m.layer3(m.layer2(m.layer1(x)))).flatten(1)
    assert got.shape == (5, 16) and got.dtype == np.float64
    assert np.allclose(got, want.numpy(), atol=1e-6)
    # penultimate features, not logits: the head still works as before
    assert classifier(inputs).shape == (5, 10)


def test_reference_stats_cache(tmp_path, classifier):
    root = write_mnist_like(tmp_path / "data", n_train=40, n_test=30)
    splits = DiffusionTask().make_data(f"mnist:{root}", (1, 8, 8), holdout_per_class=2)
    ext = classifier_features(classifier, mean=(0.1,), std=(0.3,), name="c", data="mnist")
    cache = tmp_path / "ref.npz"
    ref = reference_stats(ext, splits.test, cache=cache, batch_size=7)
    assert ref.n == 30 and ref.label == ext.label
    stamp = cache.stat().st_mtime_ns
    again = reference_stats(ext, splits.test, cache=cache)
    assert cache.stat().st_mtime_ns == stamp and np.array_equal(again.sigma, ref.sigma)
    # other features (other normalisation) or other images: recomputed, not reused
    ext2 = classifier_features(classifier, mean=(0.2,), std=(0.3,), name="c", data="mnist")
    other = reference_stats(ext2, splits.test, cache=cache)
    assert cache.stat().st_mtime_ns != stamp and not np.allclose(other.mu, ref.mu)
    part = reference_stats(ext2, splits.test, cache=cache, limit=12)
    assert part.n == 12
    # FID of the reference images themselves against their statistics
    real = next(splits.test.batches(30))[0]
    res = fid_of_images(real, ext, ref, batch_size=8)
    assert res.fid == pytest.approx(0.0, abs=1e-6) and (res.n, res.n_ref) == (30, 30)
    assert str(res).startswith(ext.label)


def test_inception_refuses_clearly_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(FeaturesUnavailableError) as e:
        inception_features()
    msg = str(e.value)
    assert "torch-fidelity" in msg and "pytorch-fid" in msg and "Nothing is downloaded" in msg
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "classifier" in msg
    assert str(tmp_path) in msg


# ---------------------------------------------------------------------------
# KID, reference features, quality with bootstrap spreads


def test_kid_of_identical_sets_is_zero_and_matches_a_direct_computation():
    from layermerge.fid import kid, polynomial_kernel

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    k = polynomial_kernel(x, x)
    m = len(x)
    off, diag = (k.sum() - np.trace(k)) / (m * (m - 1)), np.trace(k) / m
    # the kernel is (x.y / d + 1)^3
    assert k[0, 1] == pytest.approx((x[0] @ x[1] / 8 + 1) ** 3)
    # a set against itself: 2 (off-diagonal mean) - 2 (full mean) = (2 / m)(off - diag):
    # slightly negative, O(1/m), far below what a small shift gives
    got = kid(x, x, subset_size=None)
    assert got == pytest.approx(2 * (off - diag) / m, rel=1e-9)
    assert -0.1 < got < 0 and abs(got) < 0.2 * kid(x + 0.3, x, subset_size=None)
    assert kid(x, x, subsets=5, subset_size=100) < 0


def test_kid_is_unbiased_for_one_distribution_and_grows_with_a_mean_shift():
    from layermerge.fid import kid

    rng = np.random.default_rng(1)
    d = 16
    vals = []
    for _ in range(200):
        pool = rng.normal(size=(40, d))
        vals.append(kid(pool[:20], pool[20:], subsets=1, subset_size=20, seed=0))
    vals = np.array(vals)
    se = vals.std(ddof=1) / math.sqrt(len(vals))
    # unbiased: the mean over random splits of one Gaussian is 0 within 3 SE; single
    # estimates go negative (a biased MMD^2 would stay > 0)
    assert abs(vals.mean()) < 3 * se and (vals < 0).mean() > 0.2
    # grows monotonically with a mean shift (MMD^2 = O(shift^2) for small shifts)
    y = rng.normal(size=(300, d))
    x = rng.normal(size=(300, d))
    shifts = [0.0, 0.3, 0.6, 1.2]
    ks = [kid(x + s, y, subsets=20, subset_size=100, seed=2) for s in shifts]
    assert all(a < b for a, b in zip(ks, ks[1:]))
    assert ks[0] < 0.01 < ks[2]
    # subset averages and the full estimate agree on a clear shift
    full = kid(x + 1.2, y, subset_size=None)
    assert ks[3] == pytest.approx(full, rel=0.1)
    with pytest.raises(ValueError):
        kid(x[:, :3], y)


def _reference(rng, n=2000, d=6):
    from layermerge.fid import ReferenceFeatures

    return ReferenceFeatures(rng.normal(size=(n, d)), "FID (test features)", {"features": {}})


def test_quality_spreads_cover_and_shrink():
    from layermerge.fid import quality_of_features

    rng = np.random.default_rng(3)
    ref = _reference(rng)
    same = quality_of_features(rng.normal(size=(200, 6)), ref, draws=60, seed=0)
    # a sample of the reference's distribution: the KID interval covers 0, FID is small
    assert same.kid_ci[0] < 0.0 < same.kid_ci[1]
    assert same.kid_ci == pytest.approx(
        (same.kid - 1.96 * same.kid_sd, same.kid + 1.96 * same.kid_sd)
    )
    assert 0 < same.fid < 0.3 and same.fid_sd > 0 and (same.n, same.n_ref) == (200, 2000)
    assert same.label.startswith("FID/KID (test features)")
    shifted = quality_of_features(rng.normal(size=(200, 6)) + 0.5, ref, draws=60, seed=0)
    assert shifted.kid_ci[0] > same.kid_ci[1] and shifted.fid_ci[0] > same.fid_ci[1]
    assert shifted.fid == pytest.approx(6 * 0.25, rel=0.3)
    # 4x the images: about half the spread
    big = quality_of_features(rng.normal(size=(800, 6)) + 0.5, ref, draws=60, seed=0)
    assert 0.3 < big.kid_sd / shifted.kid_sd < 0.75 and 0.3 < big.fid_sd / shifted.fid_sd < 0.75
    d = big.to_dict()
    assert set(d) >= {"fid", "fid_sd", "fid_ci95", "kid", "kid_sd", "kid_ci95", "n", "n_ref"}
    json.dumps(d)


def test_reference_features_cache_round_trip(tmp_path, classifier):
    from layermerge.fid import (
        FEATURES_SCHEMA,
        ReferenceFeatures,
        features_of_images,
        quality_of_images,
        reference_features,
    )

    root = write_mnist_like(tmp_path / "data", n_train=40, n_test=30)
    splits = DiffusionTask().make_data(f"mnist:{root}", (1, 8, 8), holdout_per_class=2)
    ext = classifier_features(classifier, mean=(0.1,), std=(0.3,), name="c", data="mnist")
    cache = tmp_path / "ref-features.npz"
    ref = reference_features(ext, splits.test, cache=cache, batch_size=7)
    side = json.loads((tmp_path / "ref-features.npz.json").read_text())
    assert side["schema"] == FEATURES_SCHEMA and side["n"] == 30 and side["dim"] == 16
    with np.load(cache, allow_pickle=False) as z:
        assert set(z.files) == {"features", "mu", "sigma", "n"}
    stamp = cache.stat().st_mtime_ns
    again = reference_features(ext, splits.test, cache=cache)
    assert cache.stat().st_mtime_ns == stamp
    assert np.array_equal(again.features, ref.features)
    # the same Gaussian fit as reference_stats, and FID works across the two
    stats = reference_stats(ext, splits.test)
    assert np.allclose(again.stats.sigma, stats.sigma) and np.allclose(again.stats.mu, stats.mu)
    assert fid_between(again.stats, stats).fid == pytest.approx(0.0, abs=1e-9)
    real = next(splits.test.batches(30))[0]
    assert np.allclose(features_of_images(real, ext, batch_size=8), ref.features)
    q = quality_of_images(real, ext, again, draws=5)
    assert q.fid == pytest.approx(0.0, abs=1e-6) and q.n == 30
    # other features: recomputed; a foreign file: refused
    ext2 = classifier_features(classifier, mean=(0.2,), std=(0.3,), name="c", data="mnist")
    reference_features(ext2, splits.test, cache=cache)
    assert cache.stat().st_mtime_ns != stamp
    with pytest.raises(ValueError, match="another feature extractor"):
        quality_of_images(real, ext, ReferenceFeatures.load(cache), draws=2)
    FeatureStats.of(ref.features, ext.label).save(tmp_path / "stats.npz")
    with pytest.raises(ValueError, match="reference-features"):
        ReferenceFeatures.load(tmp_path / "stats.npz")
