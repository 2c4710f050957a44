"""Samplers for the processes of `jaxdiff.processes` (Gaussian and blurring diffusion) with an eps model.

Each process is diagonal in its basis: coefficient k of u = to_basis(z_t) is a 1-D diffusion
u_k = alpha_{t,k} x_k + sigma_t eps_k. So every sampler works per coefficient, for any process.

ancestral_sample  The paper's sampler (Hoogeboom & Salimans 2023, Sec. 4 and its sampling algorithm):
                  T steps on the uniform grid t_i = 1 - i/T; each draws u_s ~ q(z_s | z_t, x_hat)
                  (`process.posterior`, per-frequency variance sigma_s^2 (1 - r)) with the noise drawn
                  in the basis, and the last step (t = 1/T -> 0) returns the posterior mean, no noise.
ode_sample        The probability-flow ODE in scaled coordinates. With x~ = u / alpha_t and
                  sigma~ = sigma_t / alpha_t per coefficient, u = alpha (x + sigma~ eps) makes each
                  coefficient a variance-exploding diffusion x~ = x + sigma~ eps, whose PF-ODE is
                      dx~_k / dt = sigma~_k'(t) eps_hat_k,   i.e. dx~_k = eps_hat_k dsigma~_k.
                  solver='euler': x~_s = x~_t + (sigma~_s - sigma~_t) eps_hat, which is DDIM (eta = 0)
                  exactly, per frequency. solver='heun': EDM's 2nd-order step on each coefficient's
                  own sigma~ (the Euler point, eps_hat' there, the average of the two slopes).
                  solver='exp_heun' (default): the same two evaluations combined as a 2nd-order
                  exponential integrator in log sigma~ (`ode_step`), which stays accurate when a
                  step shrinks sigma~ by orders of magnitude. For a Gaussian process 'euler' and
                  'heun' are EDM's Euler and Heun in sigma~. The last step is Euler from t = 0 to
                  sigma~ = 0 (x_hat = x~ - sigma~ eps_hat, EDM's final step), so N steps cost N
                  (euler) or 2N - 1 (heun, exp_heun) model calls.

Why 'exp_heun' and a uniform grid: blurring diffusion moves each frequency through its own noise
levels, sigma~_k(t) = sigma~_DC(t) / d_k(t), and the high frequencies fall by a factor 1/d_min =
1000 within about a tenth of the time axis. Measured on 8x8 Gaussian test data with the ideal
model (max over frequencies of |output variance / data variance - 1| from the exact start, uniform
grid; the full table, with the rho grid, is printed by `python tests/test_process_samplers.py`):

    steps (model calls)       gaussian: heun  exp_heun  euler    blurring: heun  exp_heun  euler
    N=20 (39; euler 20)                 0.10   0.060    0.17               740    0.62      0.80
    N=40 (79; euler 40)                 0.015  0.019    0.086              4.5    0.21      0.54
    N=80 (159; euler 80)                0.0027 0.0056   0.044              0.36   0.052     0.31
    N=160 (319; euler 160)              5.2e-4 0.0018   0.022              0.064  0.013     0.17
    ancestral, T = 100 / 1000 calls     0.081 / 0.0092                     0.37 / 0.047

EDM's trapezoid ('heun') is unusable on blurring below ~80 steps (it extrapolates across the
1000x drop), while 'exp_heun' is stable at every step count and the most accurate for blurring;
for Gaussian diffusion it is better than 'heun' below 40 steps and 2-3x worse at 80-160 (both
under 1% there). Either reaches the ancestral sampler's T = 1000 accuracy with about 160 model
calls. Time grid (`ode_time_grid`): 'uniform' in t (default) or EDM's rho = 7 spacing of the DC
noise level sigma~_DC(t) = exp(-lambda(t) / 2) (the DC frequency is never blurred, so that curve
is the same for both processes) mapped back to t; uniform was the more accurate in most cases
measured and within 20% of rho otherwise.

Both drivers are one jit-compiled `lax.scan` over the steps (host float64 time grid passed in as
data, cast to the latents' dtype). `model(z, t, labels)` is a `precond.EpsModel`, a
`precond.DenoiserEpsModel` (EDM denoisers on a Gaussian process) or any function of that
signature. Start from `prior(process, key, shape)`: N(0, sigma_1^2 I), the marginal at t = 1 with
its signal term alpha_1 x dropped (alpha_1 <= exp(-5) for logsnr_min = -10).

Noise: `key` is one PRNG key, or one key per sample ([N], e.g. `samplers.keys_from_seeds`) so a
sample's noise does not depend on its batch; step i uses fold_in(key, i + 1), the prior fold_in(key, 0).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules

SOLVERS = ('euler', 'heun', 'exp_heun')
SPACINGS = ('rho', 'uniform')


# ---------------------------------------------------------------------------------------------
# Noise and the prior.

def _normal(key, index: int | jax.Array, shape, dtype):
    """Unit normal of `shape` from fold_in(key, index); per sample when key is an [N] array of keys."""
    if jnp.ndim(key) == 0:
        return jax.random.normal(jax.random.fold_in(key, index), shape, dtype)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape[1:], dtype))(key)


def prior(process, key, shape, dtype=jnp.float32):
    """z_1 ~ N(0, sigma_1^2 I) for an NHWC `shape`: the starting point of every sampler here."""
    _, sigma = process.scale_sigma(1.0, shape, dtype)
    return sigma * _normal(key, 0, shape, dtype)


# ---------------------------------------------------------------------------------------------
# Time grids (host, float64).

def ancestral_time_grid(num_steps: int) -> np.ndarray:
    """t_i = 1 - i / T, i = 0..T: step i goes from t_i to t_{i+1}."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}')
    return 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps


def ode_time_grid(process, num_steps: int, spacing: str = 'uniform', rho: float = 7.0) -> np.ndarray:
    """N times t_0 = 1 > ... > t_{N-1} = 0 for `ode_sample` (after t_{N-1} comes sigma~ = 0).

    'uniform': t_i = 1 - i / (N - 1).
    'rho': sigma~_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho on the DC noise level
    sigma~ = exp(-lambda/2) in [exp(-logsnr_max/2), exp(-logsnr_min/2)], t_i = lambda^{-1}(-2 log sigma~_i).
    """
    if num_steps < 2:
        raise ValueError(f'num_steps must be at least 2, got {num_steps}')
    if spacing == 'uniform':
        return 1.0 - np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
    if spacing != 'rho':
        raise ValueError(f'spacing must be one of {SPACINGS}, got {spacing!r}')
    lo, hi = process.logsnr_min, process.logsnr_max
    noise_levels = schedules.edm_sigma_steps(num_steps, np.exp(-0.5 * hi), np.exp(-0.5 * lo), rho)
    t = schedules.logsnr_cosine_inv(-2 * np.log(noise_levels), lo, hi)
    t[0], t[-1] = 1.0, 0.0  # exact ends, not atan/tan round trips
    return t


# ---------------------------------------------------------------------------------------------
# One step.

def ancestral_step(model, process, z_t, s, t, noise=None, labels=None):
    """z_s from z_t (s < t): u_s = mean + std * noise with (mean, std) = process.posterior(z_t, eps_hat, s, t).

    `noise` is unit normal in the basis (z's shape); None returns the posterior mean (the last step).
    """
    mean, std = process.posterior(z_t, model(z_t, t, labels), s, t)
    return process.from_basis(mean if noise is None else mean + std * noise)


def scaled_eps(model, process, x, t, labels=None):
    """(eps_hat in the basis, sigma~_t) at the scaled state x~ = to_basis(z_t) / alpha_t."""
    scale, sigma = process.scale_sigma(t, x.shape, x.dtype)
    eps = model(process.from_basis(scale * x), t, labels)
    return process.to_basis(eps), sigma / scale


def ode_step(model, process, x, s, t, labels=None, *, solver: str = 'heun'):
    """x~_s from x~_t along the PF-ODE dx~ = eps_hat dsigma~ (per coefficient; s < t, both in [0, 1]).

    With h = sigma~_s - sigma~_t and eps_hat, x_hat = x~ - sigma~_t eps_hat at (x~, t):
      'euler'     x_e = x~ + h eps_hat                                   (= DDIM, eta = 0)
      'heun'      x~ + h (eps_hat + eps_hat') / 2, eps_hat' at (x_e, s)    (EDM's trapezoid in sigma~)
      'exp_heun'  x_e + w (x_hat' - x_hat), x_hat' = x_e - sigma~_s eps_hat',
                  w = 1 + expm1(-k) / k, k = log(sigma~_t / sigma~_s) = (lambda_s - lambda_t) / 2.
    'exp_heun' integrates dx~/dlog sigma~ = x~ - x_hat with the linear part exact and x_hat linear
    in log sigma~ between its two evaluations (a 2nd-order exponential integrator, as in DPM-Solver).
    w -> k/2 for small steps (it is then 'heun'), w -> 1 for long ones (x~_s -> x_hat'), so it
    stays accurate where sigma~ falls by orders of magnitude in one step; the trapezoid then
    extrapolates wildly. Blurring does that to its high frequencies: d_t drops from 1 to d_min within
    a tenth of the time axis (see the table in the module docstring).
    """
    if solver not in SOLVERS:
        raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}')
    eps, noise_level_t = scaled_eps(model, process, x, t, labels)
    scale_s, sigma_s = process.scale_sigma(s, x.shape, x.dtype)
    noise_level_s = sigma_s / scale_s
    h = noise_level_s - noise_level_t
    x_euler = x + h * eps
    if solver == 'euler':
        return x_euler
    eps_s, _ = scaled_eps(model, process, x_euler, s, labels)
    if solver == 'heun':
        return x + h * (0.5 * (eps + eps_s))
    k = 0.5 * (process.logsnr(s, x.shape, x.dtype) - process.logsnr(t, x.shape, x.dtype))
    w = 1 + jnp.expm1(-k) / k
    return x_euler + w * ((x_euler - noise_level_s * eps_s) - (x - noise_level_t * eps))


def ode_final_step(model, process, x, t, labels=None):
    """Euler from t to sigma~ = 0: the data estimate x_hat = x~ - sigma~_t eps_hat (in the basis)."""
    eps, noise_level = scaled_eps(model, process, x, t, labels)
    return x - noise_level * eps


class LowSNRCutoff(flax.struct.PyTreeNode):
    """An eps model whose prediction is replaced by the no-signal limit u / sigma_t on every basis
    coefficient whose logSNR lambda_{t,k} is below `logsnr_cutoff`, i.e. x_hat_k = 0 there.

    Why: on the blurring process the frequencies held at the d_min floor have sigma~ = sigma /
    (a d_min) up to ~1e5, so the data estimate x_hat = x~ - sigma~ eps_hat of a trained network
    is its eps error times 1e5 there. The ancestral sampler's fresh noise forgets it; the
    deterministic ODE carries it to the end (checkerboard samples). Below the cutoff the ideal
    prediction is u / sigma up to a relative error of order exp(lambda) times the coefficient's
    variance, so a cutoff well below the data's logSNR scale costs little: measured on the digits
    preset (256 samples, FD floor 7.5), 40 exp_heun steps gave FD 88 without it and 24-30 with
    cutoffs -12 to -5 (-8 best), against 17 for the ancestral sampler with T = 100.
    """
    model: Any
    process: Any = flax.struct.field(pytree_node=False)
    logsnr_cutoff: float = flax.struct.field(pytree_node=False, default=-8.0)

    def __call__(self, z, t, labels=None):
        eps = self.model(z, t, labels)
        logsnr = self.process.logsnr(t, z.shape, z.dtype)
        _, sigma = self.process.scale_sigma(t, z.shape, z.dtype)
        u, eps_u = self.process.to_basis(z), self.process.to_basis(eps)
        return self.process.from_basis(jnp.where(logsnr < self.logsnr_cutoff, u / sigma, eps_u))


# ---------------------------------------------------------------------------------------------
# Drivers.

def _as_pytree_callable(model):
    """Models cross the jit boundary as pytrees; a plain function becomes a static Partial."""
    leaves = jax.tree_util.tree_leaves(model)
    if len(leaves) == 1 and leaves[0] is model:
        return jax.tree_util.Partial(model)
    return model


def ancestral_sample(model, process, z, key, *, num_steps: int = 1000, labels=None):
    """The paper's ancestral sampler from z (at t = 1, e.g. `prior(...)`) in `num_steps` steps (jit-compiled).

    Returns the last step's posterior mean, an estimate of z_0 = alpha_0 x + sigma_0 eps without its
    noise (alpha_0 ~ 1, sigma_0 = exp(-5) ~ 0.007 for logsnr_max = 10). Costs num_steps model calls.
    """
    grid = jnp.asarray(ancestral_time_grid(num_steps), z.dtype)
    return _ancestral(_as_pytree_callable(model), process, z, key, grid, labels)


@functools.partial(jax.jit, static_argnames=('process',))
def _ancestral(model, process, z, key, grid, labels):
    def body(z_t, inputs):
        i, t, s = inputs
        noise = _normal(key, i + 1, z_t.shape, z_t.dtype)
        return ancestral_step(model, process, z_t, s, t, noise, labels), None

    steps = grid.shape[0] - 1
    z, _ = jax.lax.scan(body, z, (jnp.arange(steps - 1), grid[:-2], grid[1:-1]))
    return ancestral_step(model, process, z, grid[-1], grid[-2], None, labels)


def ode_sample(model, process, z, *, num_steps: int = 50, solver: str = 'exp_heun', spacing: str = 'uniform',
               rho: float = 7.0, labels=None, low_snr_cutoff: float | None = None):
    """Integrate the PF-ODE from z (at t = 1) to t = 0, then to sigma~ = 0 (jit-compiled, deterministic).

    num_steps N: the grid `ode_time_grid(process, N, spacing, rho)` of N times from 1 to 0; N - 1
    `ode_step`s between them ('exp_heun', 'heun' or 'euler' = DDIM) and the final Euler step to
    sigma~ = 0. Returns the data estimate in pixel space. Costs N (euler) or 2N - 1 model calls.
    low_snr_cutoff: wrap the model in `LowSNRCutoff` (needed for trained networks on the blurring
    process; -8 on the digits).
    """
    if solver not in SOLVERS:
        raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}')
    grid = jnp.asarray(ode_time_grid(process, num_steps, spacing, rho), z.dtype)
    model = _as_pytree_callable(model)
    if low_snr_cutoff is not None:
        model = LowSNRCutoff(model, process, float(low_snr_cutoff))
    return _ode(model, process, z, grid, labels, solver=solver)


@functools.partial(jax.jit, static_argnames=('process', 'solver'))
def _ode(model, process, z, grid, labels, *, solver):
    scale, _ = process.scale_sigma(grid[0], z.shape, z.dtype)
    x = process.to_basis(z) / scale

    def body(x, inputs):
        t, s = inputs
        return ode_step(model, process, x, s, t, labels, solver=solver), None

    x, _ = jax.lax.scan(body, x, (grid[:-1], grid[1:]))
    return process.from_basis(ode_final_step(model, process, x, grid[-1], labels))
