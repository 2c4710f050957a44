"""Blurring diffusion (Hoogeboom & Salimans 2023): the Gaussian method on a BlurringProcess
(`config.process.sigma_blur_max`, min_scale; sigma_blur_max = 0 is cosine-logSNR Gaussian
diffusion), the eps loss, the paper's ancestral sampler or any other solver of the core; the
deterministic solvers get `parameterize.LowSNRCutoff` (`sample.low_snr_cutoff`)."""
from __future__ import annotations

from jaxdiff import parameterize
from jaxdiff.methods import common, gaussian
from jaxdiff.methods.gaussian import NEEDS_PRIOR_IMAGES, likelihood_model, loss, model_factory, out_channels  # noqa: F401


def check(config) -> None:
    gaussian.check(config)
    if config.process.get('sigma_blur_max') is None:
        raise ValueError('process.sigma_blur_max must be set for method blurring (0 = no blur)')


def sampling(config, prior_images=None) -> common.Sampling:
    cutoff = config.sample.get('low_snr_cutoff', None)
    stochastic = config.sample.solver in ('ancestral', 'pc')
    wrap = (lambda m: m) if cutoff is None or stochastic else (lambda m: parameterize.LowSNRCutoff(m, float(cutoff)))
    return common.sampling(config, model_factory(config), wrap=wrap)
