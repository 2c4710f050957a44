"""The FID Inception-v3 in Flax linen, NHWC: TF's 2015-12-05 graph as ported by pytorch-fid.

FID (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017) and the Inception Score (Salimans et al., "Improved Techniques for
Training GANs", NeurIPS 2016) are defined on one particular network: the Inception-v3 graph of
TensorFlow's `inception-2015-12-05.tgz`. pytorch-fid (`pytorch_fid/inception.py`,
`fid_inception_v3`) ports it to PyTorch as torchvision's `Inception3` with 1008 classes, no
auxiliary head, and four patched blocks; this module computes the same function:

* `BasicConv2d`: conv (no bias) -> BatchNorm (eps 0.001, running statistics) -> ReLU.
* Stem: 3x3/2 conv 32, 3x3 conv 32, 3x3 conv 64 (pad 1), 3x3/2 max pool, 1x1 conv 80,
  3x3 conv 192, 3x3/2 max pool.
* Mixed_5b/5c/5d `FIDInceptionA`, Mixed_6a `InceptionB`, Mixed_6b..6e `FIDInceptionC`,
  Mixed_7a `InceptionD`, Mixed_7b `FIDInceptionE` with average pooling (pytorch-fid's
  FIDInceptionE_1), Mixed_7c `FIDInceptionE` with max pooling (FIDInceptionE_2).
  The FID patches: every 3x3 average pool in a pool branch excludes the zero padding from its
  count (TF's average pool), and the last block max-pools where torchvision average-pools.
* pool3 = spatial mean of Mixed_7c, [N, 2048] (the FID features); logits = fc(pool3),
  [N, 1008] (softmax of these gives the Inception Score's class probabilities).

Input convention (pytorch-fid's): float NHWC RGB images in [0, 1] of any size. They are
resized to 299x299 with bilinear interpolation, half-pixel centres and no antialiasing
(`F.interpolate(mode='bilinear', align_corners=False)`, see `resize_bilinear`), then mapped
to [-1, 1] by 2x - 1. `inception_features_uint8` takes uint8 images (x / 255 as torchvision's
`ToTensor`, what pytorch-fid feeds its network from image files). jaxdiff samples in [-1, 1]
are usually quantised to uint8 first, as published FIDs are computed on saved images.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a torch state dict), read
without torch by `jaxdiff.nets.edm_pickle.load_torch_state_dict`, or an .npz made from it by
`convert_inception_weights` / `python -m jaxdiff.nets.inception --convert IN.pth OUT.npz`.
Nothing is downloaded. The file is checked by SHA-256 against FID_WEIGHTS_SHA256 (see there).

Parameters use Flax names and layouts under the state-dict names (`Mixed_6b.branch7x7_2.conv.
weight` [O, I, kh, kw] -> `Mixed_6b/branch7x7_2/conv/kernel` [kh, kw, I, O]; `bn.weight`,
`bn.bias`, `bn.running_mean`, `bn.running_var` -> `bn/scale`, `bn/bias`, `bn/mean`, `bn/var`;
`fc.weight` [1008, 2048] -> `fc/kernel` [2048, 1008]). Inference only: the BatchNorm running
statistics are ordinary entries of the one `params` pytree. Convolutions and the fc layer run
at `Precision.HIGHEST`, so that float32 features do not depend on an accelerator's default
reduced-precision (bf16/TF32) matmuls.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import zipfile
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.nets.edm_pickle import EDMPickleError, load_torch_state_dict  # numpy only, no torch

__all__ = [
    'FID_WEIGHTS_URL', 'FID_WEIGHTS_NAME', 'FID_WEIGHTS_SHA256', 'INPUT_SIZE', 'NUM_FEATURES',
    'NUM_LOGITS', 'InceptionWeightsError', 'FIDInceptionV3', 'resize_bilinear', 'preprocess',
    'inception_features', 'inception_features_uint8', 'state_dict_shapes',
    'params_from_state_dict', 'load_inception_params', 'convert_inception_weights',
    'file_sha256',
]

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   + FID_WEIGHTS_NAME)
# SHA-256 of FID_WEIGHTS_NAME. pytorch-fid publishes only the first 8 hex digits (torch hub's
# file-name convention, checked by `load_state_dict_from_url(check_hash=True)`); the full digest
# is the one recorded independently by several public projects that pin this file, and it
# starts with those 8 digits. The maintainers themselves publish no full digest.
FID_WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'

INPUT_SIZE = 299
NUM_FEATURES = 2048
NUM_LOGITS = 1008
BN_EPS = 1e-3  # TF's batch-norm epsilon, kept by torchvision's BasicConv2d.

# Name of the string entry of a converted .npz that records the SHA-256 of its source .pth.
_NPZ_SOURCE_KEY = '__source_sha256__'


class InceptionWeightsError(ValueError):
    """A weights file that is not (a faithful conversion of) the expected Inception state dict."""


# ---------------------------------------------------------------------------------------------
# Input pipeline.

def _linear_taps(in_size: int, out_size: int):
    """Source indices i0, i1 and weights w0, w1 of 1-D linear resizing, half-pixel centres.

    src = max((i + 0.5) * s - 0.5, 0) with s = in/out rounded to float32, i0 = floor(src),
    i1 = min(i0 + 1, in - 1), w1 = src - i0, w0 = 1 - w1: the clamp at 0 and the repeated
    last index extend the border pixels. No antialiasing: when downsampling, each output still
    reads only its two nearest inputs (jax.image.resize widens the kernel instead, a different
    function). src is rounded to float32 once, from the exact value of s (i + 0.5) - 0.5, as the
    fused multiply-add of ATen's vectorised CPU and CUDA builds gives it (the product of two
    float32 is exact in float64, and so is the difference wherever src >= 0): the weights then
    equal torch's bit for bit.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, (np.float32(1) - w1), w1


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:  # ATen copies; the formula would give w0 = 1, w1 = 0 anyway.
        return x
    i0, i1, w0, w1 = _linear_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w0, w1 = (jnp.asarray(w, x.dtype).reshape(shape) for w in (w0, w1))
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode='bilinear', align_corners=False)` for NHWC float images.

    Separable, as ATen's CPU kernel: out = wh0 (ww0 x00 + ww1 x01) + wh1 (ww0 x10 + ww1 x11),
    the width pass first. The weights are torch's exactly; the sums may round differently
    where a compiler fuses a multiply-add on one side and not on the other (torch's own
    builds differ there), so results agree to a couple of float32 ulps, not always bit for bit.
    """
    if images.ndim != 4:
        raise ValueError(f'expected NHWC images, got shape {images.shape}')
    x = _resize_axis(images, 2, size[1])
    return _resize_axis(x, 1, size[0])


def preprocess(images: jax.Array) -> jax.Array:
    """Network input from float NHWC images in [0, 1]: resized to 299x299, then 2x - 1."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'expected NHWC RGB images [N, H, W, 3], got shape {images.shape}')
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f'expected float images in [0, 1], got {images.dtype} (uint8 images go '
                        f'through inception_features_uint8)')
    x = resize_bilinear(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
    return 2 * x - 1


# ---------------------------------------------------------------------------------------------
# Network.

_HIGHEST = jax.lax.Precision.HIGHEST


class BatchNorm(nn.Module):
    """Inference-mode `BatchNorm2d(eps=0.001)`: y = (x - mean) / sqrt(var + eps) * scale + bias.

    Evaluated as ATen does on CPU, y = x * a + b with a = scale / sqrt(var + eps) and
    b = bias - mean * a per channel. The running statistics are parameters: nothing is trained.
    """
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param('mean', nn.initializers.zeros, (c,), jnp.float32)
        var = self.param('var', nn.initializers.ones, (c,), jnp.float32)
        a = scale * jax.lax.rsqrt(var + self.eps)
        return x * a + (bias - mean * a)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU, torchvision's `BasicConv2d`."""
    features: int
    kernel_size: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                    name='conv')(x)
        return nn.relu(BatchNorm(name='bn')(x))


def _avg_pool_3x3(x):
    # TF's average pool (the FID patch): the zero padding is not counted in the mean.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class FIDInceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1, concatenated."""
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name='branch1x1')(x)
        b5 = BasicConv2d(48, name='branch5x5_1')(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
        b3 = BasicConv2d(64, name='branch3x3dbl_1')(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
        bp = BasicConv2d(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (unpatched): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | 3x3/2 max pool; 35x35 -> 17x17."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=2, name='branch3x3')(x)
        bd = BasicConv2d(64, name='branch3x3dbl_1')(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions as 1x7 and 7x1 pairs, avg-pool branch."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row = dict(kernel_size=(1, 7), padding=(0, 3))
        col = dict(kernel_size=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, name='branch1x1')(x)
        b7 = BasicConv2d(c7, name='branch7x7_1')(x)
        b7 = BasicConv2d(c7, **row, name='branch7x7_2')(b7)
        b7 = BasicConv2d(192, **col, name='branch7x7_3')(b7)
        bd = BasicConv2d(c7, name='branch7x7dbl_1')(x)
        bd = BasicConv2d(c7, **col, name='branch7x7dbl_2')(bd)
        bd = BasicConv2d(c7, **row, name='branch7x7dbl_3')(bd)
        bd = BasicConv2d(c7, **col, name='branch7x7dbl_4')(bd)
        bd = BasicConv2d(192, **row, name='branch7x7dbl_5')(bd)
        bp = BasicConv2d(192, name='branch_pool')(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (unpatched): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool; 17 -> 8."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name='branch3x3_1')(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name='branch3x3_2')(b3)
        b7 = BasicConv2d(192, name='branch7x7x3_1')(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (`pool='avg'`, FIDInceptionE_1) and Mixed_7c (`pool='max'`, FIDInceptionE_2).

    1x1 | 1x1 -> (1x3 ; 3x1) | 1x1 -> 3x3 -> (1x3 ; 3x1) | pool -> 1x1. TF's graph max-pools
    in the last block (pytorch-fid's E_2 patch); the pool is 3x3, stride 1, padding 1.
    """
    pool: str = 'avg'

    @nn.compact
    def __call__(self, x):
        row = dict(kernel_size=(1, 3), padding=(0, 1))
        col = dict(kernel_size=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(320, name='branch1x1')(x)
        b3 = BasicConv2d(384, name='branch3x3_1')(x)
        b3 = jnp.concatenate([BasicConv2d(384, **row, name='branch3x3_2a')(b3),
                              BasicConv2d(384, **col, name='branch3x3_2b')(b3)], axis=-1)
        bd = BasicConv2d(448, name='branch3x3dbl_1')(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate([BasicConv2d(384, **row, name='branch3x3dbl_3a')(bd),
                              BasicConv2d(384, **col, name='branch3x3dbl_3b')(bd)], axis=-1)
        if self.pool == 'avg':
            pooled = _avg_pool_3x3(x)
        elif self.pool == 'max':  # Padding counts as -inf, as in F.max_pool2d.
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f'pool must be "avg" or "max", not {self.pool!r}')
        bp = BasicConv2d(192, name='branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """`__call__(x) -> (pool3 [N, 2048], logits [N, 1008])` for network inputs x in [-1, 1].

    x is NHWC, normally `preprocess(images)` (299x299); the layers are fully convolutional, so
    any size of at least 75x75 runs, but only 299x299 is the FID network.
    """

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
        x = BasicConv2d(32, (3, 3), name='Conv2d_2a_3x3')(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, name='Conv2d_3b_1x1')(x)
        x = BasicConv2d(192, (3, 3), name='Conv2d_4a_3x3')(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, name='Mixed_5b')(x)
        x = FIDInceptionA(64, name='Mixed_5c')(x)
        x = FIDInceptionA(64, name='Mixed_5d')(x)
        x = InceptionB(name='Mixed_6a')(x)
        x = FIDInceptionC(128, name='Mixed_6b')(x)
        x = FIDInceptionC(160, name='Mixed_6c')(x)
        x = FIDInceptionC(160, name='Mixed_6d')(x)
        x = FIDInceptionC(192, name='Mixed_6e')(x)
        x = InceptionD(name='Mixed_7a')(x)
        x = FIDInceptionE('avg', name='Mixed_7b')(x)
        x = FIDInceptionE('max', name='Mixed_7c')(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_LOGITS, precision=_HIGHEST, name='fc')(pool)
        return pool, logits


# ---------------------------------------------------------------------------------------------
# Feature functions. The resize is compiled per input shape (cheap); the network once per batch
# size, whatever the image size, since its input is always 299x299.

_preprocess = jax.jit(preprocess)


@jax.jit
def _network(params, x):
    return FIDInceptionV3().apply({'params': params}, x)


def inception_features(params, images) -> tuple[jax.Array, jax.Array]:
    """(pool3 [N, 2048], logits [N, 1008]), float32, of float NHWC RGB images in [0, 1].

    `params` from `load_inception_params`. Any image size; call it on batches of a fixed size to
    reuse the compiled network (each new batch size compiles it again: 15-20 s on a CPU).
    """
    return _network(params, _preprocess(jnp.asarray(images)))


# torchvision's ToTensor divides by 255 in float32. XLA turns a division by a constant into a
# multiplication by its rounded reciprocal (1 ulp off for half the values), so the 256
# correctly rounded quotients are looked up instead.
_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


@jax.jit
def _uint8_to_unit(images):
    return jnp.asarray(_UINT8_TO_UNIT)[images]


def inception_features_uint8(params, images) -> tuple[jax.Array, jax.Array]:
    """`inception_features` of uint8 NHWC RGB images (0..255, read as x / 255)."""
    images = jnp.asarray(images)
    if images.dtype != jnp.uint8:
        raise TypeError(f'expected uint8 images, got {images.dtype}')
    return inception_features(params, _uint8_to_unit(images))


# ---------------------------------------------------------------------------------------------
# State dicts.

_BN_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean', 'running_var': 'var'}
_FLAX_BN_LEAVES = {v: k for k, v in _BN_LEAVES.items()}


@functools.lru_cache(maxsize=None)  # Tracing the network takes seconds; the answer is fixed.
def _flax_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    flat = jax.tree_util.tree_flatten_with_path(shapes['params'])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _torch_name(path: tuple[str, ...]) -> str:
    *module, leaf = path
    if module[-1] == 'bn':
        leaf = _FLAX_BN_LEAVES[leaf]
    elif leaf == 'kernel':
        leaf = 'weight'
    return '.'.join((*module, leaf))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == 'kernel':  # HWIO -> OIHW, [in, out] -> [out, in].
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return shape


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """{state-dict name: torch shape} of every parameter and running statistic the network uses.

    The names of pytorch-fid's `fid_inception_v3().state_dict()`, less the BatchNorm
    `num_batches_tracked` counters (accepted and ignored by `params_from_state_dict`).
    """
    return {_torch_name(p): _torch_shape(p, s) for p, s in _flax_param_shapes().items()}


def _listed(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f' and {len(names) - limit} more' if len(names) > limit else ''
    return ', '.join(names[:limit]) + more


def params_from_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """Flax `params` of `FIDInceptionV3` from a pytorch-fid Inception state dict (numpy arrays).

    Every name and shape is checked: a missing, unexpected or misshapen entry raises
    `InceptionWeightsError` naming it. `*.bn.num_batches_tracked` entries (training counters)
    may be present or not and are dropped.
    """
    shapes = {_torch_name(p): (p, s) for p, s in _flax_param_shapes().items()}
    counter = 'num_batches_tracked'
    counters = {k for k in state_dict
                if k.endswith('.bn.' + counter) and k[:-len(counter)] + 'weight' in shapes}
    names = set(state_dict) - counters
    problems = []
    if missing := set(shapes) - names:
        problems.append(f'missing {_listed(missing)}')
    if extra := names - set(shapes):
        problems.append(f'unexpected {_listed(extra)}')
    params: dict = {}
    for name in sorted(names & set(shapes)):
        path, shape = shapes[name]
        value = np.asarray(state_dict[name])
        if value.shape != _torch_shape(path, shape):
            problems.append(f'{name} has shape {value.shape}, expected '
                            f'{_torch_shape(path, shape)}')
            continue
        if not np.issubdtype(value.dtype, np.floating):
            problems.append(f'{name} has dtype {value.dtype}, expected a float tensor')
            continue
        if path[-1] == 'kernel':
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
    if problems:
        raise InceptionWeightsError('not a pytorch-fid FID Inception-v3 state dict: '
                                    + '; '.join(problems))
    return params


# ---------------------------------------------------------------------------------------------
# Files.

def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _missing_file_message(path: str) -> str:
    return (f'Inception-v3 FID weights not found at {path!r}. jaxdiff downloads nothing: get '
            f'pytorch-fid\'s {FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL} (or the copy torch hub '
            f'keeps in ~/.cache/torch/hub/checkpoints/), then pass its path: '
            f'load_inception_params(path), or convert it once with '
            f'`python -m jaxdiff.nets.inception --convert {FID_WEIGHTS_NAME} inception.npz` '
            f'and pass the .npz.')


def _check_digest(path: str, actual: str, expected: str | None, what: str = 'has') -> None:
    if expected is not None and actual != expected.lower():
        raise InceptionWeightsError(
            f'{path} {what} SHA-256 {actual}, not {expected} of pytorch-fid\'s '
            f'{FID_WEIGHTS_NAME} ({FID_WEIGHTS_URL}): a different or damaged file. Pass '
            f'sha256=None to load other Inception weights deliberately.')


def _is_npz(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False  # A legacy-format torch file.
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return bool(names) and all(n.endswith('.npy') for n in names)


def _read_state_dict(path: str, sha256: str | None) -> tuple[dict, str]:
    """(state dict, SHA-256 of the .pth it came from) of a .pth or a converted .npz."""
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(path))
    if _is_npz(path):
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        source = data.pop(_NPZ_SOURCE_KEY, None)
        source = str(source) if source is not None else None
        if sha256 is not None and source is None:
            raise InceptionWeightsError(
                f'{path} does not record the SHA-256 of the .pth it was converted from (make it '
                f'with convert_inception_weights), or pass sha256=None to load it unchecked.')
        _check_digest(path, source, sha256, 'was converted from a file with')
        return data, source
    digest = file_sha256(path)
    _check_digest(path, digest, sha256)
    try:
        return load_torch_state_dict(path), digest
    except EDMPickleError as exc:
        raise InceptionWeightsError(f'not a readable torch state dict: {exc}') from exc


def load_inception_params(path: str | os.PathLike, *, sha256: str | None = FID_WEIGHTS_SHA256):
    """FID Inception-v3 `params` (jax arrays) from pytorch-fid's .pth or a converted .npz.

    `sha256` is the expected digest of the .pth (for an .npz, of the .pth it was converted from,
    as recorded in it); None skips the check, for other weights of the same architecture.
    Raises FileNotFoundError (saying where the file comes from) for a missing path and
    InceptionWeightsError for a wrong digest or a state dict of another shape.
    """
    state_dict, _ = _read_state_dict(os.fspath(path), sha256)
    return jax.tree.map(jnp.asarray, params_from_state_dict(state_dict))


def convert_inception_weights(pth: str | os.PathLike, npz: str | os.PathLike, *,
                              sha256: str | None = FID_WEIGHTS_SHA256) -> str:
    """Write the state dict of `pth` (checked by digest, names and shapes) to `npz`.

    The .npz keeps the state-dict names and torch layouts (so loading it checks it like the
    .pth) plus the SHA-256 of the source file. Returns the .npz path.
    """
    pth, npz = os.fspath(pth), os.fspath(npz)
    state_dict, digest = _read_state_dict(pth, sha256)
    params_from_state_dict(state_dict)  # Refuse to write a file that would not load.
    arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    with open(npz, 'wb') as f:  # A file object: np.savez would append .npz to another suffix.
        np.savez(f, **arrays, **{_NPZ_SOURCE_KEY: np.array(digest)})
    return npz


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m jaxdiff.nets.inception',
        description=f'Convert pytorch-fid\'s {FID_WEIGHTS_NAME} (from {FID_WEIGHTS_URL}) to an '
                    f'.npz that jaxdiff loads without torch.')
    parser.add_argument('--convert', nargs=2, metavar=('IN.pth', 'OUT.npz'), required=True)
    parser.add_argument('--no-check-sha256', action='store_true',
                        help='accept weights other than the official file')
    args = parser.parse_args(argv)
    src, dst = args.convert
    try:
        convert_inception_weights(src, dst, sha256=None if args.no_check_sha256 else
                                  FID_WEIGHTS_SHA256)
    except (FileNotFoundError, InceptionWeightsError) as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 1
    print(f'wrote {dst} (source SHA-256 {file_sha256(src)})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
