"""parameterize: every output type turns the ideal network of Gaussian data into the same closed-form
(x0, eps) on every process; EDM denoisers as models; classifier-free guidance; bad combinations.

Float64 throughout: the conversions are a few multiplications and divisions, so float64 rounding
(~1e-16 relative) amplified by at most 1 / alpha or 1 / sigma (<= 1e5 here) stays below rtol 1e-9.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussian_data import PROCESSES, ideal_model, ideal_net, ideal_x0_eps_basis, moments
from jaxdiff import analytic, parameterize, precond, processes, samplers

SHAPE = (3, 4, 4, 1)
TIMES = {'edm': np.array([0.01, 1.0, 40.0]), 'ddpm': np.array([0.001, 0.5, 1.0])}


def cases():
    for name, process in PROCESSES.items():
        for output in ('eps', 'x0', 'v', 'edm'):
            if output == 'edm' and not process.scalar_scale:
                continue
            yield pytest.param(name, output, id=f'{name}-{output}')


@pytest.mark.parametrize('name, output', list(cases()))
def test_every_output_type_of_the_ideal_network_gives_the_closed_form_x0_and_eps(name, output):
    process = PROCESSES[name]
    m, v = moments(SHAPE[1:])
    t = TIMES.get(name, np.array([0.05, 0.5, 0.95]))
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.key(0), SHAPE, jnp.float64)
        prediction = jax.jit(lambda z, t: ideal_model(process, output, m, v)(z, t))(z, jnp.asarray(t))
        alpha, sigma = (np.asarray(a) for a in process.scale_sigma(t, SHAPE, np.float64))
        x0, eps = ideal_x0_eps_basis(np.asarray(process.to_basis(z)), alpha, sigma, m, v)
        x0, eps = (np.asarray(process.from_basis(jnp.asarray(a))) for a in (x0, eps))
    np.testing.assert_allclose(np.asarray(prediction.x0), x0, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(prediction.eps), eps, rtol=1e-9, atol=1e-10)
    assert prediction.variance_fraction is None


def test_v_is_alpha_eps_minus_sigma_x_on_a_variance_preserving_process():
    """Salimans & Ho 2022: with alpha^2 + sigma^2 = 1, x0 = alpha z - sigma v and eps = sigma z + alpha v."""
    process = PROCESSES['cosine']
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.key(1), SHAPE, jnp.float64)
        v_hat = jax.random.normal(jax.random.key(2), SHAPE, jnp.float64)
        model = parameterize.model_from_fn(lambda params, x, *args: v_hat, process, 'v')
        prediction = model(z, 0.3)
        alpha, sigma = (np.asarray(a) for a in process.scale_sigma(0.3, SHAPE, np.float64))
    z, v_hat = np.asarray(z), np.asarray(v_hat)
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-15)
    np.testing.assert_allclose(prediction.x0, alpha * z - sigma * v_hat, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(prediction.eps, sigma * z + alpha * v_hat, rtol=1e-12, atol=1e-14)


def test_denoiser_model_matches_the_analytic_eps_of_correlated_gaussian_data():
    """x0 = m + C alpha (alpha^2 C + sigma^2 I)^-1 (z - alpha m), eps = sigma (alpha^2 C + sigma^2 I)^-1 (z - alpha m)."""
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(d, d))
    cov, mean = a @ a.T / d + 0.1 * np.eye(d), rng.normal(size=SHAPE[1:])
    process = PROCESSES['cosine']
    t = np.array([0.05, 0.5, 0.95])
    with jax.enable_x64(True):
        denoise = analytic.GaussianDenoiser.create(jnp.asarray(mean), jnp.asarray(cov))
        z = jax.random.normal(jax.random.key(3), SHAPE, jnp.float64)
        eps = np.asarray(parameterize.from_denoiser(denoise, process)(z, jnp.asarray(t)).eps)
        alpha, sigma = (np.asarray(a).reshape(-1) for a in process.scale_sigma(t, SHAPE, np.float64))
    for i in range(3):
        ref = sigma[i] * np.linalg.solve(alpha[i] ** 2 * cov + sigma[i] ** 2 * np.eye(d),
                                         np.asarray(z[i]).reshape(-1) - alpha[i] * mean.reshape(-1))
        np.testing.assert_allclose(eps[i].reshape(-1), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match='one scale per image'):
        parameterize.from_denoiser(denoise, processes.BlurringProcess())


def test_learned_variance_fraction_comes_from_the_last_channels():
    process = PROCESSES['ddpm']
    out = jnp.concatenate([jnp.zeros(SHAPE), jnp.full(SHAPE, -0.5)], axis=-1)
    model = parameterize.model_from_fn(lambda params, x, *args: out, process, 'eps', learned_variance=True)
    np.testing.assert_allclose(model(jnp.ones(SHAPE), 0.5).variance_fraction, 0.25)


def test_labels_are_zero_filled_and_the_noise_label_follows_the_schedule():
    seen = {}

    def net(params, x, c_noise, labels, augment_labels):
        seen['c_noise'], seen['labels'] = c_noise, labels
        return x
    for process, t, label in ((PROCESSES['ddpm'], 0.5, 499.0), (PROCESSES['cosine'], 0.25, 250.0)):
        parameterize.model_from_fn(net, process, 'eps', label_dim=3)(jnp.ones(SHAPE), t)
        np.testing.assert_allclose(seen['c_noise'], label, rtol=1e-6)
        assert seen['labels'].shape == (3, 3) and not np.any(seen['labels'])
    parameterize.model_from_fn(net, PROCESSES['cosine'], 'v', noise_labels='logsnr')(jnp.ones(SHAPE), 0.5)
    np.testing.assert_allclose(seen['c_noise'], 0.0, atol=1e-5)  # the cosine logSNR is 0 at t = 1/2


def two_class_model(process, means, v):
    """A conditional ideal model: class c's data is N(means[c], v); the null (zero) label N(means[2], v)."""
    nets = [ideal_net(process, 'eps', mc, v) for mc in means]

    def net(params, x, c_noise, labels, augment_labels):
        outs = jnp.stack([n(params, x, c_noise) for n in nets])           # [3, N, ...]
        which = jnp.where(labels.sum(-1) == 0, 2, jnp.argmax(labels, -1))  # the null label -> index 2
        return jnp.take_along_axis(outs, which[None, :, None, None, None], 0)[0]
    return parameterize.model_from_fn(net, process, 'eps', label_dim=2)


def test_guidance_scale_one_is_conditional_zero_is_unconditional_and_linear_between():
    process = PROCESSES['cosine']
    m, v = moments(SHAPE[1:])
    means = [m, -m, 0.3 * m]
    labels = jax.nn.one_hot(jnp.array([0, 1, 0]), 2, dtype=jnp.float64)
    with jax.enable_x64(True):
        model = two_class_model(process, means, v)
        z = jax.random.normal(jax.random.key(4), SHAPE, jnp.float64)
        cond, uncond = model(z, 0.4, labels), model(z, 0.4, jnp.zeros_like(labels))
        for s, expected in ((1.0, cond), (0.0, uncond)):
            guided = parameterize.Guided(model, s)(z, 0.4, labels)
            np.testing.assert_allclose(guided.eps, expected.eps, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(guided.x0, expected.x0, rtol=1e-12, atol=1e-14)
        guided = parameterize.Guided(model, 3.0)(z, 0.4, labels)
    cond, uncond, guided = jax.tree.map(np.asarray, (cond, uncond, guided))
    z = np.asarray(z)
    np.testing.assert_allclose(guided.eps, uncond.eps + 3 * (cond.eps - uncond.eps), rtol=1e-12, atol=1e-13)
    # x0 stays consistent with eps at the same z: z = alpha x0 + sigma eps.
    alpha, sigma = process.scale_sigma(0.4, SHAPE, np.float64)
    np.testing.assert_allclose(alpha * guided.x0 + sigma * guided.eps, z, rtol=1e-10, atol=1e-12)


def test_guided_samples_have_the_closed_form_mean():
    """Both classes Gaussian with variance v: the guided denoiser is the ideal denoiser of
    N(m_u + s (m_c - m_u), v), so the deterministic sampler's output has that mean and variance v."""
    process = PROCESSES['cosine']
    m, v = moments(SHAPE[1:])
    means = [m, -m, 0.3 * m]
    n = 4000
    labels = jax.nn.one_hot(jnp.zeros(n, jnp.int32), 2, dtype=jnp.float32)
    guided = parameterize.Guided(two_class_model(process, means, v), 2.5)
    latents = jax.random.normal(jax.random.key(5), (n,) + SHAPE[1:])
    x = np.asarray(samplers.sample(samplers.Sampler(solver='heun', num_steps=24, discretization='logsnr'),
                                   guided, latents, labels=labels), np.float64)
    target = means[2] + 2.5 * (means[0] - means[2])
    # Monte-Carlo: 5 standard errors of the mean (sqrt(v / n)) and of the variance (v sqrt(2 / n)),
    # plus 1% for 24 Heun steps.
    assert np.all(np.abs(x.mean(0) - target) < 5 * np.sqrt(v / n) + 0.01)
    assert np.all(np.abs(x.var(0) - v) < 5 * v * np.sqrt(2 / n) + 0.01 * v)


def test_guidance_interval_guides_only_inside_the_noise_range():
    process = PROCESSES['cosine']
    m, v = moments(SHAPE[1:])
    labels = jax.nn.one_hot(jnp.array([0, 1, 0]), 2)
    model = two_class_model(process, [m, -m, 0.3 * m], v)
    z = jax.random.normal(jax.random.key(6), SHAPE)
    t = jnp.array([0.1, 0.5, 0.9])  # noise levels sigma/alpha = exp(-lambda/2): ~0.2, 1, ~5
    guided = parameterize.Guided(model, 4.0, interval=(0.5, 2.0))(z, t, labels)
    cond, full = model(z, t, labels), parameterize.Guided(model, 4.0)(z, t, labels)
    for i, inside in enumerate((False, True, False)):
        np.testing.assert_allclose(guided.eps[i], (full if inside else cond).eps[i], rtol=1e-5, atol=1e-6)


def test_combinations_that_make_no_sense_are_one_line_errors():
    with pytest.raises(ValueError, match="output='edm'.*one scale per image"):
        parameterize.check(processes.BlurringProcess(), 'edm')
    with pytest.raises(ValueError, match='learned_variance.*VE is not one'):
        parameterize.check(PROCESSES['ve'], 'eps', learned_variance=True)
    with pytest.raises(ValueError, match='model.output must be one of'):
        parameterize.check(PROCESSES['cosine'], 'score')
    with pytest.raises(ValueError, match='dropout_key'):
        parameterize.make_model(object(), {}, PROCESSES['cosine'], train=True)


def test_edm_output_is_edm_preconditioning_of_the_denoiser():
    """Model(output='edm') on EDM's process is precond.Denoiser: the same D(x; sigma)."""
    fn = lambda params, x, c_noise, labels=None, augment_labels=None: jnp.tanh(x) * (1 + c_noise[:, None, None, None])
    process = PROCESSES['edm']
    z = jax.random.normal(jax.random.key(7), SHAPE)
    sigma = jnp.array([0.1, 1.0, 30.0])
    ours = parameterize.model_from_fn(fn, process, 'edm')(z, sigma).x0
    theirs = precond.denoiser_from_fn(fn)(z, sigma)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_make_model_wraps_a_flax_module_and_needs_a_dropout_key_to_train():
    import flax.linen as nn

    class Tiny(nn.Module):
        label_dim: int = 0

        @nn.compact
        def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
            scale = self.param('scale', nn.initializers.ones, ())
            return scale * x + 0.001 * noise_labels[:, None, None, None]

    module = Tiny()
    process = processes.GaussianProcess(processes.VP())
    params = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)))['params']
    model = parameterize.make_model(module, params, process, 'eps')
    # eps_hat = F(z; 1000 t) = z + t at z = 0.
    np.testing.assert_allclose(model(jnp.zeros((2, 4, 4, 1)), jnp.array([0.5, 1.0])).eps[:, 0, 0, 0], [0.5, 1.0],
                               rtol=1e-6)
    with pytest.raises(ValueError, match='dropout_key'):
        parameterize.make_model(module, params, process, train=True)


@pytest.mark.parametrize('name', list(PROCESSES))
def test_clip_denoised_clips_x0_and_keeps_z_equal_alpha_x0_plus_sigma_eps(name):
    """ClipDenoised: x0~ = clip(x0_hat) and u = alpha V^T x0~ + sigma V^T eps~ on every process (float64,
    where both sides are a few products of O(1) numbers: 1e-9 leaves ample room); a range the
    prediction never leaves changes nothing."""
    process = PROCESSES[name]
    m, v = moments(SHAPE[1:])
    with jax.enable_x64(True):
        t = jnp.asarray(TIMES.get(name, np.array([0.05, 0.5, 0.95])))
        z = 3 * jax.random.normal(jax.random.key(1), SHAPE, jnp.float64)
        inner = ideal_model(process, 'x0', m, v)
        plain = inner(z, t)
        clipped = parameterize.ClipDenoised(inner, -0.2, 0.2)(z, t)
        wide = parameterize.ClipDenoised(inner, -1e6, 1e6)(z, t)
        alpha, sigma = process.scale_sigma(t, SHAPE, jnp.float64)
        rebuilt = alpha * process.to_basis(clipped.x0) + sigma * process.to_basis(clipped.eps)
        u = process.to_basis(z)
    assert np.abs(np.asarray(plain.x0)).max() > 0.2  # the clip binds somewhere
    np.testing.assert_allclose(np.asarray(clipped.x0), np.clip(np.asarray(plain.x0), -0.2, 0.2), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(u), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(wide.eps), np.asarray(plain.eps), rtol=1e-9, atol=1e-9)
