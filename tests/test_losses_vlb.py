"""iDDPM's hybrid loss (`losses.diffusion_loss(vlb_weight=0.001)`, `losses.vlb_term`) against
openai/improved-diffusion's `training_losses` (learned range, RESCALED_MSE), recorded in float64 by
tests/data/make_iddpm_refs.py, and its properties: the stop-gradient on the mean, the decoder at
n = 1 against a direct scipy integral, and its errors.

Tolerances: both sides are float64 evaluations of the same formulas arranged differently; the
largest factor on rounding is exp(-log_var) <= 1 / beta_1 ~ 1e4 (cosine), so rtol 1e-10. Against
improved-diffusion as it is ('approx_cdf', its tanh approximation of the normal CDF, off by up to
1.8e-4 in probability) only the n = 1 decoder differs: the bin masses here are 1e-2..1, so each
element's log-probability moves by up to ~4e-4 / mass; measured 0.62% on the per-image mean,
checked at 1e-2, with the KL rows still at 1e-10.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdiff import losses, parameterize, processes

REF = np.load(pathlib.Path(__file__).parent / 'data' / 'gaussian' / 'iddpm_hybrid.npz')
CASES = {'cosine_T100': ('cosine', 100), 'linear_T1000': ('linear', 1000)}


def _hybrid(name, vlb_weight=0.001):
    betas, T = CASES[name]
    process = processes.GaussianProcess(processes.Discrete(betas, T))
    output = jnp.asarray(REF['inputs/model_output'])
    model = parameterize.model_from_fn(lambda p, z, *args: output, process, 'eps', learned_variance=True)
    t = (REF[f'{name}/t_index'] + 1) / T
    loss = losses.diffusion_loss(model, jnp.asarray(REF['inputs/x_start']), process=process, target='eps',
                                 vlb_weight=vlb_weight, t=jnp.asarray(t), noise=jnp.asarray(REF['inputs/noise']))
    return np.asarray(loss).mean(axis=(1, 2, 3))  # iDDPM's mean_flat


@pytest.mark.parametrize('name', list(CASES))
def test_hybrid_loss_matches_improved_diffusion_with_the_exact_cdf(name):
    with jax.enable_x64(True):
        total, simple = _hybrid(name), _hybrid(name, 0.0)
    np.testing.assert_allclose(simple, REF[f'{name}/exact_cdf/mse'], rtol=1e-10)
    np.testing.assert_allclose(total - simple, REF[f'{name}/exact_cdf/vb'], rtol=1e-10)
    np.testing.assert_allclose(total, REF[f'{name}/exact_cdf/loss'], rtol=1e-10)


@pytest.mark.parametrize('name', list(CASES))
def test_hybrid_loss_matches_improved_diffusion_as_it_is(name):
    with jax.enable_x64(True):
        vb = _hybrid(name) - _hybrid(name, 0.0)
    expected = REF[f'{name}/approx_cdf/vb']
    decoder = REF[f'{name}/t_index'] == 0
    np.testing.assert_allclose(vb[~decoder], expected[~decoder], rtol=1e-10)
    np.testing.assert_allclose(vb[decoder], expected[decoder], rtol=1e-2)


def test_decoder_is_the_gaussian_mass_of_the_pixel_bin():
    """-log of N(mean, s^2) integrated over [x - 1/255, x + 1/255], the end bins open (scipy, float64)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, 200) / 127.5 - 1
    x[:2] = -1, 1
    mean, log_scale = x + 0.02 * rng.standard_normal(200), rng.uniform(-6, -2, 200)
    with jax.enable_x64(True):
        nll = np.asarray(losses.discretized_gaussian_nll(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_scale)))
    scale = np.exp(log_scale)
    upper = np.where(x > 0.999, 1.0, scipy.stats.norm.cdf(x + 1 / 255, mean, scale))
    lower = np.where(x < -0.999, 0.0, scipy.stats.norm.cdf(x - 1 / 255, mean, scale))
    np.testing.assert_allclose(nll, -np.log(np.maximum(upper - lower, 1e-12)), rtol=1e-9)


def test_vlb_term_trains_only_the_variance():
    """iDDPM's stop-gradient: the hybrid loss's gradient on the eps channels is L_simple's; on the
    variance channels it is not zero."""
    process = processes.GaussianProcess(processes.Discrete('cosine', 100))
    images = jnp.asarray(REF['inputs/x_start'], jnp.float32)
    noise = jnp.asarray(REF['inputs/noise'], jnp.float32)
    t = jnp.asarray((REF['cosine_T100/t_index'] + 1) / 100, jnp.float32)

    def objective(output, vlb_weight):
        model = parameterize.model_from_fn(lambda p, z, *args: p, process, 'eps', params=output, learned_variance=True)
        return losses.diffusion_loss(model, images, process=process, vlb_weight=vlb_weight, t=t, noise=noise).sum()

    output = jnp.asarray(REF['inputs/model_output'], jnp.float32)
    hybrid, simple = jax.grad(objective)(output, 0.001), jax.grad(objective)(output, 0.0)
    # Two compiled programs (the hybrid one adds a term whose gradient here is exactly zero):
    # equal up to float32 reassociation of the same sums, rtol 1e-6.
    np.testing.assert_allclose(hybrid[..., :3], simple[..., :3], rtol=1e-6, atol=1e-7 * np.abs(simple).max())
    assert np.all(simple[..., 3:] == 0) and np.abs(hybrid[..., 3:]).min() > 0


def test_vlb_needs_a_discrete_gaussian_process_and_learned_variance():
    with pytest.raises(ValueError, match='learned_variance'):
        losses.check_vlb(processes.GaussianProcess(processes.Discrete('cosine', 100)), False)
    with pytest.raises(ValueError, match="schedule='discrete'"):
        losses.check_vlb(processes.GaussianProcess(processes.Cosine()), True)
