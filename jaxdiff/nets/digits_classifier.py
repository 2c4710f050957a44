"""A small CNN for sklearn's 8x8 handwritten digits, the feature network of the "digits FD".

Input: NHWC [N, 8, 8, 1] float images in [-1, 1] (pixel p in 0..16 maps to p / 8 - 1).
Output: `(features, logits)`, features [N, 64] from the penultimate layer (the Fréchet distance
is computed on them, as FID uses Inception's pool features) and logits [N, 10].

    conv3x3(32) -> silu -> conv3x3(64) -> silu -> avgpool2        8x8 -> 4x4
    conv3x3(64) -> silu -> avgpool2                               4x4 -> 2x2
    flatten(256) -> dense(64) -> silu = features -> dense(10) = logits

SiLU rather than ReLU so that no feature is exactly zero on a whole set of images (a dead unit
makes the feature covariance singular). No batch norm: inference is a pure function of the
parameters with no batch statistics to ship or to mis-set. 72,842 parameters; the weights
trained by `scripts/train_digits_classifier.py` ship as `jaxdiff/assets/digits_classifier.npz`
(load them with `jaxdiff.evaluate.load_digits_classifier`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """`__call__(x, train=False) -> (features, logits)`; dropout on the features when training
    (needs a 'dropout' rng)."""
    widths: tuple[int, int, int] = (32, 64, 64)
    feature_dim: int = FEATURE_DIM
    num_classes: int = NUM_CLASSES
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        x = nn.silu(nn.Conv(self.widths[0], (3, 3), name='conv1')(x))
        x = nn.silu(nn.Conv(self.widths[1], (3, 3), name='conv2')(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.silu(nn.Conv(self.widths[2], (3, 3), name='conv3')(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.silu(nn.Dense(self.feature_dim, name='features')(x))
        h = nn.Dropout(self.dropout, deterministic=not train)(features)
        logits = nn.Dense(self.num_classes, name='logits')(h)
        return features, logits


def init_params(module: DigitsClassifier, key: jax.Array) -> dict:
    """Fresh parameters for `module` (the `{'params': ...}` variables dict)."""
    # Jitted: op-by-op initialisation compiles every op separately, seconds on CPU.
    return jax.jit(module.init)(key, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))
