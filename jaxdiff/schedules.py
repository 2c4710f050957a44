"""Noise-level schedules and step discretisations (Karras et al. 2022, "EDM", Table 1 and App. C).

Every function here is a small pure function of arrays (jnp or numpy, whichever it is given),
so it works on traced values inside `jax.jit` and on float64 numpy on the host, where the
samplers build their step tables exactly as NVlabs/edm does (in float64).

Notation: a process has a noise level sigma(t) and a scale s(t); the probability-flow ODE is
dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t)/sigma(t) D(x/s(t); sigma(t)).
"""
from __future__ import annotations

import numpy as np

import jax.numpy as jnp


def _np(x):
    """numpy for numpy/python inputs, jax.numpy for jax arrays and tracers."""
    return np if isinstance(x, (np.ndarray, np.generic, float, int)) else jnp


# ---------------------------------------------------------------------------------------------
# EDM: sigma(t) = t, s(t) = 1, and the rho-discretisation of the noise levels.

def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                    rho: float = 7.0) -> np.ndarray:
    """EDM eq. (5): sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < N.

    Returns the N noise levels in float64, largest first (the sampler appends sigma_N = 0).
    """
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2, got {num_steps}')
    i = np.arange(num_steps, dtype=np.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + i / (num_steps - 1) * (b - a)) ** rho


def clamp_sigma_range(sigma_min: float, sigma_max: float, net_sigma_min: float = 0.0,
                      net_sigma_max: float = float('inf')) -> tuple[float, float]:
    """Restrict a sampler's [sigma_min, sigma_max] to the range the denoiser supports."""
    return max(sigma_min, net_sigma_min), min(sigma_max, net_sigma_max)


# ---------------------------------------------------------------------------------------------
# Score-SDE VP (Song et al. 2021): sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1),
# s(t) = 1 / sqrt(1 + sigma(t)^2).

def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), with expm1 (accurate for small t)."""
    xp = _np(t)
    return xp.sqrt(xp.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def vp_sigma_deriv(t, beta_d: float = 19.9, beta_min: float = 0.1):
    """sigma'(t) = (beta_min + beta_d t) (sigma(t) + 1/sigma(t)) / 2."""
    sigma = vp_sigma(t, beta_d, beta_min)
    return 0.5 * (beta_min + beta_d * t) * (sigma + 1 / sigma)


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1):
    """t(sigma) = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d, with log1p."""
    xp = _np(sigma)
    return (xp.sqrt(beta_min ** 2 + 2 * beta_d * xp.log1p(sigma ** 2)) - beta_min) / beta_d


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max (EDM App. C.2)."""
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return float(beta_d), float(beta_min)


def vp_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> np.ndarray:
    """VP discretisation: t_i = 1 + i/(N-1) (epsilon_s - 1), sigma_i = sigma(t_i), with the betas
    fitted to [sigma_min, sigma_max]."""
    beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    i = np.arange(num_steps, dtype=np.float64)
    return vp_sigma(1 + i / (num_steps - 1) * (epsilon_s - 1), beta_d, beta_min)


# ---------------------------------------------------------------------------------------------
# Score-SDE VE: sigma(t) = sqrt(t), s(t) = 1.

def ve_sigma(t):
    """sigma(t) = sqrt(t)."""
    return _np(t).sqrt(t)


def ve_sigma_deriv(t):
    """sigma'(t) = 1 / (2 sqrt(t))."""
    return 0.5 / _np(t).sqrt(t)


def ve_sigma_inv(sigma):
    """t(sigma) = sigma^2."""
    return sigma ** 2


def ve_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """VE discretisation: geometric noise levels, sigma_i^2 = smax^2 (smin^2 / smax^2)^(i/(N-1))."""
    i = np.arange(num_steps, dtype=np.float64)
    return np.sqrt(sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1)))


# ---------------------------------------------------------------------------------------------
# iDDPM (Nichol & Dhariwal 2021) as a table of noise levels u_0 > u_1 > ... > u_M = 0.

def iddpm_alpha_bar(j, M: int = 1000, C_2: float = 0.008):
    """alpha_bar(j) = sin^2(pi j / (2 M (1 + C_2))) (the cosine schedule, EDM App. C.3.2)."""
    xp = _np(j)
    return xp.sin(0.5 * np.pi * j / M / (C_2 + 1)) ** 2


def iddpm_u(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008, dtype=np.float64) -> np.ndarray:
    """Noise levels of iDDPM's M steps, u_0 > ... > u_M = 0 (EDM App. C.3.2):

        u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1).

    alpha_bar and the ratio are evaluated in float32 because NVlabs/edm does so (PyTorch's
    default dtype) and the recursion amplifies their rounding: a float64 table differs from
    EDM's by up to 5e-4 relative, this one by about 1e-6. `dtype` is the precision of the
    recursion: float32 in EDM's iDDPMPrecond, float64 in its generalised sampler. A converted
    EDM checkpoint carries its exact table (the `u` buffer), which `IDDPMPrecond` then uses.
    """
    j = np.arange(1, M + 1).astype(np.float32)
    ratio = iddpm_alpha_bar(j - 1, M, C_2) / iddpm_alpha_bar(j, M, C_2)
    ratio = np.maximum(ratio, np.float32(C_1)).astype(dtype)
    u = np.zeros(M + 1, dtype=dtype)
    for k in range(M, 0, -1):
        u[k - 1] = np.sqrt((u[k] ** 2 + 1) / ratio[k - 1] - 1)
    return u


def iddpm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, u: np.ndarray) -> np.ndarray:
    """iDDPM discretisation: the u_j inside [sigma_min, sigma_max], evenly subsampled to N levels
    (index round((len - 1) i / (N - 1)), rounding half to even as PyTorch does)."""
    inside = u[(u >= sigma_min) & (u <= sigma_max)]
    if len(inside) == 0:
        raise ValueError(f'No iDDPM noise level lies in [{sigma_min}, {sigma_max}]')
    i = np.arange(num_steps, dtype=np.float64)
    return inside[np.round((len(inside) - 1) / (num_steps - 1) * i).astype(np.int64)]


def round_to_table(sigma, table):
    """Snap each sigma to the nearest entry of a noise-level table (iDDPM's round_sigma).

    Returns (rounded sigma, index). Ties go to the lower index, as with argmin.
    """
    xp = _np(sigma)
    table = xp.asarray(table)
    index = xp.argmin(xp.abs(xp.asarray(sigma)[..., None] - table), axis=-1)
    return table[index], index


# ---------------------------------------------------------------------------------------------
# Discrete DDPM: beta tables beta_1..beta_T (index n - 1 holds beta_n), alpha_bar_n = prod (1 - beta_j),
# and the timesteps a respaced sampler visits. Host-side, float64.

def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al. 2020, Sec. 4: beta_n evenly spaced from beta_start to beta_end, n = 1..T.

    denoising-diffusion-pytorch multiplies beta_start and beta_end by 1000 / T (the same table at
    T = 1000); this function does not, so pass the scaled ends to reproduce it at other T.
    """
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal 2021, eq. (17): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2),
    beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), max_beta), t = 1..T (the clip keeps beta_T < 1)."""
    t = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((t + s) / (1 + s) * (0.5 * np.pi)) ** 2
    return np.minimum(1 - f[1:] / f[:-1], max_beta)


def sigmoid_betas(T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> np.ndarray:
    """Sigmoid schedule (Chen 2023, "On the importance of noise scheduling", Alg. 1; Jabri et al. 2022):

        alpha_bar(t) = (v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start),
        v_start = sigmoid(start / tau), v_end = sigmoid(end / tau),

    at t = n/T, n = 0..T, and beta_n = 1 - alpha_bar(n/T) / alpha_bar((n-1)/T) clipped to [0, max_beta]
    (alpha_bar(1) = 0, so beta_T is max_beta). Not diffusers' beta_schedule="sigmoid", which is GeoDiff's
    curve betas = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start.
    """
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
    t = np.arange(T + 1, dtype=np.float64) / T
    alpha_bar = (v_end - sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0.0, max_beta)


def alphas_cumprod(betas) -> np.ndarray:
    """alpha_bar_n = prod_{j <= n} (1 - beta_j), in float64 (Ho et al. 2020, eq. (4))."""
    return np.cumprod(1 - np.asarray(betas, dtype=np.float64))


def ddpm_timesteps(T: int, num_steps: int, spacing: str = 'leading', steps_offset: int = 0) -> np.ndarray:
    """The integer timesteps, largest first, in 0..T-1, that a DDPM/DDIM sampler with num_steps steps visits.

    'leading', 'trailing', 'linspace': diffusers' `set_timesteps` (Lin et al. 2023, Table 2), op for op:
      leading:  arange(num_steps) * (T // num_steps), reversed, + steps_offset;
      trailing: round(arange(T, 0, -T / num_steps)) - 1 (numpy's float arange, whose entries can differ
                from T - i T/num_steps by an ulp and so round the other way at halves; diffusers' array
                sometimes has an extra last entry -1, e.g. T=1000, num_steps=61, which is dropped here);
      linspace: round(linspace(0, T - 1, num_steps)), reversed.
    'quad': the DDIM code (Song et al. 2021, App. D.2): int(linspace(0, sqrt(0.8 T), num_steps)^2),
      reversed; it starts at int(0.8 T), not T - 1, and repeats small timesteps when num_steps is large.
    np.round rounds halves to even, as diffusers does. steps_offset applies to 'leading' only (as in
    diffusers); unlike diffusers, an offset that lifts a timestep past T - 1 is an error.
    """
    if not 1 <= num_steps <= T:
        raise ValueError(f'num_steps must be in [1, T={T}], got {num_steps}')
    if spacing == 'leading':
        steps = np.arange(num_steps)[::-1] * (T // num_steps) + steps_offset
    elif spacing == 'trailing':
        steps = np.round(np.arange(T, 0, -T / num_steps))[:num_steps] - 1
    elif spacing == 'linspace':
        steps = np.round(np.linspace(0, T - 1, num_steps))[::-1]
    elif spacing == 'quad':
        steps = np.floor(np.linspace(0, np.sqrt(T * 0.8), num_steps) ** 2)[::-1]
    else:
        raise ValueError(f"spacing must be 'leading', 'trailing', 'linspace' or 'quad', got {spacing!r}")
    steps = steps.astype(np.int64)
    if steps.min() < 0 or steps.max() > T - 1:
        raise ValueError(f'steps_offset={steps_offset} puts timesteps outside [0, {T - 1}]: {steps.max()}')
    return steps


# ---------------------------------------------------------------------------------------------
# Linear (EDM) schedule: sigma(t) = t.

def linear_sigma(t):
    """sigma(t) = t."""
    return t


def linear_sigma_deriv(t):
    """sigma'(t) = 1."""
    return _np(t).ones_like(t)


def linear_sigma_inv(sigma):
    """t(sigma) = sigma."""
    return sigma


# ---------------------------------------------------------------------------------------------
# Scalings s(t).

def vp_scale(sigma):
    """s = 1 / sqrt(1 + sigma^2): the VP scale as a function of the noise level."""
    return 1 / _np(sigma).sqrt(1 + sigma ** 2)


def vp_scale_deriv(sigma, sigma_deriv):
    """s'(t) = -sigma(t) sigma'(t) s(t)^3."""
    return -sigma * sigma_deriv * vp_scale(sigma) ** 3


# ---------------------------------------------------------------------------------------------
# logSNR form (simple diffusion; blurring diffusion, Hoogeboom & Salimans 2023, Sec. 4):
# alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1 and
# lambda = log(alpha^2 / sigma^2).

def _logsnr_cosine_limits(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """(t0, t1) = (atan(exp(-lambda_max / 2)), atan(exp(-lambda_min / 2))), in float64."""
    if not logsnr_min < logsnr_max:
        raise ValueError(f'logsnr_min must be below logsnr_max, got {logsnr_min} >= {logsnr_max}')
    return float(np.arctan(np.exp(-0.5 * logsnr_max))), float(np.arctan(np.exp(-0.5 * logsnr_min)))


def logsnr_cosine(t, logsnr_min: float = -10.0, logsnr_max: float = 10.0):
    """Cosine logSNR clipped to [logsnr_min, logsnr_max]:

        lambda(t) = -2 log tan(t0 + t (t1 - t0)),  t0 = atan(exp(-lambda_max/2)), t1 = atan(exp(-lambda_min/2)),

    so lambda(0) = logsnr_max and lambda(1) = logsnr_min; without the clipping (t0 = 0, t1 = pi/2)
    it is the cosine schedule alpha = cos(pi t / 2), sigma = sin(pi t / 2).
    """
    xp = _np(t)
    t0, t1 = _logsnr_cosine_limits(logsnr_min, logsnr_max)
    return -2 * xp.log(xp.tan(t0 + t * (t1 - t0)))


def logsnr_cosine_inv(logsnr, logsnr_min: float = -10.0, logsnr_max: float = 10.0):
    """t(lambda) = (atan(exp(-lambda/2)) - t0) / (t1 - t0), the inverse of `logsnr_cosine`."""
    xp = _np(logsnr)
    t0, t1 = _logsnr_cosine_limits(logsnr_min, logsnr_max)
    return (xp.arctan(xp.exp(-0.5 * logsnr)) - t0) / (t1 - t0)


def _logsnr_shift(image_d: int, noise_d: int) -> float:
    """2 log(noise_d / image_d), as a Python float so that it keeps float32 inputs float32."""
    return 2 * float(np.log(noise_d / image_d))


def logsnr_cosine_shifted(t, image_d: int, noise_d: int = 64, logsnr_min: float = -15.0,
                          logsnr_max: float = 15.0):
    """Shifted cosine logSNR (simple diffusion, Hoogeboom, Heek & Salimans 2023, Sec. 3.1, eq. (5)):

        lambda_shift(t) = lambda_cos(t) + 2 log(noise_d / image_d),

    the schedule whose per-pixel SNR at image side image_d matches the cosine schedule's at noise_d.
    lambda_cos is clipped to [logsnr_min, logsnr_max] before the shift, as in the paper's pseudo-code
    (and denoising-diffusion-pytorch), so the result spans [logsnr_min + shift, logsnr_max + shift].
    """
    return logsnr_cosine(t, logsnr_min, logsnr_max) + _logsnr_shift(image_d, noise_d)


def logsnr_cosine_shifted_inv(logsnr, image_d: int, noise_d: int = 64, logsnr_min: float = -15.0,
                              logsnr_max: float = 15.0):
    """t(lambda) = logsnr_cosine_inv(lambda - 2 log(noise_d / image_d)), the inverse of `logsnr_cosine_shifted`."""
    return logsnr_cosine_inv(logsnr - _logsnr_shift(image_d, noise_d), logsnr_min, logsnr_max)


def logsnr_cosine_interpolated(t, image_d: int, low_d: int = 32, high_d: int = 256, logsnr_min: float = -15.0,
                               logsnr_max: float = 15.0):
    """Interpolated cosine logSNR (simple diffusion, Sec. 3.1, eq. (6), there for 512 x 512 with 32 -> 256):

        lambda(t) = t lambda_shift high_d(t) + (1 - t) lambda_shift low_d(t),

    so lambda(0) = lambda_shift low_d(0) and lambda(1) = lambda_shift high_d(1). As both are the clipped
    cosine plus a constant, lambda(t) = lambda_shift low_d(t) + 2 t log(high_d / low_d): with low_d < high_d
    it lies between the two, on the noisier shift-low_d schedule at t = 0 and on shift-high_d at t = 1.
    denoising-diffusion-pytorch's logsnr_schedule_interpolated swaps the weights (t on the low_d
    schedule); k-diffusion's rand_cosine_interpolated weights as here.
    """
    low = logsnr_cosine_shifted(t, image_d, low_d, logsnr_min, logsnr_max)
    high = logsnr_cosine_shifted(t, image_d, high_d, logsnr_min, logsnr_max)
    return t * high + (1 - t) * low


def logsnr_cosine_interpolated_inv(logsnr, image_d: int, low_d: int = 32, high_d: int = 256,
                                   logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> np.ndarray:
    """t(lambda) for `logsnr_cosine_interpolated`, host-side by vectorised bisection in float64.

    There is no closed form. lambda(t) decreases strictly when 2 log(high_d / low_d) < 4 (t1 - t0), since
    |d lambda_cos / dt| = 4 (t1 - t0) / sin(2 (t0 + t (t1 - t0))) >= 4 (t1 - t0) (about 2 pi for
    the default range; 32 -> 256 adds 2 log 8 = 4.2); otherwise this raises. 64 halvings of [0, 1] leave
    a bracket of 2^-64, below float64 resolution, so t is exact up to the rounding of lambda itself
    (about 1e-15). A lambda outside [lambda(1), lambda(0)] raises.
    """
    t0, t1 = _logsnr_cosine_limits(logsnr_min, logsnr_max)
    if 2 * np.log(high_d / low_d) >= 4 * (t1 - t0):
        raise ValueError(f'logsnr_cosine_interpolated is not monotone for low_d={low_d}, high_d={high_d}')
    logsnr = np.asarray(logsnr, dtype=np.float64)
    fn = lambda t: logsnr_cosine_interpolated(t, image_d, low_d, high_d, logsnr_min, logsnr_max)
    if np.any(logsnr > fn(np.float64(0))) or np.any(logsnr < fn(np.float64(1))):
        raise ValueError(f'logsnr outside [{fn(np.float64(1))}, {fn(np.float64(0))}]')
    lo, hi = np.zeros_like(logsnr), np.ones_like(logsnr)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        above = fn(mid) > logsnr  # lambda decreases: the root lies right of mid
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 0.5 * (lo + hi)


def alpha_sigma_from_logsnr(logsnr):
    """(alpha, sigma) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda))).

    Written as alpha = exp(-softplus(-lambda)/2) and sigma = exp(-softplus(lambda)/2) with
    softplus(x) = logaddexp(0, x): neither overflows nor rounds the small one to 0 or the large
    one past 1 for large |lambda| (1 - sigmoid(-lambda) would lose the small one entirely).
    """
    xp = _np(logsnr)
    return xp.exp(-0.5 * xp.logaddexp(0.0, -logsnr)), xp.exp(-0.5 * xp.logaddexp(0.0, logsnr))


def logsnr_from_alphas_cumprod(alpha_bar):
    """lambda = log(alpha_bar / (1 - alpha_bar)) = log(alpha_bar) - log1p(-alpha_bar): the logSNR of a DDPM
    step (alpha^2 = alpha_bar); log1p keeps alpha_bar near 1 accurate."""
    xp = _np(alpha_bar)
    return xp.log(alpha_bar) - xp.log1p(-alpha_bar)


# ---------------------------------------------------------------------------------------------
# Blurring (heat dissipation) in the DCT basis (Hoogeboom & Salimans 2023, Sec. 3-4; Rissanen et al.
# 2022): frequency (i, j) of the orthonormal DCT is damped by d_t = (1 - d_min) exp(-lambda_ij tau_t) + d_min.

def blur_sigma(t, sigma_blur_max: float):
    """sigma_blur(t) = sigma_blur_max sin^2(pi t / 2): the width of the Gaussian blur at time t."""
    return sigma_blur_max * _np(t).sin(0.5 * np.pi * t) ** 2


def dct_frequencies(h: int, w: int, dtype=np.float64) -> np.ndarray:
    """lambda_ij = (pi i / H)^2 + (pi j / W)^2, [H, W]: the eigenvalues of the (Neumann) Laplacian
    for the DCT basis function (i, j), i.e. its decay rate under the heat equation."""
    i = np.pi * np.arange(h, dtype=np.float64) / h
    j = np.pi * np.arange(w, dtype=np.float64) / w
    return (i[:, None] ** 2 + j[None, :] ** 2).astype(dtype)


def blur_dissipation(t, frequencies, sigma_blur_max: float, min_scale: float = 0.001):
    """d_t = (1 - d_min) exp(-lambda tau_t) + d_min with tau_t = sigma_blur(t)^2 / 2 (d_min = min_scale).

    `t` and `frequencies` broadcast against each other (e.g. t [N, 1, 1, 1], lambda [H, W, 1]).
    Where e = exp(-lambda tau) > 1/2 it is evaluated as 1 - (1 - d_min)(-expm1(-lambda tau)): the
    same number, but exactly 1 wherever lambda tau = 0 (the DC frequency, t = 0, and every frequency
    when sigma_blur_max = 0) whatever the dtype and d_min -- which makes an unblurred process equal
    standard Gaussian diffusion bit for bit -- and accurate where d is close to 1. Elsewhere the
    direct sum, which keeps its relative accuracy down at the floor d_min (1 - (1 - d_min)(1 - e)
    would cancel there: 1 - float32(0.999) is 1.3e-5 off 0.001 in relative terms).
    """
    xp = _np(t) if _np(frequencies) is np else jnp
    x = frequencies * (0.5 * blur_sigma(t, sigma_blur_max) ** 2)
    e = xp.exp(-x)
    return xp.where(e > 0.5, 1 - (1 - min_scale) * -xp.expm1(-x), min_scale + (1 - min_scale) * e)


def blur_log_dissipation(t, frequencies, sigma_blur_max: float, min_scale: float = 0.001):
    """log d_t, accurate both near d_t = 1 (log1p of the expm1 form) and near the floor d_min.

    Blurring adds 2 log d_t to the logSNR of each frequency, and the samplers take differences of
    such logSNRs at nearby times; this is exactly 0 where lambda tau = 0, like `blur_dissipation`.
    """
    xp = _np(t) if _np(frequencies) is np else jnp
    x = frequencies * (0.5 * blur_sigma(t, sigma_blur_max) ** 2)
    e = xp.exp(-x)
    return xp.where(e > 0.5, xp.log1p(-(1 - min_scale) * -xp.expm1(-x)), xp.log(min_scale + (1 - min_scale) * e))
