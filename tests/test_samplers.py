"""Samplers: closed-form checks with the ideal Gaussian denoiser, compilation and reproducibility.
The comparison with NVlabs/edm's recorded sampler runs is in test_samplers_edm.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import precond, samplers, schedules
from jaxdiff.samplers import driver, steps
from jaxdiff.analytic import GaussianDenoiser

SHAPE = (2, 2, 3)  # 12-dimensional "images"


def edm_table(cfg, sigma_min=0.0, sigma_max=float('inf')):
    """The float64 step table of `cfg` for an EDM denoiser supporting [sigma_min, sigma_max]."""
    zero = precond.denoiser_from_fn(lambda params, x, *args: x * 0,
                                    precond=precond.EDMPrecond(sigma_min=sigma_min, sigma_max=sigma_max))
    model, process = samplers.bind(zero)
    table, _, _ = driver.build_table(cfg, model, process, (1,) + SHAPE)
    return table


def gaussian(seed=0):
    rng = np.random.default_rng(seed)
    d = int(np.prod(SHAPE))
    a = rng.normal(size=(d, d)) * 0.3
    cov = a @ a.T + 0.05 * np.eye(d)
    mean = rng.normal(size=SHAPE) * 0.5
    return mean, cov


def moments_error(x, mean, cov):
    """(max |mean error| / sqrt(max var), max |cov error| / max var) of the samples."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    scale = np.abs(cov).max()
    return (np.abs(x.mean(0) - mean.reshape(-1)).max() / np.sqrt(scale),
            np.abs(np.cov(x.T) - cov).max() / scale)


def heun_gain_1d(sampler, variance):
    """Independent float64 scalar implementation of deterministic EDM Heun (sigma = t, s = 1) for
    1-D N(0, v) data, where D(x; s) = v x / (v + s^2): returns x_N / latent."""
    t = np.append(schedules.edm_sigma_steps(sampler.num_steps, sampler.sigma_min, sampler.sigma_max, sampler.rho), 0)
    x = t[0]
    denoise = lambda x, s: variance / (variance + s * s) * x
    for i in range(sampler.num_steps):
        d = (x - denoise(x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if i < sampler.num_steps - 1:
            d_prime = (x_next - denoise(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * 0.5 * (d + d_prime)
        x = x_next
    return x


def test_heun_sampler_is_the_exact_discrete_map_for_gaussian_data():
    """The ideal denoiser is linear, so 18-step Heun maps latents through a fixed linear map: per
    eigendirection of C it scales by the scalar Heun recursion's gain (zero-mean data). Checked in
    float64 to 1e-10; this also pins down the 7-15% variance inflation of 18 steps here."""
    _, cov = gaussian()
    eigvals, eigvecs = np.linalg.eigh(cov)
    cfg = samplers.edm_sampler()
    with jax.enable_x64(True):
        denoise = GaussianDenoiser.create(jnp.zeros(SHAPE), jnp.asarray(cov))
        latents = jnp.asarray(eigvecs.T.reshape(12, *SHAPE))  # one eigenvector per sample
        out = np.asarray(samplers.sample(cfg, denoise, latents)).reshape(12, -1)
    gains = np.einsum('nd,nd->n', out, eigvecs.T)
    expected = np.array([heun_gain_1d(cfg, v) for v in eigvals])
    np.testing.assert_allclose(gains, expected, rtol=1e-10)


@pytest.mark.parametrize('cfg', [
    samplers.edm_sampler(num_steps=128),
    samplers.edm_sampler(num_steps=128, S_churn=40, S_min=0.05, S_max=50, S_noise=1.0),
    samplers.Sampler(num_steps=128, solver='euler', discretization='vp', schedule='vp', scaling='vp'),
    samplers.Sampler(num_steps=256, solver='heun', discretization='ve', schedule='ve', scaling='none'),
], ids=['edm_det', 'edm_churn', 'vp_euler', 've_heun'])
def test_sampler_reproduces_gaussian_mean_and_covariance(cfg):
    """20k samples of a 12-d Gaussian: the mean within 0.04 sqrt(max var) and the covariance within
    0.05 max var (the Monte-Carlo errors are about 0.007 and 0.01; discretisation is below that
    at these step counts: 18-step Heun inflates the variance by 7-15% here, see the test above,
    and the VE schedule needs ~256 steps, as EDM's Fig. 3 leads one to expect)."""
    mean, cov = gaussian()
    denoise = GaussianDenoiser.create(jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32))
    keys = samplers.keys_from_seeds(np.arange(20000))
    x = samplers.sample(cfg, denoise, samplers.latents_from_keys(keys, SHAPE), keys)
    mean_error, cov_error = moments_error(x, mean, cov)
    assert mean_error < 0.04 and cov_error < 0.05, (mean_error, cov_error)


def test_heun_uses_2n_minus_1_denoiser_calls():
    calls = []

    def counting(x, sigma, labels=None, augment_labels=None):
        calls.append(1)
        return jnp.zeros_like(x)

    # lax.scan traces its body once; count calls per trace instead by running un-jitted steps.
    cfg = samplers.edm_sampler(num_steps=5)
    table = edm_table(cfg)
    x = jnp.ones((1,) + SHAPE)
    denoise = lambda x, point: (counting(x, point.sigma), None)
    for i in range(cfg.num_steps):
        row = jax.tree.map(lambda c: c[i], table)
        x = steps.edm_step(denoise, x, row, jnp.zeros((1,)), second_order=i < cfg.num_steps - 1)
    assert len(calls) == 2 * 5 - 1 == cfg.num_evals


def test_sample_compiles_once_per_shape():
    mean, cov = gaussian()
    denoise = GaussianDenoiser.create(jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32))
    cfg = samplers.edm_sampler(num_steps=6, S_churn=10)
    keys = samplers.keys_from_seeds(np.arange(4))
    lat = samplers.latents_from_keys(keys, SHAPE)
    samplers.sample(cfg, denoise, lat, keys)
    before = driver._run._cache_size()
    other = GaussianDenoiser.create(jnp.asarray(mean + 1, jnp.float32), jnp.asarray(cov, jnp.float32))
    samplers.sample(cfg, other, lat + 1, samplers.keys_from_seeds(np.arange(4, 8)))
    assert driver._run._cache_size() == before
    # The step constants are data: another noise range or discretisation reuses the compilation.
    retimed = samplers.Sampler(num_steps=6, S_churn=20, sigma_max=20.0, discretization='vp')
    samplers.sample(retimed, denoise, lat, keys)
    assert driver._run._cache_size() == before
    samplers.sample(cfg, denoise, jnp.concatenate([lat, lat]), samplers.keys_from_seeds(np.arange(8)))
    assert driver._run._cache_size() == before + 1


def test_sample_noise_depends_only_on_its_own_seed():
    # A batch of 4 and a batch of 3 are two compiled programs: XLA may vectorise and fuse them
    # differently, so float32 results may differ by rounding (seen: 6e-6 relative after 15 churned
    # evaluations on an AVX2 CPU). In float64 that rounding is ~1e-15 relative, while a sample that
    # drew another seed's noise would differ by O(1): rtol 1e-10 separates the two on any CPU.
    mean, cov = gaussian()
    cfg = samplers.edm_sampler(num_steps=8, S_churn=40)
    seeds_a, seeds_b = np.array([3, 7, 11, 5]), np.array([11, 100, 3])
    out = {}
    with jax.enable_x64(True):
        denoise = GaussianDenoiser.create(jnp.asarray(mean), jnp.asarray(cov))
        for seeds in (seeds_a, seeds_b):
            keys = samplers.keys_from_seeds(seeds)
            x = samplers.sample(cfg, denoise, samplers.latents_from_keys(keys, SHAPE, jnp.float64), keys)
            assert x.dtype == jnp.float64
            out.update({(int(s), len(seeds)): np.asarray(x[i]) for i, s in enumerate(seeds)})
    np.testing.assert_allclose(out[(11, 4)], out[(11, 3)], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out[(3, 4)], out[(3, 3)], rtol=1e-10, atol=1e-12)
    assert not np.allclose(out[(3, 4)], out[(7, 4)], rtol=1e-3)


def test_injected_step_noise_reproduces_keyed_run_and_trajectory_starts_at_latents():
    # In float64, so the two compiled programs agree to rounding (float32 differs by ~1e-4 after
    # 11 churned evaluations of differently fused arithmetic).
    mean, cov = gaussian()
    cfg = samplers.edm_sampler(num_steps=6, S_churn=40)
    with jax.enable_x64(True):
        denoise = GaussianDenoiser.create(jnp.asarray(mean), jnp.asarray(cov))
        keys = samplers.keys_from_seeds(np.arange(3))
        lat = samplers.latents_from_keys(keys, SHAPE, jnp.float64)
        noise = jnp.stack([samplers.step_noise_from_keys(keys, i, SHAPE, jnp.float64) [0] for i in range(6)])
        keyed, traj = samplers.sample(cfg, denoise, lat, keys, return_trajectory=True)
        injected = samplers.sample(cfg, denoise, lat, step_noise=noise)
        zero_noise = samplers.sample(cfg, denoise, lat, step_noise=jnp.zeros_like(noise))
    np.testing.assert_allclose(keyed, injected, rtol=1e-12, atol=1e-12)
    assert not np.allclose(keyed, zero_noise)
    assert traj.shape == (6,) + lat.shape
    np.testing.assert_allclose(traj[0], np.asarray(lat) * 80.0, rtol=1e-12)


def test_stochastic_sampler_without_noise_source_is_an_error():
    denoise = lambda x, sigma, labels=None, augment_labels=None: x * 0
    with pytest.raises(ValueError, match='key or step_noise'):
        samplers.sample(samplers.edm_sampler(num_steps=4, S_churn=5), denoise, jnp.ones((1, 2, 2, 1)))


@pytest.mark.parametrize('cfg', [
    samplers.Sampler(num_steps=256, solver='euler', discretization='vp', schedule='vp', scaling='vp'),
    samplers.Sampler(num_steps=13, solver='heun', discretization='edm', schedule='vp', scaling='vp'),
], ids=['readme_vp_euler', 'edm_heun_vp_schedule'])
def test_deterministic_sampler_adds_no_noise_and_needs_no_key(cfg):
    """With S_churn = 0 the schedule 'vp' round trip sigma(sigma_inv(sigma)) left noise scales of
    2e-10..4e-8 in the step table, so sample() asked for a key: a deterministic sampler adds
    exactly zero noise."""
    table = edm_table(cfg)
    assert np.all(table.noise_scale == 0.0)
    mean, cov = gaussian()
    denoise = GaussianDenoiser.create(jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32))
    x = samplers.sample(cfg, denoise, samplers.latents_from_keys(samplers.keys_from_seeds(np.arange(4)), SHAPE))
    assert np.isfinite(np.asarray(x)).all()
    churned = edm_table(dataclasses.replace(cfg, S_churn=10.0))
    assert np.all(churned.noise_scale > 0)  # where gamma > 0 the noise is still there


@pytest.mark.parametrize('field,value', [('solver', 'rk4'), ('discretization', 'cosine'),
                                         ('schedule', 'exp'), ('scaling', 'sub-vp'), ('num_steps', 1),
                                         ('heun_point', 0.0), ('eta', 2.0), ('variance', 'learned'),
                                         ('spacing', 'even')])
def test_bad_sampler_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        samplers.Sampler(**{field: value})


def test_sigma_range_is_clamped_to_the_denoiser():
    table = edm_table(samplers.edm_sampler(num_steps=5), sigma_min=0.02, sigma_max=10.0)
    assert table.at_hat.sigma[0].squeeze() == pytest.approx(10.0)
    assert table.at_hat.sigma[-1].squeeze() == pytest.approx(0.02)
    assert table.h[-1] == pytest.approx(-0.02)  # the last step goes to sigma = 0
