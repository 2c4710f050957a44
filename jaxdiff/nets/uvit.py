"""The U-ViT of simple diffusion (Hoogeboom, Heek & Salimans, ICML 2023), in Flax linen, NHWC.

Paper: E. Hoogeboom, J. Heek, T. Salimans, "simple diffusion: End-to-end diffusion for high
resolution images", ICML 2023 (arXiv:2301.11093). The paper finds that a pixel-space model scales
best at 16x16 and replaces that level of a U-Net by a stack of transformer blocks: convolutional
ResBlocks with skip connections above 16x16, self-attention + MLP blocks on the 256 tokens of the
16x16 feature map, dropout only at low resolution, and optionally a first downsampling layer
(patching, or a 5/3 wavelet) so that no feature map has the image's full resolution. No official
code was found; this module follows the paper's description, and every choice it leaves open is
listed below. lucidrains' `denoising_diffusion_pytorch/simple_diffusion.py` UViT served as a
second reading (it differs in many details: linear attention at every conv level, RMSNorm,
query-key normalisation, GELU time MLP), not as a reference to match.

Architecture (C = model_channels, w_l = C * channel_mult[l], L = len(channel_mult), E = 4C,
R = img_resolution / patch_size, r_l = R / 2^l, D = transformer_channels):

  Embedding   sinusoidal features of the noise label (C channels, EDM's `positional_embedding`)
              -> Linear(E) -> SiLU -> Linear(E) [+ bias-free Linear(E) of the one-hot class
              labels: all zeros, or None, is the null label of classifier-free guidance; label
              dropout belongs to the training loss, not here] -> SiLU = emb.
  Input       patch_size 1: 3x3 conv to w_0. patch_size p > 1: a conv with kernel = stride = p
              (non-overlapping patches) to w_0, at R x R.
  Encoder     level l at r_l x r_l, width w_l: level 0 starts from the input layer, later levels
              with a downsampling ResBlock; then `num_blocks` ResBlocks. Every output is a skip.
              After the last level one more downsampling ResBlock brings the map to r_L x r_L.
  Transformer at r_L x r_L (16 x 16 in the paper's configurations): Linear(w_{L-1} -> D) per
              token + position embedding, `num_transformer_blocks` pre-norm blocks, LayerNorm,
              Linear(D -> w_{L-1}). Everything here is the `transformer` parameter subtree, so
              widening (D) or deepening the stack grows that subtree only.
  Decoder     per level, lowest first: an upsampling ResBlock, then `num_blocks + 1` ResBlocks,
              each fed concat(x, skip) (skips popped in reverse), as in ADM.
  Output      GroupNorm -> SiLU -> 3x3 conv to out_channels (patch_size 1), or a transposed conv
              with kernel = stride = p (each token's channels -> its p x p pixels); zero-initialised.

ResBlock = `layers.UNetBlock` with ADM's settings (GroupNorm-SiLU-conv, scale/shift conditioning
on emb, GroupNorm-SiLU-dropout-conv, box-filter [1, 1] resampling, zero-initialised last conv), no
attention. Transformer block (tokens x, width D, H heads):
  m = Linear(4D)(emb), zero-initialised -> (scale0, shift0, scale1, shift1)
  x = x + Dropout(Linear_zero(MHSA(LN(x) * (1 + scale0) + shift0)))
  x = x + Linear_zero(Dropout(GELU(Linear(mlp_ratio * D)(LN(x) * (1 + scale1) + shift1))))
with LN a LayerNorm without affine parameters (the modulation supplies them) and MHSA through
`jax.nn.dot_product_attention` (softmax in float32; float64 inputs use a float64 einsum
softmax instead, since that function always rounds the softmax to float32).

Open choices, stated (the paper does not fix them, or this session could not verify them):
* Levels: the transformer runs wherever the conv levels end, at r_L = R / 2^L; check() requires
  R to be divisible by 2^L, and any r_L >= 1 is accepted (16 is the paper's choice and the
  UVIT_CONFIGS setting; smaller maps suit small images, e.g. 8x8 tokens for 32 px data with
  channel_mult of length 2). There are no ResBlocks at r_L: the transformer replaces that level.
* Dropout: the paper finds that dropout improves results but should not be applied on the
  highest-resolution feature maps (its introduction, checked here); its ablation over the
  resolution from which dropout is applied could not be re-read in this session. Here rate
  `dropout` is used in every ResBlock and transformer block whose output resolution is
  <= `dropout_resolution` (default 16: the transformer stack and the block producing the 16x16
  map); elsewhere the rate is 0 and no random numbers are drawn.
* Time/label conditioning of the transformer: by the scale/shift of each pre-norm (adaLN without
  gates, zero-initialised so a fresh block is a plain pre-norm block). The paper's description
  does not say whether the transformer blocks see the embedding directly.
* Position embedding: `pos_embedding='learned'` (a [r_L^2, D] table, N(0, 0.02^2) init) or
  'sinusoidal' (fixed 2-D sin-cos: D/4 frequencies 10000^(-i/(D/4)) for each of the row and
  column index, [sin y, cos y, sin x, cos x]).
* GELU is Flax's default tanh approximation; LayerNorm eps 1e-6; MLP hidden width
  round(mlp_ratio * D); E = 4C as in ADM; ADM's (PyTorch's default) initialisation for the conv
  levels, Xavier-uniform for the transformer's linear layers, zero for the last layer of every
  residual branch and for the output layer (a fresh network outputs exact zeros).
* The 5/3 wavelet input transform of the paper is not implemented: patching is the cheap
  alternative the paper also reports, and a wavelet would need its own inverse at the output.
* `augment_dim` must be 0 (no augmentation conditioning); `augment_labels` is ignored as in the
  other networks when augment_dim is 0.
* `attn_implementation` is passed to `jax.nn.dot_product_attention` for bf16/fp16 compute (None:
  JAX's default, XLA today; 'cudnn': cuDNN's fused flash attention on NVIDIA GPUs); float32 and
  float64 compute always use the XLA / einsum path.

Precision: parameters in `param_dtype`; `dtype` is the compute dtype of convolutions, matmuls and
attention (None: the input's), with normalisation statistics, the sinusoidal embeddings and the
attention softmax in at least float32. Returns float32 (float64 for float64 input).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.nets.layers import Conv2d, GroupNorm, Linear, UNetBlock, edm_init, positional_embedding

# ADM's (PyTorch's default) initialisation for the conv levels, as in adm.py.
INIT = dict(init_mode='kaiming_uniform', init_weight=float(np.sqrt(1 / 3)), init_bias=float(np.sqrt(1 / 3)))
INIT_ZERO = dict(init_mode='kaiming_uniform', init_weight=0.0, init_bias=0.0)
INIT_TOKEN = dict(init_mode='xavier_uniform', init_bias=0.0)

# The paper's ImageNet U-ViTs (class-conditional, 1000 classes). Only what the paper states is
# meant to be here, but this session could not open the paper's appendix (its hyper-parameter
# tables) and filled these in from a reading of the paper that it could not re-check:
#   verified in the paper's text here: transformer at 16x16; dropout not at the highest resolutions;
#     downsampling first for 256 and 512 px.
#   NOT verified (recollection of the appendix / table): conv levels 128, 64, 32 px with widths
#     128, 256, 512 and 2 blocks each; 36 transformer blocks of width 2048 (about 2B parameters
#     in all, the size the paper reports for its U-ViT); 0.1 dropout; patch sizes 2 and 4 for 256
#     and 512 px (the paper may have used the 5/3 wavelet there instead).
#   chosen here, not from the paper: num_heads 16 (128 channels per head), mlp_ratio 4,
#     dropout_resolution 16.
_UVIT_IMAGENET = dict(label_dim=1000, model_channels=128, channel_mult=(1, 2, 4), num_blocks=2,
                      transformer_channels=2048, num_transformer_blocks=36, num_heads=16, mlp_ratio=4.0,
                      pos_embedding='learned', dropout=0.1, dropout_resolution=16)
UVIT_CONFIGS = {
    'imagenet128': dict(_UVIT_IMAGENET, img_resolution=128, patch_size=1),
    'imagenet256': dict(_UVIT_IMAGENET, img_resolution=256, patch_size=2),
    'imagenet512': dict(_UVIT_IMAGENET, img_resolution=512, patch_size=4),
}


def check(img_resolution, channel_mult=(1, 2, 4), patch_size=1, num_heads=8, transformer_channels=512,
          model_channels=128, pos_embedding='learned', mlp_ratio=4.0, dropout=0.0, augment_dim=0, **_):
    """Raise a one-line ValueError naming the field of an unusable configuration."""
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f'patch_size={patch_size!r} must be a positive integer')
    if img_resolution % patch_size:
        raise ValueError(f'img_resolution={img_resolution} must be divisible by patch_size={patch_size}')
    if len(channel_mult) == 0:
        raise ValueError('channel_mult must name at least one convolutional level')
    res, factor = img_resolution // patch_size, 2 ** len(channel_mult)
    if res % factor:
        raise ValueError(f'img_resolution={img_resolution}: img_resolution / patch_size = {res} must be divisible '
                         f'by 2**len(channel_mult) = {factor} (one halving per level, the transformer below them)')
    for mult in channel_mult:
        c = model_channels * mult
        if c < 4 or c % min(32, c // 4):
            raise ValueError(f'model_channels * channel_mult = {c} channels cannot be split into GroupNorm groups '
                             f'of min(32, C // 4); use a multiple of 32 (or of 4 below 128)')
    if model_channels < 4 or model_channels % 2:
        raise ValueError(f'model_channels={model_channels} must be even and at least 4 (sinusoidal embedding)')
    if num_heads < 1 or transformer_channels % num_heads:
        raise ValueError(f'transformer_channels={transformer_channels} must be divisible by num_heads={num_heads}')
    if pos_embedding not in ('learned', 'sinusoidal'):
        raise ValueError(f"pos_embedding={pos_embedding!r} must be 'learned' or 'sinusoidal'")
    if pos_embedding == 'sinusoidal' and transformer_channels % 4:
        raise ValueError(f'transformer_channels={transformer_channels} must be divisible by 4 for the '
                         f'sinusoidal 2-D position embedding')
    if mlp_ratio <= 0 or round(mlp_ratio * transformer_channels) < 1:
        raise ValueError(f'mlp_ratio={mlp_ratio} must be positive')
    if not 0 <= dropout < 1:
        raise ValueError(f'dropout={dropout} must lie in [0, 1)')
    if augment_dim:
        raise ValueError(f'augment_dim={augment_dim}: the U-ViT takes no augmentation labels; use 0')


def sincos_2d(size: int, channels: int) -> np.ndarray:
    """Fixed 2-D position embedding [size^2, channels] (row-major tokens), in float64."""
    quarter = channels // 4
    freqs = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
    ys, xs = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64), indexing='ij')
    ay, ax = ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs
    return np.concatenate([np.sin(ay), np.cos(ay), np.sin(ax), np.cos(ax)], axis=1)


def attention(q, k, v, implementation=None):
    """Multi-head self-attention of [N, T, heads, ch] arrays, softmax in at least float32."""
    if q.dtype == jnp.float64:  # jax.nn.dot_product_attention rounds the softmax to float32.
        logits = jnp.einsum('nqhc,nkhc->nhqk', q, k / float(np.sqrt(q.shape[-1])))
        return jnp.einsum('nhqk,nkhc->nqhc', jax.nn.softmax(logits, axis=-1), v)
    impl = implementation if q.dtype in (jnp.bfloat16, jnp.float16) else None
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in at least float32; optional scale and bias."""
    use_affine: bool = True
    eps: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        stat = jnp.promote_types(x.dtype, jnp.float32)
        xf = x.astype(stat)
        mean = xf.mean(axis=-1, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_affine:
            c = x.shape[-1]
            y = y * self.param('scale', nn.initializers.ones, (c,), self.param_dtype).astype(stat)
            y = y + self.param('bias', nn.initializers.zeros, (c,), self.param_dtype).astype(stat)
        return y.astype(self.dtype if self.dtype is not None else x.dtype)


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP on [N, T, D] tokens, conditioned by scale/shift of the norms."""
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_implementation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, *, train=False):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, t, d = x.shape
        mod = Linear(4 * d, name='modulation', **INIT_ZERO, **common)(emb)[:, None, :]
        scale0, shift0, scale1, shift1 = jnp.split(mod.astype(x.dtype), 4, axis=-1)

        h = LayerNorm(use_affine=False, name='norm0', **common)(x) * (1 + scale0) + shift0
        qkv = Linear(3 * d, name='qkv', **INIT_TOKEN, **common)(h).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        a = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attn_implementation).reshape(n, t, d)
        a = Linear(d, name='proj', **INIT_ZERO, **common)(a)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(a)

        h = LayerNorm(use_affine=False, name='norm1', **common)(x) * (1 + scale1) + shift1
        h = nn.gelu(Linear(int(round(self.mlp_ratio * d)), name='mlp0', **INIT_TOKEN, **common)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return x + Linear(d, name='mlp1', **INIT_ZERO, **common)(h)


class Transformer(nn.Module):
    """The low-resolution stack: [N, r, r, C] map -> r^2 tokens of width `channels` -> blocks -> map."""
    channels: int
    num_blocks: int
    num_heads: int
    mlp_ratio: float = 4.0
    pos_embedding: str = 'learned'
    dropout: float = 0.0
    attn_implementation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, *, train=False):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, h, w, c = x.shape
        x = Linear(self.channels, name='proj_in', **INIT_TOKEN, **common)(x.reshape(n, h * w, c))
        if self.pos_embedding == 'learned':
            pos = self.param('pos_embedding', nn.initializers.normal(0.02), (h * w, self.channels), self.param_dtype)
        else:
            pos = jnp.asarray(sincos_2d(h, self.channels), jnp.promote_types(x.dtype, jnp.float32))
        x = x + pos.astype(x.dtype)
        for i in range(self.num_blocks):
            x = TransformerBlock(self.num_heads, self.mlp_ratio, self.dropout, self.attn_implementation,
                                 name=f'block{i}', **common)(x, emb, train=train)
        x = LayerNorm(name='norm', **common)(x)
        return Linear(c, name='proj_out', **INIT_TOKEN, **common)(x).reshape(n, h, w, c)


class Patchify(nn.Module):
    """Conv with kernel = stride = p (embed) or its transposed conv (unembed); kernel [p, p, in, out]."""
    features: int
    patch_size: int
    transpose: bool = False
    init_weight: float = float(np.sqrt(1 / 3))
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        p, (n, h, w, c) = self.patch_size, x.shape
        fan_in = c if self.transpose else c * p * p
        init = edm_init('kaiming_uniform', fan_in, self.features, self.init_weight)
        kernel = self.param('kernel', init, (p, p, c, self.features), self.param_dtype)
        bias = self.param('bias', edm_init('kaiming_uniform', fan_in, self.features, self.init_weight),
                          (self.features,), self.param_dtype)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, kernel)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if self.transpose:  # Each pixel's channels -> a p x p block of output pixels.
            y = jnp.einsum('nhwc,pqcd->nhpwqd', x, kernel).reshape(n, h * p, w * p, self.features)
        else:
            y = jnp.einsum('nhpwqc,pqcd->nhwd', x.reshape(n, h // p, p, w // p, p, c), kernel)
        return y + bias.astype(dtype)


class UViT(nn.Module):
    """simple diffusion's U-ViT. Call with x [N, H, W, in_channels], noise_labels [N] (logSNR, a
    step index, ...), class_labels [N, label_dim] one-hot or None (= zeros); returns
    [N, H, W, out_channels]. `train=True` enables dropout, drawing from the 'dropout' rng."""
    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 4)
    num_blocks: int = 2
    transformer_channels: int = 512
    num_transformer_blocks: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0
    patch_size: int = 1
    pos_embedding: str = 'learned'
    dropout: float = 0.0
    dropout_resolution: int = 16
    attn_implementation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # Config files give lists; tuples keep the module hashable (usable as a static jit argument).
        object.__setattr__(self, 'channel_mult', tuple(self.channel_mult))
        super().__post_init__()

    def _check(self, x, noise_labels, class_labels):
        check(self.img_resolution, self.channel_mult, self.patch_size, self.num_heads, self.transformer_channels,
              self.model_channels, self.pos_embedding, self.mlp_ratio, self.dropout, self.augment_dim)
        if x.ndim != 4 or x.shape[1] != self.img_resolution or x.shape[2] != self.img_resolution:
            raise ValueError(f'x must be NHWC with H = W = img_resolution={self.img_resolution}, got shape {x.shape}')
        if x.shape[3] != self.in_channels:
            raise ValueError(f'x has {x.shape[3]} channels but in_channels={self.in_channels}')
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f'noise_labels must have shape ({x.shape[0]},), got {noise_labels.shape}')
        if self.label_dim and class_labels is not None and class_labels.shape != (x.shape[0], self.label_dim):
            raise ValueError(f'class_labels must have shape ({x.shape[0]}, label_dim={self.label_dim}), '
                             f'got {class_labels.shape}')

    def rate_at(self, res: int) -> float:
        """The dropout rate of a block whose output maps are res x res."""
        return self.dropout if res <= self.dropout_resolution else 0.0

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        del augment_labels  # augment_dim is 0.
        x, noise_labels = jnp.asarray(x), jnp.asarray(noise_labels)
        class_labels = None if class_labels is None else jnp.asarray(class_labels)
        self._check(x, noise_labels, class_labels)
        out_dtype = jnp.promote_types(x.dtype, jnp.float32)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c, p = self.model_channels, self.patch_size
        widths = [c * m for m in self.channel_mult]
        res0 = self.img_resolution // p
        block = functools.partial(UNetBlock, init_kw=INIT, init_zero_kw=INIT_ZERO, **common)

        # Embedding. The sinusoids are computed in at least float32 whatever the compute dtype.
        emb = positional_embedding(noise_labels.astype(jnp.promote_types(noise_labels.dtype, jnp.float32)), c)
        emb = nn.silu(Linear(4 * c, name='map_layer0', **INIT, **common)(emb))
        emb = Linear(4 * c, name='map_layer1', **INIT, **common)(emb)
        if self.label_dim:
            labels = (jnp.zeros((x.shape[0], self.label_dim), emb.dtype) if class_labels is None
                      else class_labels.astype(emb.dtype))
            emb = emb + Linear(4 * c, use_bias=False, name='map_label', init_mode='kaiming_normal',
                               init_weight=float(np.sqrt(self.label_dim)), **common)(labels)
        emb = nn.silu(emb)

        # Encoder: every output is a skip connection.
        if p == 1:
            x = Conv2d(widths[0], 3, name='in_conv', **INIT, **common)(x)
        else:
            x = Patchify(widths[0], p, name='in_conv', **common)(x)
        skips = [x]
        for level, width in enumerate(widths):
            res = res0 >> level
            if level:
                x = block(x.shape[-1], down=True, dropout=self.rate_at(res), name=f'enc_{res}x{res}_down')(
                    x, emb, train=train)
                skips.append(x)
            for idx in range(self.num_blocks):
                x = block(width, dropout=self.rate_at(res), name=f'enc_{res}x{res}_block{idx}')(x, emb, train=train)
                skips.append(x)
        res = res0 >> len(widths)
        x = block(x.shape[-1], down=True, dropout=self.rate_at(res), name=f'enc_{res}x{res}_down')(x, emb, train=train)

        x = Transformer(self.transformer_channels, self.num_transformer_blocks, self.num_heads, self.mlp_ratio,
                        self.pos_embedding, self.rate_at(res), self.attn_implementation, name='transformer',
                        **common)(x, emb, train=train)

        # Decoder: each level consumes num_blocks + 1 skips, in reverse order of production.
        for level, width in reversed(list(enumerate(widths))):
            res = res0 >> level
            x = block(x.shape[-1], up=True, dropout=self.rate_at(res), name=f'dec_{res}x{res}_up')(x, emb, train=train)
            for idx in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = block(width, dropout=self.rate_at(res), name=f'dec_{res}x{res}_block{idx}')(x, emb, train=train)

        x = nn.silu(GroupNorm(name='out_norm', **common)(x))
        if p == 1:
            x = Conv2d(self.out_channels, 3, name='out_conv', **INIT_ZERO, **common)(x)
        else:
            x = Patchify(self.out_channels, p, transpose=True, init_weight=0.0, name='out_conv', **common)(x)
        return x.astype(out_dtype)
