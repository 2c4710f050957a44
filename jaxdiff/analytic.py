"""Closed-form denoisers for data whose distribution is known, for tests and sanity checks.

For data x ~ N(m, C) and z = x + sigma n, the ideal denoiser is the posterior mean

    D(z; sigma) = E[x | z] = m + C (C + sigma^2 I)^{-1} (z - m),

so every sampler, loss and likelihood computation can be checked against exact answers
without training a network. Arrays are NHWC; the covariance acts on the flattened H*W*C vector.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


class GaussianDenoiser(flax.struct.PyTreeNode):
    """Ideal denoiser of N(mean, cov) data; `mean` has the image shape, `cov` is [D, D]
    with D = mean.size. Uses an eigendecomposition of cov, so each call costs O(D^2)."""
    mean: jax.Array
    eigvals: jax.Array
    eigvecs: jax.Array

    @classmethod
    def create(cls, mean, cov):
        eigvals, eigvecs = jnp.linalg.eigh(cov)
        return cls(mean=mean, eigvals=jnp.clip(eigvals, 0, None), eigvecs=eigvecs)

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        n = x.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (n,))
        r = (x - self.mean).reshape(n, -1) @ self.eigvecs
        shrink = self.eigvals / (self.eigvals + sigma[:, None] ** 2)
        return self.mean + ((r * shrink) @ self.eigvecs.T).reshape(x.shape)


class EmpiricalDenoiser(flax.struct.PyTreeNode):
    """Ideal denoiser of the empirical distribution of a data set (a mixture of point masses):

        D(z; sigma) = sum_i w_i(z) y_i,  w = softmax_i(-|z - y_i|^2 / (2 sigma^2)).

    Sampling with it reproduces training images exactly (it is the fully memorising optimum of
    the denoising loss), which makes it a quick end-to-end check of a sampler on real images.
    """
    data: jax.Array  # [M, H, W, C]

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        n = x.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype).reshape(-1), (n,))
        flat_x, flat_y = x.reshape(n, -1), self.data.reshape(self.data.shape[0], -1).astype(x.dtype)
        sq_dist = (jnp.sum(flat_x ** 2, 1)[:, None] - 2 * flat_x @ flat_y.T + jnp.sum(flat_y ** 2, 1)[None, :])
        weights = jax.nn.softmax(-sq_dist / (2 * sigma[:, None] ** 2), axis=1)
        return (weights @ flat_y).reshape(x.shape)
