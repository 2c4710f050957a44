"""The one sampler core against closed forms: every solver on every process (and every
parameterisation under -m slow) reproduces the moments of Gaussian data with its ideal model; the
ODE solvers converge at their order to the exact probability-flow solution; the Langevin corrector
keeps the noisy marginal stationary; bad combinations are one-line errors.
"""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_data import PROCESSES, exact_flow, ideal_model, ideal_x0_eps_basis, moments
from jaxdiff import samplers
from jaxdiff.samplers import driver, grids, steps

SHAPE = (4, 4, 1)
OUTPUTS = ('eps', 'x0', 'v')
# Enough steps for each solver's bias to stay well inside the tolerance below.
SOLVERS = {
    'euler': dict(num_steps=200, discretization='logsnr'),
    'heun': dict(num_steps=32, discretization='logsnr'),
    'ddim': dict(num_steps=200, discretization='logsnr'),
    'ddim_eta1': dict(solver='ddim', eta=1.0, num_steps=200, discretization='logsnr'),
    'ancestral': dict(num_steps=200, discretization='logsnr'),
    'exp_heun': dict(num_steps=32, discretization='logsnr'),
    'dpmpp_2m': dict(num_steps=32, discretization='logsnr'),
    'pc': dict(num_steps=200, discretization='logsnr', snr=0.1),
    'heun_churn': dict(solver='heun', num_steps=64, discretization='edm', S_churn=20.0),
}


# Blurring moves each frequency through its own noise levels, the high ones falling 1000x within a
# tenth of the time axis: a uniform grid in t and more steps (measured: 4-7% worst-coefficient
# variance error at these counts with n = 4096, where Monte-Carlo alone gives ~5%).
BLURRING_STEPS = {'euler': 400, 'heun': 200, 'ddim': 400, 'ddim_eta1': 1000, 'ancestral': 1000, 'exp_heun': 64,
                  'dpmpp_2m': 200, 'pc': 600, 'heun_churn': 200}


def sampler_of(name, process_name='cosine'):
    kwargs = dict(SOLVERS[name])
    kwargs.setdefault('solver', name)
    if process_name == 'blurring':
        kwargs.update(num_steps=BLURRING_STEPS[name], discretization='uniform')
    if name == 'pc' and process_name == 'subvp':
        # score_sde's own uniform-in-t grid: the logSNR grid spends a third of its 200 steps above
        # lambda = 9 (sub-VP reaches 18.4 at t = 1e-3, VP 9.2), where 67 Langevin steps at snr 0.1
        # biased the variance +5..14% (measured); on the uniform grid it is within tolerance.
        kwargs.update(discretization='uniform')
    return samplers.Sampler(**kwargs)


def default_cases():
    """Every solver on every process once, the parameterisation rotating; the full matrix is slow."""
    cycle = itertools.cycle(OUTPUTS)
    for solver, process in itertools.product(SOLVERS, PROCESSES):
        yield pytest.param(solver, process, next(cycle), id=f'{solver}-{process}')


def slow_cases():
    for solver, process, output in itertools.product(SOLVERS, PROCESSES, OUTPUTS + ('edm',)):
        if output == 'edm' and not PROCESSES[process].scalar_scale:
            continue
        yield pytest.param(solver, process, output, id=f'{solver}-{process}-{output}', marks=pytest.mark.slow)


def check_moments(solver, process_name, output, n=4096):
    process = PROCESSES[process_name]
    m, v = moments(SHAPE)
    model = ideal_model(process, output, m, v)
    keys = samplers.keys_from_seeds(np.arange(n))
    x = samplers.sample(sampler_of(solver, process_name), model, samplers.latents_from_keys(keys, SHAPE), keys)
    u = np.asarray(process.to_basis(x), np.float64)
    # Monte-Carlo: 5 standard errors of each coefficient's mean (sqrt(v / n)) and variance
    # (v sqrt(2 / n) ~ 2.2% at n = 4096), plus a 3% allowance for the solvers' discretisation bias.
    assert np.all(np.abs(u.mean(0) - m) < 5 * np.sqrt(v / n) + 0.03 * np.sqrt(v)), (u.mean(0) - m)
    assert np.all(np.abs(u.var(0) / v - 1) < 5 * np.sqrt(2 / n) + 0.03), u.var(0) / v


@pytest.mark.parametrize('solver, process_name, output', list(default_cases()))
def test_every_solver_on_every_process_reproduces_gaussian_data(solver, process_name, output):
    check_moments(solver, process_name, output)


@pytest.mark.parametrize('solver, process_name, output', list(slow_cases()))
def test_every_solver_process_and_parameterisation(solver, process_name, output):
    check_moments(solver, process_name, output)


# ---------------------------------------------------------------------------------------------
# Orders of convergence against the exact flow (float64).

ODE_SOLVERS = {'euler': 1, 'ddim': 1, 'heun': 2, 'exp_heun': 2, 'dpmpp_2m': 2}


def ode_error(solver, process, num_steps, discretization):
    """max |x - exact| over samples and coefficients, float64. Every solver's last step is D at the last
    grid point, so the exact reference is D applied to the exact flow there."""
    m, v = moments(SHAPE)
    sampler = samplers.Sampler(solver=solver, num_steps=num_steps, discretization=discretization)
    with jax.enable_x64(True):
        model = ideal_model(process, 'eps', m, v)
        latents = jax.random.normal(jax.random.key(0), (64,) + SHAPE, jnp.float64)
        out = np.asarray(process.to_basis(samplers.sample(sampler, model, latents)))
        grid = grids.time_grid(sampler, process)
        first, last = (steps.points(process, grid.t[[i]], (1,) + SHAPE) for i in (0, -1))
        level = lambda p: (p.sigma / p.alpha)[0]
        x1 = np.asarray(process.to_basis(latents)) * level(first)
        x_last = exact_flow(x1, level(first), level(last), m, v)
        exact, _ = ideal_x0_eps_basis(x_last, 1.0, level(last), m, v)
    return np.max(np.abs(out - exact))


@pytest.mark.parametrize('process_name', ['cosine', 'blurring'])
@pytest.mark.parametrize('solver', ODE_SOLVERS)
def test_ode_solvers_converge_at_their_order(solver, process_name):
    """Halving the step doubles (first order) or quarters (second order) the error: the measured
    order log2(e_N / e_2N) lies within 0.35 of the nominal one, from N = 16 on the cosine process
    and from N = 64 on blurring (whose high frequencies need more steps to reach the asymptotic
    regime: below that Heun's trapezoid even grows the error, which exp_heun was made for)."""
    process = PROCESSES[process_name]
    n = 16 if process_name == 'cosine' else 64
    e_n, e_2n = (ode_error(solver, process, k, 'logsnr') for k in (n, 2 * n))
    order = np.log2(e_n / e_2n)
    assert abs(order - ODE_SOLVERS[solver]) < 0.35, (e_n, e_2n, order)


# ---------------------------------------------------------------------------------------------
# Predictor-corrector.

def test_langevin_corrector_keeps_the_noisy_marginal_stationary():
    """With the predictor made the identity (r = 1, no noise), 400 corrector steps from x~ = 0 end in
    the noisy marginal N(m, v + sigma~^2) per coefficient (Langevin's stationary law, up to its
    step-size bias, a few per cent at snr 0.16)."""
    process = PROCESSES['ve']
    m, v = moments(SHAPE)
    n = 2048
    model = ideal_model(process, 'eps', m, v)
    grid = grids.Grid(np.array([0.3, 0.2]), grids.dc_noise_level(process, np.array([0.3, 0.2])))
    sampler = samplers.Sampler(solver='pc', num_steps=2, discretization='uniform', snr=0.16)
    table, _ = steps.pc_table(sampler, process, grid, (n,) + SHAPE)
    row = jax.tree.map(lambda a: jnp.asarray(a[0], jnp.float32), table)
    row = row._replace(r=jnp.ones_like(row.r), std=jnp.zeros_like(row.std))
    denoise = driver.scaled_denoiser(model, process, None, None)

    @jax.jit
    def run(x, key):
        def body(x, k):
            return steps.pc_step(denoise, x, row, jax.random.normal(k, (2,) + x.shape), snr=0.16, corrector_steps=1), None
        return jax.lax.scan(body, x, jax.random.split(key, 400))[0]
    x = np.asarray(run(jnp.zeros((n,) + SHAPE), jax.random.key(0)), np.float64)
    level = float(grid.sigma[0])
    assert np.all(np.abs(x.mean(0) - m) < 5 * np.sqrt((v + level ** 2) / n) + 0.02)
    assert np.all(np.abs(x.var(0) / (v + level ** 2) - 1) < 5 * np.sqrt(2 / n) + 0.05)


# ---------------------------------------------------------------------------------------------
# Keys, compilation, errors.

def test_a_samples_noise_depends_only_on_its_key_for_every_stochastic_solver():
    """In float64 (two batch sizes are two compiled programs, whose float32 rounding may differ):
    rtol 1e-10 separates rounding (~1e-15) from another seed's noise (O(1)). Not 'pc': its
    Langevin step size averages norms over the batch (as score_sde does), which couples the samples."""
    process = PROCESSES['cosine']
    m, v = moments(SHAPE)
    for name in ('ancestral', 'ddim_eta1', 'heun_churn'):
        sampler = dataclasses.replace(sampler_of(name), num_steps=12)
        out = {}
        with jax.enable_x64(True):
            model = ideal_model(process, 'eps', m, v)
            for seeds in ([3, 7, 11, 5], [11, 100, 3]):
                keys = samplers.keys_from_seeds(seeds)
                x = samplers.sample(sampler, model, samplers.latents_from_keys(keys, SHAPE, jnp.float64), keys)
                out.update({(s, len(seeds)): np.asarray(x[i]) for i, s in enumerate(seeds)})
        np.testing.assert_allclose(out[(11, 4)], out[(11, 3)], rtol=1e-10, atol=1e-12, err_msg=name)
        assert not np.allclose(out[(3, 4)], out[(7, 4)], rtol=1e-3), name


def test_grids_are_descending_and_end_where_the_process_does():
    for name, process in PROCESSES.items():
        for discretization in ('uniform', 'logsnr', 'edm'):
            grid = grids.time_grid(samplers.Sampler(num_steps=10, discretization=discretization), process)
            assert np.all(np.diff(grid.t) < 0) and np.all(np.diff(grid.sigma) < 0), (name, discretization)
            lo, hi = grids.process_noise_range(process)
            assert lo * (1 - 1e-12) <= grid.sigma[-1] and grid.sigma[0] <= hi * (1 + 1e-12)
    ddpm = grids.time_grid(samplers.Sampler(num_steps=10, discretization='ddpm'), PROCESSES['ddpm'])
    np.testing.assert_allclose(ddpm.t * 1000 - 1, np.arange(900, -1, -100))  # 'leading': 900, 800, ..., 0
    with pytest.raises(ValueError, match="'ddpm' respaces a Discrete"):
        grids.time_grid(samplers.Sampler(num_steps=10, discretization='ddpm'), PROCESSES['cosine'])


def test_bad_combinations_are_one_line_errors():
    m, v = moments(SHAPE)
    latents = jnp.zeros((2,) + SHAPE)
    blur = ideal_model(PROCESSES['blurring'], 'eps', m, v)
    with pytest.raises(ValueError, match="schedule='linear', scaling='none', heun_point=1"):
        samplers.sample(samplers.Sampler(solver='heun', schedule='vp', scaling='vp'), blur, latents)
    with pytest.raises(ValueError, match="learned_range' needs a model with learned variance"):
        samplers.sample(samplers.Sampler(solver='ancestral', variance='learned_range', discretization='uniform'),
                        ideal_model(PROCESSES['cosine'], 'eps', m, v), latents, jax.random.key(0))
    with pytest.raises(ValueError, match="variance='fixed_large' is DDPM's"):
        samplers.sample(samplers.Sampler(solver='ancestral', variance='fixed_large', discretization='uniform'),
                        ideal_model(PROCESSES['ve'], 'eps', m, v), latents, jax.random.key(0))
    with pytest.raises(ValueError, match='draws noise.*pass a key'):
        samplers.sample(samplers.Sampler(solver='pc', discretization='uniform'), blur, latents)
    with pytest.raises(ValueError, match='schedule/scaling/heun_point choose the time variable of euler/heun'):
        samplers.Sampler(solver='ddim', scaling='vp')
    assert samplers.Sampler(solver='pc', num_steps=10, corrector_steps=2).num_evals == 30
    assert samplers.Sampler(solver='dpmpp_2m', num_steps=10).num_evals == 10
