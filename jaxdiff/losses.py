"""Denoising score-matching losses of EDM (Karras et al. 2022, Table 1 and eq. 8).

All three have the same shape: draw a noise level per image, corrupt y with n ~ N(0, sigma^2 I),
and weight the squared denoising error:

    loss = lambda(sigma) * (D(y + n; sigma) - y)^2          (per element, not reduced)

They differ only in how sigma is drawn and weighted. Each is a pure function of
(denoiser, images, key); the random draws can also be passed in (`rnd_normal`/`rnd_uniform`
and `noise`, unit normal), which is how tests feed NVlabs/edm's exact draws.
Images are NHWC; sigma has shape [N, 1, 1, 1].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff import schedules


def denoising_loss(denoise, images, sigma, noise, weight, labels=None, augment_labels=None):
    """weight * (D(y + sigma * noise; sigma) - y)^2, per element."""
    denoised = denoise(images + noise * sigma, sigma.reshape(-1), labels, augment_labels)
    return weight * jnp.square(denoised - images)


def _draws(key, images, draw, noise, sample):
    """The sigma draw ([N,1,1,1]) and the unit noise, from `key` unless given."""
    if key is None and (draw is None or noise is None):
        raise ValueError('pass a key, or both the sigma draw and the noise')
    key_sigma, key_noise = jax.random.split(key) if key is not None else (None, None)
    shape = (images.shape[0],) + (1,) * (images.ndim - 1)
    draw = sample(key_sigma, shape, images.dtype) if draw is None else jnp.asarray(draw, images.dtype).reshape(shape)
    noise = jax.random.normal(key_noise, images.shape, images.dtype) if noise is None else noise
    return draw, noise


def edm_loss_weight(sigma, sigma_data: float = 0.5):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM eq. 8 with Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def edm_loss(denoise, images, key=None, labels=None, augment_labels=None, *, P_mean: float = -1.2,
             P_std: float = 1.2, sigma_data: float = 0.5, rnd_normal=None, noise=None):
    """EDM: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2."""
    rnd_normal, noise = _draws(key, images, rnd_normal, noise, jax.random.normal)
    sigma = jnp.exp(rnd_normal * P_std + P_mean)
    return denoising_loss(denoise, images, sigma, noise, edm_loss_weight(sigma, sigma_data), labels, augment_labels)


def vp_loss(denoise, images, key=None, labels=None, augment_labels=None, *, beta_d: float = 19.9,
            beta_min: float = 0.1, epsilon_t: float = 1e-5, rnd_uniform=None, noise=None):
    """VP: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2."""
    rnd_uniform, noise = _draws(key, images, rnd_uniform, noise, jax.random.uniform)
    sigma = schedules.vp_sigma(1 + rnd_uniform * (epsilon_t - 1), beta_d, beta_min)
    return denoising_loss(denoise, images, sigma, noise, 1 / sigma ** 2, labels, augment_labels)


def ve_loss(denoise, images, key=None, labels=None, augment_labels=None, *, sigma_min: float = 0.02,
            sigma_max: float = 100.0, rnd_uniform=None, noise=None):
    """VE: ln sigma ~ U(ln sigma_min, ln sigma_max), weight 1 / sigma^2."""
    rnd_uniform, noise = _draws(key, images, rnd_uniform, noise, jax.random.uniform)
    sigma = sigma_min * (sigma_max / sigma_min) ** rnd_uniform
    return denoising_loss(denoise, images, sigma, noise, 1 / sigma ** 2, labels, augment_labels)


TARGETS = ('eps', 'x0', 'v')


def draw_times(key, process, n, dtype=jnp.float32):
    """Training times: uniform on [t_min, t_max]; for a Discrete (DDPM) schedule the step n ~ U{1..T}, t = n / T."""
    schedule = process.schedule
    if hasattr(schedule, 'T'):
        return (jax.random.randint(key, (n,), 1, schedule.T + 1) / schedule.T).astype(dtype)
    return process.t_min + (process.t_max - process.t_min) * jax.random.uniform(key, (n,), dtype)


def diffusion_loss(model, images, key=None, labels=None, *, process, target: str = 'eps', t=None, noise=None):
    """The denoising loss of a model on any process, per element (DDPM's L_simple for 'eps'):

        t ~ `draw_times`,  z_t = process.diffuse(x, t, eps),  (x0_hat, eps_hat) = model(z_t, t),
        'eps': (eps_hat - eps)^2,  'x0': (x0_hat - x)^2,
        'v':   (v_hat - v)^2 with v = alpha eps - sigma x per basis coefficient (Salimans & Ho 2022).

    The target is independent of the network's output type: a v-output network trained on
    'eps' is fine. With `target='eps'` this is score-SDE's denoising score matching with
    lambda(t) = sigma_t^2 (score = -eps / sigma), and Ho et al.'s L_simple. `t` ([N]) and `noise`
    (unit normal, images' shape) may be passed instead of drawn.
    """
    if target not in TARGETS:
        raise ValueError(f'loss.type must be one of {TARGETS}, got {target!r}')
    if key is None and (t is None or noise is None):
        raise ValueError('pass a key, or both t and noise')
    key_t, key_noise = jax.random.split(key) if key is not None else (None, None)
    t = draw_times(key_t, process, images.shape[0], images.dtype) if t is None else jnp.asarray(t, images.dtype).reshape(-1)
    noise = jax.random.normal(key_noise, images.shape, images.dtype) if noise is None else noise
    prediction = model(process.diffuse(images, t, noise), t, labels)
    if target == 'eps':
        return jnp.square(prediction.eps - noise)
    if target == 'x0':
        return jnp.square(prediction.x0 - images)
    alpha, sigma = process.scale_sigma(t, images.shape, images.dtype)
    basis = process.to_basis
    return jnp.square(process.from_basis(alpha * basis(prediction.eps - noise) - sigma * basis(prediction.x0 - images)))
