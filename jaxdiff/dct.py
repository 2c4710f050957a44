"""Orthonormal 2-D DCT-II over the spatial axes of NHWC batches (blurring diffusion, IHDM).

    C[k, n] = sqrt(2 / N) * c_k * cos(pi (2n + 1) k / (2N)),   c_0 = 1/sqrt(2), c_k = 1 otherwise

    dct2(x)[..., k, l, :] = sum_{h, w} C_H[k, h] C_W[l, w] x[..., h, w, :]      (U = C_H X C_W^T)
    idct2(u) = C_H^T U C_W                                                       (C orthogonal)

The matrix form is exact in float32 and float64 (the basis is built in float64 on the host and
cast), and is two small matrix products per image. Products run at HIGHEST precision: the
default on GPUs and TPUs would round the operands to bf16/tf32, which breaks orthonormality
far beyond float32 rounding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _dct_matrix_f64(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * m + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    c.setflags(write=False)
    return c


def dct_matrix(n: int, dtype=np.float32) -> np.ndarray:
    """The orthonormal DCT-II matrix C (rows are basis vectors): C @ x is the DCT of a length-n x."""
    if n < 1:
        raise ValueError(f'DCT size must be positive, got {n}')
    return _dct_matrix_f64(n).astype(dtype)


def _check(x) -> None:
    if x.ndim < 3:
        raise ValueError(f'expected [..., H, W, C] images, got shape {x.shape}')


def dct2(x):
    """Orthonormal 2-D DCT-II of x [..., H, W, C] over H and W (per channel)."""
    _check(x)
    ch = jnp.asarray(dct_matrix(x.shape[-3], x.dtype))
    cw = jnp.asarray(dct_matrix(x.shape[-2], x.dtype))
    return jnp.einsum('kh,...hwc,lw->...klc', ch, x, cw, precision=jax.lax.Precision.HIGHEST)


def idct2(u):
    """Inverse of `dct2` (orthonormal DCT-III) over H and W of u [..., H, W, C]."""
    _check(u)
    ch = jnp.asarray(dct_matrix(u.shape[-3], u.dtype))
    cw = jnp.asarray(dct_matrix(u.shape[-2], u.dtype))
    return jnp.einsum('kh,...klc,lw->...hwc', ch, u, cw, precision=jax.lax.Precision.HIGHEST)
