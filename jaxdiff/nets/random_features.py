"""Random-CNN features: a fixed, untrained convolutional network for scoring images that have no
trained feature network (the embedded photos and faces, any data set without the Inception weights).

Randomly initialised networks stand in for a trained embedding when none fits the data: Naeem et
al. 2020 ("Reliable Fidelity and Diversity Metrics for Generative Models", ICML, section 5) compute
precision, recall, density and coverage on a randomly initialised VGG16 and find them sensitive to
fidelity and diversity. This network is much smaller, and multiscale by construction:

    x: NHWC [N, H, W, C] float32 in [-1, 1], C = 1 or 3, H, W >= 16; C = 1 is repeated to 3
    stage 0:  h0 = |conv3x3(x, W0)|                    16 channels at H x W (W0 zero-mean taps)
    stage s:  hs = |conv3x3(avgpool2(h_{s-1}), Ws)|    s = 1, 2, 3: 32, 64, 64 channels at H/2^s
    features = [mean(x), std(x), mean(h0), std(h0), ..., mean(h3), std(h3)]

mean and std: per image and channel, over all spatial positions (population std, two passes);
mean(x), std(x) are of the input's own C channels. D = 2 (C + 16 + 32 + 64 + 64): 358 features for
RGB, 354 for one channel; the logits are [N, 0] (no classifier, so no Inception Score).
conv3x3: 'SAME' zero padding, stride 1, no bias. avgpool2: 2x2 mean, stride 2 (an odd last row or
column is dropped). Stage s sees structure 2^s pixels apart; the receptive field of stage 3 is
38 pixels.

Two choices make the features sensitive to what generated images get wrong:
- stage 0's kernels sum to zero over their 3x3 taps for every (input, output) channel, so stage 0
  responds to edges and texture, not to the local colour (which mean(x), std(x) carry); with
  unconstrained kernels (in a trial) the colour dominated every stage, and a 3x3 box blur of
  photo patches raised the FD only 1.3x above the real-vs-real FD (~30x with these kernels);
- the modulus |.|, as in scattering networks (Bruna & Mallat 2013): positively homogeneous, so a
  low-contrast image goes through the same regime as a high-contrast one (a smooth GELU stayed
  in its near-linear range on the small edge responses of photos: blur then raised the FD 8x
  above real-vs-real, against ~30x), and no unit is dead (|y| is constant on an image only where
  y is), so the feature covariance is full rank.
Measured on the 1,024 photo patches at 32 px (tests/nets/test_random_features.py): FD of 512
patches against the other 512, 0.039; against them blurred by 1, 2, 3 passes of a 3x3 box filter,
1.28, 1.94, 2.35; with Gaussian noise of std 0.05, 0.1, 0.2, 0.27, 1.93, 11.9. Speed (jit, CPU,
2 shared Xeon cores): 1,024 images in 1.2 s at 64 px, 4.6 s at 128 px.

The weights (`random_weights`) are drawn once, on the host, from numpy.random.default_rng(SEED)
(PCG64: the same stream on every platform; numpy does not promise it across versions (NEP 19), so
tests/nets/test_random_features.py pins weight values and fails on a numpy that draws others),
stage by stage, each [3, 3, C_in, C_out] float32, He-normal:

    W_s = z sqrt(2 / (9 C_in)),  z ~ N(0, 1);
    stage 0: z -> (z - mean_taps(z)) sqrt(9 / 8)   (zero-mean taps, the same variance).

No jax.random and no flax init: every machine has the same network, and the same features up to
the float32 rounding of the convolutions.

LIMITS, plainly. The network is untrained. Its features measure low-level image statistics:
colour, contrast, edges and textures at four scales. They do not measure semantics (what an image
shows, whether objects are well formed). Its Fréchet distance is "FD on random-CNN features", not
FID: it is not comparable with FID, nor with an FD on any other feature network, nor across
resolutions or data sets. Use it to compare runs with each other on one data set at one
resolution, against reference statistics made with this same network.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SEED = 2020  # numpy.random.default_rng(SEED) draws the weights
WIDTHS = (16, 32, 64, 64)  # output channels of stages 0..3
IN_CHANNELS = 3  # stage 0's input: one channel is repeated to three
MIN_SIZE = 16  # stage 3 is then 2x2


def feature_dim(channels: int = IN_CHANNELS) -> int:
    """D = 2 (C + sum(WIDTHS)): 358 for RGB, 354 for one channel."""
    return 2 * (channels + sum(WIDTHS))


def random_weights(seed: int = SEED, widths: tuple[int, ...] = WIDTHS) -> tuple[np.ndarray, ...]:
    """The conv kernels [3, 3, C_in, C_out] float32 of each stage (C_in = 3 at stage 0), drawn
    stage by stage from numpy.random.default_rng(seed): W_s = z sqrt(2 / (9 C_in)), z ~ N(0, 1),
    with z -> (z - mean_taps(z)) sqrt(9 / 8) at stage 0 (zero-mean 3x3 taps, unit variance)."""
    rng = np.random.default_rng(seed)
    kernels, c_in = [], IN_CHANNELS
    for s, c_out in enumerate(widths):
        z = rng.standard_normal((3, 3, c_in, c_out))
        if s == 0:
            z = (z - z.mean(axis=(0, 1), keepdims=True)) * np.sqrt(9 / 8)
        kernels.append((z * np.sqrt(2.0 / (9 * c_in))).astype(np.float32))
        c_in = c_out
    return tuple(kernels)


@functools.lru_cache(maxsize=1)
def _default_weights() -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(w) for w in random_weights())


def _mean_std(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per image and channel: mean and population standard deviation over H x W (two passes)."""
    mean = h.mean(axis=(1, 2))
    return mean, jnp.sqrt(jnp.square(h - mean[:, None, None]).mean(axis=(1, 2)))


def _avg_pool2(h: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') * 0.25


def _conv3x3(h: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(h, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@jax.jit
def network(weights: tuple[jax.Array, ...], x: jax.Array) -> jax.Array:
    """Features [N, 2 (C + sum(widths))] of images x [N, H, W, C] float32 (C = 1 or 3) with the
    kernels `weights`: mean and std of x, then of each stage |conv3x3(avgpool2(h))| (stage 0:
    |conv3x3(x repeated to 3 channels)|, unpooled)."""
    parts = list(_mean_std(x))
    h = jnp.broadcast_to(x, (*x.shape[:3], IN_CHANNELS))
    for s, kernel in enumerate(weights):
        h = jnp.abs(_conv3x3(h if s == 0 else _avg_pool2(h), kernel))
        parts.extend(_mean_std(h))
    return jnp.concatenate(parts, axis=1)


def random_features(x) -> tuple[jax.Array, jax.Array]:
    """(features [N, feature_dim(C)] float32, logits [N, 0]) of images x NHWC float32 in [-1, 1]
    with C = 1 or 3 channels and at least MIN_SIZE pixels a side, through the network of SEED
    (module docstring); jitted, one compilation per input shape."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, IN_CHANNELS):
        raise ValueError(f'random features need images [N, H, W, 1 or 3], got shape {x.shape}')
    if min(x.shape[1:3]) < MIN_SIZE:
        raise ValueError(f'data.resolution={min(x.shape[1:3])}: random features need images of at '
                         f'least {MIN_SIZE}x{MIN_SIZE} pixels (their last stage is 8x smaller)')
    return network(_default_weights(), x), jnp.zeros((x.shape[0], 0), jnp.float32)
