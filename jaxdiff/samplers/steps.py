"""Sampler steps: a float64 host table per solver and a step function that only does arithmetic.

Every step works per basis coefficient in scaled coordinates: the state is x~ = V^T z_t / alpha_t
and its noise level sigma~ = sigma_t / alpha_t (EDM's x and sigma; per frequency for blurring). There
the process is variance exploding, x~_t = x + sigma~_t eps, whatever its schedule, and every
sampler below is a formula in (x~, sigma~, D) with D = x0_hat in the basis (`denoise(x, point)`:
the model at process time point.t with (alpha, sigma) = (point.alpha, point.sigma)). Step i goes
from grid point i to i + 1; after the last grid point comes the data (sigma~ = 0), where the
deterministic steps return D. Tables are NamedTuples of [N, ...] arrays, one row per step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules


class Point(NamedTuple):
    """Where the model is evaluated: process time t, alpha_t (per coefficient) and sigma_t."""
    t: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray


def points(process, t, shape) -> Point:
    """Point rows for times t [K] (host, float64) and an NHWC batch shape."""
    t = np.asarray(t, np.float64)
    alpha, sigma = process.scale_sigma(t, (len(t),) + tuple(shape[1:]))
    return Point(t, np.asarray(alpha, np.float64), np.asarray(sigma, np.float64))


# ---------------------------------------------------------------------------------------------
# EDM's generalised sampler: 'euler' and 'heun' with churn (Karras et al. 2022, Algorithm 2, App. D).

class EDMRow(NamedTuple):
    """x_hat = x_scale x + noise_scale eps; d(t) = a(t) x - b(t) D(x / s(t)); Euler x_hat + h d_hat;
    Heun's second point at t_hat + point_h (the trapezoid weight w_prime of d_prime)."""
    x_scale: np.ndarray
    noise_scale: np.ndarray
    s_hat: np.ndarray
    a_hat: np.ndarray
    b_hat: np.ndarray
    h: np.ndarray
    point_h: np.ndarray
    s_prime: np.ndarray
    a_prime: np.ndarray
    b_prime: np.ndarray
    w_prime: np.ndarray
    at_hat: Point
    at_prime: Point


def edm_time_variable(sampler, sigma_min: float, sigma_max: float):
    """EDM's (sigma(t), sigma'(t), t(sigma), s(t), s'(t)) of `sampler.schedule`/`scaling` (host functions);
    the VP betas are fitted to [sigma_min, sigma_max] (EDM App. C.2)."""
    if sampler.schedule == 'vp':
        bd, bm = schedules.vp_betas_for_range(sigma_min, sigma_max, sampler.epsilon_s)
        sigma = lambda t: schedules.vp_sigma(t, bd, bm)
        sigma_deriv = lambda t: schedules.vp_sigma_deriv(t, bd, bm)
        sigma_inv = lambda s: schedules.vp_sigma_inv(s, bd, bm)
    elif sampler.schedule == 've':
        sigma, sigma_deriv, sigma_inv = schedules.ve_sigma, schedules.ve_sigma_deriv, schedules.ve_sigma_inv
    else:
        sigma, sigma_deriv, sigma_inv = schedules.linear_sigma, schedules.linear_sigma_deriv, schedules.linear_sigma_inv
    if sampler.scaling == 'vp':
        scale = lambda t: schedules.vp_scale(sigma(t))
        scale_deriv = lambda t: schedules.vp_scale_deriv(sigma(t), sigma_deriv(t))
    else:
        scale, scale_deriv = (lambda t: np.ones_like(t)), (lambda t: np.zeros_like(t))
    return sigma, sigma_deriv, sigma_inv, scale, scale_deriv


def _churn(sampler, sigma_cur):
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_min <= sigma_i <= S_max, else 0."""
    inside = (sampler.S_min <= sigma_cur) & (sigma_cur <= sampler.S_max)
    return np.where(inside, min(sampler.S_churn / sampler.num_steps, np.sqrt(2) - 1), 0.0)


def edm_table(sampler, process, grid, shape, sigma_range, round_sigma=lambda s: s):
    """(EDMRow table, initial scale of the latents) of EDM's sampler on `process`.

    One scale per image: EDM's own table in its time variable, exactly as NVlabs/edm builds it.
    Per-frequency processes (blurring): the time variable is each coefficient's own sigma~
    (schedule 'linear', scaling 'none', heun_point 1), the churn follows the DC noise level.
    """
    if not process.scalar_scale:
        return _edm_table_per_coefficient(sampler, process, grid, shape)
    sigma, sigma_deriv, sigma_inv, scale, scale_deriv = edm_time_variable(sampler, *sigma_range)
    f64 = lambda a: np.asarray(a, np.float64)
    t_cur = f64(sigma_inv(grid.sigma))
    t_next = np.append(t_cur[1:], 0.0)
    sigma_cur = sigma(t_cur)
    gamma = _churn(sampler, sigma_cur)
    t_hat = f64(sigma_inv(f64(round_sigma(sigma_cur + gamma * sigma_cur))))
    sigma_hat, s_hat, s_cur = sigma(t_hat), scale(t_hat), scale(t_cur)
    # Where gamma = 0, sigma_hat^2 - sigma_cur^2 is round-off of sigma(sigma_inv(.)): exactly no noise.
    noise_scale = np.where(gamma > 0, np.sqrt(np.clip(sigma_hat ** 2 - sigma_cur ** 2, 0, None)), 0.0)
    h = t_next - t_hat
    t_prime = t_hat + sampler.heun_point * h
    with np.errstate(divide='ignore', invalid='ignore'):  # at the last step t_prime may be 0: never used
        coefficients = lambda t: (scale(t), sigma_deriv(t) / sigma(t) + scale_deriv(t) / scale(t),
                                  sigma_deriv(t) * scale(t) / sigma(t))
        _, a_hat, b_hat = coefficients(t_hat)
        s_prime, a_prime, b_prime = coefficients(t_prime)
        sigma_prime = np.where(sigma(t_prime) > 0, sigma(t_prime), sigma_hat)
        at_prime = points(process, process.t_from_noise_level(sigma_prime), shape)
    row = EDMRow(s_hat / s_cur, noise_scale * s_hat * sampler.S_noise, s_hat, a_hat, b_hat, h,
                 sampler.heun_point * h, s_prime, a_prime, b_prime, np.full_like(h, 1 / (2 * sampler.heun_point)),
                 points(process, process.t_from_noise_level(sigma_hat), shape), at_prime)
    return row, sigma_cur[0] * s_cur[0]


def _edm_table_per_coefficient(sampler, process, grid, shape):
    if (sampler.schedule, sampler.scaling, sampler.heun_point) != ('linear', 'none', 1.0):
        raise ValueError(f'On {type(process).__name__} (a noise level per frequency) euler/heun integrate in '
                         "each coefficient's sigma~: sample.schedule='linear', scaling='none', heun_point=1")
    n = len(grid.t)
    gamma = _churn(sampler, grid.sigma)
    with np.errstate(divide='ignore'):
        t_hat = np.where(gamma > 0, process.t_from_noise_level(grid.sigma * (1 + gamma)), grid.t)
    at_hat = points(process, t_hat, shape)
    level = lambda p: p.sigma / p.alpha
    sigma_cur, sigma_hat = level(points(process, grid.t, shape)), level(at_hat)
    at_next = points(process, np.append(grid.t[1:], grid.t[-1]), shape)  # the last row's is never used
    sigma_next = level(at_next).copy()
    sigma_next[-1] = 0.0
    noise_scale = np.where(gamma.reshape(-1, 1, 1, 1) > 0, np.sqrt(np.clip(sigma_hat ** 2 - sigma_cur ** 2, 0, None)), 0)
    h = sigma_next - sigma_hat
    ones = np.ones_like(h)
    with np.errstate(divide='ignore'):
        inv_next = np.where(sigma_next > 0, 1 / np.where(sigma_next > 0, sigma_next, 1), 0.0)
    row = EDMRow(ones, noise_scale * sampler.S_noise, ones, 1 / sigma_hat, 1 / sigma_hat, h, h, ones,
                 inv_next, inv_next, 0.5 * ones, at_hat, at_next)
    return row, sigma_cur[0]


def edm_step(denoise, x, row: EDMRow, noise, *, second_order: bool):
    """EDM Algorithm 2, lines 4-11: x_hat = x_scale x + noise_scale eps; d = a x_hat - b D(x_hat/s_hat);
    Euler: x_hat + h d. Heun: x' = x_hat + point_h d, d' there, x_hat + h ((1 - w') d + w' d')."""
    x_hat = row.x_scale * x + row.noise_scale * noise[0]
    d_cur = row.a_hat * x_hat - row.b_hat * denoise(x_hat / row.s_hat, row.at_hat)[0]
    if not second_order:
        return x_hat + row.h * d_cur
    x_prime = x_hat + row.point_h * d_cur
    d_prime = row.a_prime * x_prime - row.b_prime * denoise(x_prime / row.s_prime, row.at_prime)[0]
    return x_hat + row.h * ((1 - row.w_prime) * d_cur + row.w_prime * d_prime)


# ---------------------------------------------------------------------------------------------
# One-evaluation steps from grid point i to i + 1 in scaled coordinates.

class GaussianRow(NamedTuple):
    """x_next = c_x x + (1 - c_x) D + std eps (+ the learned-variance terms of 'ancestral')."""
    at: Point
    c_x: np.ndarray
    std: np.ndarray
    log_beta: np.ndarray        # learned range: log of the forward step's variance (z coordinates)
    log_beta_tilde: np.ndarray  # ... and of the posterior's, floored at 1e-20 (as diffusers)
    inv_alpha_next: np.ndarray  # 1 / alpha at the destination (0 at the data: no noise)


def gaussian_table(sampler, process, grid, shape):
    """DDIM with eta (Song et al. 2021, eq. 12 and 16) and DDPM's ancestral step (Ho et al. 2020,
    eq. 6-7; Nichol & Dhariwal 2021, eq. 15) in scaled coordinates, from sigma~_t to sigma~_s:

        r = sigma~_s^2 / sigma~_t^2 = exp(lambda_t - lambda_s),  posterior mean  r x~ + (1 - r) D,
        DDIM:       std = eta sigma~_s sqrt(1 - r),  x~_s = D + sqrt(sigma~_s^2 - std^2) / sigma~_t (x~ - D) + std eps
        ancestral:  x~_s = r x~ + (1 - r) D + std eps with std^2 = sigma~_s^2 (1 - r) ('fixed_small', the
                    posterior's), sigma_ts^2 / alpha_s^2 ('fixed_large': the forward step's variance
                    sigma_ts^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2, DDPM's beta_t) or the learned
                    interpolation exp(f log beta_t + (1 - f) log beta~_t) / alpha_s^2 ('learned_range').

    DDIM with eta = 1 is the ancestral step with 'fixed_small'. The step into the data has no noise.
    """
    n = len(grid.t)
    at = points(process, grid.t, shape)
    sigma_t = at.sigma / at.alpha
    nxt = points(process, np.append(grid.t[1:], grid.t[-1]), shape)
    alpha_s = np.concatenate([nxt.alpha[:n - 1], np.ones_like(nxt.alpha[:1])])
    sigma_s_z = np.concatenate([nxt.sigma[:n - 1], np.zeros_like(nxt.sigma[:1])])
    sigma_s = sigma_s_z / alpha_s
    r = (sigma_s / sigma_t) ** 2
    zeros = np.zeros(np.broadcast_shapes(sigma_s.shape, at.alpha.shape))
    log_beta = log_beta_tilde = zeros
    inv_alpha_next = np.concatenate([1 / alpha_s[:n - 1], np.zeros_like(alpha_s[:1])]) + zeros
    if sampler.solver == 'ddim':
        std = sampler.eta * sigma_s * np.sqrt(1 - r)
        c_x = np.sqrt(np.clip(sigma_s ** 2 - std ** 2, 0, None)) / sigma_t
    else:
        c_x = r
        beta_tilde = sigma_s_z ** 2 * (1 - r)
        beta = at.sigma ** 2 - (at.alpha / alpha_s) ** 2 * sigma_s_z ** 2
        last = np.arange(n).reshape(-1, *([1] * (beta.ndim - 1))) == n - 1
        beta = np.where(last, 0.0, beta)
        if sampler.variance == 'fixed_small':
            std = sigma_s * np.sqrt(1 - r)
        elif sampler.variance == 'fixed_large':
            std = np.sqrt(np.clip(beta, 0, None)) / alpha_s
        else:
            std = zeros
            with np.errstate(divide='ignore'):
                log_beta = np.log(np.clip(beta, 1e-20, None)) + zeros
                log_beta_tilde = np.log(np.clip(beta_tilde, 1e-20, None)) + zeros
    return GaussianRow(at, c_x + zeros, std + zeros, log_beta, log_beta_tilde, inv_alpha_next), sigma_t[0]


def gaussian_step(denoise, x, row: GaussianRow, noise, *, learned_variance: bool):
    """x~_s = c_x x~ + (1 - c_x) D + std eps; with learned variance std = exp((f log beta + (1 - f) log beta~) / 2) / alpha_s."""
    d, fraction = denoise(x, row.at)
    x_next = d + row.c_x * (x - d)
    if learned_variance:
        log_var = fraction * row.log_beta + (1 - fraction) * row.log_beta_tilde
        return x_next + jnp.exp(0.5 * log_var) * row.inv_alpha_next * noise[0]
    return x_next + row.std * noise[0]


# ---------------------------------------------------------------------------------------------
# Two-evaluation and multistep steps.

class ExpHeunRow(NamedTuple):
    at: Point
    at_next: Point
    ratio: np.ndarray  # sigma~_s / sigma~_t (0 into the data)
    w: np.ndarray      # 1 + expm1(-k) / k, k = log(sigma~_t / sigma~_s)


def exp_heun_table(sampler, process, grid, shape):
    """A 2nd-order exponential integrator of dx~/dlog sigma~ = x~ - D in log sigma~ (as DPM-Solver-2):

        x_e = D + (sigma~_s / sigma~_t) (x~ - D),  x~_s = x_e + w (D(x_e, s) - D),  w = 1 + expm1(-k) / k,

    k = log(sigma~_t / sigma~_s). w -> k/2 for small steps (Heun's trapezoid), w -> 1 for long
    ones (x~_s -> D(x_e, s)): accurate where sigma~ drops by orders of magnitude in one step,
    as blurring's high frequencies do. The step into the data is Euler: D.
    """
    n = len(grid.t)
    at = points(process, grid.t, shape)
    sigma_t = at.sigma / at.alpha
    at_next = points(process, np.append(grid.t[1:], grid.t[-1]), shape)
    sigma_s = np.concatenate([(at_next.sigma / at_next.alpha)[:n - 1], np.zeros_like(sigma_t[:1])])
    ratio = sigma_s / sigma_t
    with np.errstate(divide='ignore', invalid='ignore'):
        k = np.log(sigma_t / sigma_s)
        w = np.where(k > 0, 1 + np.expm1(-k) / np.where(k > 0, k, 1), 0.0)
    return ExpHeunRow(at, at_next, ratio, w), sigma_t[0]


def exp_heun_step(denoise, x, row: ExpHeunRow, noise, *, second_order: bool):
    d = denoise(x, row.at)[0]
    x_euler = d + row.ratio * (x - d)
    if not second_order:
        return x_euler
    return x_euler + row.w * (denoise(x_euler, row.at_next)[0] - d)


class DPMRow(NamedTuple):
    at: Point
    ratio: np.ndarray   # sigma~_s / sigma~_t
    c_prev: np.ndarray  # 1 / (2 r_i), r_i = h_{i-1} / h_i; 0 at the first step and into the data


def dpmpp_2m_table(sampler, process, grid, shape):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in scaled coordinates, h_i = log(sigma~_i / sigma~_{i+1}):

        D' = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1},  x~_{i+1} = (sigma~_{i+1} / sigma~_i) x~_i + (1 - sigma~_{i+1} / sigma~_i) D',

    first order (D' = D_i) at the first step and into the data, as k-diffusion's sample_dpmpp_2m.
    """
    n = len(grid.t)
    at = points(process, grid.t, shape)
    sigma_t = at.sigma / at.alpha
    sigma_s = np.concatenate([sigma_t[1:], np.zeros_like(sigma_t[:1])])
    ratio = sigma_s / sigma_t
    with np.errstate(divide='ignore'):
        h = np.log(sigma_t / sigma_s)
    c_prev = np.zeros_like(h)
    if n > 2:
        c_prev[1:n - 1] = 0.5 * h[1:n - 1] / h[:n - 2]
    return DPMRow(at, ratio, c_prev), sigma_t[0]


def dpmpp_2m_step(denoise, state, row: DPMRow, noise):
    x, d_prev = state
    d = denoise(x, row.at)[0]
    d_mix = (1 + row.c_prev) * d - row.c_prev * d_prev
    return row.ratio * x + (1 - row.ratio) * d_mix, d


class PCRow(NamedTuple):
    at: Point
    r: np.ndarray           # sigma~_s^2 / sigma~_t^2
    std: np.ndarray         # sqrt(sigma~_t^2 - sigma~_s^2): the reverse-diffusion step's noise
    langevin_a: np.ndarray  # score-SDE's alpha_i: (alpha_t / alpha_s)^2 (1 for VE)


def pc_table(sampler, process, grid, shape):
    """score-SDE's predictor-corrector sampler (Song et al. 2021, Algorithms 2-4), corrector first:

      Langevin corrector on u = alpha x~ (per coefficient), score grad = alpha (D - x~) / sigma^2:
        eps_i = 2 a_i (snr ||xi|| / ||grad||)^2 (norms per sample, averaged over the batch, as score_sde),
        u <- u + eps_i grad + sqrt(2 eps_i) xi;
      reverse-diffusion predictor from sigma~_t to sigma~_s (score_sde's ReverseDiffusionPredictor for VE,
        and the same step in scaled coordinates for every other process):
        x~_s = x~ + (sigma~_t^2 - sigma~_s^2) (D - x~) / sigma~_t^2 + sqrt(sigma~_t^2 - sigma~_s^2) xi.

    Into the data the predictor returns its mean, D (score_sde's denoise=True). The batch-averaged
    norms make a sample depend on the others in its batch (the only sampler here that does).
    """
    n = len(grid.t)
    at = points(process, grid.t, shape)
    sigma_t = at.sigma / at.alpha
    nxt = points(process, np.append(grid.t[1:], grid.t[-1]), shape)
    sigma_s = np.concatenate([(nxt.sigma / nxt.alpha)[:n - 1], np.zeros_like(sigma_t[:1])])
    std = np.sqrt(np.clip(sigma_t ** 2 - sigma_s ** 2, 0, None))
    std[-1] = 0.0
    alpha_s = np.concatenate([nxt.alpha[:n - 1, :1, :1], np.ones_like(nxt.alpha[:1, :1, :1])])
    return PCRow(at, (sigma_s / sigma_t) ** 2, std, (at.alpha[:, :1, :1] / alpha_s) ** 2), sigma_t[0]


def pc_step(denoise, x, row: PCRow, noise, *, snr: float, corrector_steps: int):
    alpha, sigma = row.at.alpha, row.at.sigma
    mean_norm = lambda a: jnp.mean(jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=1)))
    for j in range(corrector_steps):
        grad = alpha * (denoise(x, row.at)[0] - x) / sigma ** 2
        xi = noise[1 + j]
        step = 2 * row.langevin_a * (snr * mean_norm(xi) / mean_norm(grad)) ** 2
        x = (alpha * x + step * grad + jnp.sqrt(2 * step) * xi) / alpha
    d = denoise(x, row.at)[0]
    return d + row.r * (x - d) + row.std * noise[0]


def num_noises(sampler) -> int:
    """Unit-normal draws per step and sample."""
    return 1 + sampler.corrector_steps if sampler.solver == 'pc' else 1


def tree_cast(table, dtype):
    """The host table as device arrays of `dtype`."""
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), table)
