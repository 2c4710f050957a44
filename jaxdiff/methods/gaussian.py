"""The Gaussian-process methods' shared shape (ddpm, score_sde, blurring): a process of
`config.process`, a `parameterize` model of `config.model` (output eps | x0 | v, learned variance),
the denoising loss on it (`config.loss.type`: the target eps | x0 | v; `loss.vlb_weight`: iDDPM's
hybrid L_vlb term; `loss.multiscale_lowest`: simple diffusion's multiscale loss; `loss.sigmoid_bias`: VDM++/SiD2's sigmoid weighting; `loss.min_snr_gamma`: Min-SNR-gamma
weighting) and any sampler of the core."""
from __future__ import annotations

import functools

from jaxdiff import losses, processes, train
from jaxdiff.methods import common

NEEDS_PRIOR_IMAGES = False


def check(config) -> None:
    loss(config)
    model_factory(config)
    sampler = common.build_sampler(config)
    if sampler.solver == 'ancestral':  # learned variance with its sampler, and DDPM variances on VP only
        learned = config.model.get('learned_variance', False)
        if (sampler.variance == 'learned_range') != bool(learned):
            raise ValueError("sample.variance='learned_range' goes with model.learned_variance=True, and back")
    for field in ('sample.eta', 'sample.snr'):
        train.check_number(config, field, low=0)


def out_channels(config, channels: int) -> int:
    return 2 * channels if config.model.get('learned_variance', False) else channels


def model_factory(config):
    return common.model_factory(config, common.build_process(config))


def loss(config):
    process = common.build_process(config)
    if config.loss.type not in losses.TARGETS:
        raise ValueError(f'loss.type must be one of {losses.TARGETS}, got {config.loss.type!r}')
    vlb_weight = config.loss.get('vlb_weight', 0.0)
    if vlb_weight:
        train.check_number(config, 'loss.vlb_weight', low=0)
        losses.check_vlb(process, config.model.get('learned_variance', False))
    lowest = config.loss.get('multiscale_lowest', 0)
    if lowest:
        train.check_number(config, 'loss.multiscale_lowest', low=1, integer=True)
        losses.multiscale_scales(config.data.resolution, lowest)  # a ValueError naming the field
    gamma = config.loss.get('min_snr_gamma', 0.0)
    if gamma:
        train.check_number(config, 'loss.min_snr_gamma', low=0)
        if not isinstance(process, processes.GaussianProcess):
            raise ValueError('loss.min_snr_gamma weights by the scalar SNR of a GaussianProcess; '
                             f'process is a {type(process).__name__}')
    bias = config.loss.get('sigmoid_bias', None)
    if bias is not None:
        train.check_number(config, 'loss.sigmoid_bias')
        if config.loss.type != 'eps' or not isinstance(process, processes.GaussianProcess) \
                or isinstance(process.schedule, processes.Discrete):
            raise ValueError("loss.sigmoid_bias weights the eps loss (loss.type='eps') of a continuous-time "
                             f"GaussianProcess; got loss.type={config.loss.type!r} on {type(process).__name__}"
                             f"({type(process.schedule).__name__})")
        bias = float(bias)
    return functools.partial(losses.diffusion_loss, process=process, target=config.loss.type, vlb_weight=vlb_weight,
                             multiscale_lowest=lowest, min_snr_gamma=gamma, sigmoid_bias=bias)


def sampling(config, prior_images=None) -> common.Sampling:
    return common.sampling(config, model_factory(config))


def likelihood_model(config, make, module, params):
    """The model on its process, whose PF-ODE `scoring` integrates for bits/dim."""
    return make(module, params)
