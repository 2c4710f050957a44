"""Process samplers on data whose ideal eps model is known in closed form.

Data: x = IDCT(u) with the DCT coefficients u_k ~ N(m_k, v_k) independent, so for any process here
u_t = alpha_k u_k + sigma eps_k per coefficient, and the ideal (posterior-mean) noise predictor is

    eps_hat(z_t, t) = IDCT( sigma (DCT(z_t) - alpha m) / (alpha^2 v + sigma^2) ),

written below with the paper's alpha, sigma (not the library's). With it:
  * the PF-ODE has a closed-form solution per coefficient, x~ - m proportional to sqrt(v + sigma~^2), so
    after the final step to sigma~ = 0 the exact output is x_hat = m + v (x~_1 - m) / sqrt((v + se^2)(v + s1^2))
    (s1, se: sigma~ at t = 1 and t = 0); the ODE samplers must converge to it at their order;
  * every sampler is an affine map per coefficient, so the exact mean and variance of its output can be
    propagated through its own steps, and must approach the data's (m_k, v_k) as steps grow;
  * Monte-Carlo runs of the jit-compiled drivers must match those moments to within their standard error.

`python tests/test_process_samplers.py` prints the error-vs-steps table of the module docstring.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import dct, process_samplers, processes

H, W, C = 8, 8, 1
FREQS = (np.pi * np.arange(H)[:, None] / H) ** 2 + (np.pi * np.arange(W)[None, :] / W) ** 2
DATA_MEAN = np.random.default_rng(0).normal(size=(H, W, C)) * 0.5
DATA_VAR = np.broadcast_to((0.1 + 0.9 / (1 + FREQS))[..., None], (H, W, C)).copy()  # decays with frequency
PROCESSES = {'gaussian': processes.GaussianProcess(), 'blurring': processes.BlurringProcess(sigma_blur_max=20.0)}


def paper_scale_sigma(t, blur, min_scale=0.001, logsnr_min=-10.0, logsnr_max=10.0):
    """alpha_t [..., H, W, 1] and sigma_t [..., 1, 1, 1] from the paper's formulas (jnp, t of shape [N])."""
    t = jnp.reshape(t, (-1, 1, 1, 1))
    t0, t1 = np.arctan(np.exp(-logsnr_max / 2)), np.arctan(np.exp(-logsnr_min / 2))
    logsnr = -2 * jnp.log(jnp.tan(t0 + t * (t1 - t0)))
    a, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
    tau = (blur * jnp.sin(t * np.pi / 2) ** 2) ** 2 / 2
    d = (1 - min_scale) * jnp.exp(-jnp.asarray(FREQS[..., None], t.dtype) * tau) + min_scale
    return a * d, sigma


def ideal_eps_model(blur):
    def model(z, t, labels=None):
        t = jnp.broadcast_to(jnp.asarray(t, z.dtype).reshape(-1), (z.shape[0],))
        alpha, sigma = paper_scale_sigma(t, blur)
        m, v = jnp.asarray(DATA_MEAN, z.dtype), jnp.asarray(DATA_VAR, z.dtype)
        return dct.idct2(sigma * (dct.dct2(z) - alpha * m) / (alpha ** 2 * v + sigma ** 2))
    return model


def blur_of(process):
    return getattr(process, 'sigma_blur_max', 0.0)


def start_moments(process):
    """Mean and std of DCT(z_1) under the exact marginal at t = 1 (float64)."""
    alpha, sigma = paper_scale_sigma(jnp.ones(1, jnp.float64), blur_of(process))
    alpha, sigma = np.asarray(alpha[0]), np.asarray(sigma[0])
    return alpha * DATA_MEAN, np.sqrt(alpha ** 2 * DATA_VAR + sigma ** 2)


def relative_errors(mean, var):
    """max_k |mean_k - m_k| / sqrt(v_k) and max_k |var_k / v_k - 1|."""
    return float(np.max(np.abs(mean - DATA_MEAN) / np.sqrt(DATA_VAR))), float(np.max(np.abs(var / DATA_VAR - 1)))


def ode_output_moments(process, num_steps, solver, spacing='uniform'):
    """Exact output mean and variance of `ode_sample` from the exact start (float64; call under x64):
    the sampler is affine and diagonal per coefficient, so two runs give its offset and slope."""
    mu, sd = start_moments(process)
    z = dct.idct2(jnp.asarray(np.stack([mu, mu + sd])))
    out = np.asarray(dct.dct2(process_samplers.ode_sample(ideal_eps_model(blur_of(process)), process, z,
                                                           num_steps=num_steps, solver=solver, spacing=spacing)))
    return out[0], (out[1] - out[0]) ** 2


@functools.partial(jax.jit, static_argnums=0)
def _ancestral_affine_step(process, mean, s, t):
    """(mean_s, slope, std) of one ancestral step at u_t = mean, in the basis (DCT coordinates)."""
    model = ideal_eps_model(blur_of(process))
    z = dct.idct2(jnp.stack([mean, mean + 1]))
    out = dct.dct2(process_samplers.ancestral_step(model, process, z, s, t, None))
    _, std = process.posterior(z, model(z, t), s, t)
    return out[0], out[1] - out[0], std[0]


def ancestral_output_moments(process, num_steps):
    """Exact output mean and variance of `ancestral_sample` from the exact start (float64; under x64):
    mean_s = step(mean_t), var_s = slope^2 var_t + std^2 (no noise at the last step)."""
    mu, sd = start_moments(process)
    mean, var = jnp.asarray(mu), jnp.asarray(sd ** 2)
    grid = process_samplers.ancestral_time_grid(num_steps)
    for i in range(num_steps):
        mean, slope, std = _ancestral_affine_step(process, mean, grid[i + 1], grid[i])
        var = slope ** 2 * var + (std ** 2 if i < num_steps - 1 else 0)
    return np.asarray(mean), np.asarray(var)


# ---------------------------------------------------------------------------------------------

def test_ideal_eps_model_is_the_posterior_mean_of_the_noise():
    """Check the test's own reference first: regressing eps on z_t over samples recovers the model
    (the posterior mean is linear here), to Monte-Carlo accuracy."""
    process = PROCESSES['blurring']
    m = 10000
    keys = jax.random.split(jax.random.key(0), 2)
    u = DATA_MEAN + np.sqrt(DATA_VAR) * np.asarray(jax.random.normal(keys[0], (m, H, W, C)))
    noise = jax.random.normal(keys[1], (m, H, W, C))
    z = process.diffuse(dct.idct2(jnp.asarray(u, jnp.float32)), 0.3, noise)
    eps_u, u_t = np.asarray(dct.dct2(noise), np.float64), np.asarray(dct.dct2(z), np.float64)
    pred_u = np.asarray(dct.dct2(ideal_eps_model(20.0)(z, 0.3)), np.float64)
    # Residual eps - eps_hat is uncorrelated with u_t (orthogonality of the conditional mean).
    resid = eps_u - pred_u
    corr = np.mean((resid - resid.mean(0)) * (u_t - u_t.mean(0)), axis=0) / (resid.std(0) * u_t.std(0))
    assert np.all(np.abs(corr) < 5 / np.sqrt(m))
    assert np.all(np.abs(resid.mean(0)) < 5 * resid.std(0) / np.sqrt(m))


@pytest.mark.parametrize('name', ['gaussian', 'blurring'])
def test_ode_samplers_converge_to_the_closed_form_flow(name):
    """Per-sample error against the exact PF-ODE map at 40 and 80 steps: exp_heun (and plain heun on
    the Gaussian process) is 2nd order (error / 4 per doubling; measured 3.5-5.6, plain heun being
    pre-asymptotic at 40 steps), Euler (DDIM) 1st
    order (error / 2)."""
    process = PROCESSES[name]
    with jax.enable_x64(True):
        alpha1, sigma1 = paper_scale_sigma(jnp.ones(1, jnp.float64), blur_of(process))
        alpha0, sigma0 = paper_scale_sigma(jnp.zeros(1, jnp.float64), blur_of(process))
        s1, se = np.asarray(sigma1 / alpha1)[0], np.asarray(sigma0 / alpha0)[0]
        z1 = process_samplers.prior(process, jax.random.key(1), (4, H, W, C), jnp.float64)
        x1 = np.asarray(dct.dct2(z1)) / np.asarray(alpha1)[0]
        exact = DATA_MEAN + DATA_VAR * (x1 - DATA_MEAN) / np.sqrt((DATA_VAR + se ** 2) * (DATA_VAR + s1 ** 2))
        solvers = ('exp_heun', 'euler', 'heun') if name == 'gaussian' else ('exp_heun', 'euler')
        errors = {solver: [float(np.max(np.abs(np.asarray(dct.dct2(process_samplers.ode_sample(
            ideal_eps_model(blur_of(process)), process, z1, num_steps=n, solver=solver))) - exact)))
            for n in (40, 80)] for solver in solvers}
    for solver in solvers:
        coarse, fine = errors[solver]
        assert (3.0 < coarse / fine < 6.5) if solver != "euler" else (1.7 < coarse / fine < 2.3), errors
    assert errors['exp_heun'][1] < (4e-3 if name == 'gaussian' else 3e-2), errors
    assert errors['exp_heun'][1] < errors['euler'][1] / 5, errors


@pytest.mark.parametrize('name', ['gaussian', 'blurring'])
def test_ancestral_moments_converge_to_the_data(name):
    """Exact output moments: the variance error is ~ 1/T (first order) and below 0.015 (Gaussian) /
    0.05 (blurring) at the paper's T = 1000; the mean is alpha_0 m exactly, since the last step
    returns E[z_0] = alpha_0 x (alpha_0 = sqrt(sigmoid(10)), 1 - 2.3e-5) rather than x."""
    process = PROCESSES[name]
    alpha0 = np.asarray(paper_scale_sigma(jnp.zeros(1), blur_of(process))[0], np.float64)[0]
    with jax.enable_x64(True):
        var_errors = []
        for n in (100, 1000):
            mean, var = ancestral_output_moments(process, n)
            np.testing.assert_allclose(mean, alpha0 * DATA_MEAN, rtol=1e-6, atol=1e-12)
            var_errors.append(relative_errors(mean, var)[1])
    assert var_errors[1] < (0.015 if name == 'gaussian' else 0.05), var_errors
    assert 5 < var_errors[0] / var_errors[1] < 15, var_errors


@pytest.mark.parametrize('name', ['gaussian', 'blurring'])
def test_sampler_runs_reproduce_data_moments(name):
    """Monte Carlo through the jitted drivers from `prior`, M samples: per-frequency mean and variance
    within 5 standard errors (sqrt(v/M) for the mean, v sqrt(2/M) for the variance) of the data's,
    plus the sampler's exact bias at that step count (from `*_output_moments`), plus for the mean the
    prior's dropped signal term alpha_1 m, which biases the output mean by at most
    |m| alpha_1 / sigma_1 sqrt(v) < 0.01 sqrt(v). Few steps keep the test fast; the biases at the
    paper's step counts are checked exactly above."""
    process = PROCESSES[name]
    m = 4096
    z1 = process_samplers.prior(process, jax.random.key(2), (m, H, W, C))
    model = ideal_eps_model(blur_of(process))
    ancestral_steps, heun_steps = 200, 40
    runs = {'ancestral': process_samplers.ancestral_sample(model, process, z1, jax.random.key(3),
                                                           num_steps=ancestral_steps),
            'exp_heun': process_samplers.ode_sample(model, process, z1, num_steps=heun_steps)}
    with jax.enable_x64(True):
        exact = {'ancestral': ancestral_output_moments(process, ancestral_steps),
                 'exp_heun': ode_output_moments(process, heun_steps, 'exp_heun')}
    for sampler, x in runs.items():
        u = np.asarray(dct.dct2(x), np.float64)
        exact_mean, exact_var = exact[sampler]
        mean_bias = np.abs(exact_mean - DATA_MEAN) + 0.01 * np.sqrt(DATA_VAR)
        var_bias = np.abs(exact_var - DATA_VAR)
        assert np.all(np.abs(u.mean(0) - DATA_MEAN) <= 5 * np.sqrt(DATA_VAR / m) + mean_bias), sampler
        assert np.all(np.abs(u.var(0) - DATA_VAR) <= 5 * DATA_VAR * np.sqrt(2 / m) + var_bias), sampler
        # ... and the variance actually moved from the prior's (~1 for the DC, ~1e10 scaled) to the data's.
        assert np.all(np.abs(u.var(0) / DATA_VAR - 1) < 0.5), sampler


def test_heun_needs_far_fewer_model_calls_than_ancestral():
    """Same accuracy on the per-frequency variance (the harder moment): exp_heun with 2N - 1 calls,
    N = 80 (Gaussian) / 160 (blurring), beats the paper's ancestral sampler with T = 1000 calls."""
    with jax.enable_x64(True):
        for name, heun_steps in (('gaussian', 80), ('blurring', 160)):
            process = PROCESSES[name]
            ancestral = relative_errors(*ancestral_output_moments(process, 1000))[1]
            heun = relative_errors(*ode_output_moments(process, heun_steps, 'exp_heun'))[1]
            assert heun < ancestral and 2 * heun_steps - 1 <= 1000 / 3, (name, heun, ancestral)


def test_plain_heun_diverges_on_blurring_with_few_steps_where_exp_heun_does_not():
    """Why exp_heun is the default: blurring's high frequencies drop sigma~ ~1000x within a few steps."""
    with jax.enable_x64(True):
        process = PROCESSES['blurring']
        plain = relative_errors(*ode_output_moments(process, 20, 'heun'))[1]
        exponential = relative_errors(*ode_output_moments(process, 20, 'exp_heun'))[1]
    assert plain > 10 and exponential < 1, (plain, exponential)


def test_ode_time_grids():
    process = processes.GaussianProcess()
    uniform = process_samplers.ode_time_grid(process, 5, 'uniform')
    np.testing.assert_allclose(uniform, [1, 0.75, 0.5, 0.25, 0])
    rho = process_samplers.ode_time_grid(process, 6, 'rho')
    assert rho[0] == 1 and rho[-1] == 0 and np.all(np.diff(rho) < 0)
    # rho spacing of the DC noise level exp(-lambda/2), as EDM's sigma steps.
    from jaxdiff import schedules
    noise = np.exp(-0.5 * schedules.logsnr_cosine(rho))
    np.testing.assert_allclose(noise, schedules.edm_sigma_steps(6, np.exp(-5.0), np.exp(5.0)), rtol=1e-10)
    np.testing.assert_allclose(process_samplers.ancestral_time_grid(4), [1, 0.75, 0.5, 0.25, 0])
    with pytest.raises(ValueError, match='spacing'):
        process_samplers.ode_time_grid(process, 5, 'log')
    with pytest.raises(ValueError, match='solver'):
        process_samplers.ode_sample(lambda z, t, labels=None: z, process, jnp.zeros((1, 4, 4, 1)), solver='rk4')


def test_noise_of_a_sample_depends_only_on_its_key():
    """Per-sample keys: a sample drawn alone equals the same sample drawn in a batch."""
    process = PROCESSES['blurring']
    keys = jax.vmap(jax.random.key)(jnp.arange(3))
    model = ideal_eps_model(20.0)
    with jax.enable_x64(True):  # float64, so batch-size-dependent rounding cannot hide a difference
        z1 = process_samplers.prior(process, keys, (3, H, W, C), jnp.float64)
        batch = process_samplers.ancestral_sample(model, process, z1, keys, num_steps=3)
        alone = process_samplers.ancestral_sample(model, process, z1[1:2], keys[1:2], num_steps=3)
        np.testing.assert_allclose(alone[0], batch[1], rtol=1e-9, atol=1e-12)
        assert not np.allclose(batch[0], batch[1])


def error_table():
    """The error-vs-steps table: max over frequencies of |var/v - 1| (mean errors are ~0 from the exact start)."""
    rows = []
    with jax.enable_x64(True):
        for name, process in PROCESSES.items():
            for n in (10, 20, 40, 80, 160):
                row = [name, f'N={n}']
                for solver in ('euler', 'heun', 'exp_heun'):
                    for spacing in ('uniform', 'rho'):
                        row.append(f'{relative_errors(*ode_output_moments(process, n, solver, spacing))[1]:.1e}')
                rows.append(row)
            for t in (10, 100, 1000):
                rows.append([name, f'ancestral T={t}', f'{relative_errors(*ancestral_output_moments(process, t))[1]:.1e}'])
    header = ['process', 'steps'] + [f'{s}/{g}' for s in ('euler', 'heun', 'exp_heun') for g in ('uniform', 'rho')]
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] +
                     ['| ' + ' | '.join(r) + ' |' for r in rows])


if __name__ == '__main__':
    print(error_table())


def test_low_snr_cutoff_replaces_eps_by_the_no_signal_limit_below_the_cutoff_only():
    process = PROCESSES['blurring']
    model = ideal_eps_model(20.0)
    z = jax.random.normal(jax.random.key(3), (4, H, W, C))
    t = jnp.array([0.2, 0.5, 0.8, 0.97])
    wrapped = process_samplers.LowSNRCutoff(jax.tree_util.Partial(model), process, -8.0)
    got = np.asarray(dct.dct2(wrapped(z, t)))
    eps = np.asarray(dct.dct2(model(z, t)))
    logsnr = np.broadcast_to(np.asarray(process.logsnr(t, z.shape)), z.shape)
    _, sigma = process.scale_sigma(t, z.shape)
    limit = np.broadcast_to(np.asarray(dct.dct2(z) / sigma), z.shape)
    below = logsnr < -8.0
    assert below.any() and (~below).any()
    np.testing.assert_allclose(got[below], limit[below], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[~below], eps[~below], rtol=1e-5, atol=1e-5)


def test_low_snr_cutoff_below_every_logsnr_leaves_the_ode_sampler_unchanged():
    # float64: the wrapper's extra DCT round trip is exact only up to rounding, which the ODE's
    # large sigma~ amplifies to ~1e-4 in float32.
    with jax.enable_x64(True):
        process = PROCESSES['blurring']
        model = ideal_eps_model(20.0)
        z = process_samplers.prior(process, jax.random.key(4), (8, H, W, C), jnp.float64)
        plain = process_samplers.ode_sample(model, process, z, num_steps=6)
        wrapped = process_samplers.ode_sample(model, process, z, num_steps=6, low_snr_cutoff=-1e9)
    np.testing.assert_allclose(np.asarray(wrapped), np.asarray(plain), rtol=1e-9, atol=1e-9)
