"""From a run's config to the library's objects: network, preconditioning, loss, sampler.

Each builder validates the fields it reads and raises a ValueError naming the field, so a bad
config fails at start-up, before any compilation or data loading.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxdiff import losses, precond, samplers
from jaxdiff.nets import convert

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_module(config, *, label_dim: int = 0):
    """The Flax network of `config.model` for `config.data`'s image shape."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f'model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}')
    kwargs = dict(config.model.kwargs)
    try:
        module = convert.edm_module(config.model.type, img_resolution=config.data.resolution,
                                    img_channels=config.data.channels, label_dim=label_dim,
                                    out_channels=config.data.channels * (2 if config.precond.type == 'iddpm' else 1),
                                    dtype=None if config.model.dtype == 'float32' else DTYPES[config.model.dtype],
                                    **kwargs)
    except TypeError as e:  # An unknown keyword argument of the network.
        raise ValueError(f'model.kwargs: {e}') from None
    except ValueError as e:
        raise ValueError(f'model: {e}') from None
    _check_channels(config)
    return module


def _check_channels(config) -> None:
    """GroupNorm needs channel counts divisible by its group count (min(32, C // 4))."""
    mc = config.model.kwargs.get('model_channels')
    mults = config.model.kwargs.get('channel_mult', ())
    for mult in mults:
        c = mc * mult
        groups = min(32, c // 4)
        if groups == 0 or c % groups:
            raise ValueError(f'model.kwargs: model_channels * channel_mult = {c} channels cannot be split into '
                             f'{groups} normalisation groups; use a multiple of 32 (or of 4 below 128)')


def build_precond(config):
    """The preconditioning named by `config.precond.type` ('edm', 'vp', 've', 'iddpm')."""
    kind = config.precond.type
    if kind == 'edm':
        return precond.EDMPrecond(sigma_data=config.precond.get('sigma_data', 0.5))
    if kind == 'vp':
        return precond.VPPrecond()
    if kind == 've':
        return precond.VEPrecond()
    if kind == 'iddpm':
        return precond.IDDPMPrecond()
    raise ValueError(f"precond.type must be one of 'edm', 'vp', 've', 'iddpm', got {kind!r}")


def build_loss(config):
    """`loss(denoise, images, key, labels)` for `config.loss.type` ('edm', 'vp', 've')."""
    kind = config.loss.type
    if kind == 'edm':
        return functools.partial(losses.edm_loss, P_mean=config.loss.P_mean, P_std=config.loss.P_std,
                                 sigma_data=config.precond.get('sigma_data', 0.5))
    if kind == 'vp':
        return losses.vp_loss
    if kind == 've':
        return losses.ve_loss
    raise ValueError(f"loss.type must be one of 'edm', 'vp', 've', got {kind!r}")


def build_sampler(config) -> samplers.Sampler:
    """The sampler of `config.sample`."""
    s = config.sample
    try:
        return samplers.Sampler(num_steps=s.num_steps, solver=s.solver, discretization=s.discretization,
                                schedule=s.schedule, scaling=s.scaling, S_churn=s.S_churn, S_min=s.S_min,
                                S_max=s.S_max, S_noise=s.S_noise)
    except ValueError as e:
        raise ValueError(str(e).replace('Sampler.', 'sample.')) from None
