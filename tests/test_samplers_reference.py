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


SDE_VE = np.load(pathlib.Path(__file__).parent / 'data' / 'gaussian' / 'diffusers_score_sde_ve.npz')


def _ve_pc_row(process, t, shape):
    grid = grids.Grid(t, grids.dc_noise_level(process, t))
    sampler = samplers.Sampler(solver='pc', num_steps=2, discretization='uniform', snr=0.16)
    return jax.tree.map(lambda a: jnp.asarray(a[0]), steps.pc_table(sampler, process, grid, shape)[0])


@pytest.mark.parametrize('N', [100, 1000])
def test_pc_predictor_matches_diffusers_score_sde_ve_step_pred(N):
    """ScoreSdeVeScheduler.step_pred (score_sde's reverse-diffusion predictor) at steps 0, 1, N/2 and
    N - 1 of CIFAR-10's VE setting (sigma 0.01..50): it steps between its discrete sigmas
    sigma_j = sigma_min (sigma_max / sigma_min)^(j / (N - 1)), j = long(t (N - 1)), from j to j - 1
    (the data, sigma 0, from j = 0), which is our VE process at t = j / (N - 1). The means agree
    everywhere; diffusers adds noise even on the step into the data, where ours returns the mean."""
    process = processes.GaussianProcess(processes.VE(0.01, 50.0))
    sample, score, noise = SDE_VE['inputs/sample'], SDE_VE['inputs/score'], SDE_VE['inputs/noise_pred']
    key = f'f64/N{N}/step_pred'
    with jax.enable_x64(True):
        model = parameterize.from_denoiser(lambda x, sigma, *a: x + sigma.reshape(-1, 1, 1, 1) ** 2 * score, process)
        denoise = driver.scaled_denoiser(model, process, None, None)
        for i, timestep in enumerate(SDE_VE[f'{key}/timestep']):
            j = int(timestep * (N - 1))
            t = np.array([j, j - 1], np.float64)[: 2 if j > 0 else 1] / (N - 1)
            row = _ve_pc_row(process, t, sample.shape)
            mean = steps.pc_step(denoise, jnp.asarray(sample), row, jnp.zeros((1,) + sample.shape), snr=0.16,
                                 corrector_steps=0)
            np.testing.assert_allclose(mean, SDE_VE[f'{key}/prev_sample_mean'][i], rtol=1e-10, atol=1e-10)
            if j > 0:
                x = steps.pc_step(denoise, jnp.asarray(sample), row, jnp.asarray(noise)[None], snr=0.16,
                                  corrector_steps=0)
                np.testing.assert_allclose(x, SDE_VE[f'{key}/prev_sample'][i], rtol=1e-10, atol=1e-10)


def test_langevin_corrector_matches_diffusers_score_sde_ve_step_correct():
    """ScoreSdeVeScheduler.step_correct: step = 2 (snr ||noise|| / ||score||)^2 with per-sample norms
    averaged over the batch, x + step score + sqrt(2 step) noise (VE: score_sde's alpha_i = 1)."""
    process = processes.GaussianProcess(processes.VE(0.01, 50.0))
    sample, score, noise = SDE_VE['inputs/sample'], SDE_VE['inputs/score'], SDE_VE['inputs/noise_correct']
    with jax.enable_x64(True):
        model = parameterize.from_denoiser(lambda x, sigma, *a: x + sigma.reshape(-1, 1, 1, 1) ** 2 * score, process)
        denoise = driver.scaled_denoiser(model, process, None, None)
        row = _ve_pc_row(process, np.array([0.5, 0.4]), sample.shape)
        row = row._replace(r=jnp.ones_like(row.r), std=jnp.zeros_like(row.std))  # the predictor as identity
        x = steps.pc_step(denoise, jnp.asarray(sample), row, jnp.stack([jnp.zeros_like(noise), noise]), snr=0.16,
                          corrector_steps=1)
    np.testing.assert_allclose(x, SDE_VE['f64/step_correct/prev_sample'], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('n', [50, 1000])
@pytest.mark.parametrize('variance', ['fixed_small', 'learned_range'])
@pytest.mark.parametrize('prediction', list(OUTPUTS))
def test_ancestral_step_matches_diffusers_ddpm(prediction, variance, n):
    """DDPMScheduler.step with n inference steps (prev = t - T/n; into the data from t = 0, without
    noise there), variance 'fixed_small' (the posterior's) or 'learned_range' (iDDPM's interpolation
    of log beta_t and log beta~_t, the network's last C channels), injected variance noise."""
    process = processes.GaussianProcess(processes.Discrete('linear', T))
    learned = variance == 'learned_range'
    sample, noise = REF['inputs/sample'], REF['inputs/noise']
    output = REF['inputs/model_output_2c'] if learned else REF['inputs/model_output']
    expected = REF[f'f64/ddpm/n{n}/{variance}/{prediction}/prev_sample']
    sampler = samplers.Sampler(solver='ancestral', variance=variance, num_steps=2, discretization='uniform')
    stride = T // n
    with jax.enable_x64(True):
        model = parameterize.model_from_fn(lambda p, z, *args: jnp.asarray(output), process, OUTPUTS[prediction],
                                           learned_variance=learned)
        denoise = driver.scaled_denoiser(model, process, None, None)
        for i, k in enumerate(REF['step/t_values']):
            t = np.array([k + 1, k + 1 - stride], np.float64)[: 2 if k > 0 else 1] / T
            table, _ = steps.gaussian_table(sampler, process, grids.Grid(t, grids.dc_noise_level(process, t)),
                                            sample.shape)
            row = jax.tree.map(lambda a: jnp.asarray(a[0]), table)
            x_next = steps.gaussian_step(denoise, jnp.asarray(sample) / row.at.alpha, row, jnp.asarray(noise)[None],
                                         learned_variance=learned)
            alpha_next = 1.0 if k == 0 else float(np.sqrt(1 / (1 + np.exp(-process.schedule.logsnr(t[1])))))
            np.testing.assert_allclose(np.asarray(x_next) * alpha_next, expected[i], rtol=1e-9, atol=1e-10,
                                       err_msg=f'timestep {k}')
