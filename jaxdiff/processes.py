"""Forward diffusion processes that are Gaussian and diagonal in a fixed orthonormal basis.

A process gives the marginal q(z_t | x) = N(V diag(alpha_t) V^T x, sigma_t^2 I) for t in [0, 1],
where V is the basis (`from_basis`; `to_basis` is V^T), alpha_t the scale of each basis
coefficient and sigma_t a scalar. Since sigma_t is a scalar, the noise is white in every
orthonormal basis, so each coefficient u_k = (V^T z_t)_k is an independent 1-D diffusion
u_k = alpha_{t,k} (V^T x)_k + sigma_t eps_k with its own logSNR lambda_{t,k} = log(alpha_{t,k}^2 / sigma_t^2).

  GaussianProcess   V = I, alpha_t = a_t a scalar per image: standard (variance-preserving) diffusion
                    with the cosine logSNR clipped to [logsnr_min, logsnr_max].
  BlurringProcess   V the orthonormal 2-D DCT (`jaxdiff.dct`), alpha_t = a_t d_t per frequency:
                    blurring diffusion (Hoogeboom & Salimans 2023, "Blurring Diffusion Models",
                    Sec. 3-4), d_t the heat-dissipation factor of `schedules.blur_dissipation`.

Both are frozen dataclasses (hashable: static arguments of `jax.jit`) with one interface:

  scale_sigma(t, shape, dtype=None) -> (scale [N,1,1,1] or [N,H,W,1] (blur), sigma [N,1,1,1])
  logsnr(t, shape, dtype=None)      -> log(scale^2 / sigma^2), the shape of scale
  to_basis(x) / from_basis(u)       -> V^T x / V u  (NHWC in, NHWC out)
  diffuse(x, t, noise)              -> z_t = from_basis(scale_t * to_basis(x)) + sigma_t * noise
  posterior(z_t, eps_hat, s, t)     -> (mean, std) of q(z_s | z_t, x_hat) in the basis, s < t
  posterior_from_x0(z_t, x0, s, t)  -> the same with the data estimate x0 instead of eps_hat

`t` is a scalar or one time per image ([N]); `shape` is the NHWC batch shape (the blurring scale
needs H and W). Everything is computed in `dtype` (default: the default float dtype; `diffuse`
and the posteriors use their input's dtype).

BlurringProcess(sigma_blur_max=0) is GaussianProcess bit for bit, by construction: with no blur
it runs exactly the Gaussian operations (scale [N,1,1,1], identity basis), not the per-frequency
ones with d_t = 1. Equal numbers in are not enough under `jax.jit`: XLA simplifies and fuses
arithmetic differently for different shapes (measured: sigma_t (1 - r) / alpha_ts came out 1 ulp
apart when 1 - r had shape [N,H,W,1] instead of [N,1,1,1]), and the DCT round trip is exact only
up to rounding. The per-frequency formulas are nonetheless
continuous at zero blur (`schedules.blur_dissipation` is exactly 1 there). `tests/test_processes.py`
checks equality with `jnp.array_equal` through whole jit-compiled sampler runs.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxdiff import dct, schedules


def _dtype(dtype):
    return jnp.result_type(float) if dtype is None else jnp.dtype(dtype)


def _batch_time(t, shape, dtype):
    """t as [N, 1, 1, 1] in `dtype`, N = shape[0] (a scalar t applies to the whole batch)."""
    t = jnp.asarray(t, dtype)
    return jnp.broadcast_to(t.reshape(-1, 1, 1, 1), (shape[0], 1, 1, 1))


def _cosine_logsnr(t, shape, dtype, logsnr_min, logsnr_max):
    """lambda(t) of the clipped cosine schedule as [N, 1, 1, 1]."""
    return schedules.logsnr_cosine(_batch_time(t, shape, _dtype(dtype)), logsnr_min, logsnr_max)


class _DiagonalProcess:
    """What follows from (scale, sigma, basis) alone, shared so both processes run the same code."""

    def diffuse(self, x, t, noise):
        """z_t = V (alpha_t * V^T x) + sigma_t * noise, with unit-normal `noise` of x's shape.

        The noise is added in pixel space: sigma_t is a scalar, so it needs no change of basis.
        """
        scale, sigma = self.scale_sigma(t, x.shape, x.dtype)
        return self.from_basis(scale * self.to_basis(x)) + sigma * noise

    def posterior_coefficients(self, s, t, shape, dtype=None):
        """(1 / alpha_ts, sigma_t (1 - r) / alpha_ts, std) of q(z_s | z_t, x) per basis coefficient, s < t:

            alpha_ts = alpha_t / alpha_s,  sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2
                     = sigma_t^2 (1 - r),  r = exp(lambda_t - lambda_s) = alpha_ts^2 sigma_s^2 / sigma_t^2,
            variance = 1 / (1/sigma_s^2 + alpha_ts^2 / sigma_ts^2) = sigma_s^2 (1 - r),
            mean     = (alpha_ts sigma_s^2 / sigma_t^2) u_t + (alpha_s sigma_ts^2 / sigma_t^2) u_x
                     = (u_t - sigma_t (1 - r) u_eps) / alpha_ts     with u_x = (u_t - sigma_t u_eps) / alpha_t.

        1 - r = -expm1(lambda_t - lambda_s) comes from the logSNRs rather than as the difference of
        variances sigma_t^2 - alpha_ts^2 sigma_s^2, which the paper divides by and has to clip away
        from 0 with a small delta: here nothing divides by sigma_s^2, sigma_ts^2 or alpha_t (the only
        divisor is alpha_ts, a ratio in (0, 1]), and lambda_t - lambda_s is clipped to <= 0 so that
        rounding can never make a variance negative; s = t gives exactly z_s = z_t. (In float32 both
        forms are limited by the rounding of lambda itself: for steps of 1e-3 the std is within 5e-5
        and the eps coefficient within 1e-4 of float64, relative.)
        """
        scale_s, sigma_s = self.scale_sigma(s, shape, dtype)
        scale_t, sigma_t = self.scale_sigma(t, shape, dtype)
        log_r = jnp.minimum(self.logsnr(t, shape, dtype) - self.logsnr(s, shape, dtype), 0)
        one_minus_r = -jnp.expm1(log_r)
        inv_alpha_ts = scale_s / scale_t
        return inv_alpha_ts, sigma_t * one_minus_r * inv_alpha_ts, sigma_s * jnp.sqrt(one_minus_r)

    def posterior(self, z_t, eps_hat, s, t):
        """(mean, std) of q(z_s | z_t, x_hat) in the basis, with x_hat implied by the noise estimate:

            mean = (u_t - sigma_t (1 - r) u_eps_hat) / alpha_ts,  std = sigma_s sqrt(1 - r),

        u_t = to_basis(z_t), u_eps_hat = to_basis(eps_hat) (see `posterior_coefficients`). It is
        algebraically the x0 form with x_hat = (u_t - sigma_t u_eps_hat) / alpha_t, but needs only the
        ratio alpha_ts: no division by alpha_t, which falls to a_1 d_min ~ 7e-6 for blurring at t = 1,
        and no detour through x_hat values 1/alpha_t times larger than the result, so nothing needs
        the clipping of the paper's delta. `std` has the shape of the scale.
        """
        c_z, c_eps, std = self.posterior_coefficients(s, t, z_t.shape, z_t.dtype)
        return c_z * self.to_basis(z_t) - c_eps * self.to_basis(eps_hat), std

    def posterior_from_x0(self, z_t, x0, s, t):
        """(mean, std) of q(z_s | z_t, x0) in the basis from a data estimate x0:

            mean = (r / alpha_ts) u_t + alpha_s (1 - r) u_x0,  std = sigma_s sqrt(1 - r).
        """
        scale_s, sigma_s = self.scale_sigma(s, z_t.shape, z_t.dtype)
        scale_t, _ = self.scale_sigma(t, z_t.shape, z_t.dtype)
        log_r = jnp.minimum(self.logsnr(t, z_t.shape, z_t.dtype) - self.logsnr(s, z_t.shape, z_t.dtype), 0)
        mean = jnp.exp(log_r) * (scale_s / scale_t) * self.to_basis(z_t) - scale_s * jnp.expm1(log_r) * self.to_basis(x0)
        return mean, sigma_s * jnp.sqrt(-jnp.expm1(log_r))


@dataclasses.dataclass(frozen=True)
class GaussianProcess(_DiagonalProcess):
    """Variance-preserving Gaussian diffusion with the clipped cosine logSNR:

        lambda(t) = -2 log tan(t0 + t (t1 - t0)),  alpha_t = sqrt(sigmoid(lambda)), sigma_t = sqrt(sigmoid(-lambda)),

    lambda(0) = logsnr_max, lambda(1) = logsnr_min (`schedules.logsnr_cosine`). In EDM's terms
    the noise level is sigma_t / alpha_t = exp(-lambda / 2), from exp(-logsnr_max/2) to
    exp(-logsnr_min/2) (0.0067 to 148 for the defaults; EDM's 0.002 to 80 is
    logsnr_min = -2 log 80, logsnr_max = -2 log 0.002).
    """
    logsnr_min: float = -10.0
    logsnr_max: float = 10.0

    scalar_scale = True  # one scale per image: a plain noise-level denoiser applies (see precond)

    def __post_init__(self):
        schedules._logsnr_cosine_limits(self.logsnr_min, self.logsnr_max)  # validates the pair

    def logsnr(self, t, shape, dtype=None):
        """lambda(t) as [N, 1, 1, 1]."""
        return _cosine_logsnr(t, shape, dtype, self.logsnr_min, self.logsnr_max)

    def scale_sigma(self, t, shape, dtype=None):
        """(alpha_t, sigma_t), each [N, 1, 1, 1]."""
        return schedules.alpha_sigma_from_logsnr(self.logsnr(t, shape, dtype))

    def to_basis(self, x):
        return x

    def from_basis(self, u):
        return u


@dataclasses.dataclass(frozen=True)
class BlurringProcess(_DiagonalProcess):
    """Blurring diffusion (Hoogeboom & Salimans 2023, Sec. 4): in the DCT basis, frequency (i, j) has

        alpha_t = a_t d_t,  d_t = (1 - d_min) exp(-lambda_ij tau_t) + d_min,  tau_t = sigma_blur(t)^2 / 2,
        sigma_blur(t) = sigma_blur_max sin^2(pi t / 2),  lambda_ij = (pi i / H)^2 + (pi j / W)^2,

    with (a_t, sigma_t) the clipped cosine schedule of `GaussianProcess` and d_min = `min_scale`.
    So z_t = IDCT(alpha_t * DCT(x)) + sigma_t eps: a Gaussian blur of width sigma_blur(t), floored
    at d_min per frequency so that the process stays invertible, plus white noise. The DC
    frequency is never blurred (lambda_00 = 0), so its noise level sigma_t / alpha_t is that of
    the Gaussian process. The paper uses sigma_blur_max = 20 at 32 and 64 px.

    The per-frequency logSNR is lambda(t) + 2 log d_t. With sigma_blur_max = 0 the process runs
    `GaussianProcess`'s arithmetic and is equal to it bit for bit (see the module docstring).
    """
    sigma_blur_max: float = 20.0
    min_scale: float = 0.001
    logsnr_min: float = -10.0
    logsnr_max: float = 10.0

    def __post_init__(self):
        schedules._logsnr_cosine_limits(self.logsnr_min, self.logsnr_max)
        if self.sigma_blur_max < 0:
            raise ValueError(f'BlurringProcess.sigma_blur_max must be >= 0, got {self.sigma_blur_max}')
        if not 0 < self.min_scale <= 1:
            raise ValueError(f'BlurringProcess.min_scale must be in (0, 1], got {self.min_scale}')

    @property
    def scalar_scale(self) -> bool:
        return self.sigma_blur_max == 0

    def _frequencies(self, shape, dtype):
        """lambda_ij as [H, W, 1] for an NHWC `shape`."""
        return jnp.asarray(schedules.dct_frequencies(shape[-3], shape[-2])[..., None], dtype)

    def dissipation(self, t, shape, dtype=None):
        """d_t per frequency, [N, H, W, 1]."""
        dtype = _dtype(dtype)
        return schedules.blur_dissipation(_batch_time(t, shape, dtype), self._frequencies(shape, dtype),
                                          self.sigma_blur_max, self.min_scale)

    def logsnr(self, t, shape, dtype=None):
        """lambda(t) + 2 log d_t per frequency, [N, H, W, 1] ([N, 1, 1, 1] without blur)."""
        logsnr = _cosine_logsnr(t, shape, dtype, self.logsnr_min, self.logsnr_max)
        if not self.sigma_blur_max:  # exactly GaussianProcess (module docstring)
            return logsnr
        dtype = _dtype(dtype)
        log_d = schedules.blur_log_dissipation(_batch_time(t, shape, dtype), self._frequencies(shape, dtype),
                                               self.sigma_blur_max, self.min_scale)
        return logsnr + 2 * log_d

    def scale_sigma(self, t, shape, dtype=None):
        """(a_t d_t [N, H, W, 1], sigma_t [N, 1, 1, 1]); without blur (a_t, sigma_t), both [N, 1, 1, 1]."""
        a, sigma = schedules.alpha_sigma_from_logsnr(_cosine_logsnr(t, shape, dtype, self.logsnr_min, self.logsnr_max))
        if not self.sigma_blur_max:  # exactly GaussianProcess (module docstring)
            return a, sigma
        return a * self.dissipation(t, shape, dtype), sigma

    def to_basis(self, x):
        return dct.dct2(x) if self.sigma_blur_max else x

    def from_basis(self, u):
        return dct.idct2(u) if self.sigma_blur_max else u


Process = GaussianProcess | BlurringProcess
