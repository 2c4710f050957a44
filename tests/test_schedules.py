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
