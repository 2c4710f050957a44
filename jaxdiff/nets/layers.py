"""Building blocks shared by the EDM networks (DDPM++, NCSN++, ADM), in Flax linen, NHWC.

Each layer computes the same function as its namesake in NVlabs/edm `training/networks.py`
(checked against arrays recorded with that code, see tests/nets/). Parameters use Flax names
and layouts (`kernel` HWIO for convolutions, `kernel` [in, out] for dense layers, `scale` for
normalisation); `jaxdiff.nets.convert` maps EDM's PyTorch state dicts onto them.

Precision: parameters are stored in `param_dtype` (float32). `dtype` is the compute dtype of
convolutions and matmuls; None computes in the input's dtype (so float64 inputs and params give
a float64 network, which the reference tests use). Normalisation statistics and attention
softmax always run in at least float32.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


# ---------------------------------------------------------------------------------------------
# Initialisation (EDM's `weight_init`): every mode is a fan-scaled uniform or normal draw,
# multiplied by `init_weight` (weights) or `init_bias` (biases).

def edm_init(mode: str, fan_in: int, fan_out: int, gain: float = 1.0):
    """Initializer for EDM's init modes.

    xavier_uniform:  sqrt(6 / (fan_in + fan_out)) * U(-1, 1)
    xavier_normal:   sqrt(2 / (fan_in + fan_out)) * N(0, 1)
    kaiming_uniform: sqrt(3 / fan_in) * U(-1, 1)
    kaiming_normal:  sqrt(1 / fan_in) * N(0, 1)
    """
    if mode == 'xavier_uniform':
        scale, uniform = np.sqrt(6 / (fan_in + fan_out)), True
    elif mode == 'xavier_normal':
        scale, uniform = np.sqrt(2 / (fan_in + fan_out)), False
    elif mode == 'kaiming_uniform':
        scale, uniform = np.sqrt(3 / fan_in), True
    elif mode == 'kaiming_normal':
        scale, uniform = np.sqrt(1 / fan_in), False
    else:
        raise ValueError(f'Invalid init mode {mode!r}')

    def init(key, shape, dtype=jnp.float32):
        if uniform:
            draw = jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
        else:
            draw = jax.random.normal(key, shape, dtype)
        return (scale * gain) * draw

    return init


def _compute_dtype(dtype: Dtype | None, *arrays) -> Dtype:
    return dtype if dtype is not None else jnp.result_type(*arrays)


# ---------------------------------------------------------------------------------------------

class Linear(nn.Module):
    """Fully-connected layer y = x W + b (EDM's `Linear`)."""
    features: int
    use_bias: bool = True
    init_mode: str = 'kaiming_normal'
    init_weight: float = 1.0
    init_bias: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param('kernel', edm_init(self.init_mode, fan_in, self.features, self.init_weight),
                            (fan_in, self.features), self.param_dtype)
        dtype = _compute_dtype(self.dtype, x, kernel)
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            bias = self.param('bias', edm_init(self.init_mode, fan_in, self.features, self.init_bias),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def resample_filter_2d(taps: Sequence[float]) -> np.ndarray:
    """Separable FIR filter f f^T / (sum f)^2 used for up/downsampling (EDM's `resample_filter`)."""
    f = np.asarray(taps, dtype=np.float64)
    return np.outer(f, f) / f.sum() ** 2


def _filter_axis(x, taps, axis: int, *, stride: int = 1, pad: tuple[int, int] = (0, 0)):
    """Correlate `x` with the 1-D filter `taps` along `axis` (zero padding, then stride):
    y[i] = sum_k taps[k] x_padded[stride i + k]. Written as shifted slices rather than a
    depthwise convolution, which XLA:CPU runs far slower (15 ms vs 0.1 ms for a 2x2 filter on
    a [128, 8, 8, 32] batch, forward and backward)."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = pad
    x = jnp.pad(x, widths)
    k = len(taps)
    n_out = (x.shape[axis] - k) // stride + 1
    out = 0
    for i, tap in enumerate(taps):
        window = jax.lax.slice_in_dim(x, i, i + stride * (n_out - 1) + 1, stride=stride, axis=axis)
        out = out + tap * window
    return out


def _dilate_axis(x, axis: int):
    """Insert a zero between neighbouring entries along `axis` (length n -> 2n - 1)."""
    stacked = jnp.stack([x, jnp.zeros_like(x)], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] *= 2
    return jax.lax.slice_in_dim(stacked.reshape(shape), 0, shape[axis] - 1, axis=axis)


def downsample_2x(x, taps: Sequence[float], padding: int):
    """Filter NHWC `x` with the separable f f^T / (sum f)^2 and keep every second pixel (EDM: a
    grouped conv2d with stride 2 and `padding` on each side)."""
    g = np.asarray(taps, np.float64) / np.sum(taps)
    g = [float(t) for t in g]
    for axis in (1, 2):
        x = _filter_axis(x, g, axis, stride=2, pad=(padding, padding))
    return x


def upsample_2x(x, taps: Sequence[float], padding: int):
    """Zero-insertion upsampling filtered by 4 f f^T / (sum f)^2 (EDM: a grouped conv_transpose2d,
    stride 2, `padding`): per axis, insert zeros, pad by k-1-padding and correlate with 2 flip(f)."""
    g = 2 * np.asarray(taps, np.float64)[::-1] / np.sum(taps)
    g = [float(t) for t in g]
    k = len(g)
    for axis in (1, 2):
        x = _filter_axis(_dilate_axis(x, axis), g, axis, pad=(k - 1 - padding, k - 1 - padding))
    return x


def _conv(x, kernel, padding: int):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((padding, padding), (padding, padding)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Conv2d(nn.Module):
    """2-D convolution with optional 2x up/downsampling by a FIR filter (EDM's `Conv2d`).

    `kernel_size=0` gives a pure resampling layer without weights. `fused_resample` applies the
    convolution before downsampling (or after upsampling) with the padding folded together, as
    EDM does for NCSN++'s residual encoder path.
    """
    features: int
    kernel_size: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: Sequence[float] = (1, 1)
    fused_resample: bool = False
    init_mode: str = 'kaiming_normal'
    init_weight: float = 1.0
    init_bias: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.up and self.down:
            raise ValueError('Conv2d cannot both upsample and downsample')
        cin, k = x.shape[-1], self.kernel_size
        kernel = bias = None
        if k:
            fan_in, fan_out = cin * k * k, self.features * k * k
            kernel = self.param('kernel', edm_init(self.init_mode, fan_in, fan_out, self.init_weight),
                                (k, k, cin, self.features), self.param_dtype)
            if self.use_bias:
                bias = self.param('bias', edm_init(self.init_mode, fan_in, fan_out, self.init_bias),
                                  (self.features,), self.param_dtype)
        dtype = _compute_dtype(self.dtype, x, *([kernel] if kernel is not None else []))
        x = x.astype(dtype)
        w = kernel.astype(dtype) if kernel is not None else None
        f = tuple(self.resample_filter) if (self.up or self.down) else None
        w_pad = k // 2
        f_pad = (len(f) - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = upsample_2x(x, f, padding=max(f_pad - w_pad, 0))
            x = _conv(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = _conv(x, w, padding=w_pad + f_pad)
            x = downsample_2x(x, f, padding=0)
        else:
            if self.up:
                x = upsample_2x(x, f, padding=f_pad)
            if self.down:
                x = downsample_2x(x, f, padding=f_pad)
            if w is not None:
                x = _conv(x, w, padding=w_pad)
        if bias is not None:
            x = x + bias.astype(dtype)
        return x


def _standardize(x, axes, eps):
    """(y, r): y = (x - mean) r, r = 1 / sqrt(var + eps), the moments over `axes` (biased variance)."""
    mean = x.mean(axis=axes, keepdims=True)
    r = jax.lax.rsqrt(jnp.square(x - mean).mean(axis=axes, keepdims=True) + eps)
    return (x - mean) * r, r


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def standardize(x, axes: tuple[int, ...], eps: float):
    """(x - mean) / sqrt(var + eps) over `axes` (biased variance), with the closed-form derivative

        dy = r (dx - mean(dx) - y mean(y dx)),   r = 1 / sqrt(var + eps), means over `axes`,

    a symmetric linear map, so the gradient is the same formula in g = dL/dy. Autodiff's trace
    through the two reductions gave XLA:CPU fused backward passes about twice as long; the
    digits preset's training step ran 4-7% faster with this (benchmarks/RESULTS.md §16)."""
    return _standardize(x, axes, eps)[0]


@standardize.defjvp
def _standardize_jvp(axes, eps, primals, tangents):
    (x,), (dx,) = primals, tangents
    y, r = _standardize(x, axes, eps)
    return y, r * (dx - dx.mean(axis=axes, keepdims=True) - y * (y * dx).mean(axis=axes, keepdims=True))


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups (EDM's `GroupNorm`).

    Statistics are computed in at least float32, whatever the compute dtype.
    """
    num_groups: int = 32
    min_channels_per_group: int = 4
    eps: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        groups = min(self.num_groups, c // self.min_channels_per_group)
        scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
        out_dtype = _compute_dtype(self.dtype, x)
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        xg = x.astype(stat_dtype).reshape(*x.shape[:-1], groups, c // groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        y = standardize(xg, axes, self.eps).reshape(x.shape)
        y = y * scale.astype(stat_dtype) + bias.astype(stat_dtype)
        return y.astype(out_dtype)


def attention(qkv, num_heads: int):
    """Multi-head self-attention over the pixels of an NHWC `qkv` tensor with 3C channels.

    Channel layout follows EDM: channel `h*(3C/heads) + 3c + {0: q, 1: k, 2: v}`. The softmax of
    q.k / sqrt(C/heads) is computed in at least float32; the output has C channels, head-major.
    """
    n, h, w, c3 = qkv.shape
    c = c3 // 3
    ch = c // num_heads
    qkv = qkv.reshape(n, h * w, num_heads, ch, 3)
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
    acc = jnp.promote_types(qkv.dtype, jnp.float32)
    # A Python float, not a numpy float64 scalar, which would promote the logits to float64 under x64.
    logits = jnp.einsum('nqhc,nkhc->nhqk', q.astype(acc), k.astype(acc) / float(np.sqrt(ch)))
    weights = jax.nn.softmax(logits, axis=-1).astype(qkv.dtype)
    out = jnp.einsum('nhqk,nkhc->nqhc', weights, v)
    return out.reshape(n, h, w, c)


class UNetBlock(nn.Module):
    """EDM's unified U-Net block: GroupNorm-SiLU-conv, embedding (additive or scale/shift),
    GroupNorm-SiLU-dropout-conv, skip connection scaled by `skip_scale`, optional self-attention.
    """
    features: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: int | None = None
    channels_per_head: int = 64
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: Sequence[float] = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True
    init_kw: dict | None = None        # EDM's `init`: init mode and gains of conv0/affine/skip
    init_zero_kw: dict | None = None   # EDM's `init_zero`: conv1 and proj
    init_attn_kw: dict | None = None   # EDM's `init_attn`: qkv (defaults to init_kw)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @property
    def heads(self) -> int:
        if not self.attention:
            return 0
        return self.num_heads if self.num_heads is not None else self.features // self.channels_per_head

    @nn.compact
    def __call__(self, x, emb, *, train: bool = False):
        init = dict(self.init_kw or {})
        init_zero = dict(self.init_zero_kw if self.init_zero_kw is not None else {'init_weight': 0.0})
        init_attn = dict(self.init_attn_kw if self.init_attn_kw is not None else init)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cin, cout = x.shape[-1], self.features

        orig = x
        x = nn.silu(GroupNorm(eps=self.eps, name='norm0', **common)(x))
        x = Conv2d(cout, 3, up=self.up, down=self.down, resample_filter=self.resample_filter,
                   name='conv0', **init, **common)(x)
        params = Linear(cout * (2 if self.adaptive_scale else 1), name='affine', **init, **common)(emb)
        params = params[:, None, None, :].astype(x.dtype)
        norm1 = GroupNorm(eps=self.eps, name='norm1', **common)
        if self.adaptive_scale:
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + norm1(x) * (scale + 1))
        else:
            x = nn.silu(norm1(x + params))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Conv2d(cout, 3, name='conv1', **init_zero, **common)(x)

        if cout != cin or self.up or self.down:
            kernel = 1 if (self.resample_proj or cout != cin) else 0
            orig = Conv2d(cout, kernel, up=self.up, down=self.down, resample_filter=self.resample_filter,
                          name='skip', **init, **common)(orig)
        x = (x + orig) * self.skip_scale

        if self.heads:
            qkv = Conv2d(cout * 3, 1, name='qkv', **init_attn, **common)(
                GroupNorm(eps=self.eps, name='norm2', **common)(x))
            a = attention(qkv, self.heads)
            x = (Conv2d(cout, 1, name='proj', **init_zero, **common)(a) + x) * self.skip_scale
        return x


def positional_embedding(x, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
    """Sinusoidal embedding [cos(x w_i), sin(x w_i)], w_i = (1/max_positions)^(i / (C/2 - endpoint))."""
    half = num_channels // 2
    freqs = np.arange(half, dtype=np.float64) / (half - (1 if endpoint else 0))
    freqs = (1 / max_positions) ** freqs
    x = jnp.outer(x, jnp.asarray(freqs, dtype=x.dtype))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2) (NCSN++).

    The frequencies are a constant of the network (a buffer in EDM): they live in `params` so
    they are saved and converted with the rest, but receive no gradient.
    """
    num_channels: int
    scale: float = 16.0
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        freqs = self.param('freqs', lambda key, shape, dtype: self.scale * jax.random.normal(key, shape, dtype),
                           (self.num_channels // 2,), self.param_dtype)
        freqs = jax.lax.stop_gradient(freqs)
        x = jnp.outer(x, (2 * np.pi * freqs).astype(x.dtype))
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)
