"""From a run's config to the library's objects: network, model, loss, sampler. The network comes
from `jaxdiff.nets`; everything method-specific from the method's module (`jaxdiff.methods`).
Each builder raises a ValueError naming the field, so a bad config fails at start-up, before any
compilation or data loading."""
from __future__ import annotations

import jax.numpy as jnp

from jaxdiff import methods, nets
from jaxdiff.methods import common

METHODS = tuple(methods.METHODS)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
Sampling = common.Sampling


def check_method(config) -> None:
    methods.get(config)


def build_module(config, *, label_dim: int = 0):
    """The Flax network of `config.model` for `config.data`'s image shape."""
    if config.model.dtype not in DTYPES:
        raise ValueError(f'model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}')
    kwargs = dict(config.model.kwargs)
    channels = config.data.channels
    try:
        module = nets.build(config.model.type, img_resolution=config.data.resolution, in_channels=channels,
                            out_channels=methods.get(config).out_channels(config, channels), label_dim=label_dim,
                            dtype=None if config.model.dtype == 'float32' else DTYPES[config.model.dtype], **kwargs)
    except TypeError as e:  # an unknown keyword argument of the network
        raise ValueError(f'model.kwargs: {e}') from None
    except ValueError as e:
        raise ValueError(f'model: {e}' if 'model_channels' not in str(e) else f'model.kwargs: {e}') from None
    return module


def build_loss(config):
    """`loss(model, images, key, labels)` of the config's method."""
    return methods.get(config).loss(config)


def model_factory(config):
    """`make_model(module, params, *, train=False, dropout_key=None)`: what the loss and the sampler call."""
    return methods.get(config).model_factory(config)


def build_sampling(config, prior_images=None) -> common.Sampling:
    """How the run samples (ihdm needs `prior_images`, training images in [-1, 1])."""
    return methods.get(config).sampling(config, prior_images)


def build_sampler(config):
    return common.build_sampler(config)


def check(config) -> None:
    """Every method field of the config (a ValueError naming the field)."""
    methods.get(config).check(config)
