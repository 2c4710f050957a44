"""Tests of jaxdiff.evaluate: Fréchet distance closed forms, feature statistics (one shot and
streaming), the shipped digits classifier and the digits report."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
import scipy.linalg
from scipy.ndimage import uniform_filter

from jaxdiff import evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def digits():
    """sklearn's 1,797 digits as float32 NHWC in [-1, 1] (pixel / 8 - 1), and their labels."""
    from sklearn.datasets import load_digits
    data = load_digits()
    return (data.images.astype(np.float32) / 8.0 - 1.0)[..., None], data.target


@pytest.fixture(scope='module')
def train_script():
    spec = importlib.util.spec_from_file_location('train_digits_classifier', REPO / 'scripts' / 'train_digits_classifier.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def random_covariance(rng, d, n):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    return np.cov(x, rowvar=False)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_of_commuting_covariances_is_the_closed_form():
    # Covariances with common eigenvectors Q: FD = |mu1 - mu2|^2 + sum_k (sqrt(a_k) - sqrt(b_k))^2.
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    q = random_orthogonal(rng, d)
    fd = evaluate.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_with_singular_covariances_is_the_closed_form():
    # Rank-deficient covariances (fewer samples than dimensions) need no eps*I regularisation.
    rng = np.random.default_rng(1)
    d = 10
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    a[:4], b[2:6] = 0.0, 0.0
    q = random_orthogonal(rng, d)
    mu = np.zeros(d)
    fd = evaluate.frechet_distance(mu, q @ np.diag(a) @ q.T, mu, q @ np.diag(b) @ q.T)
    # Zero eigenvalues come out as +-1e-16 and their square roots as 1e-8: sqrt's own conditioning.
    assert fd == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-6)


def test_frechet_distance_of_a_distribution_to_itself_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = rng.normal(size=20), random_covariance(rng, 20, 200)
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_is_symmetric():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = random_covariance(rng, 16, 100), random_covariance(rng, 16, 50)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        evaluate.frechet_distance(mu2, s2, mu1, s1), rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_random_features():
    # The pytorch-fid / EDM computation: tr(sqrtm(sigma1 sigma2)) in float64 with scipy.
    rng = np.random.default_rng(4)
    f1 = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
    f2 = 0.5 + rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='shape'):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------
# Feature statistics


def test_feature_statistics_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(5).normal(size=(100, 7)).astype(np.float32)
    mu, sigma = evaluate.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_streaming_statistics_equal_one_shot_for_uneven_batches():
    # A mean far from zero checks the shifted sums: unshifted sums of x x^T would cancel.
    x = 1e4 + np.random.default_rng(6).normal(size=(1000, 9))
    stats = evaluate.FeatureStatistics()
    for start, stop in [(0, 1), (1, 257), (257, 257), (257, 700), (700, 1000)]:
        stats.update(x[start:stop])
    mu, sigma = stats.finalize()
    mu_ref, sigma_ref = evaluate.feature_statistics(x)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-14)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


def test_streaming_statistics_need_two_vectors():
    stats = evaluate.FeatureStatistics()
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match='at least 2'):
        stats.finalize()


# ---------------------------------------------------------------------------------------------
# The shipped digits classifier


def test_shipped_classifier_is_small_and_classifies_real_digits(digits):
    images, labels = digits
    module, params = evaluate.load_digits_classifier()
    assert sum(p.size for p in jax.tree.leaves(params)) <= 100_000
    assert evaluate.classifier_metadata()['test_accuracy'] >= 0.97
    features, logits = evaluate.digits_features(images, batch_size=512)
    assert features.shape == (len(images), module.feature_dim) and logits.shape == (len(images), 10)
    assert np.mean(logits.argmax(-1) == labels) >= 0.97


def test_digits_features_do_not_depend_on_batching(digits):
    images = digits[0][:300]
    f1, l1 = evaluate.digits_features(images, batch_size=512)
    f2, l2 = evaluate.digits_features(images, batch_size=128)
    np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)


def _use_classifier_file(monkeypatch, directory):
    """Point the loader at `directory`/assets/digits_classifier.npz instead of the package's."""
    monkeypatch.setattr(evaluate.importlib.resources, 'files', lambda package: directory)
    evaluate._classifier.cache_clear()


@pytest.fixture
def restore_classifier_cache():
    yield
    evaluate._classifier.cache_clear()
    evaluate._jitted_classifier.cache_clear()


def test_missing_or_corrupt_classifier_file_names_the_file_and_script(tmp_path, monkeypatch, restore_classifier_cache):
    _use_classifier_file(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match='digits_classifier.npz.*train_digits_classifier.py'):
        evaluate.load_digits_classifier()
    (tmp_path / 'assets').mkdir()
    (tmp_path / 'assets' / 'digits_classifier.npz').write_bytes(b'not a zip file')
    with pytest.raises(ValueError, match='corrupt.*digits_classifier.npz.*train_digits_classifier.py'):
        evaluate.load_digits_classifier()


def test_train_script_runs_and_writes_a_file_the_loader_reads(train_script, tmp_path, monkeypatch,
                                                              restore_classifier_cache):
    result = train_script.train(seed=0, steps=3, batch_size=32, log_every=0)
    assert 0.0 <= result['accuracy'] <= 1.0 and result['meta']['steps'] == 3
    train_script.save_classifier(tmp_path / 'assets' / 'digits_classifier.npz', result['params'], result['meta'])
    _use_classifier_file(monkeypatch, tmp_path)
    _, params = evaluate.load_digits_classifier()
    jax.tree.map(np.testing.assert_array_equal, params['params'], result['params'])
    assert evaluate.classifier_metadata()['steps'] == 3


# ---------------------------------------------------------------------------------------------
# The digits report


def test_digits_report_on_disjoint_real_digits_is_near_the_floor(digits):
    # Samples and reference are disjoint real halves: fd should match the floor on average.
    images = digits[0]
    fds, floors = [], []
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(images))
        report = evaluate.digits_report(images[order[:898]], images[order[898:]], seed=seed)
        fds.append(report['fd'])
        floors.append(report['fd_floor'])
    assert 0.6 < np.mean(fds) / np.mean(floors) < 1.5


def test_digits_report_ranks_bad_samples_far_above_the_floor(digits):
    images = digits[0]
    rng = np.random.default_rng(0)
    subset = images[rng.permutation(len(images))[:512]]
    bad = {
        'uniform noise': rng.uniform(-1, 1, subset.shape),
        'blurred': uniform_filter(subset, size=(1, 3, 3, 1), mode='nearest'),
        'shuffled pixels': np.stack([im.reshape(-1)[rng.permutation(64)].reshape(im.shape) for im in subset]),
    }
    for name, samples in bad.items():
        report = evaluate.digits_report(samples, images)
        assert report['fd'] > 20 * report['fd_floor'], name


def test_digits_report_is_json_serialisable_with_a_full_histogram(digits):
    images, labels = digits
    report = evaluate.digits_report(images[:200], images, real_labels=labels)
    json.dumps(report, allow_nan=False)
    assert report['num_samples'] == 200 and report['num_real'] == len(images)
    assert len(report['class_histogram']) == 10 and sum(report['class_histogram']) == 200
    assert 0.9 < report['class_balance'] <= 1.0 and report['real_accuracy'] >= 0.97
    assert report['fd'] >= 0 and report['fd_floor'] > 0


def test_fd_floor_rescales_the_halves_by_the_sample_size_bias():
    assert evaluate.fd_floor_at(4.0, num_real=1000, num_samples=1000) == pytest.approx(2.0)
    assert evaluate.fd_floor_at(4.0, num_real=1000, num_samples=500) == pytest.approx(3.0)


def test_digits_report_rejects_wrong_shapes_and_non_finite_samples(digits):
    images = digits[0]
    with pytest.raises(ValueError, match='samples'):
        evaluate.digits_report(images[:10, :, :, 0], images)
    bad = images[:10].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match='non-finite'):
        evaluate.digits_report(bad, images)
