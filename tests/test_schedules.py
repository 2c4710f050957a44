"""Schedules and step discretisations against NVlabs/edm's recorded noise levels and closed forms."""
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules


def heun_step_sigmas(ref, run):
    """The noise levels t_0..t_{N-1} of a recorded deterministic Heun run: its denoiser calls are
    t_0, t_1, t_1, t_2, ..., t_{N-1} (the first of each pair is the step's start)."""
    return ref[f'f64/sampler/{run}/call_sigma'][::2]


def test_edm_sigma_steps_match_edm_sampler(edm_refs):
    # Algorithm 2 evaluates at sigma_0, sigma_1, sigma_1, sigma_2, ... (the Heun pairs).
    steps = schedules.edm_sigma_steps(18, 0.002, 80.0, 7.0)
    np.testing.assert_allclose(steps, heun_step_sigmas(edm_refs('ddpmpp'), 'edm_det'), rtol=1e-15)
    assert steps[0] == pytest.approx(80.0) and steps[-1] == pytest.approx(0.002)
    assert np.all(np.diff(steps) < 0)


def test_ve_sigma_steps_match_edm_ablation_sampler(edm_refs):
    steps = schedules.ve_sigma_steps(18, 0.02, 100.0)
    np.testing.assert_allclose(steps, edm_refs('ddpmpp')['f64/sampler/abl_euler_ve_ve_none/call_sigma'], rtol=1e-14)


def test_vp_sigma_steps_match_edm_ablation_sampler(edm_refs):
    lo, hi = float(schedules.vp_sigma(1e-3)), float(schedules.vp_sigma(1.0))
    steps = schedules.vp_sigma_steps(18, lo, hi, 1e-3)
    np.testing.assert_allclose(steps, edm_refs('ddpmpp')['f64/sampler/abl_euler_vp_vp_vp/call_sigma'], rtol=1e-13)


def test_iddpm_sigma_steps_match_edm_ablation_sampler(edm_refs):
    # EDM's table is built from float32 alpha_bar ratios; ours reproduces it to ~1e-6 (see iddpm_u).
    steps = schedules.iddpm_sigma_steps(18, 0.002, 81.0, schedules.iddpm_u())
    np.testing.assert_allclose(steps, heun_step_sigmas(edm_refs('ddpmpp'), 'abl_heun_iddpm_linear_none'), rtol=2e-6)


def test_iddpm_u_float32_matches_edm_precond_table(edm_refs):
    ref = edm_refs('adm_iddpm')['precond/iddpm/u']
    ours = schedules.iddpm_u(dtype=np.float32)
    assert ours.dtype == np.float32 and ours[-1] == 0
    np.testing.assert_allclose(ours[:-1], ref[:-1], rtol=2e-5)
    assert np.all(np.diff(ours) < 0)


def test_iddpm_u_is_fixed_point_of_its_recursion():
    u = schedules.iddpm_u(M=50, C_1=0.001, C_2=0.008)
    j = np.arange(1, 51)
    ratio = np.maximum(schedules.iddpm_alpha_bar(j - 1.0, 50) / schedules.iddpm_alpha_bar(j * 1.0, 50), 0.001)
    np.testing.assert_allclose((u[:-1] ** 2 + 1) * ratio, u[1:] ** 2 + 1, rtol=1e-6)


@pytest.mark.parametrize('t', [1e-3, 0.1, 0.5, 1.0])
def test_vp_sigma_inverse_and_derivative(t):
    t = np.float64(t)
    assert schedules.vp_sigma_inv(schedules.vp_sigma(t)) == pytest.approx(t, rel=1e-12)
    eps = 1e-6 * t
    numeric = (schedules.vp_sigma(t + eps) - schedules.vp_sigma(t - eps)) / (2 * eps)
    assert schedules.vp_sigma_deriv(t) == pytest.approx(numeric, rel=1e-7)


def test_vp_sigma_is_accurate_in_float32_near_t_zero():
    """At t = 1e-5 the exponent is 1e-6: exp(.) - 1 in float32 keeps about one significant digit
    (relative error ~5e-2 in sigma^2); expm1 keeps float32 precision. The inverse uses log1p; its
    sqrt(beta_min^2 + ...) - beta_min still cancels at small t, hence the looser 1e-4."""
    t64 = np.array([1e-5, 1e-4, 1e-3], np.float64)
    exact = np.sqrt(np.expm1(0.5 * 19.9 * t64 ** 2 + 0.1 * t64))
    got = np.asarray(schedules.vp_sigma(jnp.asarray(t64, jnp.float32)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, exact, rtol=1e-6)
    back = np.asarray(schedules.vp_sigma_inv(jnp.asarray(exact, jnp.float32)))
    np.testing.assert_allclose(back, t64, rtol=1e-4)


@pytest.mark.parametrize('t', [1e-3, 0.7, 400.0])
def test_ve_sigma_inverse_and_derivative(t):
    t = np.float64(t)
    assert schedules.ve_sigma_inv(schedules.ve_sigma(t)) == pytest.approx(t, rel=1e-14)
    eps = 1e-6 * t
    numeric = (schedules.ve_sigma(t + eps) - schedules.ve_sigma(t - eps)) / (2 * eps)
    assert schedules.ve_sigma_deriv(t) == pytest.approx(numeric, rel=1e-7)


def test_vp_betas_for_range_hit_both_ends():
    beta_d, beta_min = schedules.vp_betas_for_range(0.01, 50.0, 1e-3)
    assert schedules.vp_sigma(np.float64(1e-3), beta_d, beta_min) == pytest.approx(0.01, rel=1e-10)
    assert schedules.vp_sigma(np.float64(1.0), beta_d, beta_min) == pytest.approx(50.0, rel=1e-10)


def test_vp_scale_derivative_matches_finite_difference():
    t, eps = np.float64(0.4), 1e-6
    s = lambda t: schedules.vp_scale(schedules.vp_sigma(t))
    numeric = (s(t + eps) - s(t - eps)) / (2 * eps)
    analytic = schedules.vp_scale_deriv(schedules.vp_sigma(t), schedules.vp_sigma_deriv(t))
    assert analytic == pytest.approx(numeric, rel=1e-7)


def test_round_to_table_snaps_to_nearest_entry():
    table = np.array([10.0, 5.0, 1.0, 0.0])
    rounded, index = schedules.round_to_table(np.array([7.4, 7.6, 0.4, 100.0]), table)
    np.testing.assert_array_equal(rounded, [5.0, 10.0, 0.0, 10.0])
    np.testing.assert_array_equal(index, [1, 0, 3, 0])


def test_clamp_sigma_range():
    assert schedules.clamp_sigma_range(0.002, 80.0, 0.02, 100.0) == (0.02, 80.0)


def test_schedule_functions_jit():
    t = jnp.linspace(0.1, 1.0, 5)
    for fn in (schedules.vp_sigma, schedules.vp_sigma_deriv, schedules.vp_sigma_inv, schedules.ve_sigma,
               schedules.ve_sigma_deriv, schedules.ve_sigma_inv, schedules.vp_scale, schedules.linear_sigma_deriv):
        np.testing.assert_allclose(jax.jit(fn)(t), fn(np.asarray(t, np.float64)), rtol=1e-5)
    rounded, _ = jax.jit(schedules.round_to_table)(t, jnp.array([1.0, 0.5, 0.0]))
    np.testing.assert_allclose(rounded, [0.0, 0.5, 0.5, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# logSNR form and the blurring schedule (Hoogeboom & Salimans 2023).

def test_logsnr_cosine_hits_its_clipping_range_and_inverts():
    t = np.linspace(0, 1, 11)
    logsnr = schedules.logsnr_cosine(t, -10.0, 10.0)
    assert logsnr[0] == pytest.approx(10.0, abs=1e-12) and logsnr[-1] == pytest.approx(-10.0, abs=1e-12)
    assert np.all(np.diff(logsnr) < 0)
    np.testing.assert_allclose(schedules.logsnr_cosine_inv(logsnr, -10.0, 10.0), t, atol=1e-14)
    with pytest.raises(ValueError, match='logsnr_min'):
        schedules.logsnr_cosine(t, 5.0, -5.0)


def test_logsnr_cosine_without_clipping_is_the_cosine_schedule():
    """With a wide range t0 -> 0, t1 -> pi/2, so alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""
    t = np.linspace(0.05, 0.95, 7)
    alpha, sigma = schedules.alpha_sigma_from_logsnr(schedules.logsnr_cosine(t, -80.0, 80.0))
    np.testing.assert_allclose(alpha, np.cos(0.5 * np.pi * t), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.sin(0.5 * np.pi * t), rtol=1e-12)


def test_alpha_sigma_from_logsnr_variance_preserving_and_accurate_at_extremes():
    logsnr = np.array([-30.0, -3.0, 0.0, 2.5, 30.0])
    alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr)
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-15)
    np.testing.assert_allclose(np.log(alpha ** 2 / sigma ** 2), logsnr, rtol=1e-13, atol=1e-13)
    # float32 at |lambda| = 80: the small one is exp(-40), not 0 (sqrt(1 - sigmoid(80)) would be 0).
    alpha32, sigma32 = schedules.alpha_sigma_from_logsnr(jnp.array([-80.0, 80.0], jnp.float32))
    np.testing.assert_allclose(np.asarray(alpha32), [np.exp(-40.0), 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sigma32), [1.0, np.exp(-40.0)], rtol=1e-6)


def test_blur_sigma_is_sin_squared():
    t = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(schedules.blur_sigma(t, 20.0), [0.0, 10.0, 20.0], atol=1e-13)


def test_dct_frequencies_are_laplacian_eigenvalues_of_the_dct_basis():
    """Row k of the DCT-II matrix is an eigenvector of the 1-D Neumann second difference with
    eigenvalue 4 sin^2(pi k / 2N), which is (pi k / N)^2 to leading order: the continuum eigenvalue
    the paper uses. Also the (i, j) layout: i runs over H, j over W."""
    from jaxdiff import dct
    n = 64
    lap = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    lap[0, 0] = lap[-1, -1] = 1  # reflecting (Neumann) ends
    c = dct.dct_matrix(n, np.float64)
    discrete = np.array([c[k] @ lap @ c[k] for k in range(n)])
    np.testing.assert_allclose(lap @ c.T, c.T * discrete, atol=1e-12)
    x = np.pi * np.arange(1, 8) / n  # 4 sin^2(x/2) = x^2 (1 - x^2/12 + ...)
    assert np.all(np.abs(discrete[1:8] / x ** 2 - 1) <= x ** 2 / 12 + 1e-12)
    freqs = schedules.dct_frequencies(4, 6)
    assert freqs.shape == (4, 6)
    assert freqs[3, 5] == pytest.approx((np.pi * 3 / 4) ** 2 + (np.pi * 5 / 6) ** 2)


def test_blur_dissipation_matches_the_paper_formula():
    t = np.linspace(0, 1, 9)[:, None, None]
    freqs = schedules.dct_frequencies(8, 8)
    tau = 0.5 * (20.0 * np.sin(0.5 * np.pi * t) ** 2) ** 2
    direct = (1 - 0.001) * np.exp(-freqs * tau) + 0.001
    d = schedules.blur_dissipation(t, freqs, 20.0, 0.001)
    np.testing.assert_allclose(d, direct, rtol=1e-14)
    np.testing.assert_allclose(schedules.blur_log_dissipation(t, freqs, 20.0, 0.001), np.log(direct),
                               rtol=1e-13, atol=1e-16)
    # float32: relative accuracy everywhere, including the floor d_min.
    d32 = np.asarray(schedules.blur_dissipation(jnp.asarray(t, jnp.float32), jnp.asarray(freqs, jnp.float32), 20.0))
    np.testing.assert_allclose(d32, direct, rtol=2e-6)
    log32 = schedules.blur_log_dissipation(jnp.asarray(t, jnp.float32), jnp.asarray(freqs, jnp.float32), 20.0)
    np.testing.assert_allclose(np.asarray(log32), np.log(direct), atol=2e-6)


def test_blur_dissipation_is_exactly_one_without_blur_and_at_dc():
    """d = 1 exactly (not 0.999 + 0.001 rounded) for sigma_blur_max = 0, at t = 0 and for the DC
    frequency, in float32 and for a d_min whose complement is not representable."""
    freqs = jnp.asarray(schedules.dct_frequencies(8, 8), jnp.float32)
    t = jnp.linspace(0, 1, 5, dtype=jnp.float32)[:, None, None]
    for min_scale in (0.001, 0.3, 1e-7):
        assert np.all(np.asarray(schedules.blur_dissipation(t, freqs, 0.0, min_scale)) == 1.0)
        assert np.all(np.asarray(schedules.blur_log_dissipation(t, freqs, 0.0, min_scale)) == 0.0)
        d = np.asarray(schedules.blur_dissipation(t, freqs, 20.0, min_scale))
        assert np.all(d[:, 0, 0] == 1.0) and np.all(d[0] == 1.0)
        assert d.min() >= np.float32(min_scale) * (1 - 1e-6)


# ---------------------------------------------------------------------------------------------
# Discrete DDPM beta tables and timestep spacings.
#
# Tolerances: EPS = 2^-52 is float64's unit roundoff doubled (one ulp at 1). A beta computed as
# 1 - ratio carries an absolute error of a few EPS whatever its size, so betas are compared with an
# absolute tolerance in EPS; products of T factors each rounded once carry a relative error of at most
# about T EPS.

EPS = np.finfo(np.float64).eps
EPS32 = float(np.finfo(np.float32).eps)
GAUSSIAN = pathlib.Path(__file__).parent / 'data' / 'gaussian'


def _cos_f(t, T, s=0.008):
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


def _sigmoid_alpha_bar(u, start, end, tau):
    sig = lambda x: 1 / (1 + math.exp(-x))
    return (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))


def test_linear_betas_shape_ends_and_increase():
    betas = schedules.linear_betas()
    assert betas.shape == (1000,) and betas.dtype == np.float64
    assert betas[0] == pytest.approx(1e-4, rel=EPS) and betas[-1] == pytest.approx(0.02, rel=EPS)
    assert np.all(np.diff(betas) > 0)
    # Independent: beta_n = start + (n - 1)(end - start)/(T - 1), in Python floats.
    direct = [1e-4 + n * (0.02 - 1e-4) / 999 for n in range(1000)]
    np.testing.assert_allclose(betas, direct, rtol=0, atol=4 * EPS * 0.02)


def test_cosine_betas_match_a_scalar_loop_and_increase():
    T = 1000
    betas = schedules.cosine_betas(T)
    assert betas.shape == (T,) and betas.dtype == np.float64
    direct = [min(1 - _cos_f(t, T) / _cos_f(t - 1, T), 0.999) for t in range(1, T + 1)]
    np.testing.assert_allclose(betas, direct, rtol=0, atol=8 * EPS)
    assert np.all(np.diff(betas) > 0) and betas[-1] == pytest.approx(0.999)


def test_cosine_alphas_cumprod_is_f_over_f0_until_the_clip():
    """alpha_bar_t = f(t)/f(0) wherever no beta up to t was clipped (only the last few are)."""
    T = 1000
    betas = schedules.cosine_betas(T)
    unclipped = int(np.argmax(betas >= 0.999))  # first clipped index
    assert 990 < unclipped < T
    alpha_bar = schedules.alphas_cumprod(betas)[:unclipped]
    direct = [_cos_f(t, T) / _cos_f(0, T) for t in range(1, unclipped + 1)]
    # T factors, each with a relative rounding of a few EPS (1 - beta, the product).
    np.testing.assert_allclose(alpha_bar, direct, rtol=4 * T * EPS)


def test_max_beta_clips_the_cosine_and_sigmoid_tables():
    full, clipped = schedules.cosine_betas(100), schedules.cosine_betas(100, max_beta=0.05)
    assert clipped.max() == pytest.approx(0.05) and np.sum(full > 0.05) > 1
    np.testing.assert_allclose(clipped[full <= 0.05], full[full <= 0.05], rtol=EPS)
    sig = schedules.sigmoid_betas(100, max_beta=0.05)
    assert sig.max() == pytest.approx(0.05) and sig.min() >= 0


@pytest.mark.parametrize('start, end, tau', [(-3.0, 3.0, 1.0), (0.0, 3.0, 0.7), (-3.0, 3.0, 0.5)])
def test_sigmoid_betas_match_a_scalar_loop_and_reach_both_ends(start, end, tau):
    T = 200
    betas = schedules.sigmoid_betas(T, start, end, tau, max_beta=1.0)
    assert betas.shape == (T,) and np.all(np.diff(betas) > 0)
    ab = [_sigmoid_alpha_bar(n / T, start, end, tau) for n in range(T + 1)]
    assert ab[0] == pytest.approx(1.0, abs=EPS) and ab[T] == pytest.approx(0.0, abs=EPS)
    direct = [1 - ab[n] / ab[n - 1] for n in range(1, T)]
    # alpha_bar = (v_end - sigmoid(x)) / (v_end - v_start) has an absolute rounding of about EPS (both
    # terms <= 1), a relative one of EPS / alpha_bar; beta_n = 1 - alpha_bar_n / alpha_bar_{n-1} then
    # carries an absolute error of about 2 EPS / alpha_bar_{n-1} per computation, large only for the
    # last few betas: 8 EPS / alpha_bar_{n-1} between two computations.
    np.testing.assert_array_less(np.abs(betas[:-1] - direct), 8 * EPS / np.array(ab[:T - 1]))
    # alpha_bar(1) = 0, so beta_T = 1 and the product ends at 0 (and starts at alpha_bar(1/T)).
    assert betas[-1] == pytest.approx(1.0, abs=EPS)
    alpha_bar = schedules.alphas_cumprod(betas)
    assert alpha_bar[-1] == pytest.approx(0.0, abs=EPS) and alpha_bar[0] == pytest.approx(ab[1], rel=4 * EPS)


def test_alphas_cumprod_is_the_running_product():
    betas = [0.1, 0.2, 0.5]
    np.testing.assert_allclose(schedules.alphas_cumprod(betas), [0.9, 0.72, 0.36], rtol=4 * EPS)
    assert schedules.alphas_cumprod(np.float32(betas)).dtype == np.float64


@pytest.mark.parametrize('spacing, steps', [
    ('leading', [6, 3, 0]),    # 10 // 3 = 3
    ('trailing', [9, 6, 2]),   # round(10, 6.67, 3.33) - 1
    ('linspace', [9, 4, 0]),   # round(0, 4.5, 9): 4.5 rounds to even
    ('quad', [8, 2, 0]),       # int(8 i^2 / 4) for i = 0, 1, 2
])
def test_ddpm_timesteps_hand_computed_T10_N3(spacing, steps):
    got = schedules.ddpm_timesteps(10, 3, spacing)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, steps)


@pytest.mark.parametrize('T, n, spacing, steps', [
    (10, 4, 'leading', [6, 4, 2, 0]),
    (10, 4, 'trailing', [9, 7, 4, 1]),     # round(10, 7.5, 5, 2.5) - 1: halves to even
    (10, 4, 'linspace', [9, 6, 3, 0]),
    (10, 4, 'quad', [8, 3, 0, 0]),         # int(8 i^2 / 9): 0.89 -> 0 repeats 0, as DDIM's code does
    (7, 6, 'trailing', [6, 5, 4, 2, 1, 0]),  # arange's 4th entry is 3.4999999999999996, not 3.5
])
def test_ddpm_timesteps_hand_computed_small_cases(T, n, spacing, steps):
    np.testing.assert_array_equal(schedules.ddpm_timesteps(T, n, spacing), steps)


def test_ddpm_timesteps_leading_offset():
    np.testing.assert_array_equal(schedules.ddpm_timesteps(10, 3, 'leading', steps_offset=1), [7, 4, 1])
    # The offset is a 'leading' option only (diffusers ignores it for the other spacings too).
    np.testing.assert_array_equal(schedules.ddpm_timesteps(10, 3, 'trailing', steps_offset=1), [9, 6, 2])


@pytest.mark.parametrize('spacing', ['leading', 'trailing', 'linspace', 'quad'])
def test_ddpm_timesteps_length_bounds_and_order(spacing):
    for T, n in [(10, 1), (10, 10), (15, 13), (100, 7), (1000, 61), (1000, 1000)]:
        steps = schedules.ddpm_timesteps(T, n, spacing)
        assert len(steps) == n and steps.min() >= 0 and steps.max() <= T - 1, (T, n)
        if spacing == 'quad':
            assert np.all(np.diff(steps) <= 0)  # int() of the small squares can repeat
        else:
            assert np.all(np.diff(steps) < 0)
    assert schedules.ddpm_timesteps(1000, 1000, 'quad')[0] == 800  # quad starts at int(0.8 T)


def test_ddpm_timesteps_errors():
    with pytest.raises(ValueError, match='num_steps'):
        schedules.ddpm_timesteps(10, 0)
    with pytest.raises(ValueError, match='num_steps'):
        schedules.ddpm_timesteps(10, 11)
    with pytest.raises(ValueError, match='spacing'):
        schedules.ddpm_timesteps(10, 3, 'uniform')
    with pytest.raises(ValueError, match='steps_offset'):
        schedules.ddpm_timesteps(10, 10, 'leading', steps_offset=1)


# ---------------------------------------------------------------------------------------------
# Shifted and interpolated cosine logSNR (simple diffusion).
#
# |lambda| stays below 32 here, where one float64 ulp is 7e-15; "a few ulp" is 1e-13. The inverse
# t(lambda) has |dt/dlambda| = sin(2 theta) / (4 (t1 - t0)) <= 0.16, so it adds no error of its own.

T_GRID = np.concatenate([[0.0, 1e-6, 1e-3], np.linspace(0.01, 0.99, 99), [1 - 1e-3, 1 - 1e-6, 1.0]])


@pytest.mark.parametrize('image_d, noise_d', [(512, 64), (128, 32), (32, 64), (64, 64)])
def test_logsnr_cosine_shifted_is_cosine_plus_constant(image_d, noise_d):
    shifted = schedules.logsnr_cosine_shifted(T_GRID, image_d, noise_d)
    cosine = schedules.logsnr_cosine(T_GRID, -15.0, 15.0)
    np.testing.assert_allclose(shifted - cosine, 2 * np.log(noise_d / image_d), rtol=0, atol=1e-13)
    # Clipped before the shift: the range is [-15, 15] + shift. At the ends tan is evaluated near 0 and
    # pi/2, where lambda = -2 log tan(theta) amplifies theta's rounding (1e-16) by 4 / sin(2 theta)
    # ~ 4 exp(7.5) = 7e3: 1e-12.
    assert shifted[0] == pytest.approx(15 + 2 * np.log(noise_d / image_d), abs=1e-12)
    assert shifted[-1] == pytest.approx(-15 + 2 * np.log(noise_d / image_d), abs=1e-12)


def test_logsnr_cosine_shifted_equals_cosine_at_reference_size():
    np.testing.assert_allclose(schedules.logsnr_cosine_shifted(T_GRID, 64, 64, -10.0, 10.0),
                               schedules.logsnr_cosine(T_GRID, -10.0, 10.0), rtol=0, atol=1e-14)


def test_logsnr_cosine_shifted_inverse_round_trips_in_float64_and_float32():
    back = schedules.logsnr_cosine_shifted_inv(schedules.logsnr_cosine_shifted(T_GRID, 256, 64), 256, 64)
    np.testing.assert_allclose(back, T_GRID, rtol=0, atol=1e-13)
    # float32 (jnp): lambda rounds to half an ulp of 16 (1e-6), which the inverse scales by <= 0.16,
    # and theta = t0 + t (t1 - t0) rounds to half an ulp of 1.6 (1.2e-7), i.e. 1e-7 in t, before tan
    # and again after atan: a few 1e-7 in all, so 1e-6.
    t32 = jnp.asarray(T_GRID, jnp.float32)
    lam32 = schedules.logsnr_cosine_shifted(t32, 256, 64)
    assert lam32.dtype == jnp.float32
    back32 = schedules.logsnr_cosine_shifted_inv(lam32, 256, 64)
    assert back32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(back32), np.asarray(t32, np.float64), rtol=0, atol=1e-6)


def test_logsnr_cosine_interpolated_endpoints_follow_eq_6():
    """Eq. (6): lambda(t) = t lambda_shift256(t) + (1 - t) lambda_shift32(t), so at t = 0 it is the
    shift-32 schedule and at t = 1 the shift-256 one."""
    t = np.array([0.0, 1.0])
    interp = schedules.logsnr_cosine_interpolated(t, 512, 32, 256)
    low, high = (schedules.logsnr_cosine_shifted(t, 512, d) for d in (32, 256))
    assert interp[0] == pytest.approx(low[0], abs=1e-13) and interp[1] == pytest.approx(high[1], abs=1e-13)
    # The clipped ends to 1e-12, as in the shifted test.
    assert interp[0] == pytest.approx(15 - 2 * np.log(16), abs=1e-12)   # shift 2 log(32/512)
    assert interp[1] == pytest.approx(-15 - 2 * np.log(2), abs=1e-12)   # shift 2 log(256/512)


def test_logsnr_cosine_interpolated_lies_between_and_starts_at_the_noisier_schedule():
    """At 512 x 512 the shift-32 schedule is the noisier (lower logSNR) everywhere; the interpolation
    is lambda_shift32(t) + 2 t log(256/32): on it at t = 0, on shift-256 at t = 1, between in between."""
    interp = schedules.logsnr_cosine_interpolated(T_GRID, 512)
    low, high = (schedules.logsnr_cosine_shifted(T_GRID, 512, d) for d in (32, 256))
    assert np.all(low < high)
    np.testing.assert_allclose(interp - low, 2 * T_GRID * np.log(8), rtol=0, atol=1e-13)
    assert np.all(interp >= low - 1e-13) and np.all(interp <= high + 1e-13)
    assert np.all(np.diff(interp) < 0)


def test_logsnr_cosine_interpolated_inverse_round_trips():
    lam = schedules.logsnr_cosine_interpolated(T_GRID, 512)
    # Bisection to 2^-64, then limited by lambda's own rounding (7e-15) times |dt/dlambda| <= 0.5.
    np.testing.assert_allclose(schedules.logsnr_cosine_interpolated_inv(lam, 512), T_GRID, rtol=0, atol=1e-13)
    lam32 = np.asarray(schedules.logsnr_cosine_interpolated(jnp.asarray(T_GRID, jnp.float32), 512))
    assert lam32.dtype == np.float32
    np.testing.assert_allclose(schedules.logsnr_cosine_interpolated_inv(lam32.astype(np.float64), 512),
                               T_GRID, rtol=0, atol=1e-6)  # float32 forward: as in the shifted test
    with pytest.raises(ValueError, match='outside'):
        schedules.logsnr_cosine_interpolated_inv(lam[0] + 1.0, 512)
    with pytest.raises(ValueError, match='monotone'):  # 2 log(512/8) = 8.3 > 4 (t1 - t0) = 2 pi
        schedules.logsnr_cosine_interpolated_inv(0.0, 512, low_d=8, high_d=512)


def test_logsnr_from_alphas_cumprod_inverts_alpha_sigma_from_logsnr():
    alpha_bar = schedules.alphas_cumprod(schedules.linear_betas())
    logsnr = schedules.logsnr_from_alphas_cumprod(alpha_bar)
    alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr)
    np.testing.assert_allclose(alpha ** 2, alpha_bar, rtol=1e-13)
    np.testing.assert_allclose(sigma ** 2, 1 - alpha_bar, rtol=1e-12)
    # Near alpha_bar = 1, log1p keeps the exact 1 - alpha_bar = 2^-40: lambda = log(alpha_bar) + 40 log 2.
    near = 1 - 2.0 ** -40
    assert schedules.logsnr_from_alphas_cumprod(np.float64(near)) == pytest.approx(
        math.log(near) + 40 * math.log(2), rel=4 * EPS)
    # float32 traced: 1 - alpha_bar is exact, each log and the difference round once, |lambda| <= 10:
    # a few float32 ulp of 10; 8 of them.
    ab32 = jnp.asarray(alpha_bar[::100], jnp.float32)
    got = jax.jit(schedules.logsnr_from_alphas_cumprod)(ab32)
    ab = np.asarray(ab32, np.float64)
    np.testing.assert_allclose(np.asarray(got), np.log(ab) - np.log1p(-ab), rtol=0, atol=8 * EPS32 * 10)


def test_logsnr_schedules_jit_in_float32():
    t = jnp.linspace(0.0, 1.0, 9)
    for fn in (lambda t: schedules.logsnr_cosine_shifted(t, 256, 64),
               lambda t: schedules.logsnr_cosine_interpolated(t, 512)):
        got = jax.jit(fn)(t)
        assert got.dtype == jnp.float32
        # |lambda| < 32: a float32 ulp there is 4e-6, and t, theta, tan, log each round once.
        np.testing.assert_allclose(np.asarray(got), fn(np.asarray(t, np.float64)), rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Against tables recorded from denoising-diffusion-pytorch 2.3.4 and diffusers 0.42.1
# (tests/data/make_gaussian_refs.py).

@pytest.fixture(scope='module')
def ddpm_pytorch():
    return np.load(GAUSSIAN / 'ddpm_pytorch_schedules.npz')


@pytest.fixture(scope='module')
def diffusers_ddpm():
    return np.load(GAUSSIAN / 'diffusers_ddpm.npz')


def test_betas_match_denoising_diffusion_pytorch(ddpm_pytorch):
    # torch.linspace and np.linspace round differently: a few ulp of beta_end.
    np.testing.assert_allclose(schedules.linear_betas(), ddpm_pytorch['linear/T1000/betas'],
                               rtol=0, atol=4 * EPS * 0.02)
    # At T = 500 it scales the ends by 1000 / T; we take the ends as given.
    np.testing.assert_allclose(schedules.linear_betas(500, 2e-4, 0.04), ddpm_pytorch['linear/T500/betas'],
                               rtol=0, atol=4 * EPS * 0.04)
    # 1 - ratio: a few EPS absolute (see the note on tolerances above).
    np.testing.assert_allclose(schedules.cosine_betas(), ddpm_pytorch['cosine/s0.008/betas'], rtol=0, atol=8 * EPS)
    for key, (start, end, tau) in {'start-3_end3_tau1': (-3, 3, 1), 'start-3_end3_tau0.5': (-3, 3, 0.5),
                                   'start0_end3_tau0.7': (0, 3, 0.7)}.items():
        # As in the scalar-loop test: 8 EPS / alpha_bar_{n-1}.
        ab = np.array([_sigmoid_alpha_bar(n / 1000, start, end, tau) for n in range(1000)])
        diff = np.abs(schedules.sigmoid_betas(1000, start, end, tau) - ddpm_pytorch[f'sigmoid/{key}/betas'])
        np.testing.assert_array_less(diff[:-1], 8 * EPS / ab[:-1], err_msg=key)
        assert diff[-1] <= EPS  # both clip beta_T = 1 to 0.999


def test_logsnr_schedules_match_denoising_diffusion_pytorch(ddpm_pytorch):
    # t runs 0, 0.01, ..., 1: the clipped ends are included, where tan amplifies rounding to 1e-12
    # (see the shifted-schedule test); a few ulp (1e-13) elsewhere. 1e-12 throughout.
    t = ddpm_pytorch['logsnr/t']
    np.testing.assert_allclose(schedules.logsnr_cosine(t, -15.0, 15.0), ddpm_pytorch['logsnr/cosine'],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(schedules.logsnr_cosine(t, -20.0, 20.0), ddpm_pytorch['logsnr/cosine_min-20_max20'],
                               rtol=0, atol=1e-12)
    for image_d in (32, 64, 128, 256, 512):
        for noise_d in (32, 64):
            np.testing.assert_allclose(schedules.logsnr_cosine_shifted(t, image_d, noise_d),
                                       ddpm_pytorch[f'logsnr/shifted/image{image_d}_noise{noise_d}'],
                                       rtol=0, atol=1e-12)
        # denoising-diffusion-pytorch weights t on the low_d schedule, the transpose of eq. (6): it is
        # our function with low_d and high_d exchanged.
        ref = ddpm_pytorch[f'logsnr/interpolated/image{image_d}_low32_high256']
        np.testing.assert_allclose(schedules.logsnr_cosine_interpolated(t, image_d, low_d=256, high_d=32), ref,
                                   rtol=0, atol=1e-12)
        assert not np.allclose(schedules.logsnr_cosine_interpolated(t, image_d), ref)


def test_betas_and_alphas_cumprod_match_diffusers(diffusers_ddpm):
    ref = diffusers_ddpm
    T = 1000
    for ours, name in ((schedules.linear_betas(), 'linear'), (schedules.cosine_betas(), 'squaredcos_cap_v2')):
        # diffusers with its float32 replaced by float64: the same formulas, rounding-level differences.
        np.testing.assert_allclose(ours, ref[f'f64/schedule/{name}/betas'], rtol=0, atol=8 * EPS, err_msg=name)
        np.testing.assert_allclose(schedules.alphas_cumprod(ours), ref[f'f64/schedule/{name}/alphas_cumprod'],
                                   rtol=4 * T * EPS, err_msg=name)
    # diffusers as shipped builds 'linear' with torch.linspace in float32: the step, the product and the
    # sum round in float32, plus the stored value, so 4 float32 ulp relative. 'squaredcos_cap_v2' is
    # computed in float64 (math module) and stored as float32: half an ulp.
    np.testing.assert_allclose(schedules.linear_betas(), ref['f32/schedule/linear/betas'], rtol=4 * EPS32)
    np.testing.assert_allclose(schedules.cosine_betas(), ref['f32/schedule/squaredcos_cap_v2/betas'], rtol=EPS32)
    # Its float32 cumprod: T factors (1 - beta) each rounded in float32, so T float32 ulp relative.
    for ours, name in ((schedules.linear_betas(), 'linear'), (schedules.cosine_betas(), 'squaredcos_cap_v2')):
        np.testing.assert_allclose(schedules.alphas_cumprod(ours), ref[f'f32/schedule/{name}/alphas_cumprod'],
                                   rtol=T * EPS32, err_msg=name)


@pytest.mark.parametrize('scheduler', ['ddpm', 'ddim'])
@pytest.mark.parametrize('spacing', ['leading', 'trailing', 'linspace'])
def test_ddpm_timesteps_match_diffusers_set_timesteps(diffusers_ddpm, scheduler, spacing):
    # Integers from the same float operations: exact equality is the property.
    for offset in (0, 1):
        for n in (7, 10, 50, 1000):
            ref = diffusers_ddpm[f'timesteps/{scheduler}/{spacing}/offset{offset}/n{n}']
            if spacing == 'leading' and offset == 1 and n == 1000:
                assert ref[0] == 1000  # diffusers returns a timestep past T - 1; we refuse
                with pytest.raises(ValueError, match='steps_offset'):
                    schedules.ddpm_timesteps(1000, n, spacing, offset)
                continue
            np.testing.assert_array_equal(schedules.ddpm_timesteps(1000, n, spacing, offset), ref)
