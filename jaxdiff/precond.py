"""Preconditioning: turn a raw network F into a denoiser D(x; sigma) (EDM, Table 1).

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

Each parameterisation is a frozen dataclass (hashable, so it can be a static argument of
`jax.jit`) with `scalings(sigma) -> (c_skip, c_out, c_in, c_noise)`, the noise range the
network supports (`sigma_min`, `sigma_max`) and `round_sigma` (identity except for iDDPM,
whose network only knows a table of M noise levels). `Denoiser` binds one to a network and
its parameters; it is a pytree (the parameters are its leaves), so a sampler or loss can be
jit-compiled once and called with new parameters without recompiling.

The raw network is any `net(params, x, noise_labels, class_labels, augment_labels)`; for the
Flax modules in `jaxdiff.nets` use `flax_net(module)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules


def _batch_sigma(sigma, x):
    """sigma as an [N, 1, 1, 1] array in x's dtype (a scalar sigma applies to the whole batch)."""
    sigma = jnp.asarray(sigma, dtype=x.dtype)
    return jnp.broadcast_to(sigma.reshape(-1, *([1] * (x.ndim - 1))), (x.shape[0],) + (1,) * (x.ndim - 1))


@dataclasses.dataclass(frozen=True)
class EDMPrecond:
    """EDM: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
    c_noise = ln(s)/4, with sd = sigma_data."""
    sigma_data: float = 0.5
    sigma_min: float = 0.0
    sigma_max: float = float('inf')

    def scalings(self, sigma):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma ** 2 + sd2)
        c_in = 1 / jnp.sqrt(sd2 + sigma ** 2)
        c_noise = jnp.log(sigma) / 4
        return c_skip, c_out, c_in, c_noise

    def round_sigma(self, sigma):
        return sigma


@dataclasses.dataclass(frozen=True)
class VPPrecond:
    """Score-SDE VP: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = (M-1) t(s),
    with t(s) the inverse of the VP schedule sigma(t)."""
    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5

    def _sigma_float32(self, t: float) -> float:
        # NVlabs/edm evaluates the supported range in float32, where sigma(1e-5) rounds to 2^-10
        # rather than 1e-3; the sampler clamps its range with it, so we reproduce that (with a
        # correctly rounded float32 exp, as PyTorch's).
        f32 = np.float32
        t = f32(t)
        arg = f32(0.5) * f32(self.beta_d) * t * t + f32(self.beta_min) * t
        return float(np.sqrt(f32(np.exp(np.float64(arg))) - f32(1)))

    @property
    def sigma_min(self) -> float:
        return self._sigma_float32(self.epsilon_t)

    @property
    def sigma_max(self) -> float:
        return self._sigma_float32(1.0)

    def scalings(self, sigma):
        c_in = 1 / jnp.sqrt(sigma ** 2 + 1)
        c_noise = (self.M - 1) * schedules.vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return jnp.ones_like(sigma), -sigma, c_in, c_noise

    def round_sigma(self, sigma):
        return sigma


@dataclasses.dataclass(frozen=True)
class VEPrecond:
    """Score-SDE VE: c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s/2)."""
    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def scalings(self, sigma):
        return jnp.ones_like(sigma), sigma, jnp.ones_like(sigma), jnp.log(0.5 * sigma)

    def round_sigma(self, sigma):
        return sigma


@dataclasses.dataclass(frozen=True, eq=False)
class IDDPMPrecond:
    """Improved DDPM: c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1), c_noise = M-1-j(s), where
    j(s) is the index of the nearest entry u_j of the noise-level table (`round_sigma`).

    The network predicts 2*C channels (epsilon and the variance interpolation); only the first C
    are used. `u` defaults to the table recomputed by `schedules.iddpm_u` (float32 recursion,
    as NVlabs/edm); a converted EDM checkpoint passes its stored table.
    """
    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000
    u: Any = None

    def __post_init__(self):
        u = schedules.iddpm_u(self.M, self.C_1, self.C_2, dtype=np.float32) if self.u is None else self.u
        u = np.asarray(u, dtype=np.float32)
        if u.shape != (self.M + 1,):
            raise ValueError(f'IDDPMPrecond.u must have M+1 = {self.M + 1} entries, got shape {u.shape}')
        object.__setattr__(self, 'u', u)

    def __hash__(self):  # Hash by value so equal preconds share compiled samplers.
        return hash((self.C_1, self.C_2, self.M, self.u.tobytes()))

    def __eq__(self, other):
        return (isinstance(other, IDDPMPrecond) and (self.C_1, self.C_2, self.M) == (other.C_1, other.C_2, other.M)
                and np.array_equal(self.u, other.u))

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def scalings(self, sigma):
        _, index = schedules.round_to_table(sigma.astype(jnp.float32), self.u)
        c_noise = (self.M - 1 - index).astype(sigma.dtype)
        return jnp.ones_like(sigma), -sigma, 1 / jnp.sqrt(sigma ** 2 + 1), c_noise

    def round_sigma(self, sigma):
        rounded, _ = schedules.round_to_table(sigma, self.u)
        return rounded


Precond = EDMPrecond | VPPrecond | VEPrecond | IDDPMPrecond


class Denoiser(flax.struct.PyTreeNode):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) for one network and its parameters.

    Call as `denoise(x, sigma, labels=None, augment_labels=None)`: x is NHWC, sigma a scalar or
    [N]. A conditional network (label_dim > 0) called without labels gets zeros, as in EDM.
    The result has x's dtype. `sigma_min`, `sigma_max` and `round_sigma` come from the
    preconditioning; the samplers respect them.

    `net(params, x, noise_labels, class_labels, augment_labels)` must itself be a pytree
    (a `FlaxNet`, or `jax.tree_util.Partial(fn)` for a plain function) so that a Denoiser can be
    an argument of a jit-compiled function; `make_denoiser` and `denoiser_from_fn` do that.
    """
    params: Any
    net: Callable
    precond: Precond = flax.struct.field(pytree_node=False, default=EDMPrecond())
    label_dim: int = flax.struct.field(pytree_node=False, default=0)

    def __call__(self, x, sigma, labels=None, augment_labels=None):
        sigma = _batch_sigma(sigma, x)
        if self.label_dim and labels is None:
            labels = jnp.zeros((x.shape[0], self.label_dim), x.dtype)
        c_skip, c_out, c_in, c_noise = self.precond.scalings(sigma)
        F = self.net(self.params, c_in * x, c_noise.reshape(-1), labels, augment_labels)
        return (c_skip * x + c_out * F[..., :x.shape[-1]].astype(x.dtype)).astype(x.dtype)

    @property
    def sigma_min(self) -> float:
        return self.precond.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.precond.sigma_max

    def round_sigma(self, sigma):
        return self.precond.round_sigma(sigma)


class FlaxNet(flax.struct.PyTreeNode):
    """`net(params, x, noise_labels, class_labels, augment_labels)` for a jaxdiff Flax module.

    `train=True` enables dropout and label dropout, drawn from `dropout_key`.
    """
    module: Any = flax.struct.field(pytree_node=False)
    train: bool = flax.struct.field(pytree_node=False, default=False)
    dropout_key: Any = None

    def __call__(self, params, x, noise_labels, class_labels=None, augment_labels=None):
        rngs = {'dropout': self.dropout_key} if self.dropout_key is not None else None
        return self.module.apply({'params': params}, x, noise_labels, class_labels, augment_labels,
                                 train=self.train, rngs=rngs)


def make_denoiser(module, params, precond: Precond = EDMPrecond(), *, train: bool = False,
                  dropout_key=None) -> Denoiser:
    """Denoiser of a jaxdiff Flax network (`module(x, noise_labels, class_labels,
    augment_labels, train=...)`) with `params` under `precond`."""
    if train and dropout_key is None:
        raise ValueError('make_denoiser(train=True) needs a dropout_key')
    return Denoiser(params=params, net=FlaxNet(module, train, dropout_key), precond=precond,
                    label_dim=getattr(module, 'label_dim', 0))


def denoiser_from_fn(fn: Callable, params: Any = None, precond: Precond = EDMPrecond(),
                     label_dim: int = 0) -> Denoiser:
    """Denoiser of a plain raw-network function `fn(params, x, noise_labels, class_labels,
    augment_labels)`."""
    return Denoiser(params=params, net=jax.tree_util.Partial(fn), precond=precond, label_dim=label_dim)
