"""EDM's deterministic and stochastic samplers (Karras et al. 2022, Algorithms 1 and 2, App. D).

One sampler covers EDM's Algorithm 2 and its whole generalised ("ablation") family: it follows
the probability-flow ODE of a process with noise level sigma(t) and scale s(t),

    dx/dt = (sigma'(t)/sigma(t) + s'(t)/s(t)) x - sigma'(t) s(t)/sigma(t) D(x/s(t); sigma(t)),

from t_0 to t_N = 0 with Euler or 2nd-order Heun steps (Heun's point at t + alpha h), the last
step always Euler (so N Heun steps cost 2N - 1 denoiser calls), and optional churn: before step
i the noise is raised from sigma(t_i) to sigma(t_hat) = (1 + gamma_i) sigma(t_i) with
gamma_i = min(S_churn/N, sqrt(2) - 1) when S_min <= sigma(t_i) <= S_max, by adding
sqrt(sigma(t_hat)^2 - sigma(t_i)^2) s(t_hat) S_noise eps. With sigma(t) = t and s(t) = 1
(schedule='linear', scaling='none') this is exactly Algorithm 2.

Everything that depends only on the configuration -- the steps t_i, the churned t_hat, and the
ODE coefficients at each evaluation point -- is a static float64 table computed on the host, as
NVlabs/edm computes it; the loop over steps is a `lax.scan` whose body is array arithmetic and
denoiser calls. `sample` is jit-compiled and compiles once per (config, shapes).

Noise: a sample's noise depends only on its own key (pass one key per sample, e.g. from
`keys_from_seeds`), never on the batch it sits in; `step_noise` injects the per-step noise
instead (shape [num_steps, *latents.shape]), which reproduces a recorded run exactly.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules

SOLVERS = ('euler', 'heun')
DISCRETIZATIONS = ('vp', 've', 'iddpm', 'edm')
SCHEDULES = ('vp', 've', 'linear')
SCALINGS = ('vp', 'none')


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Configuration of the generalised EDM sampler; the defaults are EDM's Algorithm 2.

    solver: 'euler' | 'heun'; alpha: Heun's evaluation point t + alpha h (1 = trapezoid).
    discretization: how the N noise levels are spaced: 'edm' (rho), 'vp', 've', 'iddpm'.
    schedule: sigma(t): 'linear' (t), 'vp', 've' (sqrt t). scaling: s(t): 'none' (1), 'vp'.
    sigma_min / sigma_max: None takes the discretization's default (edm 0.002/80, vp
    sigma(epsilon_s)/sigma(1), ve 0.02/100, iddpm 0.002/81), then both are clamped to the
    range the denoiser supports.
    S_churn, S_min, S_max, S_noise: stochasticity (Algorithm 2); S_churn = 0 is deterministic.
    """
    num_steps: int = 18
    solver: str = 'heun'
    discretization: str = 'edm'
    schedule: str = 'linear'
    scaling: str = 'none'
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    epsilon_s: float = 1e-3
    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000
    alpha: float = 1.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float('inf')
    S_noise: float = 1.0

    def __post_init__(self):
        for field, value, allowed in (('solver', self.solver, SOLVERS),
                                      ('discretization', self.discretization, DISCRETIZATIONS),
                                      ('schedule', self.schedule, SCHEDULES),
                                      ('scaling', self.scaling, SCALINGS)):
            if value not in allowed:
                raise ValueError(f'Sampler.{field} must be one of {allowed}, got {value!r}')
        if int(self.num_steps) != self.num_steps or self.num_steps < 2:
            raise ValueError(f'Sampler.num_steps must be an integer >= 2, got {self.num_steps}')
        if not 0 < self.alpha <= 1:
            raise ValueError(f'Sampler.alpha must be in (0, 1], got {self.alpha}')
        if self.S_churn < 0 or self.S_noise < 0:
            raise ValueError('Sampler.S_churn and Sampler.S_noise must be non-negative')

    @property
    def num_evals(self) -> int:
        """Denoiser calls per sample: N for Euler, 2N - 1 for Heun."""
        return self.num_steps if self.solver == 'euler' else 2 * self.num_steps - 1


def edm_sampler(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float('inf'),
                S_noise: float = 1.0) -> Sampler:
    """EDM's Algorithm 2: Heun steps on sigma(t) = t at the rho-spaced noise levels."""
    return Sampler(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                   S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise)


# ---------------------------------------------------------------------------------------------
# Static step tables (host, float64).

class Process(NamedTuple):
    """sigma(t), sigma'(t), t(sigma), s(t), s'(t) as host functions of float64 arrays."""
    sigma: callable
    sigma_deriv: callable
    sigma_inv: callable
    scale: callable
    scale_deriv: callable


def sampler_process(sampler: Sampler, sigma_min: float, sigma_max: float) -> Process:
    """The (sigma, s) process the sampler integrates; the VP betas are fitted to the range."""
    if sampler.schedule == 'vp':
        beta_d, beta_min = schedules.vp_betas_for_range(sigma_min, sigma_max, sampler.epsilon_s)
        sigma = functools.partial(schedules.vp_sigma, beta_d=beta_d, beta_min=beta_min)
        sigma_deriv = functools.partial(schedules.vp_sigma_deriv, beta_d=beta_d, beta_min=beta_min)
        sigma_inv = functools.partial(schedules.vp_sigma_inv, beta_d=beta_d, beta_min=beta_min)
    elif sampler.schedule == 've':
        sigma, sigma_deriv, sigma_inv = schedules.ve_sigma, schedules.ve_sigma_deriv, schedules.ve_sigma_inv
    else:
        sigma, sigma_deriv, sigma_inv = schedules.linear_sigma, schedules.linear_sigma_deriv, schedules.linear_sigma_inv
    if sampler.scaling == 'vp':
        scale = lambda t: schedules.vp_scale(sigma(t))
        scale_deriv = lambda t: schedules.vp_scale_deriv(sigma(t), sigma_deriv(t))
    else:
        scale = lambda t: np.ones_like(t)
        scale_deriv = lambda t: np.zeros_like(t)
    return Process(sigma, sigma_deriv, sigma_inv, scale, scale_deriv)


def default_sigma_range(sampler: Sampler) -> tuple[float, float]:
    """The discretization's default [sigma_min, sigma_max] (EDM's generate.py defaults)."""
    vp_min = float(schedules.vp_sigma(np.float64(sampler.epsilon_s)))
    vp_max = float(schedules.vp_sigma(np.float64(1.0)))
    lo = {'vp': vp_min, 've': 0.02, 'iddpm': 0.002, 'edm': 0.002}[sampler.discretization]
    hi = {'vp': vp_max, 've': 100.0, 'iddpm': 81.0, 'edm': 80.0}[sampler.discretization]
    return (lo if sampler.sigma_min is None else sampler.sigma_min,
            hi if sampler.sigma_max is None else sampler.sigma_max)


def sigma_steps(sampler: Sampler, sigma_min: float, sigma_max: float) -> np.ndarray:
    """The N noise levels of the discretization, largest first (float64)."""
    n = sampler.num_steps
    if sampler.discretization == 'vp':
        return schedules.vp_sigma_steps(n, sigma_min, sigma_max, sampler.epsilon_s)
    if sampler.discretization == 've':
        return schedules.ve_sigma_steps(n, sigma_min, sigma_max)
    if sampler.discretization == 'iddpm':
        u = schedules.iddpm_u(sampler.M, sampler.C_1, sampler.C_2)
        return schedules.iddpm_sigma_steps(n, sigma_min, sigma_max, u)
    return schedules.edm_sigma_steps(n, sigma_min, sigma_max, sampler.rho)


class StepTable(NamedTuple):
    """Per-step constants, each an [N] float64 array (step i goes from t_cur[i] to t_next[i]).

    x_hat = x_scale * x + noise_scale * eps; the ODE derivative at a point t is
    d = a(t) x - b(t) D(x / s(t); sigma(t)) with a = sigma'/sigma + s'/s, b = sigma' s / sigma.
    """
    t_cur: np.ndarray
    t_hat: np.ndarray
    t_next: np.ndarray
    sigma_cur: np.ndarray
    s_cur: np.ndarray
    x_scale: np.ndarray       # s(t_hat) / s(t_cur)
    noise_scale: np.ndarray   # sqrt(max(sigma(t_hat)^2 - sigma(t_cur)^2, 0)) s(t_hat) S_noise; 0 where gamma = 0
    sigma_hat: np.ndarray
    s_hat: np.ndarray
    a_hat: np.ndarray
    b_hat: np.ndarray
    h: np.ndarray             # t_next - t_hat
    alpha_h: np.ndarray       # alpha h: Heun's second evaluation is at t_prime = t_hat + alpha h
    sigma_prime: np.ndarray
    s_prime: np.ndarray
    a_prime: np.ndarray
    b_prime: np.ndarray
    w_prime: np.ndarray       # 1 / (2 alpha): weight of d' in the Heun update


def step_table(sampler: Sampler, net_sigma_min: float = 0.0, net_sigma_max: float = float('inf'),
               round_sigma=lambda sigma: sigma) -> StepTable:
    """All configuration-dependent constants of the sampler, in float64 on the host."""
    sigma_min, sigma_max = schedules.clamp_sigma_range(*default_sigma_range(sampler), net_sigma_min, net_sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f'Empty noise range: sigma_min={sigma_min} >= sigma_max={sigma_max} '
                         '(after clamping to the range the denoiser supports)')
    proc = sampler_process(sampler, sigma_min, sigma_max)
    f64 = lambda a: np.asarray(a, dtype=np.float64)
    t_steps = f64(proc.sigma_inv(f64(round_sigma(sigma_steps(sampler, sigma_min, sigma_max)))))
    t_cur, t_next = t_steps, np.append(t_steps[1:], 0.0)

    sigma_cur = proc.sigma(t_cur)
    churn = (sampler.S_min <= sigma_cur) & (sigma_cur <= sampler.S_max)
    gamma = np.where(churn, min(sampler.S_churn / sampler.num_steps, np.sqrt(2) - 1), 0.0)
    t_hat = f64(proc.sigma_inv(f64(round_sigma(sigma_cur + gamma * sigma_cur))))
    sigma_hat, s_hat = proc.sigma(t_hat), proc.scale(t_hat)
    # Where gamma = 0, sigma_hat^2 - sigma_cur^2 is round-off from sigma(sigma_inv(sigma)) (about
    # 1e-20 with schedule 'vp', whose square root 1e-10 would still need a key): exactly no noise.
    noise_scale = np.where(gamma > 0, np.sqrt(np.clip(sigma_hat ** 2 - sigma_cur ** 2, 0, None)), 0.0)
    noise_scale = noise_scale * s_hat * sampler.S_noise
    h = t_next - t_hat

    def ode_coefficients(t):
        sigma, ds, s = proc.sigma(t), proc.sigma_deriv(t), proc.scale(t)
        return sigma, s, ds / sigma + proc.scale_deriv(t) / s, ds * s / sigma

    _, _, a_hat, b_hat = ode_coefficients(t_hat)
    # Heun's second point; at the last step t_prime may be 0, where it is never used.
    t_prime = t_hat + sampler.alpha * h
    with np.errstate(divide='ignore', invalid='ignore'):
        sigma_prime, s_prime, a_prime, b_prime = ode_coefficients(t_prime)
    s_cur = proc.scale(t_cur)
    w_prime = np.full_like(h, 1 / (2 * sampler.alpha))
    return StepTable(t_cur, t_hat, t_next, sigma_cur, s_cur, s_hat / s_cur, noise_scale, sigma_hat, s_hat,
                     a_hat, b_hat, h, sampler.alpha * h, sigma_prime, s_prime, a_prime, b_prime, w_prime)


# ---------------------------------------------------------------------------------------------
# One step.

def heun_step(denoise, x, row, noise, labels=None, augment_labels=None, *, second_order: bool):
    """One step of the generalised sampler from t_cur to t_next (EDM Algorithm 2, lines 4-11).

    x_hat = (s(t_hat)/s(t_cur)) x + noise_scale eps; d = a(t_hat) x_hat - b(t_hat) D(x_hat/s; sigma);
    Euler: x_next = x_hat + h d. Heun: x' = x_hat + alpha h d, d' at t_hat + alpha h,
    x_next = x_hat + h ((1 - 1/(2 alpha)) d + 1/(2 alpha) d'). `row` holds the step's constants
    (a `StepTable` slice); `noise` is the unit-normal eps (ignored where noise_scale = 0).
    """
    x_hat = row.x_scale * x + row.noise_scale * noise
    d_cur = row.a_hat * x_hat - row.b_hat * denoise(x_hat / row.s_hat, row.sigma_hat, labels, augment_labels)
    if not second_order:
        return x_hat + row.h * d_cur
    x_prime = x_hat + row.alpha_h * d_cur
    denoised = denoise(x_prime / row.s_prime, row.sigma_prime, labels, augment_labels)
    d_prime = row.a_prime * x_prime - row.b_prime * denoised
    return x_hat + row.h * ((1 - row.w_prime) * d_cur + row.w_prime * d_prime)


# ---------------------------------------------------------------------------------------------
# The whole sampler.

def keys_from_seeds(seeds) -> jax.Array:
    """One PRNG key per sample from integer seeds: a sample's randomness then depends on its seed
    alone, whatever batch it is drawn in."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, dtype=jnp.uint32))


def latents_from_keys(keys, shape, dtype=jnp.float32) -> jax.Array:
    """Unit-normal latents [len(keys), *shape], sample n drawn from keys[n] alone."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, dtype))(keys)


def step_noise_from_keys(keys, step: int, shape, dtype=jnp.float32) -> jax.Array:
    """The unit-normal churn noise of one step, sample n drawn from fold_in(keys[n], step + 1)."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step + 1), shape, dtype))(keys)


def _as_pytree_callable(denoise):
    """Denoisers cross the jit boundary as pytrees; wrap a plain function (static, by identity)."""
    leaves = jax.tree_util.tree_leaves(denoise)
    if len(leaves) == 1 and leaves[0] is denoise:
        return jax.tree_util.Partial(denoise)
    return denoise


def sample(sampler: Sampler, denoise, latents, key=None, labels=None, augment_labels=None, *,
           step_noise=None, return_trajectory: bool = False):
    """Draw samples by integrating from sigma_max to 0 with `sampler` (jit-compiled).

    denoise: `D(x, sigma, labels, augment_labels)`, e.g. a `jaxdiff.precond.Denoiser` (whose
      sigma range and round_sigma the sampler respects) or any function of that signature.
    latents: unit-normal NHWC array; the sampler starts from latents * sigma(t_0) s(t_0).
    key: one key per sample ([N], e.g. `keys_from_seeds(seeds)`) or a single key (split into N;
      then a sample's noise depends on its batch position). Needed only when S_churn > 0 and no
      `step_noise` is given.
    step_noise: optional [num_steps, *latents.shape] unit-normal churn noise, used instead of keys.
    return_trajectory: also return x at the start of every step, [num_steps, *latents.shape]
      (the scaled state s(t) x when scaling='vp', as in NVlabs/edm).

    The step constants are computed on the host in float64 and passed to the compiled loop as
    data, so only the number of steps, the solver, whether there is noise at all and the shapes
    select a compilation. The state has the latents' dtype.
    """
    table = step_table(sampler, getattr(denoise, 'sigma_min', 0.0), getattr(denoise, 'sigma_max', float('inf')),
                       getattr(denoise, 'round_sigma', lambda sigma: sigma))
    stochastic = bool(np.any(table.noise_scale > 0)) or step_noise is not None
    if step_noise is not None:
        if step_noise.shape != (sampler.num_steps,) + latents.shape:
            raise ValueError(f'step_noise must have shape {(sampler.num_steps,) + latents.shape}, '
                             f'got {step_noise.shape}')
    elif stochastic:
        if key is None:
            raise ValueError('A stochastic sampler (S_churn > 0) needs a key or step_noise')
        if jnp.ndim(key) == 0:
            key = jax.random.split(key, latents.shape[0])
    table = StepTable(*(np.asarray(column, latents.dtype) for column in table))
    heun_steps = sampler.num_steps - 1 if sampler.solver == 'heun' else 0
    return _sample(denoise=_as_pytree_callable(denoise), latents=latents, table=table,
                   keys=key if stochastic else None, labels=labels, augment_labels=augment_labels,
                   step_noise=step_noise, heun_steps=heun_steps, return_trajectory=return_trajectory)


@functools.partial(jax.jit, static_argnames=('heun_steps', 'return_trajectory'))
def _sample(*, denoise, latents, table, keys, labels, augment_labels, step_noise, heun_steps, return_trajectory):
    """The compiled loop: `heun_steps` Heun steps then Euler steps, over the rows of `table`."""
    steps = jnp.arange(table.t_cur.shape[0])
    stochastic = keys is not None or step_noise is not None

    def noise_at(step, given):
        if not stochastic:
            return jnp.zeros((), latents.dtype)
        if given is not None:
            return given
        return step_noise_from_keys(keys, step, latents.shape[1:], latents.dtype)

    def body(second_order):
        def step(x, inputs):
            row, i, given = inputs
            x_next = heun_step(denoise, x, row, noise_at(i, given), labels, augment_labels,
                               second_order=second_order)
            return x_next, (x if return_trajectory else None)
        return step

    rows = (table, steps, step_noise)
    x = latents * (table.sigma_cur[0] * table.s_cur[0])
    trajectory = []
    if heun_steps:
        x, traj = jax.lax.scan(body(True), x, jax.tree.map(lambda a: a[:heun_steps], rows))
        trajectory.append(traj)
    # The remaining steps are Euler: all of them for solver='euler', else the last one (to sigma=0).
    x, traj = jax.lax.scan(body(False), x, jax.tree.map(lambda a: a[heun_steps:], rows))
    trajectory.append(traj)
    return (x, jnp.concatenate(trajectory)) if return_trajectory else x
