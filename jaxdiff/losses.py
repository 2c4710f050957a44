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

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import processes, schedules


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


def multiscale_scales(resolution: int, lowest: int) -> tuple[int, ...]:
    """(lowest, 2 lowest, 4 lowest, ..., resolution), or a ValueError naming `loss.multiscale_lowest`."""
    if lowest < 1 or resolution % lowest or (resolution // lowest) & (resolution // lowest - 1):
        raise ValueError(f'loss.multiscale_lowest={lowest} must be the image size {resolution} divided by a '
                         'power of two')
    scales = [resolution]
    while scales[-1] > lowest:
        scales.append(scales[-1] // 2)
    return tuple(reversed(scales))


def multiscale_square_error(error, lowest: int):
    """Simple diffusion's multiscale loss (Hoogeboom, Heek & Salimans 2023, "Multiscale training loss"),
    per element: with D^s the average pooling of a d x d image to s x s,

        L^s = mean over pixels and channels of (D^s[error])^2,   L = sum_{s in {lowest, 2 lowest, ..., d}} (d / s) L^s.

    The paper weights L^s by 1/s; the factor d here makes the full-resolution term's weight 1, so with
    lowest = d this is the plain squared error. Pooling is linear, so D^s[eps] - D^s[eps_hat] =
    D^s[error]. Returned as a [N, d, d, C] array whose mean over the image is L: each scale's squared
    pooled error repeated over its s x s blocks (nearest upsampling keeps the mean) and weighted."""
    n, height, width, channels = error.shape
    if height != width:
        raise ValueError(f'the multiscale loss needs square images, got {height}x{width}')
    total = 0
    for s in multiscale_scales(height, lowest):
        k = height // s
        pooled = error.reshape(n, s, k, s, k, channels).mean(axis=(2, 4))
        total = total + (height / s) * jnp.repeat(jnp.repeat(jnp.square(pooled), k, axis=1), k, axis=2)
    return total


def min_snr_weight(logsnr, target: str, gamma: float):
    """Min-SNR-gamma (Hang et al. 2023, eq. 7): weight the x0 error by min(SNR, gamma), which on a
    variance-preserving process is min(SNR, gamma) / SNR on the eps loss and min(SNR, gamma) / (SNR + 1)
    on the v loss (SNR = exp(logsnr)); denoising-diffusion-pytorch's simple_diffusion weights so."""
    snr = jnp.exp(logsnr)
    clipped = jnp.minimum(snr, gamma)
    return {'eps': clipped / snr, 'v': clipped / (snr + 1), 'x0': clipped}[target]


def sigmoid_weight(logsnr, dlogsnr_dt, bias: float):
    """The sigmoid weighting of Kingma & Gao 2023 (VDM++, their sec. 5 and Fig. 3) that SiD2
    (Hoogeboom et al. 2024) trains with, as a factor on the eps loss at t ~ U(0, 1):

        w(t) = sigmoid(b - lambda_t) * (-d lambda / dt),

    i.e. the weighted loss (1/2) E_t[w(lambda) (-d lambda/dt) ||eps_hat - eps||^2] of VDM++'s eq. 8
    without the 1/2. The -d lambda/dt factor turns the uniform t into a uniform lambda (the
    loss is an integral over logSNR, independent of the schedule); sigmoid(b - lambda) ~ 1 at low
    SNR and ~ e^(b - lambda) at high SNR (there it is the x0 loss), the bias b setting where it
    turns. Where the schedule clips lambda (d lambda/dt = 0) the weight is 0."""
    return jax.nn.sigmoid(bias - logsnr) * -dlogsnr_dt


def diffusion_loss(model, images, key=None, labels=None, *, process, target: str = 'eps', vlb_weight: float = 0.0,
                   multiscale_lowest: int = 0, min_snr_gamma: float = 0.0, sigmoid_bias: float | None = None,
                   t=None, noise=None):
    """The denoising loss of a model on any process, per element (DDPM's L_simple for 'eps'):

        t ~ `draw_times`,  z_t = process.diffuse(x, t, eps),  (x0_hat, eps_hat) = model(z_t, t),
        'eps': (eps_hat - eps)^2,  'x0': (x0_hat - x)^2,
        'v':   (v_hat - v)^2 with v = alpha eps - sigma x per basis coefficient (Salimans & Ho 2022).

    The target is independent of the network's output type: a v-output network trained on
    'eps' is fine. With `target='eps'` this is score-SDE's denoising score matching with
    lambda(t) = sigma_t^2 (score = -eps / sigma), and Ho et al.'s L_simple. `multiscale_lowest` > 0
    squares the error at every scale from that size up to the image's (`multiscale_square_error`,
    simple diffusion's multiscale loss; the error is taken in pixel space). `min_snr_gamma` > 0 weights
    by Min-SNR-gamma (Hang et al. 2023; `min_snr_weight`); `sigmoid_bias` b (not None) by
    VDM++/SiD2's sigmoid(b - lambda) (-d lambda / dt) (`sigmoid_weight`, eps target). `vlb_weight` > 0 adds
    iDDPM's hybrid term (`vlb_term`, learned variance on a Discrete schedule):
    loss + vlb_weight * T * L_t / ln 2, which is iDDPM's L_simple + 0.001 L_vlb for 0.001.
    `t` ([N]) and `noise` (unit normal, images' shape) may be passed instead of drawn.
    """
    if target not in TARGETS:
        raise ValueError(f'loss.type must be one of {TARGETS}, got {target!r}')
    if key is None and (t is None or noise is None):
        raise ValueError('pass a key, or both t and noise')
    key_t, key_noise = jax.random.split(key) if key is not None else (None, None)
    t = draw_times(key_t, process, images.shape[0], images.dtype) if t is None else jnp.asarray(t, images.dtype).reshape(-1)
    noise = jax.random.normal(key_noise, images.shape, images.dtype) if noise is None else noise
    z = process.diffuse(images, t, noise)
    prediction = model(z, t, labels)
    if target == 'eps':
        error = prediction.eps - noise
    elif target == 'x0':
        error = prediction.x0 - images
    else:
        alpha, sigma = process.scale_sigma(t, images.shape, images.dtype)
        basis = process.to_basis
        error = process.from_basis(alpha * basis(prediction.eps - noise) - sigma * basis(prediction.x0 - images))
    loss = multiscale_square_error(error, multiscale_lowest) if multiscale_lowest else jnp.square(error)
    if min_snr_gamma:
        loss = loss * min_snr_weight(process.logsnr(t, images.shape, images.dtype), target, min_snr_gamma)
    if sigmoid_bias is not None:
        logsnr, dlogsnr_dt = jax.jvp(lambda t: process.logsnr(t, images.shape, images.dtype), (t,), (jnp.ones_like(t),))
        loss = loss * sigmoid_weight(logsnr, dlogsnr_dt, sigmoid_bias)
    if vlb_weight:
        T = check_vlb(process, prediction.variance_fraction is not None)
        loss = loss + (vlb_weight * T / math.log(2)) * vlb_term(process.schedule, prediction, images, z, t)
    return loss


# ---------------------------------------------------------------------------------------------
# iDDPM's variational bound term (Nichol & Dhariwal 2021, Sec. 3.1; Ho et al. 2020, eq. 5).

def check_vlb(process, learned_variance: bool) -> int:
    """T of the process, or a ValueError: L_vlb needs learned variance on a Gaussian Discrete process."""
    if not (isinstance(process, processes.GaussianProcess) and isinstance(process.schedule, processes.Discrete)):
        raise ValueError("loss.vlb_weight > 0 (iDDPM's hybrid loss) needs process.schedule='discrete' on a "
                         'Gaussian process (its L_vlb is over the T steps)')
    if not learned_variance:
        raise ValueError('loss.vlb_weight > 0 trains the variance: it needs model.learned_variance=True')
    return process.schedule.T


def posterior_table(schedule) -> dict:
    """Host float64 tables over n = 1..T of a Discrete schedule, with alpha_bar_0 = 1:

        beta_n,  beta~_n = beta_n (1 - alpha_bar_{n-1}) / (1 - alpha_bar_n)   (Ho et al. eq. 7),
        q(z_{n-1} | z_n, x) = N(c_x x + c_z z_n, beta~_n),
        c_x = sqrt(alpha_bar_{n-1}) beta_n / (1 - alpha_bar_n),  c_z = sqrt(1 - beta_n) (1 - alpha_bar_{n-1}) / (1 - alpha_bar_n),
        log_beta_tilde: log beta~_n with beta~_1 = 0 replaced by beta~_2 (iDDPM's clipping).
    """
    beta = schedule.betas_table
    alpha_bar = np.cumprod(1 - beta)
    alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
    beta_tilde = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)
    return dict(c_x=np.sqrt(alpha_bar_prev) * beta / (1 - alpha_bar),
                c_z=np.sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar),
                log_beta=np.log(beta), log_beta_tilde=np.log(np.append(beta_tilde[1], beta_tilde[1:])))


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (log_var2 - log_var1 + jnp.exp(log_var1 - log_var2) + jnp.square(mean1 - mean2) * jnp.exp(-log_var2) - 1)


def discretized_gaussian_nll(x, mean, log_scale, bin_width: float = 2 / 255):
    """-log P(x) per element in nats for N(mean, e^(2 log_scale)) integrated over x's bin of `bin_width`
    (8-bit data in [-1, 1]), the end bins reaching to -inf and +inf; probabilities floored at 1e-12
    as Ho et al. and iDDPM do. The exact normal CDF (iDDPM uses a tanh approximation of it)."""
    inv_scale = jnp.exp(-log_scale)
    upper = jax.scipy.stats.norm.cdf(inv_scale * (x - mean + bin_width / 2))
    lower = jax.scipy.stats.norm.cdf(inv_scale * (x - mean - bin_width / 2))
    prob = jnp.where(x < -0.999, upper, jnp.where(x > 0.999, 1 - lower, upper - lower))
    return -jnp.log(jnp.maximum(prob, 1e-12))


def vlb_term(schedule, prediction, images, z, t):
    """L_t per element in nats for t = n / T (iDDPM's `_vb_terms_bpd` times ln 2):
    KL(q(z_{n-1} | z_n, x) || p(z_{n-1} | z_n)) for n > 1, the discretised decoder -log p(x | z_1) for n = 1.
    p's mean is the posterior mean at x0_hat with the gradient stopped (only the variance learns
    from L_vlb); its log-variance is f log beta_n + (1 - f) log beta~_n (f: `variance_fraction`)."""
    table = {k: jnp.asarray(v, images.dtype) for k, v in posterior_table(schedule).items()}
    n = jnp.round(jnp.asarray(t).reshape(-1) * schedule.T).astype(jnp.int32)
    row = {k: v[n - 1].reshape((-1,) + (1,) * (images.ndim - 1)) for k, v in table.items()}
    x0 = jax.lax.stop_gradient(prediction.x0)
    f = prediction.variance_fraction
    log_var = f * row['log_beta'] + (1 - f) * row['log_beta_tilde']
    mean = row['c_x'] * x0 + row['c_z'] * z
    kl = normal_kl(row['c_x'] * images + row['c_z'] * z, row['log_beta_tilde'], mean, log_var)
    decoder = discretized_gaussian_nll(images, mean, 0.5 * log_var)
    return jnp.where((n == 1).reshape(row['c_x'].shape), decoder, kl)
