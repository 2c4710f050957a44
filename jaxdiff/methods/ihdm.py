"""Inverse heat dissipation (Rissanen et al. 2023): a heat model (residual deblurring) on
`ihdm.HeatDissipation(**config.process)`, its loss, and its sampler from the kernel-density prior
of blurred training images (`prior_images`)."""
from __future__ import annotations

import functools

import jax

from jaxdiff import ihdm
from jaxdiff.methods import common

NEEDS_PRIOR_IMAGES = True


def build_process(config) -> ihdm.HeatDissipation:
    try:
        return ihdm.HeatDissipation(**config.process.to_dict())
    except TypeError as e:  # an unknown field
        raise ValueError(f'process: {e}') from None
    except ValueError as e:
        raise ValueError(f'process: {str(e).replace("HeatDissipation.", "process.")}') from None


def check(config) -> None:
    loss(config)
    if config.sample.get('guidance', 1.0) != 1.0:
        raise ValueError('sample.guidance: IHDM has no classifier-free guidance (its model is not a Gaussian denoiser)')
    process = build_process(config)
    if config.sample.num_steps != process.K:
        raise ValueError(f'sample.num_steps must equal process.K = {process.K} for method ihdm (its sampler '
                         f'runs through every blur level), got {config.sample.num_steps}')


def out_channels(config, channels: int) -> int:
    return channels


def model_factory(config):
    return ihdm.make_model


def loss(config):
    if config.loss.type != 'ihdm':
        raise ValueError(f"loss.type must be 'ihdm' for method 'ihdm', got {config.loss.type!r}")
    return functools.partial(ihdm.ihdm_loss, process=build_process(config))


def sampling(config, prior_images=None) -> common.Sampling:
    check(config)
    process = build_process(config)
    if prior_images is None:
        raise ValueError('method ihdm samples from a prior fitted on training images: pass prior_images')
    prior = ihdm.fit_prior(process, prior_images)

    def draw(module, params, keys, labels, image_shape):
        u_K = jax.vmap(lambda k: ihdm.sample_prior(prior, jax.random.fold_in(k, 0), 1)[0])(keys)
        return ihdm.sample(ihdm.make_model(module, params), u_K, keys, labels, process=process)
    return common.Sampling(draw, process.K, process.K, f'ihdm {process.K} steps')


def likelihood_model(config, make, module, params):
    return None
