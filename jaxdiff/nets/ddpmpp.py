"""DDPM++ and NCSN++ (Song et al.'s U-Nets) in Flax linen, NHWC.

`SongUNet` computes the same function as `SongUNet` in NVlabs/edm `training/networks.py`, the
re-implementation of the score networks of

  Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole, "Score-Based
  Generative Modeling through Stochastic Differential Equations", ICLR 2021,

as configured in T. Karras, M. Aittala, T. Aila, S. Laine, "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS 2022 (Appendix F, implementation details: DDPM++
and NCSN++ are the networks of its VP and VE configurations).

Architecture:

* Mapping network. The noise label becomes a `model_channels * channel_mult_noise` vector:
  sinusoidal features (`embedding_type='positional'`, DDPM++) or random Fourier features
  (`'fourier'`, NCSN++), with the sine half first. Class labels (scaled by sqrt(label_dim)) and
  augmentation labels are added through linear layers `map_label` / `map_augment`, then two
  linear+SiLU layers give the embedding of width `model_channels * channel_mult_emb`.
* Encoder. A 3x3 conv at full resolution, then per resolution level a downsampling UNetBlock
  (except at the first level) and `num_blocks` UNetBlocks of width `model_channels * mult`, with
  self-attention at `attn_resolutions`. `encoder_type='skip'` adds 1x1 projections of the
  downsampled input image after each downsampling; `'residual'` (NCSN++) keeps a progressive
  input path: a fused 3x3 conv + downsampling of the previous level's path, added to the main
  path and scaled by 1/sqrt(2); the sum is also the new input path.
* Decoder. At the lowest resolution two blocks (the first with attention), at the others an
  upsampling block; then `num_blocks + 1` blocks, each fed the concatenation of the current
  features and the matching encoder output. The output is GroupNorm-SiLU-3x3 conv at full
  resolution; `decoder_type='skip'` also emits such an output at every level and sums them,
  upsampling the running sum by `resample_filter`.

All UNetBlocks are non-adaptive (additive embedding), scale residual sums by sqrt(1/2), use a
single attention head, GroupNorm eps 1e-6 and 1x1-projected resampling skips. Submodule names
follow EDM's state-dict names (`enc.16x16_block0` -> `enc_16x16_block0`) so that
`jaxdiff.nets.convert.params_from_state_dict` loads EDM checkpoints directly.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.nets.layers import Conv2d, FourierEmbedding, GroupNorm, Linear, UNetBlock, positional_embedding

EMBEDDING_TYPES = ('positional', 'fourier')
ENCODER_TYPES = ('standard', 'skip', 'residual')
DECODER_TYPES = ('standard', 'skip')

# EDM's initialisers for SongUNet: Xavier-uniform everywhere, near-zero output convolutions,
# qkv convolutions scaled by sqrt(0.2). Only used by `init`; loaded checkpoints override them.
INIT = {'init_mode': 'xavier_uniform'}
INIT_ZERO = {'init_mode': 'xavier_uniform', 'init_weight': 1e-5}
INIT_ATTN = {'init_mode': 'xavier_uniform', 'init_weight': float(np.sqrt(0.2))}

# Python floats, not numpy scalars: a numpy float64 would promote float32/bfloat16 activations
# to float64 when x64 is enabled.
SQRT_HALF = float(np.sqrt(0.5))
SQRT_TWO = float(np.sqrt(2))


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net; the fields are EDM's `SongUNet` constructor arguments.

    Call with x [N, H, W, in_channels] (H = W = img_resolution), noise_labels [N], optional
    class_labels [N, label_dim] (None counts as all-zero labels) and augment_labels
    [N, augment_dim] (None skips `map_augment`, as in EDM). Returns [N, H, W, out_channels] in
    float32, or float64 for float64 input. With `train=True`, dropout and label dropout draw
    from the 'dropout' rng.
    """
    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    embedding_type: str = 'positional'
    channel_mult_noise: int = 1
    encoder_type: str = 'standard'
    decoder_type: str = 'standard'
    resample_filter: Sequence[int] = (1, 1)
    dtype: Any = None            # compute dtype (None = input dtype; jnp.bfloat16 for mixed precision)
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # EDM only asserts these; fail early with the offending field named.
        if self.embedding_type not in EMBEDDING_TYPES:
            raise ValueError(f'embedding_type must be one of {EMBEDDING_TYPES}, got {self.embedding_type!r}')
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f'encoder_type must be one of {ENCODER_TYPES}, got {self.encoder_type!r}')
        if self.decoder_type not in DECODER_TYPES:
            raise ValueError(f'decoder_type must be one of {DECODER_TYPES}, got {self.decoder_type!r}')
        if len(self.channel_mult) < 1:
            raise ValueError('channel_mult must have at least one entry')
        if self.img_resolution % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f'img_resolution={self.img_resolution} must be divisible by '
                             f'2**(len(channel_mult)-1) = {2 ** (len(self.channel_mult) - 1)}')
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f'label_dropout must be in [0, 1], got {self.label_dropout}')
        super().__post_init__()

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train: bool = False):
        x = jnp.asarray(x)
        n = x.shape[0]
        if x.ndim != 4 or x.shape[1:3] != (self.img_resolution, self.img_resolution):
            raise ValueError(f'x must be [N, {self.img_resolution}, {self.img_resolution}, C] '
                             f'(img_resolution={self.img_resolution}), got shape {x.shape}')
        if x.shape[-1] != self.in_channels:
            raise ValueError(f'x has {x.shape[-1]} channels, expected in_channels={self.in_channels}')
        out_dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        filt = tuple(self.resample_filter)
        attn_res = tuple(self.attn_resolutions)
        block = functools.partial(
            UNetBlock, num_heads=1, dropout=self.dropout, skip_scale=SQRT_HALF, eps=1e-6,
            resample_filter=filt, resample_proj=True, adaptive_scale=False,
            init_kw=INIT, init_zero_kw=INIT_ZERO, init_attn_kw=INIT_ATTN, **common)

        emb = self._embedding(n, noise_labels, class_labels, augment_labels, train)

        # Encoder. `skips` holds every output the decoder concatenates, in order.
        skips = []
        aux = x  # Input-image path of the 'skip' / 'residual' encoders.
        for level, mult in enumerate(self.channel_mult):
            tag = self._tag(level)
            if level == 0:
                x = Conv2d(self.model_channels, 3, name=f'enc_{tag}_conv', **INIT, **common)(x)
                skips.append(x)
            else:
                x = block(x.shape[-1], down=True, name=f'enc_{tag}_down')(x, emb, train=train)
                skips.append(x)
                if self.encoder_type == 'skip':
                    aux = Conv2d(aux.shape[-1], 0, down=True, resample_filter=filt,
                                 name=f'enc_{tag}_aux_down', **common)(aux)
                    x = x + Conv2d(x.shape[-1], 1, name=f'enc_{tag}_aux_skip', **INIT, **common)(aux)
                    skips[-1] = x
                elif self.encoder_type == 'residual':
                    res_conv = Conv2d(x.shape[-1], 3, down=True, resample_filter=filt, fused_resample=True,
                                      name=f'enc_{tag}_aux_residual', **INIT, **common)
                    x = aux = (x + res_conv(aux)) / SQRT_TWO
                    skips[-1] = x
            for idx in range(self.num_blocks):
                x = block(self.model_channels * mult, attention=self._res(level) in attn_res,
                          name=f'enc_{tag}_block{idx}')(x, emb, train=train)
                skips.append(x)

        # Decoder.
        out = None  # Running sum of the output heads (one head unless decoder_type='skip').
        last = len(self.channel_mult) - 1
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            tag = self._tag(level)
            if level == last:
                x = block(x.shape[-1], attention=True, name=f'dec_{tag}_in0')(x, emb, train=train)
                x = block(x.shape[-1], name=f'dec_{tag}_in1')(x, emb, train=train)
            else:
                x = block(x.shape[-1], up=True, name=f'dec_{tag}_up')(x, emb, train=train)
            for idx in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = block(self.model_channels * mult,
                          attention=(idx == self.num_blocks and self._res(level) in attn_res),
                          name=f'dec_{tag}_block{idx}')(x, emb, train=train)
            if self.decoder_type == 'skip' or level == 0:
                if out is not None:
                    out = Conv2d(self.out_channels, 0, up=True, resample_filter=filt,
                                 name=f'dec_{tag}_aux_up', **common)(out)
                head = GroupNorm(eps=1e-6, name=f'dec_{tag}_aux_norm', **common)(x)
                head = Conv2d(self.out_channels, 3, name=f'dec_{tag}_aux_conv', **INIT_ZERO, **common)(nn.silu(head))
                out = head if out is None else head + out
        return out.astype(out_dtype)

    def _res(self, level: int) -> int:
        return self.img_resolution >> level

    def _tag(self, level: int) -> str:
        res = self._res(level)
        return f'{res}x{res}'

    def _embedding(self, n, noise_labels, class_labels, augment_labels, train):
        """The mapping network: noise (+ class, augmentation) labels -> embedding vector."""
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        noise_labels = jnp.asarray(noise_labels)
        if not jnp.issubdtype(noise_labels.dtype, jnp.floating):
            noise_labels = noise_labels.astype(jnp.float32)
        noise_labels = jnp.broadcast_to(noise_labels.reshape(-1), (n,))
        noise_channels = self.model_channels * self.channel_mult_noise
        if self.embedding_type == 'positional':
            emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
        else:
            emb = FourierEmbedding(noise_channels, name='map_noise', param_dtype=self.param_dtype)(noise_labels)
        # The embeddings return [cos, sin]; Song et al.'s networks were trained with [sin, cos].
        half = emb.shape[-1] // 2
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)

        if self.label_dim:
            if class_labels is None:
                labels = jnp.zeros((n, self.label_dim), emb.dtype)
            else:
                labels = jnp.asarray(class_labels).astype(emb.dtype)
                if labels.shape != (n, self.label_dim):
                    raise ValueError(f'class_labels must be [N, label_dim={self.label_dim}], got {labels.shape}')
            if train and self.label_dropout:
                # Classifier-free guidance training: drop whole label vectors with this probability.
                keep = jax.random.uniform(self.make_rng('dropout'), (n, 1)) >= self.label_dropout
                labels = labels * keep.astype(labels.dtype)
            emb = emb + Linear(noise_channels, name='map_label', **INIT, **common)(
                labels * float(np.sqrt(self.label_dim))).astype(emb.dtype)
        if self.augment_dim and augment_labels is not None:
            augment_labels = jnp.asarray(augment_labels).astype(emb.dtype)
            emb = emb + Linear(noise_channels, use_bias=False, name='map_augment', **INIT, **common)(
                augment_labels).astype(emb.dtype)
        emb_channels = self.model_channels * self.channel_mult_emb
        emb = nn.silu(Linear(emb_channels, name='map_layer0', **INIT, **common)(emb))
        emb = nn.silu(Linear(emb_channels, name='map_layer1', **INIT, **common)(emb))
        return emb
