"""Likelihoods through the probability-flow ODE, checked against independent references:
closed-form Gaussian densities, explicit Jacobians and finite differences, the exact solution of a
linear ODE, the change of variables for bits/dim done by hand, score-SDE's drift and diffusion
coefficients, and the EDM form against the general (process, model) form."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import gaussian_data
from jaxdiff.samplers import driver
from jaxdiff import likelihood as L
from jaxdiff import precond, processes, samplers, schedules
from jaxdiff.samplers import grids
from jaxdiff.analytic import GaussianDenoiser

SHAPE = (4, 4, 2)  # 32-dimensional "images"
DIM = int(np.prod(SHAPE))
PROCESSES = {'edm': L.edm_process(), 'vp': L.vp_process(), 've': L.ve_process()}


def diag_gaussian(seed=0, var_range=(0.05, 1.0), mean_scale=0.3):
    rng = np.random.default_rng(seed)
    return rng.normal(size=SHAPE) * mean_scale, rng.uniform(*var_range, size=SHAPE)


def data_points(mean, var, n=4, seed=1):
    return mean + np.random.default_rng(seed).normal(size=(n, *SHAPE)) * np.sqrt(var)


def marginal(process, sigma, mean, var):
    """Mean and std of the process's marginal at noise level sigma for N(mean, diag var) data:
    N(s mean, s^2 (var + sigma^2)), s = 1/sqrt(1 + sigma^2) under VP scaling, else 1."""
    s = 1 / math.sqrt(1 + sigma ** 2) if process.scaling == 'vp' else 1.0
    return s * mean, s * np.sqrt(var + sigma ** 2)


def normal_log_density(x, mean, std):
    """float64 numpy log N(x; mean, diag std^2) per image."""
    x = np.asarray(x, np.float64)
    z = (x - mean) / std
    return np.sum(-0.5 * z ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi), axis=tuple(range(1, x.ndim)))


def exact_prior(process, mean, var, dtype):
    """The exact marginal at sigma_max as a prior (a pytree, so it compiles once per structure)."""
    m, s = marginal(process, process.sigma_max, mean, var)
    return jax.tree_util.Partial(L.gaussian_log_prob, mean=jnp.asarray(m, dtype), std=jnp.asarray(s, dtype))


def gaussian_setup(name, dtype, seed=0):
    process = PROCESSES[name]
    mean, var = diag_gaussian(seed)
    denoise = GaussianDenoiser.create(jnp.asarray(mean, dtype), jnp.diag(jnp.asarray(var.reshape(-1), dtype)))
    x = data_points(mean, var)
    reference = normal_log_density(x, *marginal(process, process.sigma_min, mean, var))
    return process, mean, var, denoise, x, reference


# ---------------------------------------------------------------------------------------------
# The ODE is the samplers' ODE, and EDM's.

def edm_form(sampler, t):
    """EDM's (sigma, s, a, b) at EDM time t of a preset, dx/dt = a x - b D(x/s; sigma) with
    a = sigma'/sigma + s'/s, b = sigma' s/sigma (EDM eq. 4, Table 1), from the schedules' closed forms;
    and t(sigma). Works on numpy and traced t."""
    if sampler.schedule == 'vp':
        bd, bm = schedules.vp_betas_for_range(*grids.default_sigma_range(sampler), sampler.epsilon_s)
        sigma, dsigma = schedules.vp_sigma(t, bd, bm), schedules.vp_sigma_deriv(t, bd, bm)
        s = schedules.vp_scale(sigma)
        return sigma, s, dsigma / sigma - sigma * dsigma * s ** 2, dsigma * s / sigma  # s'/s = -sigma sigma' s^2
    sigma, dsigma = (schedules.ve_sigma(t), schedules.ve_sigma_deriv(t)) if sampler.schedule == 've' else (t, 1.0)
    return sigma, 1.0, dsigma / sigma, dsigma / sigma


def edm_time(sampler, sigma):
    if sampler.schedule == 'vp':
        return schedules.vp_sigma_inv(sigma, *schedules.vp_betas_for_range(*grids.default_sigma_range(sampler),
                                                                           sampler.epsilon_s))
    return schedules.ve_sigma_inv(sigma) if sampler.schedule == 've' else sigma


@pytest.mark.parametrize('name', PROCESSES)
def test_pf_ode_coefficients_are_the_samplers(name):
    """The ODE of the EDM form's process (`sampler_process`) in tau = log sigma is EDM's ODE of the
    generalised sampler's step table: with D = x/s - sigma eps_hat and d tau/dt = sigma'/sigma = b/s,
    dx/dtau = (a s/b - 1) x + s sigma eps_hat, so f = a s/b - 1 and c = s sigma at the table's own
    times (float64; EDM's VP time is the process's, VE's sqrt(t) is not: tau makes them comparable).
    rtol 1e-8: VP's expm1 form differs from exp - 1 by ~1e-10 relative at t = 1e-5."""
    sampler = dataclasses.replace(PROCESSES[name], num_steps=12)
    identity = lambda x, sigma, labels=None, augment_labels=None: x
    process = L.sampler_process(sampler)
    model, _ = samplers.bind(identity, process)
    table, _, _ = driver.build_table(sampler, model, process, (1, 2, 2, 1))
    with jax.enable_x64(True):
        _, flow = L.model_flow(identity, process, time='log_sigma')
        tau = np.log(table.at_hat.sigma / table.at_hat.alpha).reshape(-1)
        coefficients = jax.jit(jax.vmap(lambda tau: flow.coefficients(tau, (1, 1, 1, 1), jnp.float64)))
        t, _, _, f, c = (np.asarray(a).reshape(-1) for a in coefficients(jnp.asarray(tau)))
    np.testing.assert_allclose(t, table.at_hat.t, rtol=1e-9)  # Newton's t(tau) against the host inverse
    np.testing.assert_allclose(f, table.a_hat * table.s_hat / table.b_hat - 1, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(c, table.s_hat * np.exp(tau), rtol=1e-8)  # s sigma, sigma = e^tau
    lo, hi = grids.dc_noise_level(process, np.array(flow.times))
    assert lo == pytest.approx(sampler.sigma_min, rel=1e-9) and hi == pytest.approx(sampler.sigma_max, rel=1e-9)


def test_prior_std_is_s_sigma_at_t_max():
    """EDM and VE: sigma_max; VP: s(1) sigma(1) = sqrt(1 - exp(-beta_d/2 - beta_min)) ~ 1; and
    `sampler_process(vp_process())` is processes.VP(0.1, 20, t_min=1e-5) (the fitted betas)."""
    std = lambda name: L.model_flow(lambda x, sigma, labels=None: x, L.sampler_process(PROCESSES[name]))[1].prior_std
    assert std('edm') == pytest.approx(80.0, rel=1e-12)
    assert std('ve') == pytest.approx(50.0, rel=1e-12)
    assert std('vp') == pytest.approx(math.sqrt(-math.expm1(-19.9 / 2 - 0.1)), rel=1e-9)
    vp = L.sampler_process(PROCESSES['vp']).schedule
    assert (vp.beta_min, vp.beta_max, vp.t_min, vp.t_max) == pytest.approx((0.1, 20.0, 1e-5, 1.0), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Log-likelihood of Gaussian data against the closed form.

@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('name', PROCESSES)
def test_log_likelihood_of_gaussian_data_is_the_analytic_density(name, dtype):
    """32-d N(m, diag v) data, v in [0.05, 1]: with the ideal denoiser, exact divergence and the
    exact marginal at sigma_max as the prior, the ODE's log p equals the closed-form density of
    the marginal at sigma_min, N(s m, s^2 (v + sigma_min^2)). Tolerances (absolute, log p ~ -30):
    float64 with rtol = atol = 1e-9: 1e-5 nats; float32 with score-SDE's 1e-5: 3e-3 nats (measured
    ~1e-3 for EDM, where Delta ~ 200 nats times rtol dominates; ~3e-5 at rtol 1e-7)."""
    with jax.enable_x64(dtype == 'float64'):
        process, mean, var, denoise, x, reference = gaussian_setup(name, dtype)
        solver = L.ODESolver(rtol=1e-9, atol=1e-9) if dtype == 'float64' else L.ODESolver()
        result = L.log_likelihood(denoise, jnp.asarray(x, dtype), process=process, solver=solver,
                                  divergence='exact', prior=exact_prior(process, mean, var, dtype))
        assert result.log_prob.dtype == dtype and bool(result.success.all())
        error = np.abs(np.asarray(result.log_prob, np.float64) - reference).max()
        np.testing.assert_allclose(result.log_prob, result.prior_log_prob + result.delta_log_prob, rtol=1e-6)
    assert error < (1e-5 if dtype == 'float64' else 3e-3), error


def test_log_sigma_time_gives_the_same_likelihood():
    """div f dt is invariant under a change of time: integrating VP in u = log sigma instead of t
    gives the same log p (float32, default tolerances)."""
    process, mean, var, denoise, x, reference = gaussian_setup('vp', 'float32')
    result = L.log_likelihood(denoise, jnp.asarray(x, jnp.float32), process=process,
                              solver=L.ODESolver(time='log_sigma'), divergence='exact',
                              prior=exact_prior(process, mean, var, jnp.float32))
    assert np.abs(np.asarray(result.log_prob, np.float64) - reference).max() < 3e-3


def test_default_prior_error_is_the_closed_form_prior_mismatch():
    """With the default prior N(0, 80^2 I) instead of the exact marginal N(m, v + 80^2) the error is
    exactly log N(z; 0, 80^2) - log N(z; m, v + 80^2) at the ODE's latent z, to solver accuracy.
    Here it is up to 0.02 nats (32 dims, |m| ~ 0.3: the mean term sum z m / sigma_max^2 dominates
    the variance term D v / (2 sigma_max^2) ~ 1e-3): an offset of ~1e-3 bits/dim, which is why the
    closed-form tests use the exact marginal as the prior."""
    with jax.enable_x64(True):
        process, mean, var, denoise, x, reference = gaussian_setup('edm', 'float64')
        result = L.log_likelihood(denoise, jnp.asarray(x), process=process, divergence='exact',
                                  solver=L.ODESolver(rtol=1e-9, atol=1e-9))
        z = np.asarray(result.latents)
    mismatch = normal_log_density(z, 0.0, 80.0) - normal_log_density(z, *marginal(process, 80.0, mean, var))
    np.testing.assert_allclose(np.asarray(result.log_prob) - reference, mismatch, atol=1e-5)
    assert np.abs(mismatch).max() < 0.03


def test_fixed_step_solvers_agree_with_the_adaptive_one_on_gaussian_data():
    """RK4 with 64 steps on EDM's rho-spaced grid (256 evaluations) and the adaptive solver agree
    with the closed form to 5e-4 and 1e-5 nats (float64; measured 2.2e-4 and ~5e-6)."""
    with jax.enable_x64(True):
        process, mean, var, denoise, x, reference = gaussian_setup('edm', 'float64')
        prior = exact_prior(process, mean, var, jnp.float64)
        kwargs = dict(process=process, divergence='exact', prior=prior)
        rk4 = L.log_likelihood(denoise, jnp.asarray(x), solver=L.ODESolver(method='rk4', num_steps=64), **kwargs)
        rk45 = L.log_likelihood(denoise, jnp.asarray(x), solver=L.ODESolver(rtol=1e-9, atol=1e-9), **kwargs)
    assert np.all(np.asarray(rk4.nfe) == 256)
    assert np.abs(np.asarray(rk4.log_prob) - reference).max() < 5e-4
    assert np.abs(np.asarray(rk45.log_prob) - reference).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# Divergences.

def mlp_denoiser(dtype, label_dim=0, seed=0):
    """EDM-preconditioned denoiser of a small random tanh MLP: nonlinear, with a non-symmetric
    Jacobian, conditioned on sigma (and labels)."""
    rng = np.random.default_rng(seed)
    params = {'w1': rng.normal(size=(DIM, 48)) / math.sqrt(DIM), 'w2': rng.normal(size=(48, DIM)) / math.sqrt(48),
              'wn': rng.normal(size=48), 'wl': rng.normal(size=(max(label_dim, 1), 48))}
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)

    def net(p, x, noise_labels, class_labels, augment_labels):
        h = x.reshape(x.shape[0], -1) @ p['w1'] + noise_labels[:, None] * p['wn']
        if class_labels is not None:
            h = h + class_labels @ p['wl']
        return (jnp.tanh(h) @ p['w2']).reshape(x.shape)

    return precond.denoiser_from_fn(net, params, precond.EDMPrecond(), label_dim)


def finite_difference_trace(fn, x, eps=1e-6):
    """tr(d fn/dx) by central differences on every coordinate (float64; `fn` maps a batch)."""
    x = np.asarray(x, np.float64).reshape(-1)
    steps = np.eye(x.size) * eps
    plus = np.asarray(fn(jnp.asarray((x + steps).reshape(-1, *SHAPE)))).reshape(x.size, x.size)
    minus = np.asarray(fn(jnp.asarray((x - steps).reshape(-1, *SHAPE)))).reshape(x.size, x.size)
    return np.trace(plus - minus) / (2 * eps)


@pytest.mark.parametrize('name', PROCESSES)
def test_exact_divergence_is_the_jacobian_trace(name):
    """float64. Gaussian data: dz/dt = f z + c eps_hat with eps_hat = (z/alpha - D(z/alpha))/sigma~,
    D linear with eigenvalues v/(v + sigma~^2), so tr = D f + (c sigma~/alpha) sum 1/(v + sigma~^2)
    in closed form; a nonlinear MLP denoiser: central finite differences. Both to 1e-7 relative, at
    three times spread over [t_min, t_max]."""
    with jax.enable_x64(True):
        sampler, mean, var, denoise, x, _ = gaussian_setup(name, 'float64')
        process = L.sampler_process(sampler)
        gaussian, _ = samplers.bind(denoise, process)
        mlp, _ = samplers.bind(mlp_denoiser(jnp.float64), process)
        _, flow = L.model_flow(gaussian, time='process')
        field = lambda model, t, z: flow.vector_field(model, t, z.shape, z.dtype)(z)

        @jax.jit
        def divergences(t, x):
            one = lambda model: lambda y: field(model, t, y[None])[0]
            return L.divergence_exact(one(gaussian), x), L.divergence_exact(one(mlp), x)[1]

        batch_field = jax.jit(lambda t, z: field(mlp, t, z))
        lo, hi = flow.times
        times = np.geomspace(lo, hi, 5)[1:4] if name == 'edm' else lo + (hi - lo) * np.array([0.01, 0.3, 0.9])
        for t in times:
            _, alpha, sigma, f, c = (float(np.asarray(a).reshape(-1)[0]) for a in
                                     flow.coefficients(t, (1, *SHAPE), jnp.float64))
            level = sigma / alpha
            (fx, div), div_mlp = divergences(t, jnp.asarray(x[0]))
            closed_form = DIM * f + c * level / alpha * np.sum(1 / (var + level ** 2))
            np.testing.assert_allclose(float(div), closed_form, rtol=1e-7)
            direct = np.asarray(field(gaussian, t, jnp.asarray(x[:1]))[0])
            np.testing.assert_allclose(fx, direct, rtol=0, atol=1e-12 * np.abs(direct).max())
            fd = finite_difference_trace(functools.partial(batch_field, t), x[0])
            np.testing.assert_allclose(float(div_mlp), fd, rtol=1e-7)


@pytest.mark.parametrize('probe', L.PROBES)
def test_hutchinson_estimate_is_unbiased_with_the_predicted_variance(probe):
    """eps^T A eps over 20,000 probes, A = df/dx of the MLP denoiser's ODE (float64): the mean is
    within 4 standard errors of tr A, and the variance is the theoretical one, within 10%:
    2 (|A_s|_F^2 - sum A_ii^2) for Rademacher, 2 |A_s|_F^2 for Gaussian (A_s = (A + A^T)/2)."""
    num = 20000
    with jax.enable_x64(True):
        mlp, flow = L.model_flow(mlp_denoiser(jnp.float64), time='process')  # EDM on [0.002, 80]
        x = jnp.asarray(data_points(*diag_gaussian())[0])

        @jax.jit
        def estimates(x, key):
            fn = lambda y: flow.vector_field(mlp, 0.7, (1, *SHAPE), jnp.float64)(y[None])[0]
            probes = L.hutchinson_probes(key, SHAPE, num, probe, jnp.float64)
            single = jax.vmap(lambda e: L.divergence_hutchinson(fn, x, e[None])[1])(probes)
            return jax.jacfwd(fn)(x), single, L.divergence_hutchinson(fn, x, probes)[1]

        A, single, pooled = estimates(x, jax.random.key(3))
    A = np.asarray(A).reshape(DIM, DIM)
    single = np.asarray(single)
    sym = (A + A.T) / 2
    variance = 2 * (np.sum(sym ** 2) - (np.sum(np.diag(A) ** 2) if probe == 'rademacher' else 0))
    trace = np.trace(A)
    assert abs(single.mean() - trace) < 4 * math.sqrt(variance / num), (single.mean(), trace)
    assert abs(single.var() / variance - 1) < 0.1, (single.var(), variance)
    np.testing.assert_allclose(float(pooled), single.mean(), rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Solvers.

def linear_ode(seed=0):
    """y' = A y (8-d, oscillating and decaying modes) and w' = cos(t) w, with exact solutions
    expm(A t) y0 and w0 exp(sin t): a pytree state, one part of it time-dependent."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    block = np.zeros((8, 8))
    for i, (decay, freq) in enumerate(((0.1, 2.0), (0.5, 0.3), (1.0, 5.0), (0.05, 0.0))):
        block[2 * i:2 * i + 2, 2 * i:2 * i + 2] = [[-decay, freq], [-freq, -decay]]
    A = q @ block @ q.T
    y0, w0 = rng.normal(size=8), 1.5
    f = lambda t, y: (jnp.asarray(A) @ y[0], jnp.cos(t) * y[1])
    exact = lambda t: (scipy.linalg.expm(A * t) @ y0, w0 * math.exp(math.sin(t)))
    return f, (jnp.asarray(y0), jnp.asarray(w0)), exact


def test_adaptive_solver_meets_its_tolerance_on_a_linear_ode():
    """float64, t in [0, 4]: the global error is within 10 tolerances (atol + rtol |y|) at every
    tolerance, falls with it, and nfe = 2 + 6 (accepted + rejected) steps."""
    with jax.enable_x64(True):
        f, y0, exact = linear_ode()
        solve = jax.jit(lambda y0, rtol: L.dopri5(f, y0, 0.0, 4.0, rtol=rtol, atol=rtol))
        errors = []
        for tol in (1e-4, 1e-6, 1e-8, 1e-10):
            (y, w), stats = solve(y0, tol)
            y_ref, w_ref = exact(4.0)
            error = max(np.abs(np.asarray(y) - y_ref).max() / (tol + tol * np.abs(y_ref).max()),
                        abs(float(w) - w_ref) / (tol + tol * abs(w_ref)))
            assert bool(stats.success) and error < 10, (tol, error)
            assert int(stats.nfe) == 2 + 6 * int(stats.accepted + stats.rejected)
            errors.append(np.abs(np.asarray(y) - y_ref).max())
    assert errors == sorted(errors, reverse=True)


def test_adaptive_solver_takes_scipy_rk45_steps():
    """Same tableau, error norm, step controller and initial step as scipy's RK45 (score-SDE's
    solver): on the linear ODE the same number of evaluations and the same answer (float64)."""
    from scipy.integrate import solve_ivp
    with jax.enable_x64(True):
        f, y0, _ = linear_ode()
        A = np.asarray(jax.jacfwd(lambda y: f(0.0, (y, 0.0))[0])(y0[0]))
        for tol in (1e-5, 1e-8):
            (y, w), stats = jax.jit(lambda y0: L.dopri5(f, y0, 0.0, 4.0, rtol=tol, atol=tol))(y0)
            ref = solve_ivp(lambda t, z: np.append(A @ z[:-1], math.cos(t) * z[-1]), (0.0, 4.0),
                            np.append(np.asarray(y0[0]), float(y0[1])), method='RK45', rtol=tol, atol=tol)
            assert int(stats.nfe) == ref.nfev
            np.testing.assert_allclose(np.append(np.asarray(y), float(w)), ref.y[:, -1], rtol=1e-10, atol=1e-12)


def test_adaptive_solver_reports_failure_past_max_steps():
    with jax.enable_x64(True):
        f, y0, _ = linear_ode()
        _, stats = jax.jit(lambda y0: L.dopri5(f, y0, 0.0, 4.0, rtol=1e-10, atol=1e-10, max_steps=5))(y0)
    assert not bool(stats.success) and int(stats.accepted + stats.rejected) == 5


def test_log_likelihood_is_nan_where_the_solve_failed():
    process, mean, var, denoise, x, _ = gaussian_setup('edm', 'float32')
    result = L.log_likelihood(denoise, jnp.asarray(x, jnp.float32), process=process, divergence='exact',
                              solver=L.ODESolver(max_steps=3))
    assert not np.any(np.asarray(result.success)) and np.all(np.isnan(np.asarray(result.log_prob)))


@pytest.mark.parametrize('method,order', [('rk4', 4), ('heun', 2)])
def test_fixed_step_solvers_converge_at_their_order(method, order):
    """Doubling the steps divides the error by 2^order (within 25%), float64."""
    with jax.enable_x64(True):
        f, y0, exact = linear_ode()
        errors = []
        for n in (40, 80):
            (y, w), nfe = jax.jit(lambda y0: L.fixed_step(f, y0, np.linspace(0.0, 4.0, n + 1), method))(y0)
            assert nfe == (4 if method == 'rk4' else 2) * n
            errors.append(np.abs(np.asarray(y) - exact(4.0)[0]).max())
    assert abs(errors[0] / errors[1] / 2 ** order - 1) < 0.25, errors


# ---------------------------------------------------------------------------------------------
# bits/dim.

def test_bpd_offsets():
    """log2 of the inverse bin width: 127.5 for centred 8-bit bins, 128 (score-SDE's 7 =
    log2(d inverse_scaler/dx) + 8 with inverse_scaler(x) = (x + 1)/2), 8 for the 17-level digits."""
    assert L.bpd_offset(256, 'centered') == pytest.approx(math.log2(127.5), abs=1e-15)
    assert L.bpd_offset(256, 'score_sde') == 7.0
    assert L.bpd_offset(17, 'centered') == 3.0
    k = np.array([0, 1, 254, 255])
    np.testing.assert_allclose(L.dequantize_images(k, np.full(4, 0.5)), k / 127.5 - 1, atol=1e-15)
    np.testing.assert_allclose(L.dequantize_images(k, np.zeros(4), bins='score_sde'), k / 128 - 1, atol=1e-15)


def uint8_gaussian_images(n=4, seed=0):
    """8-bit images of N(m, diag v) data (v in [0.01, 0.1] in [-1, 1] units), and the Gaussian."""
    mean, var = diag_gaussian(seed, var_range=(0.01, 0.1), mean_scale=0.3)
    x = data_points(mean, var, n)
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8), mean, var


@pytest.mark.parametrize('bins', L.BINS)
def test_bits_per_dim_is_the_change_of_variables(bins):
    """float64, ideal denoiser, exact divergence and prior: the mean over 32 draws of u of each
    image's bpd equals the closed form E_u[-log2 p(c_k + (u - 1/2) Delta)]/D + log2(1/Delta), with
    E_u (x - m)^2 = (c_k - m)^2 + Delta^2/12 and p the marginal at sigma_min, within 4 standard
    errors (~1e-3 bits/dim). Centred bins: c_k = k/127.5 - 1, Delta = 1/127.5; score-SDE's:
    c_k = (k + 1/2)/128 - 1, Delta = 1/128."""
    images, mean, var = uint8_gaussian_images()
    process = PROCESSES['edm']
    width = 2 / 255 if bins == 'centered' else 1 / 128
    centres = (images + (0.0 if bins == 'centered' else 0.5)) * width - 1
    m, sd = marginal(process, process.sigma_min, mean, var)
    repeats = 32
    with jax.enable_x64(True):
        denoise = GaussianDenoiser.create(jnp.asarray(mean), jnp.diag(jnp.asarray(var.reshape(-1))))
        keys = jax.random.split(jax.random.key(1), repeats * len(images))
        result = L.bits_per_dim(denoise, jnp.asarray(np.tile(images, (repeats, 1, 1, 1))), keys, process=process,
                                divergence='exact', solver=L.ODESolver(rtol=1e-6, atol=1e-6),
                                prior=exact_prior(process, mean, var, jnp.float64), bins=bins, dtype=jnp.float64)
    assert bool(result.success.all())
    bpd = np.asarray(result.bpd).reshape(repeats, len(images))
    mean_sq = (centres - m) ** 2 + width ** 2 / 12
    expected = (np.sum(0.5 * mean_sq / sd ** 2 + np.log(sd) + 0.5 * np.log(2 * np.pi), axis=(1, 2, 3))
                / (DIM * math.log(2)) - math.log2(width))
    stderr = bpd.std(0) / math.sqrt(repeats)
    assert np.all(np.abs(bpd.mean(0) - expected) < 4 * stderr), (bpd.mean(0), expected, stderr)


def test_bits_per_dim_of_an_image_depends_only_on_its_key():
    """Per-image keys: an image's probes, hence its bpd, do not change when its batch-mates change
    (Hutchinson with 2 probes, bin centres, float32, a network denoiser with labels)."""
    images, _, _ = uint8_gaussian_images(n=3)
    other, _, _ = uint8_gaussian_images(n=3, seed=7)
    denoise = mlp_denoiser(jnp.float32, label_dim=3)
    labels = jnp.eye(3)
    keys = jax.random.split(jax.random.key(5), 3)
    kwargs = dict(process=PROCESSES['edm'], num_probes=2, dequantize=False)
    batch = L.bits_per_dim(denoise, jnp.asarray(images), keys, labels=labels, **kwargs)
    mixed = np.concatenate([other[:1], images[1:2], other[2:]])
    other_keys = jnp.stack([jax.random.key(8), keys[1], jax.random.key(9)])
    changed = L.bits_per_dim(denoise, jnp.asarray(mixed), other_keys, labels=labels[::-1], **kwargs)
    assert bool(batch.success.all()) and np.all(np.isfinite(batch.bpd))
    np.testing.assert_allclose(changed.bpd[1], batch.bpd[1], rtol=1e-6)
    assert abs(float(changed.bpd[0]) - float(batch.bpd[0])) > 1e-3


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match='ODESolver.method'):
        L.ODESolver(method='euler')
    with pytest.raises(ValueError, match='ODESolver.time'):
        L.ODESolver(time='sigma')
    with pytest.raises(ValueError, match='ODESolver.rtol'):
        L.ODESolver(rtol=0)
    x = jnp.zeros((1, *SHAPE))
    denoise = GaussianDenoiser.create(jnp.zeros(SHAPE), jnp.eye(DIM))
    with pytest.raises(ValueError, match='needs a key'):
        L.log_likelihood(denoise, x)
    with pytest.raises(ValueError, match='divergence'):
        L.log_likelihood(denoise, x, divergence='trace')
    with pytest.raises(ValueError, match='probe'):
        L.log_likelihood(denoise, x, jax.random.key(0), probe='uniform')
    with pytest.raises(ValueError, match='integer images'):
        L.bits_per_dim(denoise, x, jax.random.key(0))
    with pytest.raises(ValueError, match='bins'):
        L.bits_per_dim(denoise, jnp.zeros((1, *SHAPE), jnp.uint8), jax.random.key(0), bins='floor')


# ---------------------------------------------------------------------------------------------
# The general form: any process of jaxdiff.processes and a jaxdiff.parameterize model.

MODEL_PROCESSES = {**gaussian_data.PROCESSES, 'ddpm': processes.GaussianProcess(processes.Discrete('linear', 1000))}
OUTPUTS = {'cosine': 'v', 'vp': 'eps', 'subvp': 'v', 've': 'x0', 'edm': 'edm', 'ddpm': 'eps', 'blurring': 'eps'}


def model_marginal(process, t, m, v):
    """Mean and std, in the basis, of the marginal at process time t of data with independent
    basis coefficients N(m, v): N(alpha_t m, alpha_t^2 v + sigma_t^2) per coefficient."""
    alpha, sigma = (np.asarray(a, np.float64)[0] for a in process.scale_sigma(np.float64(t), (1, *SHAPE)))
    return alpha * m, np.sqrt(alpha ** 2 * v + sigma ** 2)


def basis_log_prob(process, z, mean, std):
    return L.gaussian_log_prob(process.to_basis(z), mean, std)


def exact_model_prior(process, t, m, v, dtype):
    """The marginal at t as a prior (V orthonormal: the density of z is that of V^T z)."""
    mean, std = model_marginal(process, t, m, v)
    return jax.tree_util.Partial(functools.partial(basis_log_prob, process), mean=jnp.asarray(mean, dtype),
                                 std=jnp.asarray(std, dtype))


def model_setup(name, dtype, m=None, v=None):
    """Ideal model of 32-d Gaussian data with independent basis coefficients N(m, v), v in
    [0.05, 1] (gaussian_data.moments), 4 points, and the closed-form log-density of the process's
    marginal at t_min at those points."""
    process = MODEL_PROCESSES[name]
    if m is None:
        m, v = gaussian_data.moments(SHAPE)
    model = gaussian_data.ideal_model(process, OUTPUTS[name], m, v)
    u = m + np.random.default_rng(1).normal(size=(4, *SHAPE)) * np.sqrt(v)
    x = np.asarray(process.from_basis(jnp.asarray(u)), np.float64)
    _, flow = L.model_flow(model)
    reference = normal_log_density(u, *model_marginal(process, flow.times[0], m, v))
    return process, m, v, model, x, reference, flow


def schedule_closed_forms(process, t):
    """(f, c) of the PF-ODE du/dt = f u + c eps_hat from the schedules' formulas, without
    derivatives of scale_sigma: score-SDE's SDE dx = f x dt + g dw (Song et al. 2021, eqs. 31-33)
    with c = g^2 / (2 sigma) (sub-VP's g^2 = beta (1 - exp(-2 B)), eq. 29); DDPM's lambda' = T (lambda_{n+1} - lambda_n) on [n/T, (n+1)/T); the
    cosine alpha = cos(theta), sigma = sin(theta), theta = t0 + t (t1 - t0); blurring adds
    d log d_t / dt per frequency."""
    schedule = process.schedule
    _, sigma = (np.asarray(a, np.float64)[0] for a in process.scale_sigma(np.float64(t), (1, *SHAPE)))
    if isinstance(schedule, processes.VP):
        beta = schedule.beta_min + t * (schedule.beta_max - schedule.beta_min)
        return -beta / 2, beta / (2 * sigma)
    if isinstance(schedule, processes.SubVP):  # g^2 = beta (1 - exp(-2 B)) (eq. 29)
        beta = schedule.beta_min + t * (schedule.beta_max - schedule.beta_min)
        B = schedule.beta_min * t + 0.5 * (schedule.beta_max - schedule.beta_min) * t ** 2
        return -beta / 2, beta * -np.expm1(-2 * B) / (2 * sigma)
    if isinstance(schedule, processes.VE):
        log_ratio = math.log(schedule.sigma_max / schedule.sigma_min)
        return 0.0, sigma * log_ratio  # g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min)
    if isinstance(schedule, processes.EDM):
        return 0.0, 1.0
    if isinstance(schedule, processes.Discrete):
        n = min(int(np.floor(t * schedule.T + 1e-9)), schedule.T - 1)  # table index n - 1 holds lambda_n
        dlogsnr = schedule.T * (schedule.table[n] - schedule.table[n - 1])
        return sigma ** 2 / 2 * dlogsnr, -sigma / 2 * dlogsnr
    t0, t1 = (float(np.arctan(np.exp(-0.5 * lim))) for lim in (schedule.logsnr_max, schedule.logsnr_min))
    theta = t0 + t * (t1 - t0)
    f, c = -np.tan(theta) * (t1 - t0), (t1 - t0) / np.cos(theta)
    if isinstance(process, processes.BlurringProcess):
        lam = schedules.dct_frequencies(SHAPE[0], SHAPE[1])[..., None]
        blur = process.sigma_blur_max * np.sin(np.pi * t / 2) ** 2
        d = schedules.blur_dissipation(np.float64(t), lam, process.sigma_blur_max, process.min_scale)
        dlog_d = -(1 - process.min_scale) * np.exp(-lam * blur ** 2 / 2) * lam * blur * (
            process.sigma_blur_max * np.pi / 2 * np.sin(np.pi * t)) / d
        f = f + dlog_d
        c = np.cos(theta) * (t1 - t0) - sigma * f  # sigma' - sigma f
    return f, c


@pytest.mark.parametrize('name', MODEL_PROCESSES)
def test_model_flow_coefficients_are_score_sdes(name):
    """float64: f = d log alpha/dt and c = sigma d log(sigma/alpha)/dt from jax.jvp of
    process.scale_sigma equal the schedules' closed forms (score-SDE's f and g^2 = 2 sigma c for
    VP and VE) to 1e-10 relative at five times; in log_sigma time both are divided by
    d log(sigma/alpha)/dt and the Newton inverse t(tau) recovers t to 1e-12 relative (1e-15 near
    t = 0; Discrete included, whose Newton start is not on its knots)."""
    process = MODEL_PROCESSES[name]
    with jax.enable_x64(True):
        model = gaussian_data.ideal_model(process, 'eps', *gaussian_data.moments(SHAPE))
        _, flow = L.model_flow(model, time='process')
        _, log_flow = L.model_flow(model, time='log_sigma')
        lo, hi = flow.times
        coefficients = jax.jit(lambda flow, tau: flow.coefficients(tau, (1, *SHAPE), jnp.float64), static_argnums=0)
        for t in lo + (hi - lo) * np.array([0.0, 0.0123, 0.31, 0.77, 1.0]):
            _, _, _, f, c = (np.asarray(a) for a in coefficients(flow, t))
            f_ref, c_ref = schedule_closed_forms(process, t)
            np.testing.assert_allclose(f, np.broadcast_to(f_ref, f.shape), rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(c, np.broadcast_to(c_ref, c.shape), rtol=1e-10)
            alpha, sigma = process.schedule.alpha_sigma(np.float64(t))
            tau = math.log(sigma / alpha)
            t_log, _, _, f_log, c_log = (np.asarray(a) for a in coefficients(log_flow, tau))
            assert abs(float(t_log) - t) <= 1e-12 * max(t, 1e-3), (t_log, t)
            dtau = np.asarray(c_ref).reshape(-1)[0] / sigma  # the DC coefficient's d log(sigma/alpha)/dt
            np.testing.assert_allclose(f_log, np.broadcast_to(f_ref, f.shape) / dtau, rtol=1e-9, atol=1e-14)
            np.testing.assert_allclose(c_log, np.broadcast_to(c_ref, c.shape) / dtau, rtol=1e-9)


def test_model_flow_prior_is_sigma_at_t_max():
    """The default prior N(0, sigma_{t_max}^2 I): VE 50, EDM 80, sub-VP 1 - exp(-B(1)); for VP schedules
    sqrt(1 - alpha_{t_max}^2), ~1 - 2e-5 (alpha^2 = e^-10.05, sigmoid(-10), prod(1 - beta))."""
    stds = {name: L.model_flow(gaussian_data.ideal_model(p, 'eps', *gaussian_data.moments(SHAPE)))[1].prior_std
            for name, p in MODEL_PROCESSES.items()}
    alpha_bar_T = np.prod(1 - np.linspace(1e-4, 0.02, 1000))
    expected = {'ve': 50.0, 'edm': 80.0, 'vp': math.sqrt(-math.expm1(-(0.1 + 19.9 / 2))),
                'subvp': -math.expm1(-(0.1 + 19.9 / 2)),  # sigma = 1 - exp(-B(1))
                'cosine': math.sqrt(1 / (1 + math.exp(-10))), 'blurring': math.sqrt(1 / (1 + math.exp(-10))),
                'ddpm': math.sqrt(1 - alpha_bar_T)}
    for name, std in stds.items():
        assert std == pytest.approx(expected[name], rel=1e-12), name


def model_cases():
    for name in MODEL_PROCESSES:
        yield pytest.param(name, 'float64', id=f'{name}-float64')
    for name in ('ddpm', 've'):
        yield pytest.param(name, 'float32', id=f'{name}-float32')


@pytest.mark.parametrize('name,dtype', list(model_cases()))
def test_model_log_likelihood_of_gaussian_data_is_the_analytic_density(name, dtype):
    """As the EDM-form tests above, for every process of jaxdiff.processes (the ideal model in a
    different output type on each; blurring's data independent per DCT coefficient), exact
    divergence. The ODE's log p equals the closed-form density of the marginal at t_min,
    N(alpha m, alpha^2 v + sigma^2) per coefficient, plus the default prior's closed-form error:
    it is N(0, sigma_{t_max}^2 I) (checked at the latents z to 1e-12 relative), not the marginal
    N(alpha m, alpha^2 v + sigma^2) at t_max, so log p is off by the difference of the two
    log-densities at z (~1e-2 nats here: alpha_{t_max}^2 ~ 5e-5 for the VP schedules, the variance
    term for VE and EDM). Tolerances as there (log p ~ -28): float64 with rtol = atol = 1e-9:
    1e-5 nats (measured 5e-7 on EDM, <= 3e-8 on the others); float32 with the default 1e-5:
    3e-3 nats (measured <= 4e-4; |Delta| up to ~170 nats times rtol, plus float32 round-off of
    the state). DDPM integrates in log(sigma/alpha) ('auto').

    DDPM in float32 runs with x64 enabled (a float32 state; Discrete's lambda(t) in float64): under
    JAX 0.10.2, Discrete.logsnr's jnp.interp on its cached numpy table, jit-compiled inside this
    ODE in both x64 modes in one process, fails to lower (a stale float32 constant); passing
    xp.asarray(self.table) there would fix it."""
    with jax.enable_x64(dtype == 'float64' or name == 'ddpm'):
        process, m, v, model, x, reference, flow = model_setup(name, dtype)
        solver = L.ODESolver(rtol=1e-9, atol=1e-9) if dtype == 'float64' else L.ODESolver()
        result = L.log_likelihood_of_model(model, jnp.asarray(x, dtype), solver=solver, divergence='exact')
        assert result.log_prob.dtype == dtype and bool(result.success.all())
        z = np.asarray(process.to_basis(result.latents), np.float64)
    prior = normal_log_density(z, 0.0, flow.prior_std)
    np.testing.assert_allclose(np.asarray(result.prior_log_prob, np.float64), prior,
                               rtol=1e-12 if dtype == 'float64' else 1e-6)
    mismatch = prior - normal_log_density(z, *model_marginal(process, flow.times[1], m, v))
    error = np.abs(np.asarray(result.log_prob, np.float64) - (reference + mismatch)).max()
    print(f'{name} {dtype}: error {error:.2e} nats, prior error {np.abs(mismatch).max():.2e}, '
          f'nfe {np.asarray(result.nfe).max()}')
    assert flow.time == ('log_sigma' if name == 'ddpm' else 'process')
    assert error < (1e-5 if dtype == 'float64' else 3e-3), error
    assert np.abs(mismatch).max() < 0.05


@pytest.mark.parametrize('name', ['ddpm', 've'])
def test_model_bits_per_dim_of_gaussian_data_is_the_analytic_density(name):
    """bits/dim of 8-bit images of N(m, diag v) data (v in [0.01, 0.1]) through a DDPM and a VE
    model's PF-ODE: image n's dequantised x = (k + u - 1/2)/127.5 - 1 with u drawn from
    fold_in(key_n, 0), as documented, and bpd = -log p(x)/(D ln 2) + log2(127.5) with p the
    marginal at t_min in closed form. float64, rtol 1e-9, exact prior: 1e-5 nats is 5e-7 bits/dim;
    asserted 1e-6."""
    images, mean, var = uint8_gaussian_images()
    with jax.enable_x64(True):
        process, m, v, model, _, _, flow = model_setup(name, 'float64', mean, var)
        keys = jax.random.split(jax.random.key(1), len(images))
        result = L.bits_per_dim_of_model(model, jnp.asarray(images), keys, divergence='exact',
                                         solver=L.ODESolver(rtol=1e-9, atol=1e-9), dtype=jnp.float64,
                                         prior=exact_model_prior(process, flow.times[1], mean, var, jnp.float64))
        u = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(k, 0), SHAPE, jnp.float64)) for k in keys])
    x = (images + u - 0.5) / 127.5 - 1
    expected = -normal_log_density(x, *model_marginal(process, flow.times[0], mean, var)) / (DIM * math.log(2))
    expected += math.log2(127.5)
    assert bool(result.success.all())
    print(f'{name}: bpd {np.asarray(result.bpd)}, error {np.abs(np.asarray(result.bpd) - expected).max():.2e}')
    np.testing.assert_allclose(np.asarray(result.bpd), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('name', ['edm', 've'])
def test_edm_form_is_edms_closed_form_ode_on_an_edm_denoiser(name):
    """The nonlinear MLP denoiser through `log_likelihood` (the EDM form, run as the general ODE
    of `sampler_process`, derivatives by jax.jvp of scale_sigma) against EDM's ODE written out
    here in its own time with closed-form a, b, s (`edm_form`) and solved by the same dopri5, float64,
    exact divergence, prior N(0, (s sigma)^2 I), rtol 1e-9: agreement to 1e-6 nats (solver
    tolerance; measured: EDM, the same ODE in the same time, ~1e-13 (VP too: 7e-13); VE, EDM's
    sqrt(t) against score-SDE's geometric time, 5e-8, with 578 evaluations against 944). The
    general form of the same DenoiserModel gives the same numbers (it is the same computation)."""
    sampler = PROCESSES[name]
    with jax.enable_x64(True):
        mlp = mlp_denoiser(jnp.float64)
        x = jnp.asarray(data_points(*diag_gaussian()))
        solver = L.ODESolver(rtol=1e-9, atol=1e-9)
        ours = L.log_likelihood(mlp, x, process=sampler, solver=solver, divergence='exact')
        model, _ = samplers.bind(mlp, L.sampler_process(sampler))
        general = L.log_likelihood_of_model(model, x, solver=solver, divergence='exact')

        def f(t, y):
            sigma, s, a, b = edm_form(sampler, t)
            fn = lambda x: a * x - b * mlp(x[None] / s, sigma)[0]
            return L.divergence_exact(fn, y[0])

        t0, t1 = (float(edm_time(sampler, np.float64(level))) for level in (sampler.sigma_min, sampler.sigma_max))
        solve = jax.jit(jax.vmap(lambda x: L.dopri5(f, (x, jnp.float64(0)), t0, t1, rtol=1e-9, atol=1e-9)))
        (z, delta), stats = solve(x)
        sigma1, s1, _, _ = edm_form(sampler, np.float64(t1))
        reference = np.asarray(L.gaussian_log_prob(z, 0.0, float(s1 * sigma1)) + delta)
    error = np.abs(np.asarray(ours.log_prob) - reference).max()
    print(f'{name}: {error:.2e} nats, nfe {np.asarray(ours.nfe).max()} (EDM time: {np.asarray(stats.nfe).max()})')
    assert bool(stats.success.all()) and error < 1e-6, error
    np.testing.assert_array_equal(general.log_prob, ours.log_prob)


def test_model_flow_rejects_an_empty_or_zero_noise_range():
    model = gaussian_data.ideal_model(MODEL_PROCESSES['edm'], 'eps', *gaussian_data.moments(SHAPE))
    with pytest.raises(ValueError, match='PF-ODE needs'):
        L.model_flow(model, processes.GaussianProcess(processes.EDM(sigma_min=0.0)))
    with pytest.raises(ValueError, match='ODESolver.time'):
        L.ODESolver(time='logsnr')


# ---------------------------------------------------------------------------------------------
# Slow: Hutchinson through the whole ODE, and real digits.

@pytest.mark.slow
def test_hutchinson_log_likelihood_is_unbiased_through_the_ode():
    """The mean over 256 Rademacher probe draws of the ODE's log p (MLP denoiser, float64) equals
    the exact-divergence log p within 4 standard errors."""
    with jax.enable_x64(True):
        denoise = mlp_denoiser(jnp.float64)
        x = jnp.asarray(data_points(*diag_gaussian(), n=1))
        kwargs = dict(process=PROCESSES['edm'], solver=L.ODESolver(rtol=1e-8, atol=1e-8))
        exact = float(L.log_likelihood(denoise, x, divergence='exact', **kwargs).log_prob[0])
        repeats = 256
        keys = jax.random.split(jax.random.key(0), repeats)
        estimates = np.asarray(L.log_likelihood(denoise, jnp.tile(x, (repeats, 1, 1, 1)), keys, **kwargs).log_prob)
    assert abs(estimates.mean() - exact) < 4 * estimates.std() / math.sqrt(repeats), (estimates.mean(), exact)


def digits_gaussian_fit():
    """sklearn's digits (0..16, x = k/8 - 1 as jaxdiff's data) and the Gaussian fitted to their
    dequantised values: the data covariance plus Delta^2/12 I, Delta = 1/8."""
    from jaxdiff.data import load_embedded
    x, _ = load_embedded('digits')
    k = np.round((np.asarray(x, np.float64) + 1) * 8).astype(np.int32)
    flat = (k / 8 - 1).reshape(len(k), -1)
    cov = np.cov(flat.T) + (1 / 8) ** 2 / 12 * np.eye(flat.shape[1])
    return k, flat.mean(0).reshape(x.shape[1:]), cov


@pytest.mark.slow
def test_digits_bits_per_dim_under_a_gaussian_fit():
    """A sanity figure: 64 dequantised digits through the PF-ODE (EDM, float32, default prior)
    against the fitted Gaussian's closed-form bpd of the same points (the marginal at
    sigma_min = 0.002, in float64). Exact divergence: per image within 5e-3 bits/dim, mean within
    1e-3 -- the difference (measured up to 3.3e-3, mean 4e-4) is the default prior's mismatch,
    N(0, 80^2 I) against the true N(m, C + 80^2 I) with |m| = 5.2 (the term z.m / 80^2), not the
    solver's: it stays at rtol 1e-7, and the exact prior brings it to 1e-4. One Rademacher probe:
    the mean over images within 4 standard errors of the per-image differences (std ~0.12).
    The figure is about 2.90 bits/dim (of log2(17) = 4.09 for 17 levels)."""
    k, mean, cov = digits_gaussian_fit()
    images = jnp.asarray(k[:64])
    denoise = GaussianDenoiser.create(jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32))
    keys = jax.random.split(jax.random.key(0), len(images))
    kwargs = dict(process=PROCESSES['edm'], num_levels=17)
    exact = L.bits_per_dim(denoise, images, keys, divergence='exact', **kwargs)
    hutchinson = L.bits_per_dim(denoise, images, keys, **kwargs)
    # The same dequantised points, and the density of the marginal at sigma_min, in float64.
    u = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(key, 0), images.shape[1:])) for key in keys])
    x = (np.asarray(images) + u - 0.5) / 8 - 1
    cov_min = cov + 0.002 ** 2 * np.eye(len(cov))
    diff = (x - mean).reshape(len(x), -1)
    _, logdet = np.linalg.slogdet(cov_min)
    log_p = -0.5 * (np.einsum('nd,nd->n', diff, np.linalg.solve(cov_min, diff.T).T) + logdet
                    + len(cov) * np.log(2 * np.pi))
    expected = -log_p / (len(cov) * math.log(2)) + 3.0
    assert bool(exact.success.all()) and bool(hutchinson.success.all())
    assert np.abs(np.asarray(exact.bpd) - expected).max() < 5e-3
    assert abs(np.mean(np.asarray(exact.bpd) - expected)) < 1e-3
    errors = np.asarray(hutchinson.bpd) - expected
    assert abs(errors.mean()) < 4 * errors.std() / math.sqrt(len(errors)), errors
