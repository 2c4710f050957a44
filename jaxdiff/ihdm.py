"""Inverse heat dissipation (IHDM; Rissanen, Heinonen & Solin, ICLR 2023).

Forward process: the heat equation du/dt = Laplacian(u) on the image rectangle with reflecting
(Neumann) boundaries, started from the image x and read at K+1 times t_0 = 0 < t_1 < ... < t_K.
In the orthonormal DCT-II basis it is diagonal:

    u_k = blur(x, k) = IDCT( exp(-lambda t_k) * DCT(x) ),  lambda_ij = (pi i / H)^2 + (pi j / W)^2
    t_k = sigma_k^2 / 2,   sigma_k = exp(linspace(log sigma_min, log sigma_max, K))[k - 1],  sigma_0 = 0

lambda_ij are the eigenvalues of the continuous Laplacian on [0, H] x [0, W] with zero normal
derivative for the cosine modes cos(pi i y / H) cos(pi j x / W), sampled at pixel centres: blur is
the exact heat flow of the image's cosine-series interpolant, which is a Gaussian blur of standard
deviation sigma_k pixels of the image reflected about its edges (half-sample symmetric). This is
the convention of the AaltoML code (`DCTBlur`: frequencies pi * arange(N) / N); it is *not* the
flow of the 5-point discrete Laplacian, whose eigenvalues 4 sin^2(pi i / 2H) + 4 sin^2(pi j / 2W)
agree with lambda only to leading order. level 0 is the identity (sigma_0 = 0); level 1 already
blurs with sigma_min = 0.5 pixels.

Generative model (paper Sec. 3): p(u_{k-1} | u_k) = N(mu(u_k, k), delta^2 I) with the network
predicting the less blurred image as a residual, mu(u_k, k) = u_k + f(u_k, k), trained by

    L = || blur(x, k-1) - mu(blur(x, k) + sigma eps, k) ||^2,   k ~ U{1, ..., K},  eps ~ N(0, I)

(sigma: the small training noise that makes the reverse conditionals well defined). Sampling
starts from the prior p(u_K), a Gaussian kernel density estimate on the maximally blurred training
images with bandwidth delta, and runs u_{k-1} = mu(u_k, k) + delta eps for k = K..1, returning the
last mean (the AaltoML sampler adds noise after the last step too but returns its mean).

Units: the paper's sigma = 0.01 and delta = 0.0125 (0.013 for its FID numbers) are for pixels in
[0, 1]. The blur commutes with the affine map to jaxdiff's [-1, 1] pixels (it keeps constants),
so the same model in [-1, 1] needs sigma = 0.02 and delta = 0.025 (0.026).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import dct
from jaxdiff import samplers
from jaxdiff.precond import FlaxNet

_HIGHEST = jax.lax.Precision.HIGHEST


def heat_eigenvalues(height: int, width: int) -> np.ndarray:
    """lambda_ij = (pi i / H)^2 + (pi j / W)^2, [H, W] float64: minus the Neumann Laplacian's
    eigenvalue of the DCT-II mode (i, j), in units of 1/pixel^2."""
    return (np.pi * np.arange(height) / height)[:, None] ** 2 + (np.pi * np.arange(width) / width)[None, :] ** 2


def blur_sigma_schedule(K: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """sigma_k for k = 0..K, float64: sigma_0 = 0 (the data), then K values log-spaced from
    sigma_min (k = 1) to sigma_max (k = K) -- the AaltoML `blur_schedule`, computed the same way."""
    return np.concatenate([[0.0], np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), K))])


@dataclasses.dataclass(frozen=True)
class HeatDissipation:
    """The IHDM process and its paper settings (defaults: CIFAR-10, pixels in [0, 1]).

    K: number of blur levels (steps). blur_sigma_min / blur_sigma_max: Gaussian-blur widths in
    pixels of levels 1 and K (t_k = sigma_k^2 / 2). training_noise: sigma of the loss.
    sampling_delta: delta, the sampler's per-step noise and the prior's bandwidth.
    train_on_level_K: draw training levels from {1..K} as the paper writes; False draws from
    {1..K-1}, as the AaltoML code does (`torch.randint(1, K)` excludes K), so that its first
    sampling step at level K is never trained.
    """
    K: int = 200
    blur_sigma_min: float = 0.5
    blur_sigma_max: float = 24.0
    training_noise: float = 0.01
    sampling_delta: float = 0.0125
    train_on_level_K: bool = True

    def __post_init__(self):
        if int(self.K) != self.K or self.K < 1 or (self.K < 2 and not self.train_on_level_K):
            raise ValueError(f'HeatDissipation.K must be an integer >= 1 (>= 2 when train_on_level_K '
                             f'is False), got {self.K}')
        if not 0 < self.blur_sigma_min <= self.blur_sigma_max:
            raise ValueError('HeatDissipation needs 0 < blur_sigma_min <= blur_sigma_max, got '
                             f'{self.blur_sigma_min}, {self.blur_sigma_max}')
        if self.training_noise < 0 or self.sampling_delta < 0:
            raise ValueError('HeatDissipation.training_noise and sampling_delta must be non-negative')

    def blur_sigmas(self) -> np.ndarray:
        """sigma_k, k = 0..K (float64, [K+1])."""
        return blur_sigma_schedule(self.K, self.blur_sigma_min, self.blur_sigma_max)

    def blur_times(self) -> np.ndarray:
        """t_k = sigma_k^2 / 2, k = 0..K (float64, [K+1])."""
        return self.blur_sigmas() ** 2 / 2

    def blur_scale(self, k, height: int, width: int, dtype=jnp.float32):
        """exp(-lambda t_k), the DCT-domain factor of level k: [H, W] for a scalar k, [N, H, W]
        for k of shape [N]. Evaluated in `dtype` (t_k and lambda are computed in float64 and cast)."""
        t = jnp.asarray(self.blur_times(), dtype)[jnp.asarray(k)]
        lam = jnp.asarray(heat_eigenvalues(height, width), dtype)
        return jnp.exp(-lam * t[..., None, None])

    def blur(self, x, k):
        """u_k = IDCT(exp(-lambda t_k) DCT(x)) for NHWC x; k a level (scalar or [N] integers)."""
        return _blur_dct(self, dct.dct2(x), k)


def _blur_dct(process: HeatDissipation, coefficients, k):
    """blur from given DCT coefficients [N, H, W, C] (so two levels share one forward DCT)."""
    h, w = coefficients.shape[-3:-1]
    scale = process.blur_scale(k, h, w, coefficients.dtype)
    scale = scale[..., None] if scale.ndim == 2 else scale[:, :, :, None]
    return dct.idct2(coefficients * scale)


# ---------------------------------------------------------------------------------------------
# The model.

def noise_label(k, dtype=jnp.float32):
    """The network's conditioning input for level k: k itself as a float, as in the AaltoML code,
    whose U-Net embeds the integer level with the sinusoidal timestep embedding. jaxdiff's ADM
    (`DhariwalUNet`) embeds its noise label with the same sinusoids, so it sees what theirs sees."""
    return jnp.asarray(k).astype(dtype)


class HeatModel(flax.struct.PyTreeNode):
    """mu(u_k, k) = u_k + f(u_k, k): the estimate of u_{k-1}, for one network and its parameters.

    Call as `model(u, k, labels=None)`: u NHWC, k a level (scalar or [N]). The network is any
    `net(params, x, noise_labels, class_labels, augment_labels)` that is a pytree (a
    `precond.FlaxNet`, or a `jax.tree_util.Partial`); only its first C output channels are used.
    A conditional network (label_dim > 0) called without labels gets zeros.
    """
    params: Any
    net: Callable
    label_dim: int = flax.struct.field(pytree_node=False, default=0)

    def __call__(self, u, k, labels=None):
        k = jnp.broadcast_to(jnp.asarray(k), (u.shape[0],))
        if self.label_dim and labels is None:
            labels = jnp.zeros((u.shape[0], self.label_dim), u.dtype)
        residual = self.net(self.params, u, noise_label(k, u.dtype), labels, None)
        return u + residual[..., :u.shape[-1]].astype(u.dtype)


def make_model(module, params, *, train: bool = False, dropout_key=None) -> HeatModel:
    """HeatModel of a jaxdiff Flax network (`module(x, noise_labels, class_labels,
    augment_labels, train=...)`) with `params`; `train=True` enables dropout from `dropout_key`."""
    if train and dropout_key is None:
        raise ValueError('make_model(train=True) needs a dropout_key')
    return HeatModel(params=params, net=FlaxNet(module, train, dropout_key), label_dim=getattr(module, 'label_dim', 0))


def model_from_fn(fn: Callable, params: Any = None, label_dim: int = 0) -> HeatModel:
    """HeatModel of a plain residual function `fn(params, u, noise_labels, class_labels,
    augment_labels)`."""
    return HeatModel(params=params, net=jax.tree_util.Partial(fn), label_dim=label_dim)


# ---------------------------------------------------------------------------------------------
# Training.

def training_levels(process: HeatDissipation, key, n: int):
    """n levels k ~ U{1..K} (U{1..K-1} when not process.train_on_level_K), int32."""
    high = process.K + 1 if process.train_on_level_K else process.K
    return jax.random.randint(key, (n,), 1, high, dtype=jnp.int32)


def ihdm_loss(model, images, key=None, labels=None, *, process: HeatDissipation, k=None, noise=None):
    """(blur(x, k-1) - model(blur(x, k) + sigma eps, k))^2, per element (not reduced).

    k ~ `training_levels` and eps ~ N(0, I) are drawn from `key` unless given (k: [N] integers,
    noise: unit normal of the images' shape), so tests can feed recorded draws. The sum over
    elements, averaged over the batch, is the AaltoML training objective.
    """
    if key is None and (k is None or noise is None):
        raise ValueError('pass a key, or both the levels k and the noise')
    key_k, key_noise = jax.random.split(key) if key is not None else (None, None)
    n = images.shape[0]
    k = training_levels(process, key_k, n) if k is None else jnp.broadcast_to(jnp.asarray(k, jnp.int32), (n,))
    noise = jax.random.normal(key_noise, images.shape, images.dtype) if noise is None else noise
    coefficients = dct.dct2(images)
    u_k = _blur_dct(process, coefficients, k) + process.training_noise * noise
    target = _blur_dct(process, coefficients, k - 1)
    return jnp.square(target - model(u_k, k, labels))


# ---------------------------------------------------------------------------------------------
# The prior p(u_K).

class HeatPrior(flax.struct.PyTreeNode):
    """Gaussian KDE on maximally blurred training images: p(u_K) = (1/M) sum_i N(blur(x_i, K),
    bandwidth^2 I).

    The centres are kept as their lowest h x w DCT coefficients ([M, h, w, C]): at level K the
    heat flow leaves only a few frequencies (3 x 3 for CIFAR-10 and MNIST), so storing them
    instead of images costs ~1/100 of the memory. `fit_prior` drops only coefficients whose factor
    exp(-lambda t_K) is below its `tol`.
    """
    coefficients: jax.Array
    bandwidth: Any
    image_shape: tuple = flax.struct.field(pytree_node=False)

    @property
    def num_centres(self) -> int:
        return self.coefficients.shape[0]

    def centres(self, index=None):
        """blur(x_i, K) for the training images i in `index` (all by default), NHWC."""
        coefficients = self.coefficients if index is None else self.coefficients[index]
        ch, cw = _low_frequency_bases(self.image_shape, coefficients.shape[1:3], coefficients.dtype)
        return jnp.einsum('kh,nklc,lw->nhwc', ch, coefficients, cw, precision=_HIGHEST)


def _low_frequency_bases(image_shape, block_shape, dtype):
    (height, width), (h, w) = image_shape, block_shape
    return (jnp.asarray(dct.dct_matrix(height, np.float64)[:h], dtype),
            jnp.asarray(dct.dct_matrix(width, np.float64)[:w], dtype))


def fit_prior(process: HeatDissipation, images, *, bandwidth: float | None = None, tol: float = 1e-7,
              batch_size: int = 4096, dtype=np.float32) -> HeatPrior:
    """The prior fitted on training `images` [M, H, W, C] (host arrays; done once, in float64).

    bandwidth: the KDE's standard deviation; None takes process.sampling_delta, the paper's
    choice (the AaltoML FID sampler starts from blur(x_i, K) + delta eps).
    tol: frequencies i (rows) and j (columns) are kept while exp(-(pi i/H)^2 t_K) > tol (resp. for
    j), so every dropped coefficient has a factor <= tol and each centre is exact to
    tol * ||x_i||_2 in the L2 norm.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f'fit_prior expects [M, H, W, C] images, got shape {images.shape}')
    height, width = images.shape[1:3]
    t_K = process.blur_times()[-1]
    row = np.exp(-(np.pi * np.arange(height) / height) ** 2 * t_K)
    col = np.exp(-(np.pi * np.arange(width) / width) ** 2 * t_K)
    # The factors decrease with the frequency, so the kept set is a leading block.
    h, w = max(1, int(np.sum(row > tol))), max(1, int(np.sum(col > tol)))
    ch = dct.dct_matrix(height, np.float64)[:h]
    cw = dct.dct_matrix(width, np.float64)[:w]
    scale = (row[:h, None] * col[None, :w])[None, :, :, None]
    blocks = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].astype(np.float64)
        x = np.tensordot(ch, x, axes=([1], [1]))                      # [h, n, W, C]
        x = np.tensordot(cw, x, axes=([1], [2]))                      # [w, h, n, C]
        blocks.append((np.transpose(x, (2, 1, 0, 3)) * scale).astype(dtype))
    bandwidth = process.sampling_delta if bandwidth is None else bandwidth
    return HeatPrior(coefficients=jnp.asarray(np.concatenate(blocks)), bandwidth=float(bandwidth),
                     image_shape=(height, width))


@functools.partial(jax.jit, static_argnames=('n',))
def sample_prior(prior: HeatPrior, key, n: int):
    """n draws u_K ~ p(u_K): a uniformly chosen centre plus bandwidth * N(0, I), NHWC."""
    key_index, key_noise = jax.random.split(key)
    index = jax.random.randint(key_index, (n,), 0, prior.num_centres)
    centres = prior.centres(index)
    return centres + prior.bandwidth * jax.random.normal(key_noise, centres.shape, centres.dtype)


# ---------------------------------------------------------------------------------------------
# Sampling.

def sample(model, u_K, key=None, labels=None, *, process: HeatDissipation, delta: float | None = None,
           step_noise=None, return_trajectory: bool = False):
    """u_0 from u_K by u_{k-1} = model(u_k, k) + delta eps_k for k = K..1 (jit-compiled lax.scan).

    The last step returns the mean model(u_1, 1) without noise, as the AaltoML sampler does.
    model: `model(u, k, labels)` -> estimate of u_{k-1}, e.g. a `HeatModel`; a plain function is
      wrapped (and then compiled per function).
    u_K: the initial state, e.g. from `sample_prior`.
    delta: the per-step noise (default process.sampling_delta); a traced value, so sweeping it
      does not recompile.
    key: one key per sample ([N], e.g. `samplers.keys_from_seeds`) or one key (split into N);
      step k's noise of sample n comes from fold_in(keys[n], K - k + 1), so a sample's draws do not
      depend on its batch. Not needed when delta = 0 or `step_noise` is given.
    step_noise: optional [K, *u_K.shape] unit noise, row i used after the step at k = K - i
      (the last row is never used).
    return_trajectory: also return the state at the start of every step, [K, *u_K.shape]
      (u_K, ..., u_1).
    """
    delta = process.sampling_delta if delta is None else delta
    if step_noise is not None:
        if step_noise.shape != (process.K,) + u_K.shape:
            raise ValueError(f'step_noise must have shape {(process.K,) + u_K.shape}, got {step_noise.shape}')
        keys = None
    elif isinstance(delta, (int, float)) and delta == 0:
        keys = None
    else:
        if key is None:
            raise ValueError('sampling with delta > 0 needs a key or step_noise')
        keys = jax.random.split(key, u_K.shape[0]) if jnp.ndim(key) == 0 else key
    return _sample(_as_pytree(model), u_K, jnp.asarray(delta, u_K.dtype), keys, labels,
                   step_noise, process=process, return_trajectory=return_trajectory)


def _as_pytree(model):
    """Models cross the jit boundary as pytrees; a plain function is wrapped (static, by identity)."""
    leaves = jax.tree_util.tree_leaves(model)
    return jax.tree_util.Partial(model) if len(leaves) == 1 and leaves[0] is model else model


@functools.partial(jax.jit, static_argnames=('process', 'return_trajectory'))
def _sample(model, u_K, delta, keys, labels, step_noise, *, process, return_trajectory):
    levels = jnp.arange(process.K, 0, -1, dtype=jnp.int32)
    steps = jnp.arange(process.K)

    def step(u, inputs):
        k, i, given = inputs
        mean = model(u, k, labels)
        if given is not None:
            noise = given
        elif keys is not None:
            noise = samplers.step_noise_from_keys(keys, i, u.shape[1:], u.dtype)[0]
        else:
            noise = jnp.zeros((), u.dtype)
        # No noise after the last step (k = 1): the result is its mean.
        u_next = mean + jnp.where(k > 1, delta, jnp.zeros((), u.dtype)) * noise
        return u_next, (u if return_trajectory else None)

    u_0, trajectory = jax.lax.scan(step, u_K, (levels, steps, step_noise))
    return (u_0, trajectory) if return_trajectory else u_0
