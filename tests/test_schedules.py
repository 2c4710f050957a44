"""Schedules and step discretisations against NVlabs/edm's recorded noise levels and closed forms."""
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
