"""The ConvNeXt U-Net of the "DDPM from scratch" tutorials (their `TwoResUNet`), in Flax linen, NHWC.

The tutorials build a small DDPM denoiser from ConvNeXt blocks (Z. Liu et al., "A ConvNet for the
2020s", CVPR 2022: a depthwise 7x7 conv followed by a widening and a narrowing conv) arranged as
a U-Net with two skip connections per stage. This module computes the tutorial network's function
(the tests compare it with a PyTorch module written from the same description, see
tests/data/make_convnext_refs.py), with a class-label embedding added for guidance.

Architecture (C = model_channels, widths w_0 = C, w_{l+1} = C * channel_mult[l], L = len(channel_mult)):

  Embedding   [sin(t f_i), cos(t f_i)], f_i = 10000^(-i / (C/2 - 1)), i < C/2 (the sine half
              first, the last frequency exactly 1/10000) -> Dense(4C) -> GELU -> Dense(4C) = emb;
              with label_dim > 0, + a bias-free Dense(4C) of the one-hot class labels (all zeros
              is the null label of classifier-free guidance; labels are dropped by the training
              loss, not here).
  Encoder     a 7x7 conv (in_channels -> C), kept as r. Stage l (width w_l -> w_{l+1}): two
              ConvNeXt blocks of width w_l, each output kept as a skip; then, except at the last
              stage, space-to-depth (2x2 pixels -> 4 w_l channels, channel c*4 + 2*dy + dx as
              einops' "(c p1 p2)") + 1x1 conv to w_{l+1}; the last stage instead ends with a 3x3
              conv to w_L at the same resolution, as the tutorial does. So the lowest resolution
              is img_resolution / 2^(L-1), not / 2^L.
  Middle      two ConvNeXt blocks of width w_L.
  Decoder     stage l = L-1, ..., 0: two ConvNeXt blocks (w_{l+1} + w_l -> w_{l+1}), each fed
              concat(x, skip) with the skips popped in reverse order; then, except at stage 0,
              nearest 2x upsampling + 3x3 conv to w_l; stage 0 ends with a 3x3 conv to w_0.
  Output      a ConvNeXt block on concat(x, r) (2C -> C), then a 1x1 conv to out_channels.

ConvNeXt block (c_in -> c_out, expansion `mult`):
  h = dwconv7x7(x) + Dense_{c_in}(GELU(emb))   (the embedding broadcast over the pixels)
  h = GroupNorm(1 group) -> 3x3 conv to mult * c_out -> GELU -> GroupNorm(1 group) -> 3x3 conv to c_out
  out = h + res(x), res a 1x1 conv when c_in != c_out, else the identity.

Skip gating (`use_skip_attention`, the tutorial's `AttentionUNet` with its `BlockAttention`): before
each concatenation the skip s is multiplied by a one-channel gate computed from s and the decoder
activation g: a = sigmoid(conv1x1_1(ReLU(conv1x1_{c_g}(g) + conv1x1_{c_g}(s)))), s' = s * a.
As in the tutorial there is one gate per decoder stage, shared by the stage's two skips (both skips
have w_l channels and g has w_{l+1} at both calls); the skip of the output block (r) is not gated.

Choices the tutorial leaves open or that differ from it, stated here:
* The class-label embedding (absent from the tutorial) is added to the output of the time MLP,
  so every block sees GELU(time + label) through its own Dense layer.
* The noise label is whatever the method passes (the tutorial feeds DDPM step indices 0..999).
  The sinusoid frequencies are computed in float64 and rounded once (the tutorial computes them
  in float32, which can differ by one rounding); the sinusoids run in at least float32.
* GELU is the exact (erf) form, PyTorch's `nn.GELU()` default, not Flax's tanh approximation.
* GroupNorm eps 1e-5 (PyTorch's default), with a per-channel scale and bias; statistics in at
  least float32.
* The initialisation is PyTorch's default for every layer (uniform, bound 1/sqrt(fan_in), for
  weights and biases; the depthwise conv's fan_in is 49), so a fresh network matches a fresh
  tutorial network in distribution. Nothing is zero-initialised.
* The tutorial's `convnext_block_groups` argument is unused there and absent here (all norms have
  one group); its `init_dim`/`out_dim` are C and out_channels.
* No dropout: the tutorial's blocks have none, so `dropout` must be 0 (a ValueError otherwise);
  `augment_dim` must be 0 (no augmentation conditioning). `train` changes nothing.
* Not included: the annotated-diffusion variant of this U-Net (channel LayerNorm, linear attention
  in each stage); it is a different network rather than an option of this one.

Parameter names: `init_conv`, `time_mlp0/1`, `label_embed`, `enc{l}_block{0,1}`, `enc{l}_down`
(1x1 after space-to-depth) or `enc{L-1}_conv`, `mid_block{0,1}`, `dec{l}_gate`, `dec{l}_block{0,1}`,
`dec{l}_up` or `dec0_conv`, `final_block`, `final_conv`; in a block `dwconv`, `emb_proj`, `norm0`,
`conv0`, `norm1`, `conv1`, `skip`. A PyTorch state dict with the same dotted names loads through
`jaxdiff.nets.convert.params_from_state_dict`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.nets.layers import Conv2d, GroupNorm, Linear, edm_init

# PyTorch's default layer init (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
# for weights and biases, i.e. EDM's kaiming_uniform scaled by sqrt(1/3).
INIT = dict(init_mode='kaiming_uniform', init_weight=float(np.sqrt(1 / 3)), init_bias=float(np.sqrt(1 / 3)))
MAX_PERIOD = 10000  # The tutorial's `sinusoidal_pos_emb_theta`.


def check(img_resolution, channel_mult=(1, 2, 4, 8), model_channels=64, dropout=0.0, augment_dim=0,
          depthwise='auto', **_):
    """Raise a one-line ValueError naming the field of an unusable configuration."""
    if len(channel_mult) == 0:
        raise ValueError('channel_mult must name at least one stage')
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution % factor:
        raise ValueError(f'img_resolution={img_resolution} must be divisible by 2**(len(channel_mult)-1) = '
                         f'{factor} (one halving per stage but the last)')
    if model_channels < 4 or model_channels % 2:
        raise ValueError(f'model_channels={model_channels} must be even and at least 4 (the sinusoidal '
                         'embedding has model_channels/2 > 1 frequencies)')
    if dropout:
        raise ValueError(f'dropout={dropout}: the ConvNeXt U-Net has no dropout layers; use 0')
    if augment_dim:
        raise ValueError(f'augment_dim={augment_dim}: the ConvNeXt U-Net takes no augmentation labels; use 0')
    if depthwise not in ('auto', *DEPTHWISE):
        raise ValueError(f"depthwise={depthwise!r} must be 'auto' or one of {sorted(DEPTHWISE)}")


def sinusoidal_embedding(t, num_channels: int):
    """[sin(t f_i), cos(t f_i)] with f_i = MAX_PERIOD^(-i / (num_channels/2 - 1)), i < num_channels/2.

    The frequencies are computed in float64 and rounded once to t's dtype.
    """
    half = num_channels // 2
    freqs = np.exp(-np.log(MAX_PERIOD) * np.arange(half, dtype=np.float64) / (half - 1))
    arg = t[:, None] * jnp.asarray(freqs, t.dtype)[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)


def space_to_depth(x):
    """[N, H, W, C] -> [N, H/2, W/2, 4C]; output channel c*4 + 2*dy + dx holds pixel (2i+dy, 2j+dx)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, 4 * c)


def upsample_nearest(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _live_taps(k, height, width):
    """The taps (i, j) of a k x k 'same' kernel whose window overlaps an H x W image: a tap with
    |i - k//2| >= H or |j - k//2| >= W sees only the zero padding and contributes nothing."""
    pad = k // 2
    return [(i, j) for i in range(k) for j in range(k) if abs(i - pad) < height and abs(j - pad) < width]


def _shifted_sum(x, kernel):
    k = kernel.shape[0]
    pad, (height, width) = k // 2, x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return sum(xp[:, i:i + height, j:j + width, :] * kernel[i, j, 0] for i, j in _live_taps(k, height, width))


@jax.custom_vjp
def depthwise_conv_shifted(x, kernel):
    """y[n,h,w,c] = sum_{i,j} x_pad[n, h+i, w+j, c] k[i, j, 0, c] ('same' zero padding, odd k) as a
    sum of shifted slices over the live taps (_live_taps; skipping the others is exact).
    Gradients: dx is the same sum over g with the kernel flipped; dk[i, j, c] =
    sum_{n,h,w} x_pad[n, h+i, w+j, c] g[n,h,w,c] is the grouped convolution's own kernel gradient.
    On XLA:CPU the grouped convolution's forward and input gradient are the slow parts: this runs
    fwd+bwd 6-10x faster at the digits' sizes (benchmarks/RESULTS.md)."""
    return _shifted_sum(x, kernel)


def _shifted_fwd(x, kernel):
    return _shifted_sum(x, kernel), (x, kernel)


def _shifted_bwd(residuals, g):
    x, kernel = residuals
    dx = _shifted_sum(g, kernel[::-1, ::-1])
    _, kernel_vjp = jax.vjp(lambda k: depthwise_conv_grouped(x, k), kernel)  # fast on XLA:CPU
    return dx.astype(x.dtype), kernel_vjp(g.astype(x.dtype))[0]


depthwise_conv_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def depthwise_conv_grouped(x, kernel):
    """The same convolution as XLA's grouped convolution (feature_group_count = channels)."""
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])


DEPTHWISE = {'grouped': depthwise_conv_grouped, 'shifted': depthwise_conv_shifted}


class DepthwiseConv2d(nn.Module):
    """Per-channel k x k convolution with bias, 'same' zero padding (PyTorch: groups = channels).
    `impl` 'grouped' or 'shifted' (DEPTHWISE); 'auto' is 'shifted' on CPU and 'grouped' elsewhere."""
    kernel_size: int = 7
    impl: str = 'auto'
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, k = x.shape[-1], self.kernel_size
        init = lambda gain: edm_init(INIT['init_mode'], k * k, k * k, gain)  # fan_in = k*k per channel
        kernel = self.param('kernel', init(INIT['init_weight']), (k, k, 1, c), self.param_dtype)
        bias = self.param('bias', init(INIT['init_bias']), (c,), self.param_dtype)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, kernel)
        impl = self.impl if self.impl != 'auto' else ('shifted' if jax.default_backend() == 'cpu' else 'grouped')
        y = DEPTHWISE[impl](x.astype(dtype), kernel.astype(dtype))
        return y + bias.astype(dtype)


class ConvNeXtBlock(nn.Module):
    """The tutorial's ConvNeXt block (see the module docstring) from x.shape[-1] to `features` channels."""
    features: int
    mult: int = 2
    depthwise: str = 'auto'
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(num_groups=1, min_channels_per_group=1, eps=1e-5, **common)
        cin = x.shape[-1]
        h = DepthwiseConv2d(7, self.depthwise, name='dwconv', **common)(x)
        h = h + Linear(cin, name='emb_proj', **INIT, **common)(gelu(emb))[:, None, None, :].astype(h.dtype)
        h = Conv2d(self.features * self.mult, 3, name='conv0', **INIT, **common)(GroupNorm(name='norm0', **norm)(h))
        h = GroupNorm(name='norm1', **norm)(gelu(h))
        h = Conv2d(self.features, 3, name='conv1', **INIT, **common)(h)
        if cin != self.features:
            x = Conv2d(self.features, 1, name='skip', **INIT, **common)(x)
        return h + x.astype(h.dtype)


class SkipGate(nn.Module):
    """The tutorial's `BlockAttention`: skip * sigmoid(conv1x1_1(ReLU(conv1x1(g) + conv1x1(skip))))."""
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, g, skip):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, **INIT)
        width = g.shape[-1]
        a = Conv2d(width, 1, name='gate_conv', **common)(g) + Conv2d(width, 1, name='skip_conv', **common)(skip)
        a = jax.nn.sigmoid(Conv2d(1, 1, name='attn_conv', **common)(nn.relu(a)))
        return skip * a.astype(skip.dtype)


class ConvNeXtUNet(nn.Module):
    """The tutorial's ConvNeXt U-Net (`TwoResUNet`; `AttentionUNet` with use_skip_attention=True).

    Call with x [N, H, W, in_channels], noise_labels [N], class_labels [N, label_dim] one-hot (None
    means zeros, the null label). Returns [N, H, W, out_channels] in float32, or float64 for float64
    input. `dtype` is the compute dtype (None: the input's); norms and the sinusoidal embedding run
    in at least float32. `augment_labels` and `train` are accepted for the common network signature.
    `depthwise` picks the 7x7 depthwise convolution's implementation (DepthwiseConv2d): the same
    function, 'auto' being the faster one for the backend.
    """
    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    mult: int = 2
    use_skip_attention: bool = False
    depthwise: str = 'auto'
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # Config files give lists; tuples keep the module hashable (usable as a static jit argument).
        object.__setattr__(self, 'channel_mult', tuple(self.channel_mult))
        super().__post_init__()

    def _check(self, x, noise_labels, class_labels):
        check(self.img_resolution, self.channel_mult, self.model_channels, self.dropout, self.augment_dim,
              self.depthwise)
        if self.mult < 1:
            raise ValueError(f'mult={self.mult} must be a positive integer')
        if x.ndim != 4 or x.shape[1] != self.img_resolution or x.shape[2] != self.img_resolution:
            raise ValueError(f'x must be NHWC with H = W = img_resolution={self.img_resolution}, got shape {x.shape}')
        if x.shape[3] != self.in_channels:
            raise ValueError(f'x has {x.shape[3]} channels but in_channels={self.in_channels}')
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f'noise_labels must have shape ({x.shape[0]},), got {noise_labels.shape}')
        if self.label_dim and class_labels is not None and class_labels.shape != (x.shape[0], self.label_dim):
            raise ValueError(f'class_labels must have shape ({x.shape[0]}, label_dim={self.label_dim}), '
                             f'got {class_labels.shape}')

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        del augment_labels, train  # No augmentation conditioning, no dropout.
        x, noise_labels = jnp.asarray(x), jnp.asarray(noise_labels)
        class_labels = None if class_labels is None else jnp.asarray(class_labels)
        self._check(x, noise_labels, class_labels)
        out_dtype = jnp.promote_types(x.dtype, jnp.float32)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = lambda features, name: ConvNeXtBlock(features, self.mult, self.depthwise, name=name, **common)
        conv = lambda features, k, name: Conv2d(features, k, name=name, **INIT, **common)
        c = self.model_channels
        widths = [c] + [c * m for m in self.channel_mult]
        last = len(self.channel_mult) - 1

        # Embedding of the noise label (and class label). Large noise labels (DDPM step indices up
        # to ~1000) need at least float32 for the sinusoids, whatever the compute dtype.
        t = noise_labels.astype(jnp.promote_types(noise_labels.dtype, jnp.float32))
        emb = Linear(4 * c, name='time_mlp0', **INIT, **common)(sinusoidal_embedding(t, c))
        emb = Linear(4 * c, name='time_mlp1', **INIT, **common)(gelu(emb))
        if self.label_dim:
            labels = (jnp.zeros((x.shape[0], self.label_dim), emb.dtype) if class_labels is None
                      else class_labels.astype(emb.dtype))
            emb = emb + Linear(4 * c, use_bias=False, name='label_embed', **INIT, **common)(labels)

        x = conv(c, 7, 'init_conv')(x)
        r = x
        skips = []
        for level in range(last + 1):
            for idx in range(2):
                x = block(widths[level], f'enc{level}_block{idx}')(x, emb)
                skips.append(x)
            if level < last:
                x = conv(widths[level + 1], 1, f'enc{level}_down')(space_to_depth(x))
            else:
                x = conv(widths[level + 1], 3, f'enc{level}_conv')(x)

        x = block(widths[-1], 'mid_block0')(x, emb)
        x = block(widths[-1], 'mid_block1')(x, emb)

        for level in reversed(range(last + 1)):
            gate = SkipGate(name=f'dec{level}_gate', **common) if self.use_skip_attention else None
            for idx in range(2):
                skip = skips.pop()
                if gate is not None:
                    skip = gate(x, skip)
                x = block(widths[level + 1], f'dec{level}_block{idx}')(jnp.concatenate([x, skip], axis=-1), emb)
            if level > 0:
                x = conv(widths[level], 3, f'dec{level}_up')(upsample_nearest(x))
            else:
                x = conv(widths[level], 3, f'dec{level}_conv')(x)

        x = block(c, 'final_block')(jnp.concatenate([x, r], axis=-1), emb)
        x = conv(self.out_channels, 1, 'final_conv')(x)
        return x.astype(out_dtype)
