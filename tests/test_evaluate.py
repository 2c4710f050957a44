"""Tests of jaxdiff.evaluate: the shipped digits classifier and the digits report (FD, KID,
precision/recall, density/coverage against their real-vs-real floors). The metric formulas
themselves are tested in test_metrics.py."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from scipy.ndimage import uniform_filter

from jaxdiff import evaluate, metrics

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


# ---------------------------------------------------------------------------------------------
# The formulas (tested in test_metrics.py) stay importable from evaluate


def test_evaluate_re_exports_the_metric_formulas():
    assert evaluate.frechet_distance is metrics.frechet_distance
    assert evaluate.feature_statistics is metrics.feature_statistics
    assert evaluate.FeatureStatistics is metrics.FeatureStatistics
    x = np.random.default_rng(5).normal(size=(50, 3))
    assert evaluate.frechet_distance(*evaluate.feature_statistics(x), *evaluate.feature_statistics(x + 1)) > 2.9


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


MANIFOLD = ('precision', 'recall', 'density', 'coverage')


def test_digits_report_on_disjoint_real_digits_is_near_the_floors(digits):
    # Samples and reference are disjoint real halves: every metric should match its floor.
    images = digits[0]
    reports = []
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(images))
        reports.append(evaluate.digits_report(images[order[:898]], images[order[898:]], seed=seed))
    mean = {k: np.mean([r[k] for r in reports]) for k in reports[0] if k != 'class_histogram'}
    assert 0.6 < mean['fd'] / mean['fd_floor'] < 1.5
    # KID is unbiased: real digits land within a few of the halves' spread of 0.
    assert abs(mean['kid']) < 3 * mean['kid_floor_std'] and abs(mean['kid_floor']) < 3 * mean['kid_floor_std']
    for name in MANIFOLD:
        assert abs(mean[name] - mean[f'{name}_floor']) < 0.06, name
    assert 0.85 < mean['precision_floor'] < 1 and 0.85 < mean['recall_floor'] < 1
    assert 0.9 < mean['density_floor'] < 1.1 and 0.9 < mean['coverage_floor'] < 1
    assert reports[0]['manifold_num_samples'] == 449 and reports[0]['manifold_num_real'] == 450


def test_digits_report_ranks_bad_samples_far_above_the_floors(digits):
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
        assert report['kid'] > report['kid_floor'] + 20 * report['kid_floor_std'], name
        for metric in MANIFOLD:
            assert report[metric] < report[f'{metric}_floor'] - 0.3, (name, metric)


def test_digits_report_is_json_serialisable_with_a_full_histogram(digits):
    images, labels = digits
    report = evaluate.digits_report(images[:200], images, real_labels=labels)
    json.dumps(report, allow_nan=False)
    assert report['num_samples'] == 200 and report['num_real'] == len(images)
    assert len(report['class_histogram']) == 10 and sum(report['class_histogram']) == 200
    assert 0.9 < report['class_balance'] <= 1.0 and report['real_accuracy'] >= 0.97
    assert report['fd'] >= 0 and report['fd_floor'] > 0
    for key in ('kid', 'kid_std', 'kid_floor', 'kid_floor_std', *MANIFOLD, *(f'{m}_floor' for m in MANIFOLD)):
        assert isinstance(report[key], float), key
    assert report['manifold_num_samples'] == 200 and report['manifold_num_real'] == 899


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
    with pytest.raises(ValueError, match='at least 12'):
        evaluate.digits_report(images[:10], images[:10])
