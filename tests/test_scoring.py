"""Tests of jaxdiff.scoring: seed sets, the digits and Inception paths, reference files, bits/dim
and the errors that name config fields.

Most tests replace the Inception network by a stand-in (a fixed random projection of the pixels,
16 features and 10 logits) through `scoring.load_inception`, so the 'inception' path runs in
milliseconds; one test runs the real FID Inception-v3 with the seeded random weights of
tests/data/inception on 8 small images.
"""
import importlib.util
import json
import os
import pathlib
import re
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import data, evaluate, images, likelihood, metrics, parameterize, processes, scoring
from jaxdiff.analytic import GaussianDenoiser

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from configs import ddpm as ddpm_config, edm, ihdm as ihdm_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


class StandIn:
    """A cheap feature network: tanh of a fixed random projection of the pixels ([-1, 1] NHWC),
    logits a fixed linear map of those. Records the batch sizes it is called with."""

    def __init__(self, pixels: int, dim: int = 16, classes: int = 10):
        rng = np.random.default_rng(123)
        self.w1 = rng.standard_normal((pixels, dim)) / np.sqrt(pixels)
        self.w2 = rng.standard_normal((dim, classes))
        self.batch_sizes = []

    def __call__(self, x):
        self.batch_sizes.append(len(x))
        pool = np.tanh(np.asarray(x, np.float64).reshape(len(x), -1) @ self.w1)
        return pool.astype(np.float32), (pool @ self.w2).astype(np.float32)


class Lines:
    """A `log` that keeps the formatted lines."""

    def __init__(self):
        self.lines = []

    def __call__(self, fmt, *args):
        self.lines.append(fmt % args)

    def __contains__(self, text):
        return any(text in line for line in self.lines)


def faces_config(**eval_fields):
    """The faces scored on Inception features (the stand-in network in most tests)."""
    c = edm.get_config()
    c.data.name, c.data.resolution, c.data.channels = 'faces', 25, 1
    c.eval.features = 'inception'
    for k, v in eval_fields.items():
        c.eval[k] = v
    return c


def faces():
    return data.load_embedded('faces', 25)[0]


def faces_sampler(calls=None):
    """sample_fn over the faces: sample i of a call is face (seed + i) mod 200 plus a little
    noise drawn from that seed alone."""
    real = faces()

    def sample_fn(num, seed):
        if calls is not None:
            calls.append((num, seed))
        seeds = np.arange(seed, seed + num)
        noise = np.stack([np.random.default_rng(int(s)).normal(0, 0.05, real.shape[1:]) for s in seeds])
        return np.clip(real[seeds % len(real)] + noise, -1, 1).astype(np.float32)
    return sample_fn


def no_sampling(num, seed):
    raise AssertionError('sample_fn must not be called')


@pytest.fixture
def stand_in(monkeypatch):
    """The stand-in network in place of the Inception weights, for any eval.inception_weights."""
    net = StandIn(25 * 25)
    monkeypatch.setattr(scoring, 'load_inception', lambda config: net)
    return net


# ---------------------------------------------------------------------------------------------
# Seed sets, shares, batching


def test_seed_sets_seeds_and_per_set_figures(tmp_path, stand_in):
    n, sets = 40, 3
    mu, sigma = metrics.feature_statistics(stand_in(faces())[0])
    scoring.save_reference(tmp_path / 'ref.npz', mu, sigma, network='inception')
    config = faces_config(num_samples=n, seed=5, seed_sets=sets, batch_size=16, metrics=('fd', 'is'),
                          ref=str(tmp_path / 'ref.npz'))
    config.sample.S_max = float('inf')  # non-finite config values are recorded as strings
    calls = []
    stand_in.batch_sizes.clear()
    result = scoring.evaluate_samples(config, faces_sampler(calls), step=3, workdir=tmp_path)
    # The network always sees full batches (one compilation), the last one padded.
    assert stand_in.batch_sizes == [16] * 9
    # Set j: seeds 5 + 40 j ... 5 + 40 j + 39, drawn in blocks of 16 (the last padded past the set).
    assert result['seeds'] == ['5-44', '45-84', '85-124']
    assert [s['seeds'] for s in result['sets']] == result['seeds']
    assert calls == [(16, 5 + 40 * j + b) for j in range(sets) for b in (0, 16, 32)]
    sample_fn = faces_sampler()
    for j, s in enumerate(result['sets']):
        pool, logits = stand_in(sample_fn(n, 5 + 40 * j))  # the set at once: the same figures
        assert s['fd'] == pytest.approx(metrics.frechet_distance(*metrics.feature_statistics(pool), mu, sigma),
                                        rel=1e-10)
        assert s['is'] == pytest.approx(metrics.inception_score(logits)[0], rel=1e-10)
        assert s['num_samples'] == n
    fds = [s['fd'] for s in result['sets']]
    assert len(set(fds)) == sets  # different seeds, different samples
    assert result['headline_set'] == int(np.argmin(fds)) and result['fd'] == min(fds)
    assert result['over_sets']['fd'] == {'min': min(fds), 'mean': pytest.approx(np.mean(fds)), 'max': max(fds)}
    assert result['over_sets']['is']['mean'] == pytest.approx(np.mean([s['is'] for s in result['sets']]))
    assert json.loads((tmp_path / 'eval_00000003.json').read_text()) == json.loads(json.dumps(result))
    assert result['features'] == 'inception' and result['ref'] == str(tmp_path / 'ref.npz')
    assert result['sample']['num_steps'] == config.sample.num_steps and result['sample']['S_max'] == 'inf'


def test_results_do_not_depend_on_the_batch_size(tmp_path, stand_in):
    mu, sigma = metrics.feature_statistics(stand_in(faces())[0])
    scoring.save_reference(tmp_path / 'ref.npz', mu, sigma, features=stand_in(faces()[:60])[0])
    results = []
    for batch_size in (7, 64):
        config = faces_config(num_samples=50, batch_size=batch_size, seed_sets=2, ref=str(tmp_path / 'ref.npz'))
        result = scoring.evaluate_samples(config, faces_sampler(), step=0)
        results.append({k: v for k, v in result.items() if 'seconds' not in k and k != 'sets'})
    assert results[0] == results[1]
    assert {'fd', 'kid', 'kid_std', 'precision', 'recall', 'density', 'coverage', 'is'} <= set(results[0])


@pytest.mark.parametrize('total,batch', [(50_000, 256), (1024, 256), (10, 3), (5, 8)])
def test_process_shares_cover_the_seeds_once_in_order(total, batch):
    for count in (1, 2, 3, 4):
        shares = [scoring.process_share(total, batch, p, count) for p in range(count)]
        assert len({len(s) for s in shares}) == 1  # the same number of sample_fn calls everywhere
        covered = [i for share in shares for start, n in share for i in range(start, start + n)]
        assert covered == list(range(total))  # process order is seed order
        assert all(0 <= n <= batch for share in shares for _, n in share)


# ---------------------------------------------------------------------------------------------
# The digits


def test_digits_report_and_json(tmp_path):
    config = edm.get_config()  # the default digits run: features 'auto' -> digits
    config.eval.num_samples, config.eval.batch_size = 64, 32
    real = data.load_embedded('digits')[0]
    calls = []

    def sample_fn(num, seed):
        calls.append((num, seed))
        return real[np.arange(seed, seed + num) * 7 % len(real)]

    log = Lines()
    result = scoring.evaluate_samples(config, sample_fn, step=12, workdir=tmp_path, log=log)
    assert calls == [(32, 0), (32, 32)]
    report = evaluate.digits_report(real[np.arange(64) * 7 % len(real)], real, seed=config.eval.seed)
    for key, value in report.items():  # every key of the digits report, as it computes it
        assert result[key] == value, key
    for key in ('fd', 'fd_floor', 'class_histogram', 'num_samples', 'step', 'sample_seconds', 'sample_seed'):
        assert key in result  # what the runner logs and writes
    assert result['features'] == 'digits' and result['num_samples'] == 64 and result['seeds'] == ['0-63']
    assert 1 < result['is'] <= 10  # the classifier's Inception-Score analogue (10 classes)
    assert json.loads((tmp_path / 'eval_00000012.json').read_text()) == json.loads(json.dumps(result))
    assert 'digits Frechet distance' in log and 'Wrote' in log


def test_a_second_evaluation_of_a_step_does_not_overwrite_the_first(tmp_path):
    config = edm.get_config()
    config.eval.num_samples, config.eval.batch_size = 32, 32
    real = data.load_embedded('digits')[0]
    reports = []
    for shift in (0, 500, 1000):  # three evaluations of step 7 with different samples
        sample_fn = lambda num, seed, shift=shift: real[shift + seed:shift + seed + num]
        reports.append(scoring.evaluate_samples(config, sample_fn, step=7, workdir=tmp_path, log=Lines()))
    names = ['eval_00000007.json', 'eval_00000007.1.json', 'eval_00000007.2.json']
    assert sorted(p.name for p in tmp_path.glob('eval_*.json')) == sorted(names)
    for name, report in zip(names, reports):
        assert json.loads((tmp_path / name).read_text()) == json.loads(json.dumps(report))
    assert len({r['fd'] for r in reports}) == 3


# ---------------------------------------------------------------------------------------------
# Reference files


def test_reference_round_trip(tmp_path, stand_in):
    config = faces_config(batch_size=64, ref_num_features=50)
    log = Lines()
    info = scoring.compute_reference(config, scoring.default_ref_path(config, tmp_path), log=log)
    path = tmp_path / 'ref_faces.npz'
    assert info['path'] == str(path) and 'images/s' in log
    real = faces()
    mu, sigma = metrics.feature_statistics(stand_in(real)[0])
    # EDM's format: fid.py reads mu and sigma; ours adds meta and a documented subset of features.
    with np.load(path) as npz:
        assert set(npz.files) == {'mu', 'sigma', 'meta', 'features'}
        np.testing.assert_allclose(npz['mu'], mu, rtol=0, atol=1e-12)
        np.testing.assert_allclose(npz['sigma'], sigma, rtol=0, atol=1e-12)
        subset, _ = data.eval_images(config.data, 50, seed=0)
        np.testing.assert_array_equal(npz['features'], stand_in(subset)[0])
    ref = scoring.load_reference(path)
    assert ref.meta['dataset'] == 'faces' and ref.meta['num_images'] == 200 and ref.meta['network'] == 'inception'
    assert ref.meta['num_features'] == 50 and ref.meta['feature_dim'] == 16
    assert metrics.load_statistics(path)[2] == ref.meta
    # eval.ref unset: the file --mode=ref wrote in the work directory. The data against its own
    # statistics: FD 0.
    config = faces_config(batch_size=64, num_samples=200)
    result = scoring.evaluate_samples(config, lambda num, seed: real[np.arange(seed, seed + num) % 200],
                                      step=0, workdir=tmp_path, log=log)
    assert result['ref'] == str(path) and 'eval.ref not set: using' in log
    assert abs(result['fd']) < 1e-9
    assert result['num_ref_features'] == 50 and result['prdc_num_samples'] == 50
    assert np.isfinite(result['kid']) and 0 <= result['precision'] <= 1


def test_edm_statistics_file_gives_fd_and_skips_kid_and_prdc(tmp_path, stand_in):
    mu, sigma = metrics.feature_statistics(stand_in(faces())[0])
    np.savez(tmp_path / 'edm.npz', mu=mu, sigma=sigma)  # EDM's fid.py ref: mu and sigma only
    config = faces_config(num_samples=20, batch_size=20, ref=str(tmp_path / 'edm.npz'))
    result = scoring.evaluate_samples(config, faces_sampler(), step=0)
    assert np.isfinite(result['fd']) and 'is' in result
    assert set(result['skipped']) == {'kid', 'prdc'} and 'kid' not in result and 'precision' not in result
    assert '--mode=ref' in result['skipped']['kid']


def test_reference_mode_of_the_launcher(tmp_path):
    import launch
    config = edm.get_config()
    config.eval.features, config.eval.ref_num_features, config.eval.batch_size = 'digits', 100, 500
    info = launch.reference_mode(config, tmp_path)
    ref = scoring.load_reference(tmp_path / 'ref_digits.npz')
    features, _ = evaluate.digits_features(data.load_embedded('digits')[0])
    mu, sigma = metrics.feature_statistics(features)
    np.testing.assert_allclose(ref.mu, mu, atol=1e-9)
    np.testing.assert_allclose(ref.sigma, sigma, atol=1e-9)
    assert ref.features.shape == (100, 64) and info['network'] == 'digits' and info['num_images'] == 1797
    config.eval.ref = str(tmp_path / 'elsewhere' / 'digits.npz')  # eval.ref set: written there
    launch.reference_mode(config, tmp_path)
    assert (tmp_path / 'elsewhere' / 'digits.npz').is_file()


# ---------------------------------------------------------------------------------------------
# The real Inception network (random weights)


def test_real_inception_features_path(tmp_path, monkeypatch):
    from jaxdiff.nets import inception
    spec = importlib.util.spec_from_file_location('inception_random_weights',
                                                  REPO / 'tests' / 'data' / 'inception' / 'random_weights.py')
    random_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(random_weights)
    params = jax.tree.map(jnp.asarray, inception.params_from_state_dict(
        random_weights.random_state_dict(inception.state_dict_shapes())))
    loaded = []
    monkeypatch.setattr(inception, 'load_inception_params',
                        lambda path, **kwargs: loaded.append(path) or params)
    samples = np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32)
    # The features by hand: uint8 quantisation, gray to RGB, the network in batches of 4.
    rgb = np.repeat(images.to_uint8(samples), 3, axis=-1)
    pool, logits = (np.concatenate(parts) for parts in zip(*[
        [np.asarray(a) for a in inception.inception_features_uint8(params, rgb[i:i + 4])] for i in (0, 4)]))
    scoring.save_reference(tmp_path / 'ref.npz', *metrics.feature_statistics(pool), features=pool,
                           network='inception')
    config = edm.get_config()
    config.eval.features, config.eval.inception_weights = 'inception', 'pt_inception.pth'
    config.eval.num_samples, config.eval.batch_size, config.eval.ref = 8, 4, str(tmp_path / 'ref.npz')
    # No 'fd' here: its 2048 x 2048 eigendecomposition takes 10-20 s on a shared 2-core CPU, and
    # the FD path is the same for any network (checked with the stand-in above).
    config.eval.metrics = ('kid', 'prdc', 'is')
    result = scoring.evaluate_samples(config, lambda num, seed: samples[seed:seed + num], step=0)
    assert loaded == ['pt_inception.pth'] and result['features'] == 'inception'
    assert result['kid'] == pytest.approx(metrics.kernel_inception_distance(pool, pool)[0], rel=1e-4)
    assert result['is'] == pytest.approx(metrics.inception_score(logits, splits=8)[0], rel=1e-6)
    assert result['precision'] == result['recall'] == result['coverage'] == 1.0


# ---------------------------------------------------------------------------------------------
# Random features (nets.random_features): no weights to download


@pytest.fixture
def one_blas_thread():
    """numpy's eigendecompositions (FD) on one OpenBLAS thread: two threads on two cores shared with
    other jobs make a 358 x 358 FD take seconds instead of 0.1 s."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):
        yield


def photos_config(**eval_fields):
    c = edm.get_config()
    c.data.name, c.data.resolution, c.data.channels = 'photos', 32, 3
    for k, v in eval_fields.items():
        c.eval[k] = v
    return c


def test_auto_features_resolve_to_digits_inception_or_random():
    assert scoring.resolve_features(edm.get_config()) == 'digits'  # the 8x8 digits
    config = photos_config()
    assert scoring.resolve_features(config) == 'random'
    assert scoring.default_ref_path(config, 'w') == pathlib.Path('w/ref_photos_random.npz')
    config.eval.inception_weights = 'pt_inception.pth'
    assert scoring.resolve_features(config) == 'inception'
    assert scoring.default_ref_path(config, 'w') == pathlib.Path('w/ref_photos.npz')
    config = faces_config(features='auto')  # one channel, 25 px: random too
    assert scoring.resolve_features(config) == 'random'
    config = edm.get_config()
    config.data.resolution = 12  # resized digits: too small for the random network
    with pytest.raises(ValueError, match=r"eval\.features='auto'.*at least 16x16.*data\.resolution is 12"):
        scoring.resolve_features(config)
    config.eval.features = 'random'
    with pytest.raises(ValueError, match=r'eval\.metrics has .is.*random'):  # no logits: no IS
        scoring.evaluate_samples(config, no_sampling, step=0)


def test_random_features_score_an_embedded_set_with_no_reference_file(tmp_path, one_blas_thread):
    """The default photos run: no eval.ref, no file in the work directory -> the reference is
    computed on the spot from the 1,024 patches and written as ref_photos_random.npz; 'is' (a
    default metric) is skipped under 'auto'. The patches themselves score about the real-vs-real
    floor, noisy ones far above; the second evaluation reads the file."""
    real = data.load_embedded('photos', 32)[0]
    config = photos_config(num_samples=64, batch_size=64)
    log = Lines()
    result = scoring.evaluate_samples(config, lambda num, seed: real[seed:seed + num], step=1,
                                      workdir=tmp_path, log=log)
    path = tmp_path / 'ref_photos_random.npz'
    assert 'computed the random-feature statistics of the 1024 photos images' in log and f'wrote {path}' in log
    ref = scoring.load_reference(path)
    assert ref.meta['network'] == 'random' and ref.meta['num_images'] == 1024 and ref.meta['feature_dim'] == 358
    assert ref.features.shape == (1024, 358) and ref.meta['random_seed'] == 2020
    assert result['features'] == 'random' and result['ref'] == str(path) and 'is' not in result
    assert 'no classifier logits' in result['skipped']['is']
    assert 0 < result['fd'] < 2 and 0 <= result['precision'] <= 1 and np.isfinite(result['kid'])
    noise = np.random.default_rng(0).standard_normal(real.shape[1:]).astype(np.float32)
    noisy = scoring.evaluate_samples(config, lambda num, seed: np.clip(real[seed:seed + num] + 0.2 * noise, -1, 1),
                                     step=2, workdir=tmp_path, log=log)
    assert 'eval.ref not set: using' in log and noisy['fd'] > 10 * result['fd']
    # No work directory: computed the same, kept in memory.
    again = scoring.evaluate_samples(config, lambda num, seed: real[seed:seed + num], step=1, log=Lines())
    assert again['fd'] == pytest.approx(result['fd'], rel=1e-9) and again['ref'] is None


def test_a_reference_of_another_network_is_refused_with_random_features(tmp_path, stand_in):
    config = photos_config()
    scoring.save_reference(tmp_path / 'inception.npz', np.zeros(358), np.eye(358), network='inception')
    np.savez(tmp_path / 'edm.npz', mu=np.zeros(358), sigma=np.eye(358))  # EDM's files: Inception statistics
    scoring.save_reference(tmp_path / 'old.npz', np.zeros(358), np.eye(358), network='random', random_seed=1)
    for name, message in (('inception', 'holds inception features but the samples get random'),
                          ('edm', 'holds inception features but the samples get random'),
                          ('old', 'another random network')):
        config.eval.ref = str(tmp_path / f'{name}.npz')
        with pytest.raises(ValueError, match=rf'eval\.ref=.*{name}\.npz.*{message}'):
            scoring.evaluate_samples(config, no_sampling, step=0)
    # And a random-feature file with Inception features (the same default name is not shared).
    scoring.save_reference(tmp_path / 'random.npz', np.zeros(16), np.eye(16), network='random', random_seed=2020)
    config = faces_config(ref=str(tmp_path / 'random.npz'))
    with pytest.raises(ValueError, match=r'holds random features but the samples get inception'):
        scoring.evaluate_samples(config, no_sampling, step=0)


def test_tfds_data_still_need_an_explicit_reference(tmp_path):
    config = photos_config()
    config.data.name = 'cifar10'  # not embedded: no reference on the spot, whatever the network
    with pytest.raises(ValueError, match=r'eval\.ref is not set: FD needs.*--mode=ref.*ref_cifar10_random\.npz'):
        scoring.evaluate_samples(config, no_sampling, step=0, workdir=tmp_path)


def test_reference_mode_writes_the_random_feature_file(tmp_path):
    import launch
    config = photos_config(ref_num_features=100)
    info = launch.reference_mode(config, tmp_path)
    ref = scoring.load_reference(tmp_path / 'ref_photos_random.npz')
    features = scoring.random_features_fn(data.load_embedded('photos', 32)[0])[0]
    mu, sigma = metrics.feature_statistics(features)
    np.testing.assert_allclose(ref.mu, mu, atol=1e-9)
    np.testing.assert_allclose(ref.sigma, sigma, atol=1e-9)
    assert info['network'] == 'random' and ref.features.shape == (100, 358) and ref.meta['quantized']


# ---------------------------------------------------------------------------------------------
# bits/dim


def digits_denoiser():
    x, _ = data.load_embedded('digits')
    flat = (np.round((x + 1) * 8) / 8 - 1).reshape(len(x), -1)
    cov = np.cov(flat.T) + np.eye(flat.shape[1]) / 768
    return GaussianDenoiser.create(jnp.asarray(flat.mean(0).reshape(8, 8, 1), jnp.float32),
                                   jnp.asarray(cov, jnp.float32))


def test_bits_per_dim_metric(tmp_path):
    config = edm.get_config()
    config.eval.metrics, config.eval.bpd_num_images, config.eval.batch_size = ('bpd',), 3, 2
    denoise = digits_denoiser()
    result = scoring.evaluate_samples(config, no_sampling, step=1, workdir=tmp_path, denoise=denoise)
    # The same images (data.eval_images with eval.seed), 17 levels, image i with key i.
    x, _ = data.eval_images(config.data, 3, seed=0)
    ints = np.rint((x + 1) * 8).astype(np.int32)
    keys = jax.random.split(jax.random.key(0), 3)
    direct = [likelihood.bits_per_dim(denoise, ints[i], keys[i], process=likelihood.edm_process(), num_levels=17)
              for i in (np.array([0, 1]), np.array([2, 2]))]
    expected = np.concatenate([np.asarray(direct[0].bpd), np.asarray(direct[1].bpd)[:1]])
    assert result['bpd'] == pytest.approx(expected.mean(), rel=1e-6)
    assert result['bpd_num_images'] == 3 and result['bpd_failed'] == 0 and result['bpd_levels'] == 17
    assert result['bpd_process'] == 'edm' and 2 < result['bpd'] < np.log2(17)
    assert 'fd' not in result and 'sets' not in result
    assert json.loads((tmp_path / 'eval_00000001.json').read_text())['bpd'] == result['bpd']


def test_bits_per_dim_metric_of_a_model_on_its_process(tmp_path):
    """The process methods (no precond block) integrate the model's own process: DDPM's linear
    betas over [1/T, 1] here, the same figure as likelihood.bits_per_dim_of_model called directly."""
    config = ddpm_config.get_config()
    config.eval.metrics, config.eval.bpd_num_images, config.eval.batch_size = ('bpd',), 2, 2
    process = processes.GaussianProcess(processes.Discrete('linear', 1000))
    model = parameterize.from_denoiser(digits_denoiser(), process)
    result = scoring.evaluate_samples(config, no_sampling, step=1, workdir=tmp_path, denoise=model)
    x, _ = data.eval_images(config.data, 2, seed=0)
    direct = likelihood.bits_per_dim_of_model(model, np.rint((x + 1) * 8).astype(np.int32),
                                              jax.random.split(jax.random.key(0), 2), num_levels=17)
    assert result['bpd'] == pytest.approx(float(np.mean(direct.bpd)), rel=1e-6)
    assert result['bpd_process'] == 'Discrete' and 2 < result['bpd'] < np.log2(17)


# ---------------------------------------------------------------------------------------------
# Errors, raised before any sampling


def test_missing_reference_names_eval_ref_and_the_command(tmp_path, stand_in):
    config = faces_config()
    with pytest.raises(ValueError, match=r'eval\.ref is not set.*--mode=ref'):
        scoring.evaluate_samples(config, no_sampling, step=0, workdir=tmp_path)
    config.eval.ref = str(tmp_path / 'nowhere.npz')
    with pytest.raises(FileNotFoundError, match=r"eval\.ref=.*nowhere\.npz.*--mode=ref"):
        scoring.evaluate_samples(config, no_sampling, step=0, workdir=tmp_path)
    (tmp_path / 'garbage.npz').write_text('not numpy')
    config.eval.ref = str(tmp_path / 'garbage.npz')
    with pytest.raises(ValueError, match=r'eval\.ref.*garbage\.npz'):
        scoring.evaluate_samples(config, no_sampling, step=0)


def test_reference_of_another_network_names_eval_ref(tmp_path, stand_in):
    scoring.save_reference(tmp_path / 'digits.npz', np.zeros(16), np.eye(16), network='digits')
    config = faces_config(ref=str(tmp_path / 'digits.npz'))
    with pytest.raises(ValueError, match=r'eval\.ref=.*digits features.*inception'):
        scoring.evaluate_samples(config, no_sampling, step=0)


def test_missing_inception_weights_say_where_they_come_from(tmp_path):
    config = faces_config()
    for weights in (None, str(tmp_path / 'missing.pth')):
        config.eval.inception_weights = weights
        with pytest.raises(FileNotFoundError, match=r'eval\.inception_weights.*pytorch-fid'):
            scoring.evaluate_samples(config, no_sampling, step=0)
        with pytest.raises(FileNotFoundError, match=r'eval\.inception_weights.*github\.com/mseitzer'):
            scoring.compute_reference(config, tmp_path / 'ref.npz')
    assert not (tmp_path / 'ref.npz').exists()


@pytest.mark.parametrize('field,value,message', [
    ('metrics', ('fd', 'fid'), r"eval\.metrics: unknown metric\(s\) \['fid'\]"),
    ('metrics', (), r'eval\.metrics must be a non-empty tuple'),
    ('features', 'clip', r'eval\.features must be one of'),
    ('num_samples', 1, r'eval\.num_samples must be an integer >= 2'),
    ('seed_sets', 0, r'eval\.seed_sets must be an integer >= 1'),
    ('seed', 2 ** 32 - 10, r'below 2\*\*32'),
])
def test_bad_eval_fields_are_named(field, value, message):
    config = edm.get_config()
    config.eval[field] = value
    with pytest.raises(ValueError, match=message):
        scoring.evaluate_samples(config, no_sampling, step=0)


def test_digits_features_need_the_digits():
    config = faces_config(features='digits')
    with pytest.raises(ValueError, match=r"eval\.features='digits'.*'faces'"):
        scoring.evaluate_samples(config, no_sampling, step=0)


def test_bpd_needs_a_process_and_a_denoiser():
    config = edm.get_config()
    config.eval.metrics = ('fd', 'bpd')
    with pytest.raises(ValueError, match=r"'bpd'.*denoise"):
        scoring.evaluate_samples(config, no_sampling, step=0)
    config.precond.type = 'iddpm'
    with pytest.raises(ValueError, match=r"eval\.metrics: 'bpd'.*precond\.type.*'iddpm'"):
        scoring.evaluate_samples(config, no_sampling, step=0, denoise=digits_denoiser())
    config = ihdm_config.get_config()
    config.eval.metrics = ('fd', 'bpd')
    with pytest.raises(ValueError, match=r"'bpd'.*this method has no likelihood"):
        scoring.evaluate_samples(config, no_sampling, step=0, denoise=None)


# ---------------------------------------------------------------------------------------------
# Resuming a killed draw (blocks_root, scoring._draw's directory)


class Killed(Exception):
    """What a sample_fn raises to stand for the process being killed."""


def killed_at(sample_fn, call: int | None, calls: list):
    """sample_fn that records its calls and raises Killed at call number `call` (0-based; None: never)."""
    def wrapped(num, seed):
        if len(calls) == call:
            raise Killed(f'killed at call {call}')
        calls.append((num, seed))
        return sample_fn(num, seed)
    return wrapped


def resume_draw(directory, sample_fn, *, seed=5, step=3, keep_images=True, features_fn=None, **eval_fields):
    """scoring._draw of the faces (50 samples from `seed` in 7 blocks of 8) into `directory` (None: in memory)."""
    config = faces_config(**{'num_samples': 50, 'batch_size': 8, **eval_fields})
    manifest = scoring.draw_manifest(config, seed, step=step, keep_images=keep_images, network='custom',
                                     fingerprint={'num_steps': 18})
    return scoring._draw(sample_fn, config, seed, keep_images=keep_images, features_fn=features_fn or StandIn(625),
                         progress_desc='test', directory=directory, manifest=manifest)


def test_a_killed_draw_resumes_at_its_finished_blocks_with_the_same_results(tmp_path, monkeypatch):
    """Killed at its fourth block (three written), a draw started again in the same directory calls
    sample_fn for the four others only, its bar starts at the 24 loaded, and it returns exactly
    what an uninterrupted draw returns (images, pool features, logits)."""
    uninterrupted = resume_draw(None, faces_sampler())
    assert uninterrupted[3] == 0
    calls = []
    with pytest.raises(Killed):
        resume_draw(tmp_path, killed_at(faces_sampler(), 3, calls))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'block_000000000.npz', 'block_000000008.npz', 'block_000000016.npz', 'manifest.json']
    bars = []
    monkeypatch.setattr(scoring, 'tqdm', lambda **kwargs: bars.append(kwargs) or NoBar())
    calls.clear()
    resumed = resume_draw(tmp_path, killed_at(faces_sampler(), None, calls))
    assert calls == [(8, 5 + start) for start in (24, 32, 40, 48)]
    assert resumed[3] == 24 and bars[0]['initial'] == 24 and bars[0]['total'] == 50
    for got, want in zip(resumed[:3], uninterrupted[:3]):
        assert got.shape[0] == 50
        np.testing.assert_array_equal(got, want)
    calls.clear()  # all seven blocks there now: nothing drawn, the same results
    again = resume_draw(tmp_path, killed_at(faces_sampler(), None, calls))
    assert calls == [] and again[3] == 50
    for got, want in zip(again[:3], uninterrupted[:3]):
        np.testing.assert_array_equal(got, want)


class NoBar:
    """A tqdm stand-in that shows nothing."""

    def update(self, n):
        pass

    def close(self):
        pass


@pytest.mark.parametrize('change,field', [({'seed': 6}, 'seed'), ({'step': 4}, 'fingerprint.step'),
                                          ({'keep_images': False}, 'fingerprint.keeps.images'),
                                          ({'batch_size': 10}, 'batch_size')])
def test_a_directory_of_another_draw_is_refused_naming_the_field(tmp_path, change, field):
    with pytest.raises(Killed):
        resume_draw(tmp_path, killed_at(faces_sampler(), 2, []))
    where, field = re.escape(str(tmp_path)), re.escape(field)
    with pytest.raises(ValueError, match=rf'^{where}/manifest\.json was written with {field}=.*this call has '
                                         rf'{field}=.*delete {where}$'):
        resume_draw(tmp_path, no_sampling, **change)
    assert len(list(tmp_path.glob('block_*.npz'))) == 2  # nothing mixed in


def test_stale_temporary_block_files_are_removed_and_a_broken_block_is_named(tmp_path):
    uninterrupted = resume_draw(None, faces_sampler())
    with pytest.raises(Killed):
        resume_draw(tmp_path, killed_at(faces_sampler(), 2, []))
    stale = tmp_path / '.block_000000016.npz.0123abcd.tmp'  # a run killed while writing block 16
    stale.write_bytes(b'half a file')
    calls = []
    resumed = resume_draw(tmp_path, killed_at(faces_sampler(), None, calls))
    assert not stale.exists() and len(calls) == 5
    np.testing.assert_array_equal(resumed[1], uninterrupted[1])
    (tmp_path / 'block_000000008.npz').write_bytes(b'not an npz')
    with pytest.raises(ValueError, match=r'block_000000008\.npz is not a readable \.npz file.*delete it'):
        resume_draw(tmp_path, no_sampling)


def test_an_evaluation_with_blocks_root_resumes_and_removes_its_directories(tmp_path, stand_in):
    """evaluate_samples with blocks_root: one directory per seed set; killed in the second set, the
    evaluation started again draws only the unfinished blocks, reports the figures of an in-memory
    evaluation, hands first_set_fn the same samples, and removes the directories once the JSON is
    written."""
    mu, sigma = metrics.feature_statistics(stand_in(faces())[0])
    scoring.save_reference(tmp_path / 'ref.npz', mu, sigma, features=stand_in(faces()[:60])[0])
    config = faces_config(num_samples=40, batch_size=16, seed_sets=2, ref=str(tmp_path / 'ref.npz'))
    firsts = []
    in_memory = scoring.evaluate_samples(config, faces_sampler(), step=3, first_set_fn=firsts.append, log=Lines())
    root, calls = tmp_path / 'eval', []
    with pytest.raises(Killed):  # set 1's blocks done, set 2's first done, its second killed
        scoring.evaluate_samples(config, killed_at(faces_sampler(), 4, calls), step=3, workdir=tmp_path,
                                 blocks_root=root, fingerprint={'num_steps': 18}, first_set_fn=firsts.append)
    dirs = sorted(root.iterdir())
    assert [d.name.split('_')[:3] for d in dirs] == [['blocks', '00000003', 'seed0'], ['blocks', '00000003', 'seed40']]
    assert [len(list(d.glob('block_*.npz'))) for d in dirs] == [3, 1]
    with np.load(dirs[0] / 'block_000000000.npz') as f:
        assert sorted(f.files) == ['images', 'logits', 'pool']  # set 1's images kept for first_set_fn
    with np.load(dirs[1] / 'block_000000000.npz') as f:
        assert sorted(f.files) == ['logits', 'pool']
    calls.clear()
    log = Lines()
    resumed = scoring.evaluate_samples(config, killed_at(faces_sampler(), None, calls), step=3, workdir=tmp_path,
                                       blocks_root=root, fingerprint={'num_steps': 18}, first_set_fn=firsts.append,
                                       log=log)
    assert calls == [(16, 40 + 16), (16, 40 + 32)]
    assert '; 40 more loaded from the blocks in' in log and '; 16 more loaded from the blocks in' in log
    assert without_times(resumed) == without_times(in_memory)
    np.testing.assert_array_equal(firsts[-1], firsts[0])
    assert firsts[0].shape == (40, 25, 25, 1)
    assert json.loads((tmp_path / 'eval_00000003.json').read_text()) == json.loads(json.dumps(resumed))
    assert list(root.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Two processes (slow): jax.distributed over gloo


TWO_PROCESS_SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import jax, numpy as np
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    process = int(sys.argv[1])
    jax.distributed.initialize(coordinator_address={address!r}, num_processes=2, process_id=process)
    from jaxdiff import scoring
    from test_scoring import StandIn, Killed, faces_config, faces_sampler, digits_config, digits_sampler, killed_at
    out = {{}}
    calls = []
    config = faces_config(num_samples=50, batch_size=8, seed_sets=2, ref={ref!r})
    out['faces'] = scoring.evaluate_samples(config, faces_sampler(calls), step=0, features_fn=StandIn(625))
    out['calls'] = calls
    out['digits'] = scoring.evaluate_samples(digits_config(), digits_sampler(), step=0)
    # Killed (both processes) after 3 and 1 of their 4 blocks of set 1, then resumed: only the
    # place both finished (the first) is loaded; both make the same calls again.
    root, calls = {out!r} + '/blocks', []
    try:
        scoring.evaluate_samples(config, killed_at(faces_sampler(), [3, 1][process], calls), step=0,
                                 features_fn=StandIn(625), blocks_root=root)
    except Killed:
        pass
    calls.clear()
    out['resumed'] = scoring.evaluate_samples(config, faces_sampler(calls), step=0, features_fn=StandIn(625),
                                              blocks_root=root)
    out['resumed_calls'] = calls
    out['blocks_left'] = os.listdir(root)
    config = faces_config(batch_size=16, ref_num_features=50)
    scoring.compute_reference(config, {out!r} + '/ref_two.npz', features_fn=StandIn(625))
    with open({out!r} + f'/process_{{process}}.json', 'w') as f:
        json.dump(out, f)
''')


def digits_config():
    config = edm.get_config()
    config.eval.num_samples, config.eval.batch_size = 40, 16
    return config


def digits_sampler():
    real = data.load_embedded('digits')[0]
    return lambda num, seed: real[np.arange(seed, seed + num) * 7 % len(real)]


def without_times(result):
    """A result less its timings (which differ from run to run)."""
    if isinstance(result, dict):
        return {k: without_times(v) for k, v in result.items() if 'seconds' not in k}
    if isinstance(result, list):
        return [without_times(v) for v in result]
    return result


@pytest.mark.slow
def test_two_processes_score_as_one(tmp_path, coordinator_address, process_runner):
    """Each process samples and featurises its share; the figures (Inception path with the
    stand-in, and the digits) equal one process's; both processes make the same number of
    sample_fn calls, also when a killed draw resumes from their block files; the reference statistics merged across processes equal one process's."""
    net = StandIn(625)
    mu, sigma = metrics.feature_statistics(net(faces())[0])
    scoring.save_reference(tmp_path / 'ref.npz', mu, sigma, features=net(faces()[:40])[0])
    script = TWO_PROCESS_SCRIPT.format(repo=str(REPO), tests=str(REPO / 'tests'), address=coordinator_address,
                                       ref=str(tmp_path / 'ref.npz'), out=str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    process_runner([([sys.executable, '-c', script, str(i)], env) for i in range(2)], cwd=REPO, timeout=300)
    results = [json.loads((tmp_path / f'process_{i}.json').read_text()) for i in range(2)]
    # One process, here: the same figures.
    config = faces_config(num_samples=50, batch_size=8, seed_sets=2, ref=str(tmp_path / 'ref.npz'))
    one = json.loads(json.dumps(scoring.evaluate_samples(config, faces_sampler(), step=0, features_fn=StandIn(625))))
    digits_one = json.loads(json.dumps(scoring.evaluate_samples(digits_config(), digits_sampler(), step=0)))
    for result in results:
        assert without_times(result['faces']) == without_times(one)
        assert without_times(result['digits']) == without_times(digits_one)
    # 7 blocks of 8 per set: process 0 blocks 0-3, process 1 blocks 4-7 (block 7 past the set).
    assert results[0]['calls'] == [[8, s + 8 * b] for s in (0, 50) for b in range(4)]
    assert results[1]['calls'] == [[8, s + 8 * b] for s in (0, 50) for b in range(4, 8)]
    for result in results:  # a killed two-process evaluation resumed: the same figures
        assert without_times(result['resumed']) == without_times(one) and result['blocks_left'] == []
    assert results[0]['resumed_calls'] == [[8, 8 * b] for b in (1, 2, 3)] + [[8, 50 + 8 * b] for b in range(4)]
    assert results[1]['resumed_calls'] == [[8, 8 * b] for b in (5, 6, 7)] + [[8, 50 + 8 * b] for b in range(4, 8)]
    config = faces_config(batch_size=16, ref_num_features=50)
    scoring.compute_reference(config, tmp_path / 'ref_one.npz', features_fn=StandIn(625))
    two, single = scoring.load_reference(tmp_path / 'ref_two.npz'), scoring.load_reference(tmp_path / 'ref_one.npz')
    np.testing.assert_allclose(two.mu, single.mu, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(two.sigma, single.sigma, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(two.features, single.features)
    assert two.meta == single.meta
