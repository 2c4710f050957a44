"""Forward processes against the paper's formulas written out independently here (numpy float64):
marginal moments by Monte Carlo in the DCT basis, the ancestral step's posterior against brute-force
Gaussian conditioning, and BlurringProcess(sigma_blur_max=0) == GaussianProcess bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft
import scipy.integrate

from jaxdiff import dct, parameterize, processes, samplers
from jaxdiff.samplers import grids, steps

H, W, C = 4, 4, 2


def paper_alpha_sigma(t, h, w, sigma_blur_max, min_scale=0.001, logsnr_min=-10.0, logsnr_max=10.0):
    """(alpha [H, W], sigma) at scalar t from the paper's definitions, float64 numpy."""
    t0, t1 = np.arctan(np.exp(-logsnr_max / 2)), np.arctan(np.exp(-logsnr_min / 2))
    logsnr = -2 * np.log(np.tan(t0 + t * (t1 - t0)))
    a, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
    freqs = (np.pi * np.arange(h)[:, None] / h) ** 2 + (np.pi * np.arange(w)[None, :] / w) ** 2
    sigma_blur = sigma_blur_max * np.sin(t * np.pi / 2) ** 2
    d = (1 - min_scale) * np.exp(-freqs * sigma_blur ** 2 / 2) + min_scale
    return a * d, sigma


def dct_np(x):
    return scipy.fft.dctn(np.asarray(x, np.float64), type=2, axes=(-3, -2), norm='ortho')


@pytest.mark.parametrize('process', [processes.GaussianProcess(), processes.BlurringProcess(sigma_blur_max=3.0)],
                         ids=['gaussian', 'blurring'])
def test_scale_sigma_matches_paper_formula(process):
    with jax.enable_x64(True):
        t = jnp.array([0.0, 0.05, 0.3, 0.7, 1.0])
        scale, sigma = process.scale_sigma(t, (5, 8, 6, 1), jnp.float64)
        blur = getattr(process, 'sigma_blur_max', 0.0)
        for i, ti in enumerate(np.asarray(t)):
            alpha_ref, sigma_ref = paper_alpha_sigma(ti, 8, 6, blur)
            np.testing.assert_allclose(np.broadcast_to(scale[i, ..., 0], (8, 6)), alpha_ref, rtol=1e-12)
            np.testing.assert_allclose(sigma[i, 0, 0, 0], sigma_ref, rtol=1e-12)
            logsnr = process.logsnr(ti, (1, 8, 6, 1), jnp.float64)
            np.testing.assert_allclose(np.broadcast_to(logsnr[0, ..., 0], (8, 6)),
                                       np.log(alpha_ref ** 2 / sigma_ref ** 2), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize('t', [0.1, 0.45, 0.8])
@pytest.mark.parametrize('process', [processes.GaussianProcess(), processes.BlurringProcess(sigma_blur_max=3.0)],
                         ids=['gaussian', 'blurring'])
def test_monte_carlo_moments_in_dct_basis(process, t):
    """u = DCT(z_t) for a fixed x over M noise draws: mean alpha_t * DCT(x), covariance sigma_t^2 I.
    Bounds are 5 standard errors: sigma/sqrt(M) for the mean, sigma^2 sqrt(2/M) for variances and
    sigma^2/sqrt(M) for covariances (D = 32 coefficients, so ~1e-4 chance of a false failure overall)."""
    m = 20000
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (1, H, W, C), jnp.float64)
        noise = jax.random.normal(jax.random.key(1), (m, H, W, C), jnp.float64)
        z = process.diffuse(jnp.broadcast_to(x, (m, H, W, C)), t, noise)
        u = dct_np(z).reshape(m, -1)
    alpha, sigma = paper_alpha_sigma(t, H, W, getattr(process, 'sigma_blur_max', 0.0))
    expected_mean = (alpha[..., None] * dct_np(x)[0]).reshape(-1)
    assert np.all(np.abs(u.mean(0) - expected_mean) <= 5 * sigma / np.sqrt(m))
    cov = np.cov(u, rowvar=False)
    diag, off = np.diag(cov), cov[~np.eye(cov.shape[0], dtype=bool)]
    assert np.all(np.abs(diag - sigma ** 2) <= 5 * sigma ** 2 * np.sqrt(2 / m))
    assert np.all(np.abs(off) <= 5 * sigma ** 2 / np.sqrt(m))


@pytest.mark.parametrize('s, t', [(0.3, 0.5), (0.05, 0.1), (0.7, 0.99), (0.499, 0.5), (0.0, 0.01)])
@pytest.mark.parametrize('process', [processes.GaussianProcess(), processes.BlurringProcess(sigma_blur_max=3.0)],
                         ids=['gaussian', 'blurring'])
def test_posterior_matches_brute_force_conditioning(process, s, t):
    """Per coefficient, (z_s, z_t) | x is jointly Gaussian: z_s = alpha_s x + sigma_s e1,
    z_t = alpha_ts z_s + sigma_ts e2. Condition on z_t with the Schur complement (float64)."""
    blur = getattr(process, 'sigma_blur_max', 0.0)
    (alpha_s, sigma_s), (alpha_t, sigma_t) = paper_alpha_sigma(s, H, W, blur), paper_alpha_sigma(t, H, W, blur)
    rng = np.random.default_rng(3)
    x, z_t = rng.normal(size=(2, H, W, C)), rng.normal(size=(2, H, W, C))
    u_x, u_t = dct_np(x), dct_np(z_t)
    ref_mean, ref_var = np.zeros_like(u_x), np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            a_s, a_t = alpha_s[i, j], alpha_t[i, j]
            a_ts = a_t / a_s
            var_ts = sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2
            assert var_ts > 0
            cov = np.array([[sigma_s ** 2, a_ts * sigma_s ** 2],
                            [a_ts * sigma_s ** 2, a_ts ** 2 * sigma_s ** 2 + var_ts]])
            gain = cov[0, 1] / cov[1, 1]
            ref_mean[:, i, j] = a_s * u_x[:, i, j] + gain * (u_t[:, i, j] - a_t * u_x[:, i, j])
            ref_var[i, j] = cov[0, 0] - gain * cov[1, 0]
    # The ancestral step's table from t to s (a two-point grid): in scaled coordinates x~ = u / alpha
    # its mean is c_x x~_t + (1 - c_x) x~_0 and its std is the posterior's (fixed_small), times alpha_s.
    grid = grids.Grid(np.array([t, s]), grids.dc_noise_level(process, np.array([t, s])))
    table, _ = steps.gaussian_table(samplers.Sampler(solver='ancestral', num_steps=2, discretization='uniform'),
                                    process, grid, (2, H, W, C))
    alpha_at = lambda time: np.broadcast_to(steps.points(process, np.array([time]), (1, H, W, C)).alpha[0], (H, W, 1))
    alpha_s_ours, alpha_t_ours = alpha_at(s)[..., 0], alpha_at(t)[..., 0]
    c_x = np.broadcast_to(table.c_x[0], (H, W, 1))
    std = np.broadcast_to(table.std[0], (H, W, 1))[..., 0] * alpha_s_ours
    mean = alpha_s_ours[..., None] * (c_x * u_t / alpha_t_ours[..., None] + (1 - c_x) * u_x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(std ** 2, ref_var, rtol=1e-9, atol=1e-15)


def test_blurring_without_blur_is_gaussian_bit_for_bit():
    gauss, blur0 = processes.GaussianProcess(), processes.BlurringProcess(sigma_blur_max=0.0)
    shape = (6, 8, 8, 2)
    keys = jax.random.split(jax.random.key(5), 3)
    x, noise, eps = (jax.random.normal(k, shape) for k in keys)
    t = jnp.array([0.0, 0.01, 0.3, 0.5, 0.9, 1.0])

    def same(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return np.array_equal(np.broadcast_to(a, np.broadcast_shapes(a.shape, b.shape)),
                              np.broadcast_to(b, np.broadcast_shapes(a.shape, b.shape)))

    for g, b in zip(gauss.scale_sigma(t, shape), blur0.scale_sigma(t, shape)):
        assert same(g, b)
    assert same(gauss.logsnr(t, shape), blur0.logsnr(t, shape))
    assert jnp.array_equal(gauss.diffuse(x, t, noise), blur0.diffuse(x, t, noise))
    assert jnp.array_equal(jax.jit(gauss.diffuse)(x, t, noise), jax.jit(blur0.diffuse)(x, t, noise))
    # Whole sampler runs, with a network that mixes pixels so any basis mismatch would show.
    def net(params, z, noise_labels, labels=None, augment_labels=None):
        return jnp.tanh(dct.dct2(z) * 0.7) + 0.1 * jnp.roll(z, 1, axis=1) + 1e-4 * noise_labels[:, None, None, None]

    latents = jax.random.normal(jax.random.key(7), shape)
    key = jax.random.key(8)
    for sampler in (samplers.Sampler(solver='ancestral', num_steps=12, discretization='uniform'),
                    samplers.Sampler(solver='heun', num_steps=6, discretization='uniform'),
                    samplers.Sampler(solver='exp_heun', num_steps=6, discretization='uniform'),
                    samplers.Sampler(solver='dpmpp_2m', num_steps=6, discretization='logsnr')):
        runs = [samplers.sample(sampler, parameterize.model_from_fn(net, process, 'eps'), latents, key)
                for process in (gauss, blur0)]
        assert jnp.array_equal(*runs), sampler.solver


def test_blurring_blurs_high_frequencies_first():
    """alpha_t / a_t = d_t decreases with frequency at fixed t and with t at fixed frequency; the DC
    coefficient is never blurred; high frequencies reach the floor d_min."""
    process = processes.BlurringProcess(sigma_blur_max=20.0)
    with jax.enable_x64(True):
        d = np.asarray(process.dissipation(jnp.array([0.1, 0.5, 1.0]), (3, 16, 16, 1), jnp.float64))[..., 0]
    assert np.all(d[:, 0, 0] == 1.0)
    assert np.all(np.diff(d[:, 0, :], axis=1) <= 0) and np.all(np.diff(d[:, :, 0], axis=1) <= 0)
    assert np.all(np.diff(d, axis=0) <= 0)
    assert d[-1, -1, -1] == pytest.approx(0.001, rel=1e-9)


def test_processes_are_hashable_static_arguments_and_validate():
    assert hash(processes.BlurringProcess()) == hash(processes.BlurringProcess())
    f = jax.jit(lambda x, process: process.diffuse(x, 0.5, x), static_argnums=1)
    np.testing.assert_allclose(f(jnp.ones((1, 4, 4, 1)), processes.BlurringProcess()).shape, (1, 4, 4, 1))
    with pytest.raises(ValueError, match='sigma_blur_max'):
        processes.BlurringProcess(sigma_blur_max=-1.0)
    with pytest.raises(ValueError, match='min_scale'):
        processes.BlurringProcess(min_scale=0.0)
    with pytest.raises(ValueError, match='logsnr_min'):
        processes.GaussianProcess(processes.Cosine(logsnr_min=3.0, logsnr_max=1.0))
    with pytest.raises(ValueError, match='schedule on t in'):
        processes.BlurringProcess(processes.EDM())


SCHEDULE_KWARGS = {'cosine_shifted': dict(image_d=256), 'cosine_interpolated': dict(image_d=512)}


@pytest.mark.parametrize('name', sorted(processes.SCHEDULES))
def test_every_schedule_inverts_its_logsnr_and_agrees_with_its_alpha_sigma(name):
    """t_from_logsnr(logsnr(t)) = t (float64, rtol 1e-9: the inverses go through log/sqrt of values
    near 1 at small t); log(alpha^2 / sigma^2) = logsnr; numpy and jax.numpy give the same logsnr (float32
    rounding, rtol 1e-5 of max(1, |lambda|))."""
    schedule = processes.SCHEDULES[name](**SCHEDULE_KWARGS.get(name, {}))
    t = np.linspace(schedule.t_min, schedule.t_max, 101)[1:-1] if name != 'discrete' else np.arange(1, 1001) / 1000
    lam = schedule.logsnr(t)
    np.testing.assert_allclose(schedule.t_from_logsnr(lam), t, rtol=1e-9)
    alpha, sigma = schedule.alpha_sigma(t)
    np.testing.assert_allclose(np.log(alpha ** 2 / sigma ** 2), lam, rtol=1e-9, atol=1e-9)
    lam32 = np.asarray(schedule.logsnr(jnp.asarray(t, jnp.float32)))
    np.testing.assert_allclose(lam32, lam, atol=1e-5 * np.maximum(1, np.abs(lam)).max())


def test_sub_vp_marginals_solve_the_sub_vp_sde_variance_equation():
    """Song et al. 2021 eq. 29: dx = -beta/2 x dt + sqrt(beta (1 - exp(-2 B))) dw gives mean factor
    alpha = exp(-B/2) and variance Sigma with dSigma/dt = -beta Sigma + beta (1 - exp(-2 B)), Sigma(0) = 0;
    integrated by scipy (rtol 1e-10, atol 1e-14 per step) it equals sigma_t^2 = (1 - exp(-B))^2."""
    schedule = processes.SubVP()
    beta = lambda t: schedule.beta_min + (schedule.beta_max - schedule.beta_min) * t
    B = lambda t: schedule.beta_min * t + 0.5 * (schedule.beta_max - schedule.beta_min) * t ** 2
    rhs = lambda t, y: [-beta(t) * y[0] + beta(t) * (1 - np.exp(-2 * B(t))), -0.5 * beta(t) * y[1]]
    t = np.linspace(0.01, 1, 12)
    sol = scipy.integrate.solve_ivp(rhs, (0, 1), [0.0, 1.0], t_eval=t, rtol=1e-10, atol=1e-14)
    alpha, sigma = schedule.alpha_sigma(t)
    np.testing.assert_allclose(sol.y[0], sigma ** 2, rtol=1e-7, atol=1e-11)  # the solver's absolute error
    np.testing.assert_allclose(sol.y[1], alpha, rtol=1e-7)


# ---------------------------------------------------------------------------------------------
# Simple diffusion's shifted and interpolated schedules as processes.

def test_shifted_cosine_is_the_cosine_plus_the_resolution_shift():
    t = np.linspace(0, 1, 101)
    for image_d, noise_d in ((128, 64), (256, 32), (32, 64)):
        shifted = processes.ShiftedCosine(image_d, noise_d)
        plain = processes.Cosine(-15.0, 15.0, shift=2 * np.log(noise_d / image_d))
        np.testing.assert_allclose(shifted.logsnr(t), plain.logsnr(t), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match='image_d'):
        processes.ShiftedCosine(0)


@pytest.mark.parametrize('image_d,noise_d', [(32, 8), (64, 16), (16, 16)])
def test_shifted_schedule_pooled_to_noise_d_has_the_unshifted_logsnr(image_d, noise_d):
    """Simple diffusion's argument, by Monte Carlo: z_t = alpha x + sigma eps at image_d, average-pooled by
    k = image_d / noise_d, keeps a signal that is constant over k x k blocks and divides the white noise's
    variance by k^2, so the pooled logSNR is lambda_shift + 2 log k = lambda_cos. Measured as
    log(slope^2 / residual variance) of pooled z regressed on pooled x, over m = 65,536 pooled values per t.
    Standard errors: the log variance sqrt(2 / m), the log slope^2 2 sqrt(1 / (m SNR)) (the slope's
    relative error is sqrt(residual variance / (m alpha^2)) for unit-variance x); 5 of them combined."""
    process = processes.GaussianProcess(processes.ShiftedCosine(image_d, noise_d))
    cosine = processes.Cosine(-15.0, 15.0)
    m = 65536
    k, n = image_d // noise_d, m // noise_d ** 2
    key_x, key_e = jax.random.split(jax.random.key(image_d))
    coarse = jax.random.normal(key_x, (n, noise_d, noise_d, 1))
    x = jnp.repeat(jnp.repeat(coarse, k, axis=1), k, axis=2)  # constant over k x k blocks
    pool = lambda a: a.reshape(n, noise_d, k, noise_d, k, 1).mean(axis=(2, 4))
    for t in (0.2, 0.5, 0.8):
        z = process.diffuse(x, jnp.full((n,), t), jax.random.normal(jax.random.fold_in(key_e, int(100 * t)), x.shape))
        u, v = np.asarray(pool(x), np.float64).ravel(), np.asarray(pool(z), np.float64).ravel()
        slope = np.dot(u, v) / np.dot(u, u)
        residual = v - slope * u
        measured, expected = np.log(slope ** 2 / residual.var()), float(cosine.logsnr(t))
        tolerance = 5 * np.sqrt(2 / m + 4 / (m * np.exp(expected)))
        assert measured == pytest.approx(expected, abs=tolerance), (t, measured, tolerance)


def test_interpolated_cosine_process_runs_the_samplers_time_grids():
    """Eq. (6) as a process: noisier than shift-256 and less noisy than shift-32 in between; its host
    inverse gives the sampler's step tables (the 'logsnr' grid needs t(lambda))."""
    schedule = processes.InterpolatedCosine(512)
    t = np.linspace(0.01, 0.99, 99)
    low, high = processes.ShiftedCosine(512, 32).logsnr(t), processes.ShiftedCosine(512, 256).logsnr(t)
    assert np.all(low < schedule.logsnr(t)) and np.all(schedule.logsnr(t) < high)
    process = processes.GaussianProcess(schedule)
    for discretization in ('uniform', 'logsnr', 'edm'):
        grid = grids.time_grid(samplers.Sampler(solver='ddim', num_steps=10, discretization=discretization), process)
        assert np.all(np.diff(grid.t) < 0) and 0 <= grid.t[-1] and grid.t[0] <= 1, grid.t
        np.testing.assert_allclose(schedule.logsnr(grid.t), -2 * np.log(grid.sigma), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match='low_d'):
        processes.InterpolatedCosine(512, low_d=0, high_d=32)
    with pytest.raises(ValueError, match='monotonically'):
        processes.InterpolatedCosine(512, low_d=8, high_d=512)
