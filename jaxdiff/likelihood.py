"""Log-likelihoods and bits/dim through the probability-flow ODE (Song et al. 2021, "Score-based
generative modeling through SDEs", §4.3 and App. D.2), for any process of `jaxdiff.processes` and
a `jaxdiff.parameterize` model (`log_likelihood_of_model`, `bits_per_dim_of_model`), or in EDM's
form: a denoiser D(x; sigma) and a `samplers.Sampler` naming sigma(t) and s(t) (`log_likelihood`,
`bits_per_dim`: the same computation on the matching process, `sampler_process`).

The ODE. Per basis coefficient u = V^T z = alpha_t x + sigma_t eps (alpha_t per frequency for
blurring, sigma_t a scalar), with f = d log alpha / dt and g^2 = d sigma^2 / dt - 2 f sigma^2 (the
SDE dx = f x dt + g dw of Song et al. 2021), the PF-ODE du/dt = f u - g^2 score / 2 with
score = -eps_hat / sigma is

    du/dt = f u + c eps_hat,   c = g^2 / (2 sigma) = sigma d log(sigma / alpha) / dt = -sigma lambda' / 2,

lambda = log(alpha^2 / sigma^2). alpha'(t) and sigma'(t) are forward-mode derivatives (`jax.jvp`) of
`process.scale_sigma`, so every schedule works. In EDM's variables (x = s x~, sigma~ = sigma / alpha)
this is EDM's dx/dt = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x / s; sigma) of `samplers`.
A Discrete (DDPM) schedule's lambda is linear in t between its table points t = n / T: lambda' jumps
there, and the right-hand side with it (it is smooth in lambda, not in t). Each of the T jumps
costs the adaptive solver an error of about its tolerance times |Delta| (measured: 6e-4 to 5e-3
nats at rtol 1e-5 to 1e-7), so ODESolver(time='auto') integrates a Discrete schedule in
tau = log(sigma_t / alpha_t), where it is smooth. 'process' integrates in the process's t,
'log_sigma' in tau (t(tau) by Newton's method on the schedule); div f dt is invariant under a
change of time, so the likelihood is the same and only the solver's work differs.

It is a continuous normalising flow from the data (t_min) to the prior (t_max). By the
instantaneous change of variables (Chen et al. 2018, Thm. 1), along a solution u(t),

    log p_{t_min}(u(t_min)) = log p_prior(u(t_max)) + int_{t_min}^{t_max} div f(u(t), t) dt,

so we integrate the pair (z, Delta) with dDelta/dt = div f from t_min to t_max, entirely in JAX
(`dopri5` is an adaptive Dormand-Prince 5(4) solver in a `lax.while_loop`; `rk4`/`heun` take fixed
steps) and add the prior's log-density at z(t_max): log N(z; 0, sigma_{t_max}^2 I) (EDM's
s(t_max) sigma(t_max)), which neglects the signal alpha_{t_max} x left at t_max (its error is
closed-form; tests/test_likelihood.py). V is orthonormal, so div_z = div_u and the density of z is
that of u. What is computed is the density of the process's marginal at t_min (alpha_{t_min} x +
sigma_{t_min} eps), as in score-SDE, which starts the ODE at t = epsilon. Each image is solved on its
own (vmapped: its own steps and nfe, its result independent of its batch-mates); a batch costs as
many iterations as its slowest image.

div f is exact (the trace of the Jacobian from `jax.jacfwd`: D JVPs, for small images and tests) or
Hutchinson's estimate eps^T (df/dx) eps with Rademacher or Gaussian probes, one JVP per probe, the
probes drawn once per image and held fixed along the trajectory (as score-SDE does, so the
estimated ODE stays smooth for the adaptive solver).

bits/dim. 8-bit images k in {0, ..., 255} are modelled on x in [-1, 1]. With bin width Delta (in
x units) and uniform dequantisation x = c_k + (u - 1/2) Delta, u ~ U[0, 1)^D, Jensen's inequality
gives the discrete negative log-likelihood bound

    -log2 P(k) / D <= E_u[-log p(x)] / (D ln 2) + log2(1 / Delta),

and the per-image estimate is -log p(x) / (D ln 2) + log2(1 / Delta). Two bin conventions:

  'centered' (default): bins centred on the training points x = 2k/(L-1) - 1 that jaxdiff's data
     pipeline uses (k/127.5 - 1 for L = 256 levels, k/8 - 1 for the 17-level digits), so
     Delta = 2/(L-1), x = (k + u - 1/2)/127.5 - 1 and the offset is log2(127.5) = 6.99435 bits;
  'score_sde': score-SDE's evaluation pipeline: y = (k + u)/256 in [0, 1), x = 2y - 1 =
     (k + u)/128 - 1, Delta = 2/L = 1/128 and the offset is log2(128) = 7 (their code's
     `log2(d inverse_scaler/dx) + 8` for centred data; 8 for models of [0, 1] data).

The conventions differ by log2(128/127.5) = 0.0056 bits/dim in the offset, plus the effect on
log p of the 0.4% scale change and half-bin shift. `dequantize=False` evaluates the density at the
bin centres (u = 1/2), which is an approximation, not a bound.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import processes, samplers, schedules
from jaxdiff.samplers import grids

METHODS = ('rk45', 'rk4', 'heun')
TIMES = ('auto', 'process', 'log_sigma')
DIVERGENCES = ('hutchinson', 'exact')
PROBES = ('rademacher', 'gaussian')
BINS = ('centered', 'score_sde')


@dataclasses.dataclass(frozen=True)
class ODESolver:
    """How the PF-ODE is integrated.

    method: 'rk45' (adaptive Dormand-Prince 5(4), score-SDE's scipy default) or the fixed-step 'rk4'
      and 'heun' (2nd order), whose `num_steps` steps follow a discretisation of the noise levels
      sigma_t / alpha_t (EDM's rho = 7, or the EDM form's `Sampler.discretization`), which puts them
      where the ODE moves fastest.
    rtol, atol: the adaptive solver's tolerances (score-SDE: 1e-5 both); the error norm is the RMS
      over the whole state (image and Delta) of err / (atol + rtol max(|y|, |y_new|)), as scipy's.
    max_steps: attempted adaptive steps after which an image is given up (`success` = False).
    time: 'process' (the process's t), 'log_sigma' (log(sigma_t / alpha_t)) or 'auto' ('log_sigma'
      for a Discrete schedule, else 'process'); see the module docstring.
    """
    method: str = 'rk45'
    rtol: float = 1e-5
    atol: float = 1e-5
    num_steps: int = 64
    max_steps: int = 4096
    time: str = 'auto'

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f'ODESolver.method must be one of {METHODS}, got {self.method!r}')
        if self.time not in TIMES:
            raise ValueError(f'ODESolver.time must be one of {TIMES}, got {self.time!r}')
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f'ODESolver.rtol and ODESolver.atol must be positive, got {self.rtol}, {self.atol}')
        if int(self.num_steps) != self.num_steps or self.num_steps < 1:
            raise ValueError(f'ODESolver.num_steps must be a positive integer, got {self.num_steps}')
        if int(self.max_steps) != self.max_steps or self.max_steps < 1:
            raise ValueError(f'ODESolver.max_steps must be a positive integer, got {self.max_steps}')


# ---------------------------------------------------------------------------------------------
# EDM's form: presets (samplers.Sampler) and their processes.

def edm_process(sigma_min: float = 0.002, sigma_max: float = 80.0) -> samplers.Sampler:
    """EDM: sigma(t) = t, s(t) = 1 on [sigma_min, sigma_max]; prior N(0, sigma_max^2 I)."""
    return samplers.Sampler(discretization='edm', schedule='linear', scaling='none',
                            sigma_min=sigma_min, sigma_max=sigma_max)


def vp_process(epsilon_t: float = 1e-5, beta_d: float = 19.9, beta_min: float = 0.1) -> samplers.Sampler:
    """Score-SDE VP on t in [epsilon_t, 1] (score-SDE's likelihood uses epsilon = 1e-5); prior
    N(0, s(1)^2 sigma(1)^2 I), s(1) sigma(1) = sqrt(1 - exp(-beta_d/2 - beta_min)) ~ 1."""
    sigma = lambda t: float(schedules.vp_sigma(np.float64(t), beta_d, beta_min))
    return samplers.Sampler(discretization='vp', schedule='vp', scaling='vp', epsilon_s=epsilon_t,
                            sigma_min=sigma(epsilon_t), sigma_max=sigma(1.0))


def ve_process(sigma_min: float = 0.01, sigma_max: float = 50.0) -> samplers.Sampler:
    """VE: sigma(t) = sqrt(t), s(t) = 1 (EDM's form), prior N(0, sigma_max^2 I); integrated as
    score-SDE's geometric sigma(t), the same trajectory in another time. Defaults: score-SDE's
    CIFAR-10 VE."""
    return samplers.Sampler(discretization='ve', schedule='ve', scaling='none',
                            sigma_min=sigma_min, sigma_max=sigma_max)


def sampler_process(sampler: samplers.Sampler) -> processes.GaussianProcess:
    """The process of an EDM-form `Sampler` on its discretisation's noise range: schedule 'linear'
    (scaling 'none') is EDM, 've' ('none') VE, 'vp' ('vp') VP with the betas fitted to the range
    (EDM App. C.2, as `samplers.steps.edm_time_variable`) on t in [epsilon_s, 1]."""
    lo, hi = grids.default_sigma_range(sampler)
    kind = (sampler.schedule, sampler.scaling)
    if kind == ('linear', 'none'):
        return processes.GaussianProcess(processes.EDM(lo, hi))
    if kind == ('ve', 'none'):
        return processes.GaussianProcess(processes.VE(lo, hi))
    if kind == ('vp', 'vp'):
        beta_d, beta_min = schedules.vp_betas_for_range(lo, hi, sampler.epsilon_s)
        return processes.GaussianProcess(processes.VP(beta_min, beta_min + beta_d, sampler.epsilon_s, 1.0))
    raise ValueError(f"The likelihood's EDM form takes schedule/scaling linear/none, ve/none or vp/vp, got "
                     f'{sampler.schedule}/{sampler.scaling}')


# ---------------------------------------------------------------------------------------------
# The PF-ODE of a process.

_TABLE_SIZE, _NEWTON_STEPS = 257, 3


@dataclasses.dataclass(frozen=True)
class ModelFlow:
    """The PF-ODE dz/dtau = V (f V^T z + c V^T eps_hat) of `process` in the integration variable tau:
    hashable host constants (static under jit). Module docstring for f and c.

    time: 'process' (tau = t) or 'log_sigma' (tau = log(sigma_t / alpha_t) of the schedule, the DC
      coefficient's; f and c are then multiplied by dt/dtau).
    t_min, t_max: the ends in tau; `times`: the ends in process time.
    table: for 'log_sigma', host float64 (tau_k, t_k) pairs, the start of t(tau)'s Newton steps.
    """
    process: Any
    t_min: float
    t_max: float
    time: str = 'process'
    times: tuple = (0.0, 1.0)
    table: tuple = ()

    def _log_noise_level(self, t):
        alpha, sigma = self.process.schedule.alpha_sigma(t)
        return jnp.log(sigma) - jnp.log(alpha)

    def process_time(self, tau):
        """t at tau (traced): tau itself, or Newton's method on log(sigma_t / alpha_t) = tau from
        the table's linear interpolation (exact in 1-2 steps for Discrete's piecewise-linear
        lambda; quadratic convergence from ~1e-3 relative for the smooth schedules)."""
        if self.time == 'process':
            return tau
        t = jnp.interp(tau, *(jnp.asarray(a, tau.dtype) for a in self.table))
        for _ in range(_NEWTON_STEPS):
            s, ds = jax.jvp(self._log_noise_level, (t,), (jnp.ones_like(t),))
            t = jnp.clip(t - (s - tau) / ds, *self.times).astype(tau.dtype)
        return t

    def coefficients(self, tau, shape, dtype):
        """(t, alpha_t, sigma_t, f, c) at tau for an NHWC batch shape (alpha, f, c per coefficient)."""
        tau = jnp.asarray(tau, dtype)
        t = self.process_time(tau)
        (alpha, sigma), (dalpha, dsigma) = jax.jvp(lambda t: self.process.scale_sigma(t, shape, dtype), (t,),
                                                   (jnp.ones_like(t),))
        f = dalpha / alpha
        c = dsigma - sigma * f  # sigma d log(sigma / alpha) / dt
        if self.time == 'log_sigma':
            dtau = jax.jvp(self._log_noise_level, (t,), (jnp.ones_like(t),))[1]
            f, c = f / dtau, c / dtau
        return tuple(jnp.asarray(a, dtype) for a in (t, alpha, sigma, f, c))

    def vector_field(self, model, tau, shape, dtype, labels=None):
        """z -> dz/dtau for batches z of `shape`: one model evaluation per z."""
        t, alpha, sigma, f, c = self.coefficients(tau, shape, dtype)
        p = self.process

        def field(z):
            eps = model.predict(z, t, alpha, sigma, labels).eps
            return p.from_basis(f * p.to_basis(z) + c * p.to_basis(eps))
        return field

    @property
    def prior_std(self) -> float:
        """sigma_t at t_max in float64: the std of the Gaussian prior N(0, sigma^2 I)."""
        return float(np.asarray(self.process.scale_sigma(np.float64(self.times[1]), (1, 1, 1, 1))[1]).item())

    def grid(self, num_steps: int, discretization: samplers.Sampler = samplers.Sampler()) -> tuple:
        """num_steps + 1 values of tau from t_min to t_max at the noise levels sigma_t / alpha_t (DC)
        of `discretization` (EDM's rho = 7 by default), float64 on the host."""
        lo, hi = grids.dc_noise_level(self.process, np.array(self.times))
        levels = grids.edm_noise_levels(dataclasses.replace(discretization, num_steps=num_steps + 1), lo, hi)[::-1]
        tau = np.log(levels) if self.time == 'log_sigma' else self.process.t_from_noise_level(levels)
        tau = np.asarray(tau, np.float64)
        tau[0], tau[-1] = self.t_min, self.t_max  # exact ends, whatever the inverse rounds
        return tuple(tau.tolist())


def model_flow(model, process=None, time: str = 'auto'):
    """(model, ModelFlow): the PF-ODE of `process` (default `model.process`) on its [t_min, t_max],
    clamped to the noise levels sigma_t / alpha_t the model supports (an EDM preconditioning's).

    model: a `jaxdiff.parameterize` model, or an EDM denoiser D(x, sigma, labels) (`samplers.bind`;
    without `process` on EDM's process on [0.002, 80], `log_likelihood`'s default)."""
    if time not in TIMES:
        raise ValueError(f'time must be one of {TIMES}, got {time!r}')
    if process is None and not hasattr(model, 'predict'):
        process = processes.GaussianProcess(processes.EDM())
    model, process = samplers.bind(model, process)
    if time == 'auto':
        time = 'log_sigma' if isinstance(process.schedule, processes.Discrete) else 'process'
    lo, hi = float(process.t_min), float(process.t_max)
    if model.sigma_min > 0:
        lo = max(lo, float(process.t_from_noise_level(model.sigma_min)))
    if model.sigma_max < math.inf:
        hi = min(hi, float(process.t_from_noise_level(model.sigma_max)))
    levels = grids.dc_noise_level(process, np.array([lo, hi]))
    if not (lo < hi and np.all(np.isfinite(levels)) and 0 < levels[0] < levels[1]):
        raise ValueError(f'The PF-ODE needs t_min < t_max with noise levels 0 < sigma_t / alpha_t < inf, got '
                         f't in [{lo}, {hi}], noise levels {levels.tolist()} ({type(process.schedule).__name__})')
    if time == 'process':
        return model, ModelFlow(process, lo, hi, time, (lo, hi))
    tau = np.linspace(*np.log(levels), _TABLE_SIZE)
    t = np.asarray(process.t_from_noise_level(np.exp(tau)), np.float64)
    t[0], t[-1] = lo, hi
    return model, ModelFlow(process, float(tau[0]), float(tau[-1]), time, (lo, hi),
                            (tuple(tau.tolist()), tuple(t.tolist())))


# ---------------------------------------------------------------------------------------------
# Divergence of a function of one image.

def divergence_exact(fn: Callable, x) -> tuple[jax.Array, jax.Array]:
    """(fn(x), tr(d fn / d x)) from the full Jacobian (`jax.jacfwd`: one JVP per dimension)."""
    jac, fx = jax.jacfwd(lambda x: (lambda y: (y, y))(fn(x)), has_aux=True)(x)
    return fx, jnp.trace(jac.reshape(x.size, x.size))


def divergence_hutchinson(fn: Callable, x, probes) -> tuple[jax.Array, jax.Array]:
    """(fn(x), mean_k eps_k^T (d fn / d x) eps_k) for probes eps_k ([K, *x.shape]): an unbiased
    estimate of the trace when E[eps eps^T] = I, one JVP per probe (the primal is shared)."""
    fx, jvps = jax.vmap(lambda e: jax.jvp(fn, (x,), (e,)), out_axes=(None, 0))(probes)
    return fx, jnp.mean(jnp.sum(probes * jvps, axis=tuple(range(1, probes.ndim))))


def hutchinson_probes(key, shape, num_probes: int = 1, kind: str = 'rademacher', dtype=jnp.float32):
    """[num_probes, *shape] probes with E[eps eps^T] = I: Rademacher (+-1) or standard normal.
    Rademacher has the smaller variance, 2 sum_{i != j} A_ij^2 against 2 sum_ij A_ij^2 for
    symmetric A."""
    if kind not in PROBES:
        raise ValueError(f'probe must be one of {PROBES}, got {kind!r}')
    if kind == 'rademacher':
        return jax.random.rademacher(key, (num_probes, *shape), dtype)
    return jax.random.normal(key, (num_probes, *shape), dtype)


# ---------------------------------------------------------------------------------------------
# ODE solvers on pytree states, y' = f(t, y), t0 < t1.

class SolveStats(NamedTuple):
    """nfe: evaluations of f; accepted / rejected: adaptive steps; success: reached t1."""
    nfe: jax.Array
    accepted: jax.Array
    rejected: jax.Array
    success: jax.Array


# Dormand & Prince (1980), RK5(4)7FM: nodes c, stage matrix A whose last row is the 5th-order
# weights b (so the 7th stage, at the new point, is the next step's first: "first same as last"),
# and E = b - b_hat, the difference from the embedded 4th-order weights, estimating the local error.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = ((),
         (1 / 5,),
         (3 / 40, 9 / 40),
         (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DP_B = _DP_A[-1] + (0.0,)
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0
_RK4 = dict(a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6), c=(0.0, 0.5, 0.5, 1.0))
_HEUN = dict(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0))


def _combine(y, h, weights, ks):
    """y + h sum_i w_i k_i for pytrees y and stacked stages ks (leading stage axis)."""
    return jax.tree.map(lambda y, k: y + h * jnp.tensordot(jnp.asarray(weights, k.dtype), k, axes=1), y, ks)


def _rk_stages(f, t, y, h, a, c, k1=None):
    """The stages k_i = f(t + c_i h, y + h sum_{j<i} a_ij k_j) of an explicit Runge-Kutta method,
    stacked on a leading axis; a `fori_loop`, so f is traced once however many stages. A given k1
    (first same as last) is not recomputed."""
    n = len(c)
    a = np.array([list(row) + [0.0] * (n - len(row)) for row in a])
    def body(i, ks):
        k = f(t + jnp.asarray(c, jnp.result_type(t, h))[i] * h, _combine(y, h, jnp.asarray(a)[i], ks))
        return jax.tree.map(lambda K, k: K.at[i].set(k), ks, k)
    ks = jax.tree.map(lambda y: jnp.zeros((n,) + jnp.shape(y), y.dtype), y)
    if k1 is not None:
        ks = jax.tree.map(lambda K, k: K.at[0].set(k), ks, k1)
    return jax.lax.fori_loop(0 if k1 is None else 1, n, body, ks)


def _error_norm(err, y0, y1, rtol, atol):
    """RMS over all elements of err / (atol + rtol max(|y0|, |y1|))."""
    sq, n = 0.0, 0
    for e, a, b in zip(*(jax.tree.leaves(v) for v in (err, y0, y1))):
        sq = sq + jnp.sum((e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))) ** 2)
        n += e.size
    return jnp.sqrt(sq / n)


def _initial_step(f, t0, y0, t1, rtol, atol):
    """Hairer, Norsett & Wanner (I, II.4): h with h^5 |y''| ~ 0.01 in the scaled norm, from
    f0 = f(t0, y0) and one more evaluation at a trial step h0 = 0.01 |y0| / |f0|. Returns (h, f0).

    The two evaluations run in a 2-iteration `fori_loop` (the first with a zero step), so f is
    traced once for both: compiling f is the expensive part for a network.
    """
    zeros = jax.tree.map(jnp.zeros_like, y0)

    def trial_step(f0):
        d0 = _error_norm(y0, y0, zeros, rtol, atol)
        d1 = _error_norm(f0, y0, zeros, rtol, atol)
        h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
        # Never probe beyond t1 (where, e.g., sigma = e^t may overflow).
        return jnp.minimum(h0, t1 - t0).astype(t0.dtype), d1

    def body(i, fs):
        f0 = jax.tree.map(lambda k: k[0], fs)
        h = i.astype(t0.dtype) * trial_step(f0)[0]  # 0 at i = 0: f(t0, y0) itself
        k = f(t0 + h, jax.tree.map(lambda y, k: y + h * k, y0, f0))
        return jax.tree.map(lambda K, k: K.at[i].set(k), fs, k)

    fs = jax.lax.fori_loop(0, 2, body, jax.tree.map(lambda y: jnp.zeros((2,) + jnp.shape(y), y.dtype), y0))
    f0, f1 = (jax.tree.map(lambda k: k[i], fs) for i in (0, 1))
    h0, d1 = trial_step(f0)
    d2 = _error_norm(jax.tree.map(jnp.subtract, f1, f0), y0, zeros, rtol, atol) / h0
    big = jnp.maximum(d1, d2)
    h1 = jnp.where(big <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / big) ** (1 / 5))
    return jnp.minimum(jnp.minimum(100 * h0, h1), t1 - t0).astype(t0.dtype), f0


def dopri5(f: Callable, y0, t0, t1, *, rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096):
    """Integrate y' = f(t, y) from t0 to t1 > t0 with adaptive Dormand-Prince 5(4) steps
    (local extrapolation: the 5th-order solution is kept) in a `lax.while_loop`.

    A step of size h is accepted when the error norm e <= 1 and the next step is
    h min(10, max(0.2, 0.9 e^(-1/5))) (no growth after a rejection). The last step is cut to end
    exactly at t1. The tableau, error norm, controller and initial step are those of scipy's RK45
    (score-SDE's solver), which takes the same steps (tests/test_likelihood.py), so nfe =
    2 + 6 (accepted + rejected) compares with score-SDE's figures. Returns (y(t1), SolveStats).
    """
    t0 = jnp.asarray(t0, jax.tree.leaves(y0)[0].dtype)
    t1 = jnp.asarray(t1, t0.dtype)
    h, f0 = _initial_step(f, t0, y0, t1, rtol, atol)

    def step(t, y, k1, h):
        ks = _rk_stages(f, t, y, h, _DP_A, _DP_C, k1)
        return _combine(y, h, _DP_B, ks), jax.tree.map(lambda k: k[-1], ks), _combine(
            jax.tree.map(jnp.zeros_like, y), h, _DP_E, ks)

    def body(state):
        t, y, k1, h, nfe, accepted, rejected = state
        last = h >= t1 - t
        h = jnp.where(last, t1 - t, h)
        y_new, k7, err = step(t, y, k1, h)
        e = _error_norm(err, y, y_new, rtol, atol)
        accept = e <= 1  # False for NaN: the step is retried smaller
        factor = jnp.where(jnp.isnan(e), _MIN_FACTOR,
                           jnp.clip(_SAFETY * e ** (-1 / 5), _MIN_FACTOR, _MAX_FACTOR))
        factor = jnp.where(accept, factor, jnp.minimum(factor, 1.0)).astype(h.dtype)
        select = lambda new, old: jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)
        return (jnp.where(accept, jnp.where(last, t1, t + h), t), select(y_new, y), select(k7, k1),
                h * factor, nfe + 6, accepted + accept, rejected + (~accept))

    def cond(state):
        t, _, _, _, _, accepted, rejected = state
        return (t < t1) & (accepted + rejected < max_steps)

    zero = jnp.zeros((), jnp.int32)
    t, y, _, _, nfe, accepted, rejected = jax.lax.while_loop(
        cond, body, (t0, y0, f0, h, zero + 2, zero, zero))
    return y, SolveStats(nfe, accepted, rejected, t >= t1)


def rk4_step(f, t, y, h):
    """Classical 4th-order Runge-Kutta step (4 evaluations)."""
    return _combine(y, h, _RK4['b'], _rk_stages(f, t, y, h, _RK4['a'], _RK4['c']))


def heun_ode_step(f, t, y, h):
    """Heun's (trapezoidal) 2nd-order step (2 evaluations)."""
    return _combine(y, h, _HEUN['b'], _rk_stages(f, t, y, h, _HEUN['a'], _HEUN['c']))


def fixed_step(f: Callable, y0, ts, method: str = 'rk4'):
    """Integrate y' = f(t, y) over the grid ts (t0 < ... < tN) with RK4 or Heun steps in a
    `lax.scan`. Returns (y(tN), nfe) with nfe = 4N or 2N."""
    step_fn, evals = {'rk4': (rk4_step, 4), 'heun': (heun_ode_step, 2)}[method]
    ts = jnp.asarray(ts, jax.tree.leaves(y0)[0].dtype)
    y, _ = jax.lax.scan(lambda y, tt: (step_fn(f, tt[0], y, tt[1] - tt[0]), None), y0, (ts[:-1], ts[1:]))
    return y, evals * (ts.shape[0] - 1)


# ---------------------------------------------------------------------------------------------
# Log-likelihood.

def gaussian_log_prob(z, mean=0.0, std=1.0):
    """log N(z; mean, diag(std^2)) per image, summed over all but the first axis.

    In float32 the terms are formed as ((z - mean)/std)^2, each O(1) whatever std, and a Python
    float std gives the normaliser D (log(2 pi)/2 + log std) in float64 on the host: at
    sigma_max = 80 that constant is 5.3 nats/dim against a result of ~1 nat/dim.
    """
    axes = tuple(range(1, z.ndim))
    d = int(np.prod(z.shape[1:]))
    quad = -0.5 * jnp.sum(jnp.square((z - mean) / std), axis=axes)
    if isinstance(std, (int, float)):
        return quad - d * (0.5 * math.log(2 * math.pi) + math.log(std))
    log_std = jnp.broadcast_to(jnp.log(jnp.asarray(std, z.dtype)), z.shape[1:])
    return quad - jnp.sum(log_std) - d * 0.5 * math.log(2 * math.pi)


class LogLikelihood(NamedTuple):
    """Per image: log_prob = prior_log_prob + delta_log_prob (nats, density of x in its own
    space; NaN where the solve failed), latents z = x(t_max), nfe (each evaluation includes the
    divergence: K JVPs for K probes) and success (the adaptive solver reached t_max within
    max_steps; always True for fixed steps)."""
    log_prob: jax.Array
    prior_log_prob: jax.Array
    delta_log_prob: jax.Array
    latents: jax.Array
    nfe: jax.Array
    success: jax.Array


def _as_pytree(fn):
    """Callables cross the jit boundary as pytrees; wrap a plain function (static, by identity)."""
    if fn is None:
        return None
    leaves = jax.tree_util.tree_leaves(fn)
    return jax.tree_util.Partial(fn) if len(leaves) == 1 and leaves[0] is fn else fn


def _per_image_keys(key, n):
    """One key per image: [n] keys as given, or one key split into n."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.split(key, n) if key.ndim == 0 else key


def _check(divergence, probe, num_probes):
    if divergence not in DIVERGENCES:
        raise ValueError(f'divergence must be one of {DIVERGENCES}, got {divergence!r}')
    if probe not in PROBES:
        raise ValueError(f'probe must be one of {PROBES}, got {probe!r}')
    if int(num_probes) != num_probes or num_probes < 1:
        raise ValueError(f'num_probes must be a positive integer, got {num_probes}')


def _probes(keys, shape, num_probes, probe, dtype):
    """Image n's probes from fold_in(keys[n], 1)."""
    return jax.vmap(lambda k: hutchinson_probes(jax.random.fold_in(k, 1), shape, num_probes, probe, dtype))(keys)


def _prepare(model, process, solver, discretization=samplers.Sampler()):
    """(model, flow, fixed-step grid or None), on the host."""
    model, flow = model_flow(model, process, solver.time)
    return model, flow, None if solver.method == 'rk45' else flow.grid(solver.num_steps, discretization)


@functools.partial(jax.jit, static_argnames=('flow', 'grid', 'solver', 'divergence'))
def _log_likelihood(model, prior, x, probes, labels, *, flow, grid, solver, divergence):
    """The compiled computation: one ODE solve per image (vmapped, so each image takes its own
    steps), then the prior at x(t_max)."""
    def one(x, probes, labels):
        def f(t, y):
            field = flow.vector_field(model, t, (1, *x.shape), x.dtype, None if labels is None else labels[None])
            fn = lambda x: field(x[None])[0]
            fx, div = divergence_exact(fn, y[0]) if divergence == 'exact' else divergence_hutchinson(fn, y[0], probes)
            return fx, div.astype(x.dtype)

        y0 = (x, jnp.zeros((), x.dtype))
        if solver.method == 'rk45':
            (z, delta), stats = dopri5(f, y0, flow.t_min, flow.t_max, rtol=solver.rtol, atol=solver.atol,
                                       max_steps=solver.max_steps)
            return z, delta, stats.nfe, stats.success
        (z, delta), nfe = fixed_step(f, y0, np.asarray(grid), solver.method)
        return z, delta, jnp.int32(nfe), jnp.bool_(True)

    z, delta, nfe, success = jax.vmap(one)(x, probes, labels)
    prior_log_prob = gaussian_log_prob(z, 0.0, flow.prior_std) if prior is None else prior(z)
    prior_log_prob = prior_log_prob.astype(x.dtype)
    # An image whose solve stopped short of t_max has no likelihood: NaN, never a wrong number.
    log_prob = jnp.where(success, prior_log_prob + delta, jnp.nan)
    return LogLikelihood(log_prob, prior_log_prob, delta, z, nfe, success)


def log_likelihood_of_model(model, x, key=None, *, process=None, solver: ODESolver = ODESolver(),
                            divergence: str = 'hutchinson', probe: str = 'rademacher', num_probes: int = 1,
                            labels=None, prior=None, discretization: samplers.Sampler = samplers.Sampler()
                            ) -> LogLikelihood:
    """log p_{t_min}(x) of images x (NHWC, pixel space) through the PF-ODE (jit-compiled).

    model: a `jaxdiff.parameterize` model (Model, DenoiserModel, Guided, ...: its eps_hat drives the
      ODE) or an EDM denoiser D(x, sigma, labels) (`model_flow`).
    process: a process of `jaxdiff.processes`, default `model.process` (another one only to change
      the time range: the model keeps its own noise labels); the ODE runs over its [t_min, t_max],
      clamped to the model's noise levels.
    key: one key, or one per image (then an image's probes depend on its own key alone): image n's
      probes are drawn from fold_in(key_n, 1). Not needed for divergence='exact'.
    prior: `prior(z) -> [N]` log-density at t_max; default log N(z; 0, sigma_{t_max}^2 I).
    discretization: a `samplers.Sampler` whose noise levels place the fixed steps ('rk4', 'heun').
    """
    _check(divergence, probe, num_probes)
    model, flow, grid = _prepare(model, process, solver, discretization)
    probes = None
    if divergence == 'hutchinson':
        if key is None:
            raise ValueError("divergence='hutchinson' needs a key for its probes")
        probes = _probes(_per_image_keys(key, x.shape[0]), x.shape[1:], num_probes, probe, x.dtype)
    return _log_likelihood(model, _as_pytree(prior), x, probes, labels, flow=flow, grid=grid, solver=solver,
                           divergence=divergence)


def log_likelihood(denoise, x, key=None, *, process: samplers.Sampler = samplers.Sampler(),
                   **kwargs) -> LogLikelihood:
    """`log_likelihood_of_model` in EDM's form: `denoise` D(x, sigma, labels) (a `precond.Denoiser`,
    `analytic.GaussianDenoiser`, a function; its sigma range clamps the process's) on the process
    of a `samplers.Sampler` (`edm_process`, `vp_process`, `ve_process`, `sampler_process`; default
    EDM on [0.002, 80]), whose discretisation places the fixed steps. Prior N(0, (s sigma)^2 I)."""
    return log_likelihood_of_model(denoise, x, key, process=sampler_process(process), discretization=process,
                                   **kwargs)


# ---------------------------------------------------------------------------------------------
# Bits per dimension.

def bin_width(num_levels: int = 256, bins: str = 'centered') -> float:
    """Delta, the width of one quantisation bin in x units: 2/(L-1) ('centered') or 2/L ('score_sde')."""
    if bins not in BINS:
        raise ValueError(f'bins must be one of {BINS}, got {bins!r}')
    return 2 / (num_levels - 1) if bins == 'centered' else 2 / num_levels


def bpd_offset(num_levels: int = 256, bins: str = 'centered') -> float:
    """log2(1/Delta): bits/dim to add to -log2 p(x)/D (log2(127.5) = 6.99435 or 7 for 8 bits)."""
    return -math.log2(bin_width(num_levels, bins))


def dequantize_images(images, u, num_levels: int = 256, bins: str = 'centered'):
    """x = (k + u - 1/2) Delta - 1 ('centered', bins centred on 2k/(L-1) - 1) or (k + u) Delta - 1
    ('score_sde'); u in [0, 1) uniform dequantises, u = 1/2 gives the bin centres."""
    width = bin_width(num_levels, bins)
    shift = 0.5 if bins == 'centered' else 0.0
    return (images.astype(u.dtype) + (u - shift)) * width - 1


class BitsPerDim(NamedTuple):
    """Per image: bpd, nfe and success (as `LogLikelihood`)."""
    bpd: jax.Array
    nfe: jax.Array
    success: jax.Array


def bits_per_dim_of_model(model, images, key, *, process=None, solver: ODESolver = ODESolver(),
                          divergence: str = 'hutchinson', probe: str = 'rademacher', num_probes: int = 1,
                          num_levels: int = 256, bins: str = 'centered', dequantize: bool = True, labels=None,
                          prior=None, dtype=jnp.float32,
                          discretization: samplers.Sampler = samplers.Sampler()) -> BitsPerDim:
    """bits/dim of integer images (NHWC, values in {0..num_levels-1}) through the PF-ODE
    (jit-compiled as a whole):

        bpd = -log p(x) / (D ln 2) + log2(1/Delta),  x = dequantize_images(images, u)  (module docstring).

    key: one key or one per image; image n's dequantisation noise u is drawn from fold_in(key_n, 0)
    and its probes from fold_in(key_n, 1), so an image's figure does not depend on its batch.
    dtype: of x and the ODE state. Other arguments as `log_likelihood_of_model`.
    Returns per-image bpd, nfe and success, each [N].
    """
    if not jnp.issubdtype(jnp.asarray(images).dtype, jnp.integer):
        raise ValueError(f'bits_per_dim takes integer images in [0, {num_levels}), got dtype {images.dtype}')
    bin_width(num_levels, bins)  # validates `bins`
    _check(divergence, probe, num_probes)
    model, flow, grid = _prepare(model, process, solver, discretization)
    return _bits_per_dim(model, _as_pytree(prior), jnp.asarray(images), _per_image_keys(key, images.shape[0]),
                         labels, flow=flow, grid=grid, solver=solver, divergence=divergence, probe=probe,
                         num_probes=num_probes, num_levels=num_levels, bins=bins, dequantize=dequantize,
                         dtype=jnp.dtype(dtype))


def bits_per_dim(denoise, images, key, *, process: samplers.Sampler = samplers.Sampler(), **kwargs) -> BitsPerDim:
    """`bits_per_dim_of_model` in EDM's form (`log_likelihood`)."""
    return bits_per_dim_of_model(denoise, images, key, process=sampler_process(process), discretization=process,
                                 **kwargs)


@functools.partial(jax.jit, static_argnames=('flow', 'grid', 'solver', 'divergence', 'probe', 'num_probes',
                                             'num_levels', 'bins', 'dequantize', 'dtype'))
def _bits_per_dim(model, prior, images, keys, labels, *, flow, grid, solver, divergence, probe, num_probes,
                  num_levels, bins, dequantize, dtype):
    shape = images.shape[1:]
    if dequantize:
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), shape, dtype))(keys)
    else:
        u = jnp.full(images.shape, 0.5, dtype)
    x = dequantize_images(images, u, num_levels, bins)
    probes = _probes(keys, shape, num_probes, probe, dtype) if divergence == 'hutchinson' else None
    result = _log_likelihood(model, prior, x, probes, labels, flow=flow, grid=grid, solver=solver,
                             divergence=divergence)
    dim = int(np.prod(shape))
    bpd = -result.log_prob / (dim * math.log(2)) + bpd_offset(num_levels, bins)
    return BitsPerDim(bpd, result.nfe, result.success)
