"""Forward diffusion processes: q(z_t | x) = N(V diag(alpha_t) V^T x, sigma_t^2 I), the schedule a field.

A *schedule* gives a scalar pair (alpha_t, sigma_t) and the logSNR lambda_t = log(alpha_t^2 / sigma_t^2)
for t in [t_min, t_max] (t_min: least noise), and the inverse t(lambda) that time grids need:

  Cosine       variance preserving, lambda(t) = -2 log tan(t0 + t (t1 - t0)) clipped to [logsnr_min,
               logsnr_max], plus `shift` (simple diffusion's 2 log(noise_d / image_d); 0: plain cosine)
  ShiftedCosine, InterpolatedCosine   simple diffusion's resolution-shifted cosine (eq. 5) and its
               interpolation between two shifts (eq. 6), named by image and noise sizes
  VP           score-SDE VP (Song et al. 2021, eq. 33): alpha_t^2 = exp(-beta_min t - (beta_max -
               beta_min) t^2 / 2), variance preserving, t in [t_min, 1]
  VE           score-SDE VE (Song et al. 2021, eq. 31): alpha = 1, sigma_t = sigma_min (sigma_max /
               sigma_min)^t, t in [0, 1]
  EDM          EDM's process (Karras et al. 2022, Table 1): alpha = 1, sigma_t = t, t in [sigma_min, sigma_max]
  Discrete     DDPM's T-step beta table (linear, cosine, sigmoid): alpha_n^2 = prod_{j<=n} (1 - beta_j) at
               t = n / T, lambda linear in t between the table's points, t in [1 / T, 1]

A *process* puts a schedule in a basis:

  GaussianProcess   V = I, alpha_t a scalar per image (EDM, DDPM, score-SDE, simple diffusion)
  BlurringProcess   V the orthonormal 2-D DCT, alpha_t = a_t d_t per frequency: blurring diffusion
                    (Hoogeboom & Salimans 2023, Sec. 4), d_t of `schedules.blur_dissipation`;
                    sigma_blur_max = 0 runs GaussianProcess's arithmetic exactly

Both are frozen dataclasses (hashable: static arguments of `jax.jit`) with one interface:

  scale_sigma(t, shape, dtype=None) -> (alpha_t [N,1,1,1] or [N,H,W,1] (blur), sigma_t [N,1,1,1])
  logsnr(t, shape, dtype=None)      -> log(alpha_t^2 / sigma_t^2), the shape of alpha_t
  to_basis(x) / from_basis(u)       -> V^T x / V u  (NHWC in, NHWC out)
  diffuse(x, t, noise)              -> z_t = V (alpha_t V^T x) + sigma_t noise

`t` is a scalar or one time per image ([N]); `shape` is the NHWC batch shape. Given numpy arrays
(and dtype None or float64) everything is computed in float64 numpy, which is how the samplers
build their step tables on the host; given jax arrays or a jax dtype, in that dtype on the device.
Since sigma_t is a scalar the noise is white in every orthonormal basis, so each coefficient of
u = V^T z_t is an independent 1-D diffusion with its own logSNR: every sampler works per
coefficient, in the scaled coordinates x~ = u / alpha_t, sigma~ = sigma_t / alpha_t = exp(-lambda/2).
"""
from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from jaxdiff import dct, schedules


def _xp(t, dtype):
    """numpy for host inputs (numpy/python values, dtype None or float64), else jax.numpy."""
    host = isinstance(t, (np.ndarray, np.generic, float, int)) and (dtype is None or np.dtype(dtype) == np.float64)
    return np if host else jnp


def _batch_time(t, shape, dtype):
    """t as [N, 1, 1, 1] (a scalar t applies to the whole batch of N = shape[0])."""
    xp = _xp(t, dtype)
    dtype = np.float64 if xp is np else (jnp.result_type(float) if dtype is None else dtype)
    t = xp.asarray(t, dtype)
    return xp.broadcast_to(t.reshape(-1, 1, 1, 1), (shape[0], 1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Schedules: scalar (alpha_t, sigma_t) families.

@dataclasses.dataclass(frozen=True)
class Cosine:
    """lambda(t) = -2 log tan(t0 + t (t1 - t0)) + shift (`schedules.logsnr_cosine`), variance preserving:
    alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    logsnr_min: float = -10.0
    logsnr_max: float = 10.0
    shift: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0
    variance_preserving = True

    def __post_init__(self):
        schedules._logsnr_cosine_limits(self.logsnr_min, self.logsnr_max)  # validates the pair

    def logsnr(self, t):
        return schedules.logsnr_cosine(t, self.logsnr_min, self.logsnr_max) + self.shift

    def t_from_logsnr(self, logsnr):
        return schedules.logsnr_cosine_inv(np.asarray(logsnr, np.float64) - self.shift, self.logsnr_min, self.logsnr_max)

    def alpha_sigma(self, t):
        return schedules.alpha_sigma_from_logsnr(self.logsnr(t))


@dataclasses.dataclass(frozen=True)
class ShiftedCosine:
    """Simple diffusion's cosine shifted to the image size (Hoogeboom, Heek & Salimans 2023, eq. 5;
    `schedules.logsnr_cosine_shifted`): lambda(t) = lambda_cos(t) + 2 log(noise_d / image_d), lambda_cos
    clipped to [logsnr_min, logsnr_max] before the shift; variance preserving. At image_d > noise_d the
    per-pixel SNR is lower, so that the image average-pooled to noise_d sees the cosine's SNR."""
    image_d: int
    noise_d: int = 64
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    t_min: float = 0.0
    t_max: float = 1.0
    variance_preserving = True

    def __post_init__(self):
        schedules._logsnr_cosine_limits(self.logsnr_min, self.logsnr_max)
        if self.image_d < 1 or self.noise_d < 1:
            raise ValueError(f'ShiftedCosine.image_d={self.image_d} and noise_d={self.noise_d} must be positive')

    def logsnr(self, t):
        return schedules.logsnr_cosine_shifted(t, self.image_d, self.noise_d, self.logsnr_min, self.logsnr_max)

    def t_from_logsnr(self, logsnr):
        return schedules.logsnr_cosine_shifted_inv(np.asarray(logsnr, np.float64), self.image_d, self.noise_d,
                                                   self.logsnr_min, self.logsnr_max)

    def alpha_sigma(self, t):
        return schedules.alpha_sigma_from_logsnr(self.logsnr(t))


@dataclasses.dataclass(frozen=True)
class InterpolatedCosine:
    """Simple diffusion's interpolated schedule (eq. 6; `schedules.logsnr_cosine_interpolated`):
    lambda(t) = t lambda_shift high_d(t) + (1 - t) lambda_shift low_d(t), on the noisier shift-low_d
    schedule at t = 0 and the shift-high_d one at t = 1; variance preserving. Its inverse is a host
    bisection (time grids only). low_d > high_d is allowed: it is denoising-diffusion-pytorch's
    `logsnr_schedule_interpolated(noise_d_low=high_d, noise_d_high=low_d)`, which weights the ends the
    other way round."""
    image_d: int
    low_d: int = 32
    high_d: int = 256
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    t_min: float = 0.0
    t_max: float = 1.0
    variance_preserving = True

    def __post_init__(self):
        t0, t1 = schedules._logsnr_cosine_limits(self.logsnr_min, self.logsnr_max)
        if self.image_d < 1 or self.low_d < 1 or self.high_d < 1:
            raise ValueError(f'InterpolatedCosine.image_d={self.image_d}, low_d={self.low_d} and high_d={self.high_d} '
                             'must be positive')
        if 2 * np.log(self.high_d / self.low_d) >= 4 * (t1 - t0):
            raise ValueError(f'InterpolatedCosine.low_d={self.low_d}, high_d={self.high_d}: the schedule would not '
                             'decrease monotonically (2 log(high_d / low_d) must be below 4 (t1 - t0))')

    def logsnr(self, t):
        return schedules.logsnr_cosine_interpolated(t, self.image_d, self.low_d, self.high_d, self.logsnr_min,
                                                    self.logsnr_max)

    def t_from_logsnr(self, logsnr):
        return schedules.logsnr_cosine_interpolated_inv(logsnr, self.image_d, self.low_d, self.high_d,
                                                        self.logsnr_min, self.logsnr_max)

    def alpha_sigma(self, t):
        return schedules.alpha_sigma_from_logsnr(self.logsnr(t))


@dataclasses.dataclass(frozen=True)
class VP:
    """alpha_t^2 = exp(-beta_min t - beta_d t^2 / 2), beta_d = beta_max - beta_min; in EDM's terms the
    noise level sigma~ = sigma/alpha = sqrt(expm1(beta_d t^2 / 2 + beta_min t)) (`schedules.vp_sigma`)."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    variance_preserving = True

    def logsnr(self, t):
        return -2 * _np_log(schedules.vp_sigma(t, self.beta_max - self.beta_min, self.beta_min))

    def t_from_logsnr(self, logsnr):
        return schedules.vp_sigma_inv(np.exp(-0.5 * np.asarray(logsnr, np.float64)), self.beta_max - self.beta_min,
                                      self.beta_min)

    def alpha_sigma(self, t):
        return schedules.alpha_sigma_from_logsnr(self.logsnr(t))


@dataclasses.dataclass(frozen=True)
class SubVP:
    """Song et al. 2021's sub-VP SDE (eq. 29; App. B): the mean of VP, a smaller variance,
    alpha_t = exp(-B_t / 2), sigma_t = 1 - exp(-B_t), B_t = beta_min t + (beta_max - beta_min) t^2 / 2;
    lambda = -B - 2 log(-expm1(-B)). The inverse solves u / (1 - u)^2 = e^lambda for u = exp(-B):
    u = 2a / (2a + 1 + sqrt(4a + 1)), a = e^lambda."""
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    variance_preserving = False

    def _B(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

    def logsnr(self, t):
        B = self._B(t)
        xp = np if isinstance(B, (np.ndarray, np.generic, float, int)) else jnp
        return -B - 2 * xp.log(-xp.expm1(-B))

    def t_from_logsnr(self, logsnr):
        a = np.exp(np.asarray(logsnr, np.float64))
        B = -np.log(2 * a / (2 * a + 1 + np.sqrt(4 * a + 1)))
        beta_d = self.beta_max - self.beta_min
        return (np.sqrt(self.beta_min ** 2 + 2 * beta_d * B) - self.beta_min) / beta_d

    def alpha_sigma(self, t):
        B = self._B(t)
        xp = np if isinstance(B, (np.ndarray, np.generic, float, int)) else jnp
        return xp.exp(-0.5 * B), -xp.expm1(-B)


@dataclasses.dataclass(frozen=True)
class VE:
    """alpha = 1, sigma_t = sigma_min (sigma_max / sigma_min)^t."""
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0
    variance_preserving = False

    def logsnr(self, t):
        return -2 * (np.log(self.sigma_min) + t * np.log(self.sigma_max / self.sigma_min))

    def t_from_logsnr(self, logsnr):
        return (-0.5 * np.asarray(logsnr, np.float64) - np.log(self.sigma_min)) / np.log(self.sigma_max / self.sigma_min)

    def alpha_sigma(self, t):
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return sigma ** 0, sigma


@dataclasses.dataclass(frozen=True)
class EDM:
    """alpha = 1, sigma_t = t (EDM's training process; its samplers choose their own time variable)."""
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    variance_preserving = False

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def logsnr(self, t):
        return -2 * _np_log(t)

    def t_from_logsnr(self, logsnr):
        return np.exp(-0.5 * np.asarray(logsnr, np.float64))

    def alpha_sigma(self, t):
        return t ** 0, t


@functools.lru_cache(maxsize=None)
def _discrete_betas(betas: str, T: int, kwargs: tuple) -> np.ndarray:
    table = {'linear': schedules.linear_betas, 'cosine': schedules.cosine_betas, 'sigmoid': schedules.sigmoid_betas}
    if betas not in table:
        raise ValueError(f'Discrete.betas must be one of {sorted(table)}, got {betas!r}')
    return np.asarray(table[betas](T, **dict(kwargs)), np.float64)


def _discrete_logsnr_table(betas: str, T: int, kwargs: tuple) -> np.ndarray:
    alpha_bar = schedules.alphas_cumprod(_discrete_betas(betas, T, kwargs))
    logsnr = np.log(alpha_bar) - np.log1p(-alpha_bar)
    logsnr.setflags(write=False)
    return logsnr


@dataclasses.dataclass(frozen=True)
class Discrete:
    """DDPM's beta table: alpha_n^2 = prod_{j<=n} (1 - beta_j), n = 1..T, at t = n / T; lambda is
    interpolated linearly in t between the table's points (only off-grid samplers see that).
    The network's DDPM step label is n - 1 = T t - 1 (`noise_label`). `beta_kwargs`: e.g.
    (('beta_start', 1e-4), ('beta_end', 0.02)) for 'linear' (a tuple of pairs: hashable)."""
    betas: str = 'linear'
    T: int = 1000
    beta_kwargs: tuple = ()
    variance_preserving = True

    def __post_init__(self):
        if int(self.T) != self.T or self.T < 2:
            raise ValueError(f'Discrete.T must be an integer >= 2, got {self.T}')
        _discrete_logsnr_table(self.betas, self.T, tuple(self.beta_kwargs))  # validates

    @property
    def t_min(self) -> float:
        return 1.0 / self.T

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def table(self) -> np.ndarray:
        """lambda_n for n = 1..T (float64)."""
        return _discrete_logsnr_table(self.betas, self.T, tuple(self.beta_kwargs))

    @property
    def betas_table(self) -> np.ndarray:
        """beta_n for n = 1..T (float64), as the beta function gives them."""
        return _discrete_betas(self.betas, self.T, tuple(self.beta_kwargs))

    def logsnr(self, t):
        xp = np if isinstance(t, (np.ndarray, np.generic, float, int)) else jnp
        n = np.arange(1, self.T + 1, dtype=np.float64)
        # The tables in t's dtype: jnp.interp on float64 numpy tables failed to lower in a
        # process that had compiled the same function with and without x64.
        if xp is np:
            return np.interp(t * self.T, n, self.table)
        t = jnp.asarray(t)
        return jnp.interp(t * self.T, jnp.asarray(n, t.dtype), jnp.asarray(self.table, t.dtype))

    def t_from_logsnr(self, logsnr):
        n = np.arange(1, self.T + 1, dtype=np.float64)
        return np.interp(-np.asarray(logsnr, np.float64), -self.table, n) / self.T  # lambda falls with n

    def alpha_sigma(self, t):
        return schedules.alpha_sigma_from_logsnr(self.logsnr(t))


def _np_log(x):
    return (np if isinstance(x, (np.ndarray, np.generic, float, int)) else jnp).log(x)


Schedule = Cosine | ShiftedCosine | InterpolatedCosine | VP | SubVP | VE | EDM | Discrete
SCHEDULES = {'cosine': Cosine, 'cosine_shifted': ShiftedCosine, 'cosine_interpolated': InterpolatedCosine, 'vp': VP, 'subvp': SubVP, 've': VE, 'edm': EDM, 'discrete': Discrete}


def noise_label(schedule, t):
    """The network's conventional noise label at t: DDPM's step index T t - 1 for a Discrete
    schedule, else 1000 t (DDPM's integer labels 0..999, for which the sinusoidal embeddings of
    DDPM++/ADM are sized), as score-SDE's VP models use."""
    return schedule.T * t - 1 if isinstance(schedule, Discrete) else 1000 * t


# ---------------------------------------------------------------------------------------------
# Processes.

class _DiagonalProcess:
    """What follows from (scale, sigma, basis) alone."""

    def diffuse(self, x, t, noise):
        """z_t = V (alpha_t * V^T x) + sigma_t * noise, with unit-normal `noise` of x's shape.

        The noise is added in pixel space: sigma_t is a scalar, so it needs no change of basis.
        """
        scale, sigma = self.scale_sigma(t, x.shape, x.dtype)
        return self.from_basis(scale * self.to_basis(x)) + sigma * noise

    def noise_level(self, t, shape, dtype=None):
        """sigma~_t = sigma_t / alpha_t per basis coefficient (EDM's sigma when alpha = 1)."""
        scale, sigma = self.scale_sigma(t, shape, dtype)
        return sigma / scale

    @property
    def t_min(self) -> float:
        return self.schedule.t_min

    @property
    def t_max(self) -> float:
        return self.schedule.t_max

    def t_from_noise_level(self, noise_level):
        """The time (host, float64) whose scalar (DC) noise level sigma_t / alpha_t is `noise_level`."""
        noise_level = np.asarray(noise_level, np.float64)
        if isinstance(self.schedule, EDM):  # t = sigma exactly, not through exp(log(sigma))
            return noise_level
        with np.errstate(divide='ignore'):
            return self.schedule.t_from_logsnr(-2 * np.log(noise_level))


@dataclasses.dataclass(frozen=True)
class GaussianProcess(_DiagonalProcess):
    """z_t = alpha_t x + sigma_t eps with (alpha_t, sigma_t) from `schedule`."""
    schedule: Schedule = Cosine()

    scalar_scale = True  # one scale per image: a plain noise-level denoiser applies (see parameterize)

    def logsnr(self, t, shape, dtype=None):
        """lambda(t) as [N, 1, 1, 1]."""
        return self.schedule.logsnr(_batch_time(t, shape, dtype))

    def scale_sigma(self, t, shape, dtype=None):
        """(alpha_t, sigma_t), each [N, 1, 1, 1]."""
        return self.schedule.alpha_sigma(_batch_time(t, shape, dtype))

    def to_basis(self, x):
        return x

    def from_basis(self, u):
        return u


@dataclasses.dataclass(frozen=True)
class BlurringProcess(_DiagonalProcess):
    """Blurring diffusion (Hoogeboom & Salimans 2023, Sec. 4): in the DCT basis, frequency (i, j) has

        alpha_t = a_t d_t,  d_t = (1 - d_min) exp(-lambda_ij tau_t) + d_min,  tau_t = sigma_blur(t)^2 / 2,
        sigma_blur(t) = sigma_blur_max sin^2(pi t / 2),  lambda_ij = (pi i / H)^2 + (pi j / W)^2,

    with (a_t, sigma_t) from `schedule` (the paper: the cosine logSNR clipped to [-10, 10]) and
    d_min = `min_scale`. So z_t = IDCT(alpha_t * DCT(x)) + sigma_t eps: a Gaussian blur of width
    sigma_blur(t), floored at d_min per frequency so the process stays invertible, plus white
    noise. The DC frequency is never blurred (lambda_00 = 0). The paper uses sigma_blur_max = 20
    at 32 and 64 px. The blur follows t in [0, 1], so the schedule's t range must be [0, 1].

    The per-frequency logSNR is lambda(t) + 2 log d_t. With sigma_blur_max = 0 the process runs
    GaussianProcess's operations exactly (scale [N,1,1,1], identity basis), not the per-frequency
    ones with d_t = 1: XLA fuses arithmetic differently for different shapes, so equal formulas
    are not enough for bit-equal results (tests/test_processes.py checks it through jit-compiled
    sampler runs).
    """
    schedule: Schedule = Cosine()
    sigma_blur_max: float = 20.0
    min_scale: float = 0.001

    def __post_init__(self):
        if self.sigma_blur_max < 0:
            raise ValueError(f'BlurringProcess.sigma_blur_max must be >= 0, got {self.sigma_blur_max}')
        if not 0 < self.min_scale <= 1:
            raise ValueError(f'BlurringProcess.min_scale must be in (0, 1], got {self.min_scale}')
        if self.sigma_blur_max and (self.schedule.t_min < 0 or self.schedule.t_max > 1):
            raise ValueError(f'BlurringProcess needs a schedule on t in [0, 1], got [{self.schedule.t_min}, '
                             f'{self.schedule.t_max}] ({type(self.schedule).__name__})')

    @property
    def scalar_scale(self) -> bool:
        return self.sigma_blur_max == 0

    def _blur_args(self, t, shape, dtype):
        t = _batch_time(t, shape, dtype)
        frequencies = schedules.dct_frequencies(shape[-3], shape[-2])[..., None]
        return t, (frequencies if isinstance(t, np.ndarray) else jnp.asarray(frequencies, t.dtype))

    def dissipation(self, t, shape, dtype=None):
        """d_t per frequency, [N, H, W, 1]."""
        t, frequencies = self._blur_args(t, shape, dtype)
        return schedules.blur_dissipation(t, frequencies, self.sigma_blur_max, self.min_scale)

    def logsnr(self, t, shape, dtype=None):
        """lambda(t) + 2 log d_t per frequency, [N, H, W, 1] ([N, 1, 1, 1] without blur)."""
        logsnr = self.schedule.logsnr(_batch_time(t, shape, dtype))
        if not self.sigma_blur_max:  # exactly GaussianProcess (class docstring)
            return logsnr
        t, frequencies = self._blur_args(t, shape, dtype)
        return logsnr + 2 * schedules.blur_log_dissipation(t, frequencies, self.sigma_blur_max, self.min_scale)

    def scale_sigma(self, t, shape, dtype=None):
        """(a_t d_t [N, H, W, 1], sigma_t [N, 1, 1, 1]); without blur (a_t, sigma_t), both [N, 1, 1, 1]."""
        a, sigma = self.schedule.alpha_sigma(_batch_time(t, shape, dtype))
        if not self.sigma_blur_max:  # exactly GaussianProcess (class docstring)
            return a, sigma
        return a * self.dissipation(t, shape, dtype), sigma

    def to_basis(self, x):
        return dct.dct2(x) if self.sigma_blur_max else x

    def from_basis(self, u):
        return dct.idct2(u) if self.sigma_blur_max else u


Process = GaussianProcess | BlurringProcess
