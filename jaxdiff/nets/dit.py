"""The diffusion transformer (DiT) of Peebles & Xie, in Flax linen.

Paper: W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers", ICCV 2023
(arXiv:2212.09748). This module computes the same function as `DiT` in facebookresearch/DiT
`models.py` (with timm's `PatchEmbed`, `Attention` and `Mlp`), checked against outputs of that
code with the same weights (tests/nets/test_dit.py, arrays recorded by
tests/data/make_dit_refs.py): DiT-S/2 at 32x32x4 (12 blocks) to 1e-5 of the output's scale in
float32 and to rounding in float64; also a two-block patch-4 net, DiT's null label through the
converted table, its timestep frequencies and position embedding. The parameter counts of all
twelve DiT models (S/B/L/XL at patch 2/4/8) equal DiT's code's (less its fixed pos_embed buffer
and null-label row) and round to the paper's. `params_from_dit_state_dict` loads DiT's PyTorch
state dicts.

Architecture (D = hidden_size, p = patch_size, T = (img_resolution / p)^2 tokens, NHWC in/out):

  Patchify        a p x p convolution with stride p (a linear map of each patch) -> [N, T, D],
                  plus the fixed 2-D sin-cos position embedding (MAE's, as DiT).
  Conditioning    c = MLP(sinusoidal embedding of the noise label, 256 frequencies)
                      [+ y_embedder(class labels)] [+ augment_embedder(augment labels)].
  N = depth blocks (adaLN-Zero): SiLU(c) -> Linear(6 D) = shift/scale/gate for attention and MLP;
                  x += gate_msa * Attention(LN(x) * (1 + scale_msa) + shift_msa),
                  x += gate_mlp * MLP(LN(x) * (1 + scale_mlp) + shift_mlp);
                  LN without affine parameters (eps 1e-6), multi-head self-attention with a
                  qkv projection, MLP D -> mlp_ratio D -> D with tanh-approximate GELU.
  Final layer     adaLN (shift/scale from SiLU(c)) -> Linear(p * p * out_channels) -> unpatchify.

Initialisation as DiT's `initialize_weights`: xavier-uniform linear layers with zero biases (the
patch embedding too, as a linear map of the flattened patch), N(0, 0.02^2) label and timestep-MLP
weights, and zero adaLN modulations and final linear layer, so a fresh net outputs zeros.

Labels. jaxdiff passes class labels as one-hot (or soft) vectors [N, label_dim], with the
all-zero vector as the unconditional ("null") label; label dropout for classifier-free guidance
happens outside the network. So labels are embedded by a bias-free linear layer (zero labels give
a zero embedding), where DiT looks up a row of an embedding table with one extra row for the null
class and drops labels inside the network. A DiT checkpoint's table loads as that layer's kernel
without its null row (or with it, as an ordinary last class, if `num_classes` counts it).
Augmentation labels (EDM's augment pipe) enter like class labels, through a bias-free,
zero-initialised layer; DiT has none.

Precision: parameters in `param_dtype`; `dtype` is the compute dtype of the linear layers and
attention (None: the input's, at least param_dtype). The residual stream, layer-norm statistics,
the timestep features and the attention softmax stay in at least float32 (under bf16 the
blocks compute in bf16 and add their gated outputs to a float32 stream). The output is float32
(float64 for float64 input).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Table 1 of the paper (a model name is size/patch, e.g. DiT-XL/2 = DIT_SIZES['XL'], patch_size=2).
DIT_SIZES = {
    'S': dict(hidden_size=384, depth=12, num_heads=6),
    'B': dict(hidden_size=768, depth=12, num_heads=12),
    'L': dict(hidden_size=1024, depth=24, num_heads=16),
    'XL': dict(hidden_size=1152, depth=28, num_heads=16),
}
FREQUENCY_EMBEDDING_SIZE = 256
MAX_PERIOD = 10000

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def check(img_resolution, patch_size=2, hidden_size=384, num_heads=6, dropout=0.0, **_):
    """Raise a ValueError naming the field for an inconsistent DiT configuration."""
    if patch_size < 1 or img_resolution % patch_size:
        raise ValueError(f'img_resolution={img_resolution} must be divisible by patch_size={patch_size}')
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f'hidden_size={hidden_size} must be divisible by num_heads={num_heads}')
    if hidden_size % 4:
        raise ValueError(f'hidden_size={hidden_size} must be divisible by 4 (the 2-D sin-cos position '
                         'embedding splits it into sin/cos of rows and columns)')
    if not 0 <= dropout < 1:
        raise ValueError(f'dropout={dropout} must lie in [0, 1)')


@functools.lru_cache(maxsize=None)
def sincos_position_embedding(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D position embedding [grid * grid, dim] (float64) of the row-major token grid, as
    MAE's and DiT's `get_2d_sincos_pos_embed`: token (i, j) gets
    [sin(j w), cos(j w), sin(i w), cos(i w)] with w_k = 10000^(-k / (dim/4)), k < dim/4
    (the column index j comes first)."""
    omega = 1.0 / MAX_PERIOD ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij')

    def embed(pos):
        angles = pos.reshape(-1, 1) * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([embed(cols), embed(rows)], axis=1)


def timestep_frequencies(half: int, dtype) -> np.ndarray:
    """w_k = exp(-ln(10000) k / half), k < half. In float32 these are DiT's own values: DiT forms
    the exponents in float32 (which perturbs w_k by up to 6e-7, i.e. 6e-4 rad in the phase of
    t = 1000), so a converted DiT checkpoint sees the same features; float64 is exact."""
    if np.dtype(dtype) == np.float64:
        return np.exp(-math.log(MAX_PERIOD) * np.arange(half, dtype=np.float64) / half)
    exponents = np.float32(-math.log(MAX_PERIOD)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponents.astype(np.float64)).astype(np.float32)


def timestep_embedding(t, dim: int = FREQUENCY_EMBEDDING_SIZE):
    """DiT's (GLIDE's) sinusoidal features [cos(t w), sin(t w)] of noise labels t [N] of any scale,
    computed in at least float32."""
    t = t.astype(jnp.promote_types(t.dtype, jnp.float32))
    angles = t[:, None] * jnp.asarray(timestep_frequencies(dim // 2, t.dtype), t.dtype)
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def attention(q, k, v, implementation=None):
    """softmax(q k^T / sqrt(d)) v per head, for q, k, v [N, T, heads, d]. jax.nn.dot_product_attention
    runs its softmax in float32 (under bf16 too) and can use the fused cuDNN kernel
    (`implementation='cudnn'`); it would round float64 to float32, so float64 is spelled out."""
    if q.dtype == jnp.float64:
        logits = jnp.einsum('nthd,nshd->nhts', q, k) / math.sqrt(q.shape[-1])
        return jnp.einsum('nhts,nshd->nthd', jax.nn.softmax(logits, axis=-1), v)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def modulate(x, shift, scale):
    """adaLN: x (1 + scale) + shift, with per-sample shift and scale [N, D] broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(dtype):
    # Two-pass variance (not flax's default E[x^2] - E[x]^2): the residual stream can have a large mean.
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False, dtype=dtype)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT's `DiTBlock`, timm's Attention and Mlp);
    dropout, if any, acts where timm's `proj_drop` and `Mlp(drop=...)` do."""
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_implementation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c, *, train=False):
        n, t, d = x.shape
        dense = functools.partial(nn.Dense, kernel_init=xavier_uniform, bias_init=zeros, dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train) if self.dropout else y
        modulation = dense(6 * d, kernel_init=zeros, name='adaLN_modulation')(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)

        h = modulate(layer_norm(self.dtype)(x), shift_msa, scale_msa)
        # timm's qkv layout: output channel s * D + head * d_head + i for s in (q, k, v).
        qkv = dense(3 * d, name='attn_qkv')(h).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        h = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.attention_implementation)
        h = drop(dense(d, name='attn_proj')(h.reshape(n, t, d)))
        x = x + gate_msa[:, None] * h

        h = modulate(layer_norm(self.dtype)(x), shift_mlp, scale_mlp)
        h = drop(nn.gelu(dense(int(d * self.mlp_ratio), name='mlp_fc1')(h), approximate=True))
        h = drop(dense(d, name='mlp_fc2')(h))
        return x + gate_mlp[:, None] * h


class DiT(nn.Module):
    """Diffusion transformer (DiT); `DIT_SIZES` holds the paper's S/B/L/XL widths and depths.

    Call with x [N, H, W, in_channels], noise_labels [N] (any scale: DDPM step indices, EDM's
    ln(sigma)/4, ...), class_labels [N, label_dim] (one-hot; None or all-zero = unconditional) and
    augment_labels [N, augment_dim] (None = no augmentation). Returns [N, H, W, out_channels] in
    float32, or float64 for float64 input. `train=True` enables dropout (rng 'dropout'), if any.
    `attention_implementation` goes to jax.nn.dot_product_attention (None: XLA; 'cudnn': the fused
    GPU kernel, which needs a bf16/fp16 `dtype`).
    """
    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention_implementation: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _check(self, x, noise_labels):
        """Raise ValueError for inconsistent options or inputs (shapes are static under jit)."""
        check(self.img_resolution, self.patch_size, self.hidden_size, self.num_heads, self.dropout)
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
        stream_dtype = jnp.promote_types(x.dtype, jnp.float32)  # Residual stream and output.
        n, p, d = x.shape[0], self.patch_size, self.hidden_size
        grid = self.img_resolution // p
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = functools.partial(nn.Dense, kernel_init=xavier_uniform, bias_init=zeros, **common)

        # Patchify: DiT initialises the conv as a linear map of the flattened p x p x C patch.
        x = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', name='x_embedder_proj',
                    kernel_init=nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3), **common)(x)
        x = x.reshape(n, grid * grid, d).astype(stream_dtype)
        x = x + jnp.asarray(sincos_position_embedding(d, grid), stream_dtype)

        # Conditioning vector c (DiT: t_embedder + y_embedder).
        normal = nn.initializers.normal(0.02)
        c = timestep_embedding(noise_labels)
        c = dense(d, kernel_init=normal, name='t_embedder_mlp_0')(c)
        c = dense(d, kernel_init=normal, name='t_embedder_mlp_2')(nn.silu(c))
        if self.label_dim:
            labels = (jnp.zeros((n, self.label_dim), c.dtype) if class_labels is None
                      else jnp.asarray(class_labels, c.dtype))
            c = c + nn.Dense(d, use_bias=False, kernel_init=normal, name='y_embedder', **common)(labels)
        if self.augment_dim:
            # Always called (zeros when absent), so the parameter tree does not depend on the inputs.
            augment = (jnp.zeros((n, self.augment_dim), c.dtype) if augment_labels is None
                       else jnp.asarray(augment_labels, c.dtype))
            c = c + nn.Dense(d, use_bias=False, kernel_init=zeros, name='augment_embedder', **common)(augment)

        for i in range(self.depth):
            x = DiTBlock(d, self.num_heads, self.mlp_ratio, self.dropout, self.attention_implementation,
                         name=f'blocks_{i}', **common)(x, c, train=train)

        shift, scale = jnp.split(dense(2 * d, kernel_init=zeros, name='final_layer_adaLN_modulation')(nn.silu(c)),
                                 2, axis=-1)
        x = modulate(layer_norm(self.dtype)(x), shift, scale)
        x = dense(p * p * self.out_channels, kernel_init=zeros, name='final_layer_linear')(x)
        # Unpatchify: token (i, j) holds the patch's pixels (a, b) as channels (a, b, c).
        x = x.reshape(n, grid, grid, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, grid * p, grid * p, self.out_channels).astype(stream_dtype)


def params_from_dit_state_dict(state_dict, *, num_classes: int | None = None):
    """DiT's PyTorch state dict (name -> array, e.g. `{k: v.numpy()}`) as this module's params.

    Linear weights [out, in] become kernels [in, out]; the patch conv [D, C, p, p] becomes HWIO.
    `pos_embed` (a fixed buffer, recomputed here) is dropped. The label table's first
    `num_classes` rows (default: all but DiT's last, null, row) become the y_embedder kernel.
    """
    params = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        if name == 'pos_embed':
            continue
        if name == 'y_embedder.embedding_table.weight':
            rows = value.shape[0] - 1 if num_classes is None else num_classes
            params['y_embedder'] = {'kernel': value[:rows]}
            continue
        module, leaf = name.rsplit('.', 1)
        # blocks.3.attn.qkv -> blocks_3/attn_qkv; t_embedder.mlp.0 -> t_embedder_mlp_0;
        # adaLN_modulation.1 (the Linear after SiLU) -> adaLN_modulation.
        module = re.sub(r'\.adaLN_modulation\.1$', '.adaLN_modulation', module)
        block = re.match(r'blocks\.(\d+)\.(.*)', module)
        path = [f'blocks_{block[1]}', block[2]] if block else [module]
        path = [part.replace('.', '_') for part in path]
        if leaf == 'weight':
            leaf, value = 'kernel', value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params
