"""Losses against NVlabs/edm: with EDM's draws injected and its recorded denoiser output fed back,
our losses must derive the same sigma and noisy input and return the same per-element loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses
from jaxdiff import precond as pc

EDM_NETS = ('ddpmpp', 'ncsnpp', 'adm', 'ddpmpp_cond', 'adm_cond')  # adm_iddpm has no loss refs.
LOSSES = {'EDMLoss': (losses.edm_loss, 'rnd_normal'), 'VPLoss': (losses.vp_loss, 'rnd_uniform'),
          'VELoss': (losses.ve_loss, 'rnd_uniform')}


def relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def check_loss(ref, precision, name):
    dtype = np.float32 if precision == 'f32' else np.float64
    loss_fn, draw_name = LOSSES[name]
    seen = {}

    def recorded_denoiser(x, sigma, labels=None, augment_labels=None):
        seen.update(noisy=x, sigma=sigma, labels=labels)
        return jnp.asarray(ref.nhwc(f'{precision}/loss/{name}/D_yn'), x.dtype)

    labels = ref['inputs/class_labels'].astype(dtype) if 'inputs/class_labels' in ref else None
    draw = jnp.asarray(ref[f'loss_inputs/{draw_name}'], dtype)
    loss = loss_fn(recorded_denoiser, jnp.asarray(ref.nhwc('loss_inputs/images'), dtype), None, labels,
                   noise=jnp.asarray(ref.nhwc('loss_inputs/noise'), dtype), **{draw_name: draw})
    assert loss.dtype == dtype and loss.shape == ref.nhwc('loss_inputs/images').shape
    if labels is not None:
        np.testing.assert_array_equal(seen['labels'], labels)
    return {
        'sigma': relative_error(seen['sigma'], ref[f'{precision}/loss/{name}/sigma']),
        'noisy': relative_error(seen['noisy'], ref.nhwc(f'{precision}/loss/{name}/noisy')),
        'loss': relative_error(loss, ref.nhwc(f'{precision}/loss/{name}/loss')),
        'loss_sum': abs(float(np.asarray(loss, np.float64).sum()) / float(ref[f'{precision}/loss/{name}/loss_sum']) - 1),
    }


def recorded_losses(ref):
    return sorted({k.split('/')[2] for k in ref.keys('f32/loss/')})


@pytest.mark.parametrize('net', EDM_NETS)
def test_losses_match_edm_float32(edm_refs, net):
    ref = edm_refs(net)
    names = recorded_losses(ref)
    assert names, 'no recorded losses'
    for name in names:
        errors = check_loss(ref, 'f32', name)
        assert max(errors.values()) <= 1e-5, (name, errors)


@pytest.mark.parametrize('net', EDM_NETS)
def test_losses_match_edm_float64(edm_refs, net):
    ref = edm_refs(net)
    with jax.enable_x64(True):
        for name in recorded_losses(ref):
            errors = check_loss(ref, 'f64', name)
            assert max(errors.values()) <= 1e-12, (name, errors)


def test_edm_loss_draws_log_normal_sigma():
    """ln sigma ~ N(P_mean, P_std^2): with D = y + n/2 the loss is weight * sigma^2 n^2 / 4,
    so the drawn sigma is recoverable and its log-moments checkable (20k draws, 4 sigma bounds)."""
    seen = {}

    def denoiser(x, sigma, labels=None, augment_labels=None):
        seen['sigma'] = sigma
        return x

    images = jnp.zeros((20000, 1, 1, 1))
    losses.edm_loss(denoiser, images, jax.random.key(0), P_mean=-1.2, P_std=1.2)
    log_sigma = np.log(np.asarray(seen['sigma']))
    assert abs(log_sigma.mean() + 1.2) < 4 * 1.2 / np.sqrt(20000)
    assert abs(log_sigma.std() - 1.2) < 4 * 1.2 / np.sqrt(2 * 20000)


def test_edm_loss_of_ideal_gaussian_denoiser_has_expected_value():
    """For y ~ N(0, sd^2) the ideal denoiser's error variance at sigma is sd^2 sigma^2/(sd^2+sigma^2),
    so EDM's weight makes the expected loss exactly 1 per element at every sigma."""
    sd = 0.5
    images = sd * jax.random.normal(jax.random.key(1), (4096, 2, 2, 1))

    def ideal(x, sigma, labels=None, augment_labels=None):
        return x * sd ** 2 / (sd ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2)

    loss = losses.edm_loss(ideal, images, jax.random.key(2), sigma_data=sd)
    assert abs(float(loss.mean()) - 1.0) < 4 * np.sqrt(2 / loss.size)


def test_vp_and_ve_losses_draw_sigma_in_range():
    seen = []
    denoiser = lambda x, sigma, labels=None, augment_labels=None: seen.append(sigma) or x
    images = jnp.zeros((5000, 1, 1, 1))
    losses.ve_loss(denoiser, images, jax.random.key(0), sigma_min=0.02, sigma_max=100.0)
    losses.vp_loss(denoiser, images, jax.random.key(0))
    ve, vp = np.asarray(seen[0]), np.asarray(seen[1])
    assert ve.min() >= 0.02 and ve.max() <= 100.0
    assert abs(np.log(ve).mean() - (np.log(0.02) + np.log(100.0)) / 2) < 0.1
    assert vp.min() >= pc.VPPrecond().sigma_min * 0.99 and vp.max() <= pc.VPPrecond().sigma_max * 1.01


def test_loss_needs_key_or_draws():
    with pytest.raises(ValueError, match='key'):
        losses.edm_loss(lambda x, s, l=None, a=None: x, jnp.zeros((2, 1, 1, 1)))


def test_loss_jits_and_differentiates():
    params = {'a': jnp.float32(0.3)}

    def total(params, images, key):
        denoise = pc.denoiser_from_fn(lambda p, x, c, y, a: p['a'] * x, params)
        return losses.edm_loss(denoise, images, key).mean()

    images = jax.random.normal(jax.random.key(0), (8, 4, 4, 1)) * 0.5
    value, grads = jax.jit(jax.value_and_grad(total))(params, images, jax.random.key(1))
    assert np.isfinite(value) and np.isfinite(grads['a']) and grads['a'] != 0
