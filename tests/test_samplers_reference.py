"""The core's steps against diffusers' schedulers, recorded once by tests/data/make_gaussian_refs.py
(diffusers 0.42.1, run in float64: its float32 constants patched to float64, see that script).

DDIM (DDIMScheduler.step, 50 'leading' steps of T = 1000, set_alpha_to_one=True) with the eps,
sample (x0) and v_prediction outputs, eta 0 and 1 with injected variance noise: one step of
`steps.gaussian_table` from diffusers' timestep k (our t = (k + 1) / T) to k - 20, or into the
data from k = 0. Both sides are float64 formulas of the same quantities arranged differently,
so they agree to rounding amplified by 1 / sigma~ (<= 1e2 here): rtol 1e-10.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parameterize, processes, samplers
from jaxdiff.samplers import driver, grids, steps

REF = np.load(pathlib.Path(__file__).parent / 'data' / 'gaussian' / 'diffusers_ddpm.npz')
OUTPUTS = {'epsilon': 'eps', 'sample': 'x0', 'v_prediction': 'v'}
T, STRIDE = 1000, 20


@pytest.mark.parametrize('eta', [0, 1])
@pytest.mark.parametrize('prediction', list(OUTPUTS))
def test_ddim_step_matches_diffusers(prediction, eta):
    process = processes.GaussianProcess(processes.Discrete('linear', T))
    sample, output = REF['inputs/sample'], REF['inputs/model_output']
    noise = REF['inputs/noise']
    expected = REF[f'f64/ddim/n50/eta{eta}/alpha_one_True/{prediction}/prev_sample']
    sampler = samplers.Sampler(solver='ddim', eta=float(eta), num_steps=2, discretization='uniform')
    with jax.enable_x64(True):
        model = parameterize.model_from_fn(lambda p, z, *args: jnp.asarray(output), process, OUTPUTS[prediction])
        for i, k in enumerate(REF['step/t_values']):
            t = np.array([k + 1, k + 1 - STRIDE], np.float64)[: 2 if k > 0 else 1] / T
            grid = grids.Grid(t, grids.dc_noise_level(process, t))
            table, _ = steps.gaussian_table(sampler, process, grid, sample.shape)
            row = jax.tree.map(lambda a: jnp.asarray(a[0]), table)
            x = jnp.asarray(sample) / row.at.alpha  # scaled coordinates
            denoise = driver.scaled_denoiser(model, process, None, None)
            x_next = steps.gaussian_step(denoise, x, row, jnp.asarray(noise)[None], learned_variance=False)
            alpha_next = 1.0 if k == 0 else float(np.sqrt(1 / (1 + np.exp(-process.schedule.logsnr(t[1])))))
            np.testing.assert_allclose(np.asarray(x_next) * alpha_next, expected[i], rtol=1e-10, atol=1e-10,
                                       err_msg=f'timestep {k}')


KDIFF = np.load(pathlib.Path(__file__).parent / 'data' / 'gaussian' / 'kdiffusion.npz')


@pytest.mark.parametrize('n', [5, 10, 20])
@pytest.mark.parametrize('solver', ['euler', 'heun', 'dpmpp_2m'])
def test_ode_solvers_match_k_diffusion_on_an_analytic_denoiser(solver, n):
    """k-diffusion's sample_euler / sample_heun (s_churn = 0) / sample_dpmpp_2m on Karras sigmas
    (n levels from 80 to 0.002, then 0), with the ideal denoiser of N(mu, s^2) data, recorded in
    float64: the same grid (`discretization='edm'`) and the same steps here. rtol 1e-10: float64
    rounding of differently ordered sums over <= 39 evaluations."""
    mu, s = KDIFF['inputs/mu'], KDIFF['inputs/s']
    x_init = KDIFF[f'n{n}/x_init']
    with jax.enable_x64(True):
        denoise = lambda x, sigma, labels=None, augment_labels=None: (
            mu + s ** 2 / (s ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - mu))
        sampler = samplers.Sampler(solver=solver, num_steps=n, discretization='edm', sigma_min=0.002, sigma_max=80.0)
        grid = grids.time_grid(sampler, processes.GaussianProcess(processes.EDM(0.0, float('inf'))))
        np.testing.assert_allclose(grid.sigma, KDIFF[f'f64/karras/n{n}/sigmas'][:-1], rtol=1e-13)
        out = samplers.sample(sampler, denoise, jnp.asarray(x_init) / 80.0)
    np.testing.assert_allclose(np.asarray(out), KDIFF[f'n{n}/{solver}/x_final'], rtol=1e-10, atol=1e-10)
