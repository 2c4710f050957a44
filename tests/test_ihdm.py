"""Inverse heat dissipation: the blur against independent heat-equation solutions and against
AaltoML's code (arrays in tests/data/ihdm, made by make_ihdm_refs.py), the loss, the prior and
the sampler against hand-written references and closed forms."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from jaxdiff import ihdm, samplers

REFS = pathlib.Path(__file__).parent / 'data' / 'ihdm' / 'ihdm_refs.npz'
CIFAR = ihdm.HeatDissipation(K=200, blur_sigma_max=24.0)
MNIST = ihdm.HeatDissipation(K=100, blur_sigma_max=20.0)


@pytest.fixture(scope='module')
def ref():
    return np.load(REFS)


def nhwc(a):
    return np.moveaxis(np.asarray(a), -3, -1)


def photo(shape, seed=0):
    """Smooth-ish test images in [0, 1]: a random field blurred a little, so that every
    frequency is present but the low ones dominate, as in photos."""
    x = np.random.default_rng(seed).uniform(size=shape)
    return scipy.ndimage.uniform_filter(x, size=(1, 3, 3, 1), mode='reflect')


def heat_flow_fft(x, t):
    """Independent solution of du/dt = Laplacian(u) with reflecting boundaries at time t, float64.

    Reflect each image about its edges (half-sample symmetric) into a 2H x 2W periodic image,
    whose cosine-series interpolant is the Neumann problem's initial condition; on the plane the
    heat kernel at time t is a Gaussian of variance 2t, whose transfer function at f cycles/pixel
    is exp(-4 pi^2 f^2 t). Multiply the FFT by it and crop.
    """
    h, w = x.shape[1:3]
    ext = np.concatenate([x, x[:, ::-1]], axis=1)
    ext = np.concatenate([ext, ext[:, :, ::-1]], axis=2)
    fy = np.fft.fftfreq(2 * h)[:, None]
    fx = np.fft.fftfreq(2 * w)[None, :]
    transfer = np.exp(-4 * np.pi ** 2 * (fy ** 2 + fx ** 2) * t)[None, :, :, None]
    return np.real(np.fft.ifft2(np.fft.fft2(ext, axes=(1, 2)) * transfer, axes=(1, 2)))[:, :h, :w]


# ---------------------------------------------------------------------------------------------
# The process.

def test_reference_files_name_the_reference_commit(ref):
    meta = json.loads(str(ref['meta/json']))
    assert meta['commit'] == '3f735cadf61609c30094e3aee5a37d82a301aecb'


# sigma_k = exp(linspace(log sigma_min, log sigma_max)) in float64. numpy's SIMD exp/log kernels
# differ in the last bits between CPUs (AVX-512 vs AVX2), and so may the recording's: each is
# within a few ulps, and the rounding of log sigma (|log sigma| <= 3.2 here) is multiplied by
# |log sigma| in exp. Relative error <= (4 + 4 + 4 * 3.2) * 2.2e-16 < 5e-15; a wrong schedule
# (another spacing, sigma_min or K) is off by > 1e-3.
SIGMA_RTOL = 1e-14


@pytest.mark.parametrize('process, key', [(CIFAR, 'cifar_sigmas'), (MNIST, 'mnist_sigmas')])
def test_blur_sigmas_equal_the_reference_configs_schedule(ref, process, key):
    sigmas = process.blur_sigmas()
    np.testing.assert_allclose(sigmas, ref[key], rtol=SIGMA_RTOL, atol=0)
    assert sigmas[0] == 0 and sigmas.shape == (process.K + 1,)
    np.testing.assert_allclose(sigmas[1], 0.5, rtol=SIGMA_RTOL)
    np.testing.assert_allclose(process.blur_times(), sigmas ** 2 / 2, rtol=0)  # the same float64 ops


def test_small_sampler_schedule_equals_the_recorded_one(ref):
    process = ihdm.HeatDissipation(K=12, blur_sigma_max=4.0)
    np.testing.assert_allclose(process.blur_sigmas(), ref['sampler_sigmas'], rtol=SIGMA_RTOL, atol=0)


@pytest.mark.parametrize('name, process', [('cifar', CIFAR), ('mnist', MNIST)])
def test_blur_matches_reference_float32(ref, name, process):
    x, k = nhwc(ref[f'{name}_x']), ref[f'{name}_k']
    out = np.asarray(process.blur(jnp.asarray(x), jnp.asarray(k)))
    assert out.dtype == np.float32
    # DCT, scaling and inverse DCT each sum H or W terms per axis in float32, and so does the
    # reference's own float32 computation: at most 2 (H + W) roundings of 2^-24 max|x| apart
    # (measured 1.0e-6 of 6.9e-6 at 32 px on AVX-512, AVX2 and SSE4.2 code paths).
    height, width = x.shape[1:3]
    atol = 2 * (height + width) * 2.0 ** -24 * np.abs(x).max()
    np.testing.assert_allclose(out, nhwc(ref[f'{name}_blur_f32']), atol=atol, rtol=0)


@pytest.mark.parametrize('name, process', [('cifar', CIFAR), ('mnist', MNIST)])
def test_blur_matches_reference_float64(ref, name, process):
    # The reference builds its frequencies in float32 (torch.linspace), so it is itself only
    # accurate to ~1e-8 here (measured: 6e-9 / 8e-9 from the exact solution, where we are at 5e-15).
    x, k = nhwc(ref[f'{name}_x']).astype(np.float64), ref[f'{name}_k']
    with jax.enable_x64(True):
        out = np.asarray(process.blur(jnp.asarray(x), jnp.asarray(k)))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, nhwc(ref[f'{name}_blur_f64']), atol=2e-8, rtol=0)


def test_blur_sweep_over_levels_matches_reference(ref):
    x = nhwc(ref['cifar_x'][:1])
    out = np.stack([np.asarray(CIFAR.blur(jnp.asarray(x), int(k)))[0] for k in ref['cifar_sweep_k']])
    np.testing.assert_allclose(out, nhwc(ref['cifar_sweep_blur']), atol=2e-6, rtol=0)


@pytest.mark.parametrize('shape', [(2, 16, 16, 3), (1, 12, 20, 2)])
def test_blur_solves_the_neumann_heat_equation(shape):
    process = ihdm.HeatDissipation(K=6, blur_sigma_min=0.5, blur_sigma_max=6.0)
    x = photo(shape)
    k = np.arange(shape[0]) + 2
    with jax.enable_x64(True):
        for level in range(process.K + 1):
            out = np.asarray(process.blur(jnp.asarray(x), level))
            np.testing.assert_allclose(out, heat_flow_fft(x, process.blur_times()[level]), atol=1e-12, rtol=0)
        per_image = np.asarray(process.blur(jnp.asarray(x), jnp.asarray(k)))
    for n in range(shape[0]):
        np.testing.assert_allclose(per_image[n], heat_flow_fft(x[n:n + 1], process.blur_times()[k[n]])[0],
                                   atol=1e-12, rtol=0)


def test_blur_is_a_gaussian_blur_of_width_sigma_with_reflecting_edges():
    # Spatial-domain check: scipy's sampled Gaussian kernel with mirrored edges. For sigma >= 2
    # pixels sampling the kernel changes its spectrum by < 3e-9.
    process = ihdm.HeatDissipation(K=2, blur_sigma_min=2.0, blur_sigma_max=3.0)
    x = photo((2, 32, 32, 3), seed=1)
    with jax.enable_x64(True):
        for level, sigma in ((1, 2.0), (2, 3.0)):
            out = np.asarray(process.blur(jnp.asarray(x), level))
            ref = scipy.ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode='reflect', truncate=8.0)
            np.testing.assert_allclose(out, ref, atol=1e-8, rtol=0)


def test_blur_conserves_heat_and_level_zero_is_the_identity():
    x = photo((2, 16, 16, 3), seed=2)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(CIFAR.blur(jnp.asarray(x), 0)), x, atol=1e-14)
        out = np.asarray(CIFAR.blur(jnp.asarray(x), jnp.array([1, CIFAR.K])))
    # Reflecting edges: no heat leaves, so each channel keeps its mean; at level K the image is
    # (almost) flat.
    np.testing.assert_allclose(out.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-13)
    assert np.ptp(out[1], axis=(0, 1)).max() < 1e-3 * np.ptp(x[1], axis=(0, 1)).min()


def test_heat_dissipation_rejects_bad_settings():
    with pytest.raises(ValueError, match='K must be'):
        ihdm.HeatDissipation(K=0)
    with pytest.raises(ValueError, match='blur_sigma_min'):
        ihdm.HeatDissipation(blur_sigma_min=30.0, blur_sigma_max=24.0)
    with pytest.raises(ValueError, match='non-negative'):
        ihdm.HeatDissipation(training_noise=-0.1)


# ---------------------------------------------------------------------------------------------
# The loss.

def stand_in_residual(params, u, noise_labels, class_labels=None, augment_labels=None, *, K):
    """The stand-in network of make_ihdm_refs.py, in JAX."""
    scale = (noise_labels / K)[:, None, None, None]
    return -0.3 * u + 0.05 * jnp.tanh(4 * u) * scale + 0.01 * u.mean(axis=(1, 2, 3), keepdims=True)


@functools.lru_cache(maxsize=None)
def stand_in_model(K):
    # Cached: the sampler compiles per model function, and the tests below share compilations.
    return ihdm.model_from_fn(functools.partial(stand_in_residual, K=K))


def test_loss_matches_reference_with_its_draws(ref):
    process = ihdm.HeatDissipation(K=200, blur_sigma_max=24.0, training_noise=float(ref['loss_sigma']))
    loss = ihdm.ihdm_loss(stand_in_model(200), jnp.asarray(nhwc(ref['cifar_x'])), process=process,
                          k=jnp.asarray(ref['loss_k']), noise=jnp.asarray(nhwc(ref['loss_unit_noise'])))
    per_image = np.asarray(loss).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(per_image, ref['loss_per_image'], rtol=2e-6)
    np.testing.assert_allclose(per_image.mean(), float(ref['loss_mean']), rtol=2e-6)


def test_loss_equals_hand_written_computation_float64():
    process = ihdm.HeatDissipation(K=8, blur_sigma_max=5.0, training_noise=0.05)
    x = photo((3, 8, 12, 2), seed=3)
    k = np.array([1, 5, 8])
    noise = np.random.default_rng(4).normal(size=x.shape)
    lam = (np.pi * np.arange(8) / 8)[:, None] ** 2 + (np.pi * np.arange(12) / 12)[None, :] ** 2
    t = process.blur_times()

    def blur(img, level):  # scipy's orthonormal DCT, not jaxdiff's
        coefficients = scipy.fft.dctn(img, type=2, axes=(0, 1), norm='ortho')
        return scipy.fft.idctn(coefficients * np.exp(-lam * t[level])[:, :, None], type=2, axes=(0, 1), norm='ortho')

    def residual(params, u, c, labels=None, aug=None):
        return jnp.sin(u) * c[:, None, None, None] / 10

    expected = []
    for n in range(3):
        u = blur(x[n], k[n]) + 0.05 * noise[n]
        expected.append((blur(x[n], k[n] - 1) - (u + np.sin(u) * k[n] / 10)) ** 2)
    with jax.enable_x64(True):
        out = ihdm.ihdm_loss(ihdm.model_from_fn(residual), jnp.asarray(x), process=process, k=jnp.asarray(k),
                             noise=jnp.asarray(noise))
        np.testing.assert_allclose(np.asarray(out), np.stack(expected), atol=1e-13, rtol=0)


def test_loss_of_the_identity_model_has_its_closed_form_expectation():
    # model(u_k, k) = u_k: E[sum of the loss] = ||blur(x,k) - blur(x,k-1)||^2 + sigma^2 D for a
    # one-image data set at a fixed level (the cross term has mean zero).
    sigma = 0.05
    process = ihdm.HeatDissipation(K=10, blur_sigma_max=4.0, training_noise=sigma)
    x = np.random.default_rng(5).uniform(size=(1, 8, 8, 1))  # rough, so that level 1 changes it
    n, level = 512, 1
    identity = ihdm.model_from_fn(lambda params, u, c, labels=None, aug=None: jnp.zeros_like(u))
    images = jnp.asarray(np.repeat(x, n, 0), jnp.float32)
    loss_fn = jax.jit(lambda key: ihdm.ihdm_loss(identity, images, key, process=process, k=jnp.full((n,), level)))
    loss = np.asarray(loss_fn(jax.random.key(0))).sum(axis=(1, 2, 3))
    t = process.blur_times()
    gap = np.sum((heat_flow_fft(x, t[level]) - heat_flow_fft(x, t[level - 1])) ** 2)
    expected = gap + sigma ** 2 * 64
    # Per image: sigma^2 chi^2_64 + 2 sigma <eps, gap vector>, variance 2 sigma^4 64 + 4 sigma^2 gap.
    std_of_mean = np.sqrt((2 * sigma ** 4 * 64 + 4 * sigma ** 2 * gap) / n)
    # Both terms are visible: a wrong target level or noise scale would show.
    assert gap > 10 * std_of_mean and sigma ** 2 * 64 > 10 * std_of_mean
    assert abs(loss.mean() - expected) < 5 * std_of_mean


@pytest.mark.parametrize('on_level_K, high', [(True, 5), (False, 4)])
def test_training_levels_cover_the_paper_or_reference_range(on_level_K, high):
    process = ihdm.HeatDissipation(K=5, train_on_level_K=on_level_K)
    k = np.asarray(ihdm.training_levels(process, jax.random.key(1), 4000))
    assert set(np.unique(k)) == set(range(1, high + 1))
    counts = np.bincount(k)[1:]
    assert counts.min() > 0.8 * 4000 / high


def test_loss_with_a_key_draws_levels_and_noise_from_it():
    process = ihdm.HeatDissipation(K=50, blur_sigma_max=8.0)
    x = jnp.asarray(photo((64, 8, 8, 1), seed=6), jnp.float32)
    model = ihdm.model_from_fn(lambda params, u, c, labels=None, aug=None: jnp.zeros_like(u))
    loss = jax.jit(lambda key: ihdm.ihdm_loss(model, x, key, process=process))
    a, b, c = (np.asarray(loss(jax.random.key(seed))) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    with pytest.raises(ValueError, match='pass a key'):
        ihdm.ihdm_loss(model, x, process=process, k=jnp.ones((64,), jnp.int32))


class TinyNet(nn.Module):
    """A jaxdiff-style network (x, noise_labels, class_labels, augment_labels, train) that uses
    its noise label, its class labels and dropout, small enough to compile in a moment."""
    label_dim: int = 0

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        # Per-pixel layers: XLA:CPU compiles convolutions (and their gradients) slowly.
        h = nn.Dense(4)(x) * jnp.cos(noise_labels)[:, None, None, None]
        if self.label_dim:
            h = h + nn.Dense(4)(class_labels)[:, None, None, :]
        h = nn.Dropout(0.5, deterministic=not train)(jnp.tanh(h))
        return nn.Dense(x.shape[-1] + 1)(h)  # an extra channel, which the model drops


def test_make_model_adds_the_first_output_channels_to_its_input_and_trains():
    net = TinyNet(label_dim=3)
    u = jnp.asarray(photo((2, 8, 8, 2), seed=7), jnp.float32)
    labels = jnp.eye(3)[:2]
    params = jax.jit(net.init)(jax.random.key(0), u, jnp.zeros((2,)), labels)['params']

    @jax.jit  # one compilation instead of one per eager op
    def outputs(params):
        model = ihdm.make_model(net, params)
        apply = lambda c, y: u + net.apply({'params': params}, u, c, y)[..., :2]
        return (model(u, jnp.array([3, 17]), labels), apply(jnp.array([3.0, 17.0]), labels),
                model(u, 5), apply(jnp.full((2,), 5.0), jnp.zeros((2, 3))))

    got, expected, got_unlabelled, expected_unlabelled = outputs(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_unlabelled), np.asarray(expected_unlabelled), atol=1e-6)

    process = ihdm.HeatDissipation(K=20, blur_sigma_max=6.0)

    def objective(params, dropout_key):
        model = ihdm.make_model(net, params, train=True, dropout_key=dropout_key)
        return ihdm.ihdm_loss(model, u, jax.random.key(1), labels, process=process).sum() / u.shape[0]

    value_and_grad = jax.jit(jax.value_and_grad(objective))
    value_a, grads = value_and_grad(params, jax.random.key(2))
    value_b, _ = value_and_grad(params, jax.random.key(3))
    assert value_a != value_b  # dropout is on, drawn from the key
    norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))
    assert np.isfinite(norm) and norm > 0
    with pytest.raises(ValueError, match='dropout_key'):
        ihdm.make_model(net, params, train=True)


@pytest.mark.slow
def test_make_model_with_the_adm_unet():
    from jaxdiff.nets.adm import DhariwalUNet
    net = DhariwalUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1,),
                       num_blocks=1, attn_resolutions=(), dropout=0.1)
    u = jnp.asarray(photo((2, 8, 8, 1), seed=7), jnp.float32)
    params = net.init(jax.random.key(0), u, jnp.zeros((2,)))['params']
    # The output layer starts at zero (EDM's init); perturb it so the residual is not zero.
    params = jax.tree.map(lambda p: p + 0.01, params)
    k = jnp.array([3, 17])
    expected = u + net.apply({'params': params}, u, k.astype(jnp.float32))
    assert not np.allclose(np.asarray(expected), np.asarray(u))
    np.testing.assert_allclose(np.asarray(ihdm.make_model(net, params)(u, k)), np.asarray(expected), atol=1e-6)
    process = ihdm.HeatDissipation(K=20, blur_sigma_max=6.0)

    def objective(params, dropout_key):
        model = ihdm.make_model(net, params, train=True, dropout_key=dropout_key)
        return ihdm.ihdm_loss(model, u, jax.random.key(1), process=process).sum() / u.shape[0]

    grads = jax.grad(objective)(params, jax.random.key(2))
    assert np.isfinite(float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))))


# ---------------------------------------------------------------------------------------------
# The prior.

@pytest.mark.parametrize('name, process', [('cifar', CIFAR), ('mnist', MNIST)])
def test_prior_centres_are_the_reference_maximal_blur(ref, name, process):
    x, k = nhwc(ref[f'{name}_x']), ref[f'{name}_k']
    prior = ihdm.fit_prior(process, x)
    assert prior.coefficients.shape == (len(x), 3, 3, x.shape[-1])  # the heat flow leaves 3 x 3 modes
    assert prior.bandwidth == process.sampling_delta
    centres = np.asarray(prior.centres())
    last = k == process.K
    np.testing.assert_allclose(centres[last], nhwc(ref[f'{name}_blur_f64'])[last], atol=1e-6, rtol=0)
    # Against the full float64 blur: the truncation is within tol * ||x||.
    exact = heat_flow_fft(x.astype(np.float64), process.blur_times()[-1])
    err = np.sqrt(np.sum((centres - exact) ** 2, axis=(1, 2, 3)))
    assert np.all(err <= 1e-7 * np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=(1, 2, 3))) + 1e-6)


def test_prior_keeps_every_frequency_when_the_blur_is_weak():
    process = ihdm.HeatDissipation(K=3, blur_sigma_max=1.0)
    x = photo((3, 6, 10, 2), seed=8)
    with jax.enable_x64(True):
        prior = ihdm.fit_prior(process, x, dtype=np.float64)
        assert prior.coefficients.shape == (3, 6, 10, 2)
        np.testing.assert_allclose(np.asarray(prior.centres()), heat_flow_fft(x, process.blur_times()[-1]),
                                   atol=1e-12)


def test_prior_samples_are_centres_plus_bandwidth_noise():
    process = ihdm.HeatDissipation(K=10, blur_sigma_max=20.0)
    x = np.stack([np.full((16, 16, 3), v) for v in (-0.6, 0.0, 0.7)]) + photo((3, 16, 16, 3), seed=9) * 0.1
    prior = ihdm.fit_prior(process, x, bandwidth=0.05)
    u = np.asarray(ihdm.sample_prior(prior, jax.random.key(0), 1500))
    assert u.shape == (1500, 16, 16, 3)
    centres = np.asarray(prior.centres())
    dist = ((u[:, None] - centres[None]) ** 2).sum(axis=(2, 3, 4))
    nearest = dist.argmin(1)
    assert np.bincount(nearest, minlength=3).min() > 400
    residual = u - centres[nearest]
    assert abs(residual.std() - 0.05) < 0.001 and abs(residual.mean()) < 0.001
    exact = ihdm.fit_prior(process, x, bandwidth=0.0)
    u0 = np.asarray(ihdm.sample_prior(exact, jax.random.key(1), 1500))  # same n: no recompilation
    assert np.min(((u0[:, None] - centres[None]) ** 2).sum(axis=(2, 3, 4)), axis=1).max() < 1e-10


# ---------------------------------------------------------------------------------------------
# The sampler.

def test_sampler_matches_reference_with_its_draws(ref):
    process = ihdm.HeatDissipation(K=12, blur_sigma_max=4.0, sampling_delta=float(ref['sampler_delta']))
    u_K = jnp.asarray(nhwc(ref['sampler_init']))
    u_0, trajectory = ihdm.sample(stand_in_model(12), u_K, process=process,
                                  step_noise=jnp.asarray(nhwc(ref['sampler_step_noise'])), return_trajectory=True)
    np.testing.assert_allclose(np.asarray(u_0), nhwc(ref['sampler_final']), atol=3e-7, rtol=0)
    # The reference saves u_K, ..., u_1 and then the (unused) noisy u_0.
    np.testing.assert_allclose(np.asarray(trajectory), nhwc(ref['sampler_trajectory'])[:12], atol=3e-7, rtol=0)


def exact_inverse_step_model(process, shape):
    """model(u_k, k) = blur(blur^{-1}(u_k, k), k-1): the deterministic inverse heat step, which
    maps blur(x, k) to blur(x, k-1) for every x. numpy float64, via scipy's DCT."""
    h, w = shape
    lam = jnp.asarray((np.pi * np.arange(h) / h)[:, None] ** 2 + (np.pi * np.arange(w) / w)[None, :] ** 2)
    t = jnp.asarray(process.blur_times())
    dct_h = jnp.asarray(scipy.fft.dct(np.eye(h), type=2, axis=0, norm='ortho'))
    dct_w = jnp.asarray(scipy.fft.dct(np.eye(w), type=2, axis=0, norm='ortho'))

    def residual(params, u, c, labels=None, aug=None):
        k = c.astype(jnp.int32)
        factor = jnp.exp(lam[None] * (t[k] - t[k - 1])[:, None, None])[..., None]
        coefficients = jnp.einsum('ah,nhwc,bw->nabc', dct_h, u, dct_w)
        return jnp.einsum('ah,nabc,bw->nhwc', dct_h, coefficients * factor, dct_w) - u

    return ihdm.model_from_fn(residual)


def test_sampler_with_the_exact_inverse_step_recovers_the_image_when_delta_is_zero():
    # Small blur so that undoing it is well conditioned in float64 (amplification < 1e8).
    process = ihdm.HeatDissipation(K=10, blur_sigma_max=1.5, sampling_delta=0.0)
    x = photo((2, 8, 8, 1), seed=10)
    with jax.enable_x64(True):
        u_K = process.blur(jnp.asarray(x), process.K)
        assert np.abs(np.asarray(u_K) - x).max() > 0.05
        u_0, trajectory = ihdm.sample(exact_inverse_step_model(process, (8, 8)), u_K, process=process,
                                      return_trajectory=True)
        np.testing.assert_allclose(np.asarray(u_0), x, atol=1e-8, rtol=0)
        for i, k in enumerate(range(process.K, 0, -1)):
            np.testing.assert_allclose(np.asarray(trajectory[i]), heat_flow_fft(x, process.blur_times()[k]),
                                       atol=1e-8, rtol=0)


def test_sampler_with_the_data_oracle_returns_the_image_and_noisy_intermediate_states():
    # One-image data set: the best estimate of u_{k-1} is blur(x, k-1) whatever u_k is. The
    # result is then x exactly (no noise after the last step), and every intermediate state is
    # blur(x, k) + delta eps.
    process = ihdm.HeatDissipation(K=20, blur_sigma_max=6.0, sampling_delta=0.05)
    x = photo((1, 16, 16, 1), seed=11)
    with jax.enable_x64(True):
        blurred = jnp.asarray(np.stack([heat_flow_fft(x, t)[0] for t in process.blur_times()]))

        def oracle(params, u, c, labels=None, aug=None):
            return blurred[c.astype(jnp.int32) - 1] - u

        u_K = jnp.asarray(np.repeat(np.asarray(blurred[-1:]), 64, 0))
        u_0, trajectory = ihdm.sample(ihdm.model_from_fn(oracle), u_K, jax.random.key(0), process=process,
                                      return_trajectory=True)
        np.testing.assert_allclose(np.asarray(u_0), np.repeat(x, 64, 0), atol=1e-12)
        noise = (np.asarray(trajectory[1:]) - np.asarray(blurred[1:process.K])[::-1, None]) / 0.05
    assert abs(noise.std() - 1) < 0.02 and abs(noise.mean()) < 0.02


def test_sampler_noise_variance_has_its_closed_form():
    # model(u, k) = a u from u_K = 0: u_0 = a u_1 with u_1 = delta sum_{j<K-1} a^j eps_j, so
    # Var(u_0) = delta^2 sum_{m=1}^{K-1} a^{2m}; noise after the last step, or one noise reused
    # across steps, would change it by > 30 %.
    process = ihdm.HeatDissipation(K=6, blur_sigma_max=2.0, sampling_delta=0.1)
    a = 0.9
    model = ihdm.model_from_fn(lambda params, u, c, labels=None, aug=None: (a - 1) * u)
    u_0 = np.asarray(ihdm.sample(model, jnp.zeros((256, 8, 8, 1)), jax.random.key(0), process=process))
    expected = 0.1 ** 2 * sum(a ** (2 * m) for m in range(1, process.K))
    assert abs(u_0.var() / expected - 1) < 5 * np.sqrt(2 / u_0.size)
    assert abs(u_0.mean()) < 5 * np.sqrt(expected / u_0.size)


# The three tests below share one compiled sampler: K = 5, four 8 x 8 images, with trajectory.
SMALL = ihdm.HeatDissipation(K=5, blur_sigma_max=3.0, sampling_delta=0.03)


def small_run(u_K, key, **kwargs):
    return ihdm.sample(stand_in_model(5), u_K, key, process=SMALL, return_trajectory=True, **kwargs)


def test_scan_sampler_equals_a_python_loop_step_by_step():
    model = stand_in_model(5)
    u_K = jnp.asarray(photo((4, 8, 8, 1), seed=12), jnp.float32)
    keys = samplers.keys_from_seeds([5, 6, 7, 8])
    u_0, trajectory = small_run(u_K, keys)

    @jax.jit
    def python_step(u, k, i):  # one step, compiled once (k and i are traced)
        mean = model(u, k)
        noise = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i + 1), u.shape[1:]))(keys)
        return mean, mean + 0.03 * noise

    u = u_K
    for i, k in enumerate(range(SMALL.K, 0, -1)):
        np.testing.assert_allclose(np.asarray(trajectory[i]), np.asarray(u), atol=1e-6, rtol=0)
        mean, u = python_step(u, k, i)
    np.testing.assert_allclose(np.asarray(u_0), np.asarray(mean), atol=1e-6, rtol=0)


def test_a_samples_draws_do_not_depend_on_its_batch():
    u_K = jnp.asarray(photo((4, 8, 8, 1), seed=13), jnp.float32)
    keys = samplers.keys_from_seeds([0, 1, 2, 3])
    whole, _ = small_run(u_K, keys)
    part, _ = small_run(u_K[2:], keys[2:])
    np.testing.assert_allclose(np.asarray(part), np.asarray(whole)[2:], atol=1e-6)
    assert not np.allclose(np.asarray(whole)[0], np.asarray(whole)[1])


def test_sampler_delta_override_and_missing_key():
    u_K = jnp.asarray(photo((4, 8, 8, 1), seed=14), jnp.float32)
    with pytest.raises(ValueError, match='needs a key'):
        ihdm.sample(stand_in_model(5), u_K, process=SMALL)
    deterministic, _ = small_run(u_K, None, delta=0.0)
    noisy, _ = small_run(u_K, jax.random.key(0), delta=0.05)
    default, _ = small_run(u_K, jax.random.key(0))
    assert not np.allclose(np.asarray(deterministic), np.asarray(noisy))
    # delta = 0.05 vs the default 0.03, same draws: the deviation from the deterministic run
    # scales with delta (to first order; the stand-in network is nearly linear).
    ratio = np.abs(np.asarray(noisy - deterministic)).mean() / np.abs(np.asarray(default - deterministic)).mean()
    assert abs(ratio - 0.05 / 0.03) < 0.05
    with pytest.raises(ValueError, match='step_noise must have shape'):
        ihdm.sample(stand_in_model(5), u_K, process=SMALL, step_noise=jnp.zeros((3, 4, 8, 8, 1)))
