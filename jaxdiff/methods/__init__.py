"""The methods: one small module each, one plain dict from `config.method` to it.

Each module gives, for a run's config:

  check(config)                   a ValueError naming the field for a bad method field
  out_channels(config, channels)  the network's output channels
  model_factory(config)           make(module, params, *, train=False, dropout_key=None) -> model
  loss(config)                    loss(model, images, key, labels) -> per-element loss
  sampling(config, prior_images)  a `Sampling` (ihdm fits its prior on training images)
  likelihood_model(config, make, module, params)   what `scoring`'s bits/dim integrates, or None
  NEEDS_PRIOR_IMAGES              whether `sampling` needs training images

Nothing outside this package compares `config.method`.
"""
from __future__ import annotations

from jaxdiff.methods import blurring, ddpm, edm, gaussian, ihdm, score_sde
from jaxdiff.methods.common import Sampling

# simple diffusion is the Gaussian core with its own schedule, loss option and network: no module of its own.
METHODS = {'edm': edm, 'ddpm': ddpm, 'score_sde': score_sde, 'blurring': blurring, 'ihdm': ihdm,
           'simple_diffusion': gaussian}


def get(config):
    """The method module of `config.method`, or a ValueError naming the field."""
    name = config.get('method')
    if name not in METHODS:
        raise ValueError(f'method must be one of {tuple(METHODS)}, got {name!r}')
    return METHODS[name]


__all__ = ['METHODS', 'Sampling', 'get']
