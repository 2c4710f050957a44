"""Losses against NVlabs/edm: with EDM's draws injected and its recorded denoiser output fed back,
our losses must derive the same sigma and noisy input and return the same per-element loss."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parameterize, processes
from jaxdiff import losses
from jaxdiff import precond as pc

EDM_NETS = ('ddpmpp', 'ncsnpp', 'adm', 'ddpmpp_cond', 'adm_cond')  # adm_iddpm has no loss refs.
LOSSES = {'EDMLoss': (losses.edm_loss, 'rnd_normal'), 'VPLoss': (losses.vp_loss, 'rnd_uniform'),
          'VELoss': (losses.ve_loss, 'rnd_uniform')}


def relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def check_loss(ref, precision, name):
    dtype = np.float32 if precision == 'f32' else np.float64
    loss_fn, draw_name = LOSSES[name]
    seen = {}

    def recorded_denoiser(x, sigma, labels=None, augment_labels=None):
        seen.update(noisy=x, sigma=sigma, labels=labels)
        return jnp.asarray(ref.nhwc(f'{precision}/loss/{name}/D_yn'), x.dtype)

    labels = ref['inputs/class_labels'].astype(dtype) if 'inputs/class_labels' in ref else None
    draw = jnp.asarray(ref[f'loss_inputs/{draw_name}'], dtype)
    loss = loss_fn(recorded_denoiser, jnp.asarray(ref.nhwc('loss_inputs/images'), dtype), None, labels,
                   noise=jnp.asarray(ref.nhwc('loss_inputs/noise'), dtype), **{draw_name: draw})
    assert loss.dtype == dtype and loss.shape == ref.nhwc('loss_inputs/images').shape
    if labels is not None:
        np.testing.assert_array_equal(seen['labels'], labels)
    return {
        'sigma': relative_error(seen['sigma'], ref[f'{precision}/loss/{name}/sigma']),
        'noisy': relative_error(seen['noisy'], ref.nhwc(f'{precision}/loss/{name}/noisy')),
        'loss': relative_error(loss, ref.nhwc(f'{precision}/loss/{name}/loss')),
        'loss_sum': abs(float(np.asarray(loss, np.float64).sum()) / float(ref[f'{precision}/loss/{name}/loss_sum']) - 1),
    }


def recorded_losses(ref):
    return sorted({k.split('/')[2] for k in ref.keys('f32/loss/')})


@pytest.mark.parametrize('net', EDM_NETS)
def test_losses_match_edm_float32(edm_refs, net):
    ref = edm_refs(net)
    names = recorded_losses(ref)
    assert names, 'no recorded losses'
    for name in names:
        errors = check_loss(ref, 'f32', name)
        assert max(errors.values()) <= 1e-5, (name, errors)


@pytest.mark.parametrize('net', EDM_NETS)
def test_losses_match_edm_float64(edm_refs, net):
    ref = edm_refs(net)
    with jax.enable_x64(True):
        for name in recorded_losses(ref):
            errors = check_loss(ref, 'f64', name)
            assert max(errors.values()) <= 1e-12, (name, errors)


def test_edm_loss_draws_log_normal_sigma():
    """ln sigma ~ N(P_mean, P_std^2): with D = y + n/2 the loss is weight * sigma^2 n^2 / 4,
    so the drawn sigma is recoverable and its log-moments checkable (20k draws, 4 sigma bounds)."""
    seen = {}

    def denoiser(x, sigma, labels=None, augment_labels=None):
        seen['sigma'] = sigma
        return x

    images = jnp.zeros((20000, 1, 1, 1))
    losses.edm_loss(denoiser, images, jax.random.key(0), P_mean=-1.2, P_std=1.2)
    log_sigma = np.log(np.asarray(seen['sigma']))
    assert abs(log_sigma.mean() + 1.2) < 4 * 1.2 / np.sqrt(20000)
    assert abs(log_sigma.std() - 1.2) < 4 * 1.2 / np.sqrt(2 * 20000)


def test_edm_loss_of_ideal_gaussian_denoiser_has_expected_value():
    """For y ~ N(0, sd^2) the ideal denoiser's error variance at sigma is sd^2 sigma^2/(sd^2+sigma^2),
    so EDM's weight makes the expected loss exactly 1 per element at every sigma."""
    sd = 0.5
    images = sd * jax.random.normal(jax.random.key(1), (4096, 2, 2, 1))

    def ideal(x, sigma, labels=None, augment_labels=None):
        return x * sd ** 2 / (sd ** 2 + sigma.reshape(-1, 1, 1, 1) ** 2)

    loss = losses.edm_loss(ideal, images, jax.random.key(2), sigma_data=sd)
    assert abs(float(loss.mean()) - 1.0) < 4 * np.sqrt(2 / loss.size)


def test_vp_and_ve_losses_draw_sigma_in_range():
    seen = []
    denoiser = lambda x, sigma, labels=None, augment_labels=None: seen.append(sigma) or x
    images = jnp.zeros((5000, 1, 1, 1))
    losses.ve_loss(denoiser, images, jax.random.key(0), sigma_min=0.02, sigma_max=100.0)
    losses.vp_loss(denoiser, images, jax.random.key(0))
    ve, vp = np.asarray(seen[0]), np.asarray(seen[1])
    assert ve.min() >= 0.02 and ve.max() <= 100.0
    assert abs(np.log(ve).mean() - (np.log(0.02) + np.log(100.0)) / 2) < 0.1
    assert vp.min() >= pc.VPPrecond().sigma_min * 0.99 and vp.max() <= pc.VPPrecond().sigma_max * 1.01


def test_loss_needs_key_or_draws():
    with pytest.raises(ValueError, match='key'):
        losses.edm_loss(lambda x, s, l=None, a=None: x, jnp.zeros((2, 1, 1, 1)))


def test_loss_jits_and_differentiates():
    params = {'a': jnp.float32(0.3)}

    def total(params, images, key):
        denoise = pc.denoiser_from_fn(lambda p, x, c, y, a: p['a'] * x, params)
        return losses.edm_loss(denoise, images, key).mean()

    images = jax.random.normal(jax.random.key(0), (8, 4, 4, 1)) * 0.5
    value, grads = jax.jit(jax.value_and_grad(total))(params, images, jax.random.key(1))
    assert np.isfinite(value) and np.isfinite(grads['a']) and grads['a'] != 0


# ---------------------------------------------------------------------------------------------
# diffusion_loss on processes (DDPM, score-SDE, blurring diffusion).

def recording_model(process, output, fn, seen):
    """A parameterize model of raw output fn(z) that records what the network saw."""
    def net(params, z, c_noise, labels=None, augment_labels=None):
        seen.update(z=z, t=c_noise / 1000, labels=labels)
        return fn(z)
    return parameterize.model_from_fn(net, process, output)


def test_loss_with_injected_draws_matches_the_paper_forward_process():
    """z_t = IDCT(alpha_t * DCT(x)) + sigma_t eps written out with scipy's DCT and the paper's
    alpha, sigma; the network must see (z_t, 1000 t) and the eps loss be (eps_hat - eps)^2 per element."""
    import scipy.fft
    rng = np.random.default_rng(0)
    images, noise = rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 4, 4, 2))
    t = np.array([0.1, 0.5, 0.9])
    seen = {}
    with jax.enable_x64(True):
        process = processes.BlurringProcess(sigma_blur_max=3.0)
        loss = losses.diffusion_loss(recording_model(process, 'eps', lambda z: 0.5 * z, seen), jnp.asarray(images),
                                     None, jnp.ones((3, 10)), process=process, t=jnp.asarray(t),
                                     noise=jnp.asarray(noise))
    t0, t1 = np.arctan(np.exp(-5.0)), np.arctan(np.exp(5.0))
    logsnr = -2 * np.log(np.tan(t0 + t * (t1 - t0)))[:, None, None, None]
    a, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
    freqs = ((np.pi * np.arange(4) / 4)[:, None] ** 2 + (np.pi * np.arange(4) / 4)[None, :] ** 2)[None, :, :, None]
    d = 0.999 * np.exp(-freqs * (3.0 * np.sin(np.pi * t / 2) ** 2)[:, None, None, None] ** 2 / 2) + 0.001
    u = scipy.fft.dctn(images, type=2, axes=(1, 2), norm='ortho')
    z = scipy.fft.idctn(a * d * u, type=2, axes=(1, 2), norm='ortho') + sigma * noise
    np.testing.assert_allclose(seen['z'], z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(seen['t'], t, rtol=1e-12)
    np.testing.assert_array_equal(seen['labels'], np.ones((3, 10)))
    np.testing.assert_allclose(loss, (0.5 * z - noise) ** 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('target', ['x0', 'v'])
def test_x0_and_v_targets_are_the_squared_error_of_that_quantity(target):
    """A network of the target's own output type: the loss is (raw output - target)^2 with
    x0 = the data and v = alpha eps - sigma x (Salimans & Ho 2022), written out in numpy."""
    rng = np.random.default_rng(1)
    images, noise, raw = rng.normal(size=(3, 4, 4, 2, 3)).transpose(4, 0, 1, 2, 3)
    t = np.array([0.1, 0.5, 0.9])
    process = processes.GaussianProcess()
    with jax.enable_x64(True):
        model = parameterize.model_from_fn(lambda p, z, *args: jnp.asarray(raw), process, target)
        loss = np.asarray(losses.diffusion_loss(model, jnp.asarray(images), None, process=process, target=target,
                                                t=jnp.asarray(t), noise=jnp.asarray(noise)))
    logsnr = -2 * np.log(np.tan(np.arctan(np.exp(-5.0)) + t * (np.arctan(np.exp(5.0)) - np.arctan(np.exp(-5.0)))))
    alpha, sigma = (np.sqrt(1 / (1 + np.exp(s * logsnr)))[:, None, None, None] for s in (-1, 1))
    expected = images if target == 'x0' else alpha * noise - sigma * images
    np.testing.assert_allclose(loss, (raw - expected) ** 2, rtol=1e-9, atol=1e-12)


def test_loss_draws_uniform_t_and_unit_noise_and_discrete_steps():
    seen = {}
    n = 20000
    process = processes.GaussianProcess()
    loss = losses.diffusion_loss(recording_model(process, 'eps', jnp.zeros_like, seen), jnp.zeros((n, 1, 1, 1)),
                                 jax.random.key(0), process=process)
    t = np.asarray(seen['t'])
    assert t.shape == (n,) and t.min() >= 0 and t.max() < 1
    assert abs(t.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(float(loss.mean()) - 1) < 5 * np.sqrt(2 / n)  # loss = eps^2 with eps ~ N(0, 1)
    ddpm = processes.GaussianProcess(processes.Discrete('linear', 10))
    steps = np.asarray(losses.draw_times(jax.random.key(1), ddpm, n)) * 10
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-5)  # t = n / T, n in 1..T
    assert set(np.round(steps).astype(int)) == set(range(1, 11))


def test_loss_of_the_ideal_model_has_the_expected_value():
    """Data independent per DCT coefficient, u_k ~ N(0, v_k): the ideal eps_hat leaves
    Var[eps_k | u_t] = alpha_k^2 v_k / (alpha_k^2 v_k + sigma^2) per coefficient, and an image's summed
    loss is the sum over coefficients (orthonormal DCT). Monte Carlo, 5 standard errors."""
    from jaxdiff import dct
    process = processes.BlurringProcess(sigma_blur_max=3.0)
    freqs = (np.pi * np.arange(4) / 4)[:, None] ** 2 + (np.pi * np.arange(4) / 4)[None, :] ** 2
    v = (0.05 + 1 / (1 + 3 * freqs))[..., None]
    n, t = 8192, 0.4

    def ideal(params, z, c_noise, labels=None, augment_labels=None):
        alpha, sigma = process.scale_sigma(c_noise / 1000, z.shape, z.dtype)
        return dct.idct2(sigma * dct.dct2(z) / (alpha ** 2 * v + sigma ** 2))

    images = dct.idct2(jnp.sqrt(v) * jax.random.normal(jax.random.key(1), (n, 4, 4, 1)))
    per_image = np.asarray(losses.diffusion_loss(parameterize.model_from_fn(ideal, process), images,
                                                 jax.random.key(2), process=process,
                                                 t=jnp.full((n,), t)).sum(axis=(1, 2, 3)), np.float64)
    alpha, sigma = (np.asarray(a, np.float64) for a in process.scale_sigma(t, (1, 4, 4, 1)))
    expected = float(np.sum(alpha[0] ** 2 * v / (alpha[0] ** 2 * v + sigma[0] ** 2)))
    assert abs(per_image.mean() - expected) < 5 * per_image.std() / np.sqrt(n), (per_image.mean(), expected)


def test_loss_bound_for_the_train_step_jits_and_differentiates():
    import functools
    process = processes.BlurringProcess()
    loss_fn = functools.partial(losses.diffusion_loss, process=process, target='v')

    def objective(params, images, key):
        model = parameterize.model_from_fn(lambda p, z, c, y, a: p['a'] * z, process, 'eps', params)
        return loss_fn(model, images, key, None).sum() / images.shape[0]

    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3)) * 0.5
    value, grads = jax.jit(jax.value_and_grad(objective))({'a': jnp.float32(0.3)}, images, jax.random.key(1))
    assert np.isfinite(value) and np.isfinite(grads['a']) and grads['a'] != 0
    with pytest.raises(ValueError, match='loss.type must be one of'):
        losses.diffusion_loss(None, images, jax.random.key(0), process=process, target='score')


# ---------------------------------------------------------------------------------------------
# Simple diffusion's multiscale loss.

def numpy_multiscale_loss(error, lowest):
    """sum over s in {lowest, ..., d} of (d / s) * mean((D^s error)^2), D^s the s x s average pooling
    written as an explicit loop over the k x k blocks, in float64."""
    n, d, _, c = error.shape
    total, s = 0.0, lowest
    while s <= d:
        k = d // s
        pooled = np.zeros((n, s, s, c))
        for i in range(s):
            for j in range(s):
                pooled[:, i, j] = error[:, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(axis=(1, 2))
        total += (d / s) * np.mean(pooled ** 2)
        s *= 2
    return total


@pytest.mark.parametrize('d,lowest', [(16, 4), (16, 2), (32, 8), (8, 8)])
def test_multiscale_loss_matches_explicit_pooling(d, lowest):
    error = np.random.default_rng(d + lowest).normal(size=(3, d, d, 2))
    with jax.enable_x64(True):
        loss = np.asarray(losses.multiscale_square_error(jnp.asarray(error), lowest))
    assert loss.shape == error.shape
    # float64 sums of at most a few thousand terms: 1e-12 relative.
    np.testing.assert_allclose(loss.mean(), numpy_multiscale_loss(error, lowest), rtol=1e-12)


def test_multiscale_loss_at_full_scale_only_is_the_plain_loss():
    """lowest = d leaves one scale of weight d / d = 1 and pooling over 1 x 1 blocks: (eps_hat - eps)^2
    element for element, in diffusion_loss too."""
    rng = np.random.default_rng(3)
    images, noise, raw = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(3, 4, 16, 16, 3)))
    t = jnp.asarray([0.1, 0.5, 0.9, 0.99], jnp.float32)
    process = processes.GaussianProcess(processes.Cosine(shift=-1.0))
    model = parameterize.model_from_fn(lambda p, z, *args: raw, process, 'v')
    for target in ('eps', 'v'):
        plain = losses.diffusion_loss(model, images, None, process=process, target=target, t=t, noise=noise)
        full = losses.diffusion_loss(model, images, None, process=process, target=target, t=t, noise=noise,
                                     multiscale_lowest=16)
        # The same products and no sums (means over 1 x 1 blocks, weight 1.0): equal up to the one
        # rounding a compiler may place differently, 1e-6 relative.
        np.testing.assert_allclose(np.asarray(full), np.asarray(plain), rtol=1e-6)
        lower = losses.diffusion_loss(model, images, None, process=process, target=target, t=t, noise=noise,
                                      multiscale_lowest=4)
        assert float(lower.mean()) > float(plain.mean())  # the pooled terms add to it


def test_multiscale_loss_weights_low_resolutions_as_the_paper():
    """White error of unit variance: (D^s e)^2 has mean (s / d)^2, so scale s adds (d / s)(s / d)^2 = s / d.
    An error constant over the image keeps its square under pooling, so scale s adds d / s."""
    d = 32
    white = jax.random.normal(jax.random.key(0), (64, d, d, 3))
    expected = sum(s / d for s in (4, 8, 16, 32))
    assert float(losses.multiscale_square_error(white, 4).mean()) == pytest.approx(expected, rel=0.02)
    constant = jnp.full((1, d, d, 1), 2.0)
    assert float(losses.multiscale_square_error(constant, 4).mean()) == pytest.approx(4 * sum(d / s for s in (4, 8, 16, 32)))


@pytest.mark.parametrize('d,lowest', [(16, 3), (24, 8), (16, 32), (16, 0)])
def test_multiscale_scales_reject_sizes_that_are_not_a_power_of_two_apart(d, lowest):
    with pytest.raises(ValueError, match='loss.multiscale_lowest'):
        losses.multiscale_scales(d, lowest)


# ---------------------------------------------------------------------------------------------
# Simple diffusion against denoising-diffusion-pytorch's simple_diffusion.py (recorded by
# tests/data/make_gaussian_refs.py in float64): q_sample and the per-image v / eps losses.

SIMPLE_REF = pathlib.Path(__file__).parent / 'data' / 'gaussian' / 'ddpm_pytorch_schedules.npz'
# Its 'cosine' run is the plain cosine on [-15, 15]; 'interp128' interpolates 32 -> 256 at 128 px with
# the weights the other way round from eq. (6), which InterpolatedCosine gives with low_d and high_d swapped.
SIMPLE_SCHEDULES = {'cosine': processes.Cosine(-15.0, 15.0),
                    'interp128': processes.InterpolatedCosine(128, low_d=256, high_d=32)}


@pytest.mark.parametrize('name', sorted(SIMPLE_SCHEDULES))
@pytest.mark.parametrize('target', ['v', 'eps'])
def test_simple_diffusion_loss_matches_denoising_diffusion_pytorch(name, target):
    ref = np.load(SIMPLE_REF)
    x, noise, t, raw = (ref[f'inputs/{k}'] for k in ('x_start', 'noise', 'times', 'model_pred'))
    process = processes.GaussianProcess(SIMPLE_SCHEDULES[name])
    seen = {}
    with jax.enable_x64(True):
        np.testing.assert_allclose(process.schedule.logsnr(t), ref[f'{name}/q_sample/log_snr'], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(process.diffuse(jnp.asarray(x), jnp.asarray(t), jnp.asarray(noise)),
                                   ref[f'{name}/q_sample/x_noised'], rtol=1e-12, atol=1e-12)
        model = recording_model(process, target, lambda z: jnp.asarray(raw), seen)
        loss_fn = lambda gamma: np.asarray(losses.diffusion_loss(
            model, jnp.asarray(x), None, process=process, target=target, min_snr_gamma=gamma, t=jnp.asarray(t),
            noise=jnp.asarray(noise))).mean(axis=(1, 2, 3))
        loss, loss_min_snr = loss_fn(0.0), loss_fn(5.0)
        plain = np.asarray(losses.diffusion_loss(model, jnp.asarray(x), None, process=process, target=target,
                                                 t=jnp.asarray(t), noise=jnp.asarray(noise)))
    np.testing.assert_allclose(seen['z'], ref[f'{name}/q_sample/x_noised'], rtol=1e-12, atol=1e-12)
    # The regression target it captured (v = alpha eps - sigma x, or eps): |raw - target| = sqrt(loss).
    np.testing.assert_allclose(np.abs(raw - ref[f'{name}/p_losses/{target}/minsnroff/target']), np.sqrt(plain),
                               rtol=1e-10, atol=1e-12)
    # Its per-image loss is the mean squared error times min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v),
    # with gamma = infinity when min-SNR is off (so the v loss is weighted by SNR / (SNR + 1) = alpha^2).
    snr = np.exp(ref[f'{name}/q_sample/log_snr'])
    unclipped = 1.0 if target == 'eps' else snr / (snr + 1)
    # float64 sums and sqrt(sigmoid) on both sides: 1e-12 relative.
    np.testing.assert_allclose(loss * unclipped, ref[f'{name}/p_losses/{target}/minsnroff/losses'], rtol=1e-12)
    np.testing.assert_allclose(loss_min_snr, ref[f'{name}/p_losses/{target}/minsnr5/losses'], rtol=1e-12)


def test_sigmoid_weighting_is_sigmoid_of_bias_minus_logsnr_times_the_cosine_closed_form_derivative():
    """VDM++/SiD2: on the truncated cosine lambda = -2 log tan(u), u = t0 + t (t1 - t0),
    -d lambda/dt = 4 (t1 - t0) / sin(2 u) (closed form, float64; pi / sin(pi t) untruncated); the loss
    is the plain eps loss times sigmoid(b - lambda) (-d lambda/dt); on the shifted cosine the
    derivative is the same (the shift is constant)."""
    t = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    with jax.enable_x64(True):
        for schedule in (processes.Cosine(), processes.ShiftedCosine(64, 32)):
            process = processes.GaussianProcess(schedule)
            x = jax.random.normal(jax.random.key(0), (5, 4, 4, 1), jnp.float64)
            noise = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
            model = parameterize.model_from_fn(lambda p, z, c, *a: 0.5 * z, process, 'eps')
            run = lambda bias: np.asarray(losses.diffusion_loss(model, x, process=process, t=jnp.asarray(t),
                                                                noise=noise, sigmoid_bias=bias))
            plain, weighted = run(None), run(-1.0)
            lam = np.asarray(schedule.logsnr(jnp.asarray(t)))
            from jaxdiff import schedules
            t0, t1 = schedules._logsnr_cosine_limits(schedule.logsnr_min, schedule.logsnr_max)
            expected = 1 / (1 + np.exp(lam + 1.0)) * 4 * (t1 - t0) / np.sin(2 * (t0 + t * (t1 - t0)))
            np.testing.assert_allclose(weighted, plain * expected.reshape(-1, 1, 1, 1), rtol=1e-12)


def test_sigmoid_weighting_config_errors_name_the_field(tmp_path):
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import ddpm, simple_diffusion
    from jaxdiff import builders
    config = simple_diffusion.get_config()
    config.loss.sigmoid_bias = 0.0
    builders.build_loss(config)  # eps loss on the shifted cosine: accepted
    config.loss.type = 'v'
    with pytest.raises(ValueError, match=r"loss\.sigmoid_bias weights the eps loss"):
        builders.build_loss(config)
    config = ddpm.get_config()
    config.loss.sigmoid_bias = 0.0
    with pytest.raises(ValueError, match=r"loss\.sigmoid_bias .*Discrete"):
        builders.build_loss(config)
