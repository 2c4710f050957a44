"""EDM (Karras et al. 2022): a denoiser D(x; sigma) under `config.precond` (EDM, VP, VE or iDDPM
preconditioning), EDM's losses (`config.loss.type` edm | vp | ve) and any sampler of the core
(EDM's generalised Heun/Euler with churn by default; the model is run on EDM's process, alpha = 1,
sigma = t)."""
from __future__ import annotations

import functools

from jaxdiff import losses, precond, train
from jaxdiff.methods import common

NEEDS_PRIOR_IMAGES = False
PRECONDS = {'edm': lambda c: precond.EDMPrecond(sigma_data=c.precond.get('sigma_data', 0.5)),
            'vp': lambda c: precond.VPPrecond(), 've': lambda c: precond.VEPrecond(),
            'iddpm': lambda c: precond.IDDPMPrecond()}
LOSSES = ('edm', 'vp', 've')


def check(config) -> None:
    build_precond(config)
    loss(config)
    common.build_sampler(config)
    train.check_number(config, 'precond.sigma_data', low=0, low_open=True)
    train.check_number(config, 'loss.P_mean')
    train.check_number(config, 'loss.P_std', low=0, low_open=True)


def build_precond(config):
    """The preconditioning named by `config.precond.type`."""
    kind = config.precond.type
    if kind not in PRECONDS:
        raise ValueError(f'precond.type must be one of {tuple(PRECONDS)}, got {kind!r}')
    return PRECONDS[kind](config)


def out_channels(config, channels: int) -> int:
    """iDDPM's network predicts 2C channels (eps and the variance interpolation)."""
    return 2 * channels if config.precond.type == 'iddpm' else channels


def model_factory(config):
    return functools.partial(precond.make_denoiser, precond=build_precond(config))


def loss(config):
    kind = config.loss.type
    if kind == 'edm':
        return functools.partial(losses.edm_loss, P_mean=config.loss.P_mean, P_std=config.loss.P_std,
                                 sigma_data=config.precond.get('sigma_data', 0.5))
    if kind in ('vp', 've'):
        return {'vp': losses.vp_loss, 've': losses.ve_loss}[kind]
    raise ValueError(f'loss.type must be one of {LOSSES}, got {kind!r}')


def sampling(config, prior_images=None) -> common.Sampling:
    return common.sampling(config, model_factory(config))


def likelihood_model(config, make, module, params):
    """The denoiser, whose PF-ODE `scoring` integrates for bits/dim."""
    return make(module, params)
