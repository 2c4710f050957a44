"""The ADM U-Net of Dhariwal & Nichol, as re-implemented in EDM (`DhariwalUNet`), in Flax linen.

Paper: P. Dhariwal, A. Nichol, "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021
(arXiv:2105.05233). This module computes the same function as `DhariwalUNet` in NVlabs/edm
`training/networks.py` (Karras et al. 2022), checked against arrays recorded with that code
(tests/nets/test_adm.py), so EDM checkpoints load through `jaxdiff.nets.convert`.

Architecture (C = model_channels, E = C * channel_mult_emb, NHWC throughout):

  Mapping network   sinusoidal embedding of the noise label (C channels)
                    [+ map_augment(augment labels), a bias-free linear layer, zero-initialised]
                    -> map_layer0 (C -> E) -> SiLU -> map_layer1 (E -> E)
                    [+ map_label(class labels), bias-free; labels zeroed with probability
                    `label_dropout` in training, for classifier-free guidance] -> SiLU = emb
  Encoder           per level l (resolution R = img_resolution / 2^l, width C * channel_mult[l]):
                    level 0 starts with a 3x3 conv, later levels with a downsampling block;
                    then `num_blocks` residual blocks (self-attention where R is in
                    `attn_resolutions`). Every encoder output is kept as a skip connection.
  Decoder           the lowest level starts with two blocks (the first with attention), the
                    others with an upsampling block; then `num_blocks + 1` blocks per level,
                    each taking the channel concatenation of the running tensor and one skip.
  Output            GroupNorm -> SiLU -> 3x3 conv (zero-initialised) to `out_channels`.

Every block is `layers.UNetBlock` with ADM's settings: scale/shift conditioning on emb
(adaptive_scale), skip_scale 1, box filter [1, 1] for resampling, 64 channels per attention head
(a block narrower than 64 channels gets no attention), and EDM's ADM initialisation:
kaiming-uniform scaled by sqrt(1/3) (PyTorch's default layer init), with the last conv of each
residual branch (conv1, proj), map_augment and out_conv starting at zero.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.nets.layers import Conv2d, GroupNorm, Linear, UNetBlock, positional_embedding

# EDM's ADM initialisation: PyTorch's default init, expressed as kaiming-uniform times sqrt(1/3).
INIT = dict(init_mode='kaiming_uniform', init_weight=float(np.sqrt(1 / 3)), init_bias=float(np.sqrt(1 / 3)))
# Output layers of residual branches (and map_augment) start at zero, so every block starts
# as the identity and the freshly initialised net outputs zero.
INIT_ZERO = dict(init_mode='kaiming_uniform', init_weight=0.0, init_bias=0.0)
CHANNELS_PER_HEAD = 64


class DhariwalUNet(nn.Module):
    """ADM U-Net (EDM's `DhariwalUNet`); the constructor takes EDM's keyword arguments.

    Call with x [N, H, W, in_channels], noise_labels [N], class_labels [N, label_dim] (None
    means all-zero labels) and augment_labels [N, augment_dim] (None means no augmentation
    conditioning). Returns [N, H, W, out_channels] in float32, or float64 for float64 input.
    `dtype` is the compute dtype (None: the input's); `train=True` enables dropout and label
    dropout, drawing from the 'dropout' rng.
    """
    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # EDM's kwargs give lists; tuples keep the module hashable (usable as a static jit
        # argument) and equal to the same net built with tuples.
        for field in ('channel_mult', 'attn_resolutions'):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        super().__post_init__()

    def _check(self, x, noise_labels):
        """Raise ValueError for inconsistent options or inputs (shapes are static under jit)."""
        if len(self.channel_mult) == 0:
            raise ValueError('channel_mult must name at least one level')
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.img_resolution % factor:
            raise ValueError(f'img_resolution={self.img_resolution} must be divisible by '
                             f'2**(len(channel_mult)-1) = {factor} (one halving per extra level)')
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f'label_dropout={self.label_dropout} must lie in [0, 1]')
        if x.ndim != 4 or x.shape[1] != self.img_resolution or x.shape[2] != self.img_resolution:
            raise ValueError(f'x must be NHWC with H = W = img_resolution={self.img_resolution}, '
                             f'got shape {x.shape}')
        if x.shape[3] != self.in_channels:
            raise ValueError(f'x has {x.shape[3]} channels but in_channels={self.in_channels}')
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(f'noise_labels must have shape ({x.shape[0]},), got {noise_labels.shape}')

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, *, train=False):
        x = jnp.asarray(x)
        noise_labels = jnp.asarray(noise_labels)
        self._check(x, noise_labels)
        out_dtype = jnp.promote_types(x.dtype, jnp.float32)
        n = x.shape[0]
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb_channels = self.model_channels * self.channel_mult_emb
        block = functools.partial(UNetBlock, channels_per_head=CHANNELS_PER_HEAD, dropout=self.dropout,
                                  init_kw=INIT, init_zero_kw=INIT_ZERO, **common)

        # Mapping network. The sinusoidal features are computed in at least float32 even for
        # bf16 compute: noise labels can be large (iDDPM's run up to ~1000).
        emb = positional_embedding(noise_labels.astype(jnp.promote_types(noise_labels.dtype, jnp.float32)),
                                   self.model_channels)
        if self.augment_dim:
            # Absent augment labels contribute exactly zero (the layer has no bias); always calling
            # the layer keeps the parameter tree independent of which inputs init saw.
            if augment_labels is None:
                augment_labels = jnp.zeros((n, self.augment_dim), emb.dtype)
            emb = emb + Linear(self.model_channels, use_bias=False, name='map_augment',
                               **INIT_ZERO, **common)(jnp.asarray(augment_labels, emb.dtype))
        emb = nn.silu(Linear(emb_channels, name='map_layer0', **INIT, **common)(emb))
        emb = Linear(emb_channels, name='map_layer1', **INIT, **common)(emb)
        if self.label_dim:
            labels = (jnp.zeros((n, self.label_dim), emb.dtype) if class_labels is None
                      else jnp.asarray(class_labels, emb.dtype))
            if train and self.label_dropout:
                # Drop the whole label vector of a sample (the unconditional model for guidance).
                keep = jax.random.uniform(self.make_rng('dropout'), (n, 1)) >= self.label_dropout
                labels = labels * keep.astype(labels.dtype)
            emb = emb + Linear(emb_channels, use_bias=False, name='map_label', init_mode='kaiming_normal',
                               init_weight=float(np.sqrt(self.label_dim)), **common)(labels)
        emb = nn.silu(emb)

        # Encoder: keep every output as a skip connection for the decoder.
        skips = []
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            width = self.model_channels * mult
            if level == 0:
                x = Conv2d(width, 3, name=f'enc_{res}x{res}_conv', **INIT, **common)(x)
            else:
                x = block(x.shape[-1], down=True, name=f'enc_{res}x{res}_down')(x, emb, train=train)
            skips.append(x)
            for idx in range(self.num_blocks):
                x = block(width, attention=res in self.attn_resolutions,
                          name=f'enc_{res}x{res}_block{idx}')(x, emb, train=train)
                skips.append(x)

        # Decoder: each level consumes num_blocks + 1 skips, in reverse order of production.
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.img_resolution >> level
            width = self.model_channels * mult
            if level == len(self.channel_mult) - 1:
                # The bottleneck always attends (if at least one head's worth of channels).
                x = block(x.shape[-1], attention=True, name=f'dec_{res}x{res}_in0')(x, emb, train=train)
                x = block(x.shape[-1], name=f'dec_{res}x{res}_in1')(x, emb, train=train)
            else:
                x = block(x.shape[-1], up=True, name=f'dec_{res}x{res}_up')(x, emb, train=train)
            for idx in range(self.num_blocks + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = block(width, attention=res in self.attn_resolutions,
                          name=f'dec_{res}x{res}_block{idx}')(x, emb, train=train)

        x = nn.silu(GroupNorm(name='out_norm', **common)(x))
        x = Conv2d(self.out_channels, 3, name='out_conv', **INIT_ZERO, **common)(x)
        return x.astype(out_dtype)
