"""From a run's config to the library's objects: network, model, loss, sampler.

`config.method` picks the family:

  edm       a denoiser D(x; sigma) under `config.precond` (EDM, VP, VE, iDDPM preconditioning),
            EDM's losses (`config.loss.type` edm | vp | ve) and EDM's generalised sampler
            (`config.sample`: solver euler | heun, discretisation, schedule, scaling, churn).
  blurring  an eps model on `processes.BlurringProcess(**config.process)` (sigma_blur_max = 0 is
            the cosine-logSNR Gaussian diffusion), the eps loss, and the process samplers
            (`config.sample.solver` ancestral | euler (DDIM) | heun | exp_heun).
  ihdm      a heat model (residual deblurring) on `ihdm.HeatDissipation(**config.process)`, its
            loss, and its sampler from the KDE prior of blurred training images.

Each builder validates the fields it reads and raises a ValueError naming the field, so a bad
config fails at start-up, before any compilation or data loading.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff import ihdm, losses, parameterize, precond, processes, samplers
from jaxdiff.nets import convert

METHODS = ('edm', 'blurring', 'ihdm')

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
    """`loss(model, images, key, labels)` for `config.loss.type`: 'edm', 'vp', 've' (method edm),
    'eps' (blurring) or 'ihdm'."""
    kind = config.loss.type
    if config.method == 'blurring':
        if kind != 'eps':
            raise ValueError(f"loss.type must be 'eps' for method 'blurring', got {kind!r}")
        return functools.partial(losses.eps_loss, process=build_process(config))
    if config.method == 'ihdm':
        if kind != 'ihdm':
            raise ValueError(f"loss.type must be 'ihdm' for method 'ihdm', got {kind!r}")
        return functools.partial(ihdm.ihdm_loss, process=build_process(config))
    if kind == 'edm':
        return functools.partial(losses.edm_loss, P_mean=config.loss.P_mean, P_std=config.loss.P_std,
                                 sigma_data=config.precond.get('sigma_data', 0.5))
    if kind == 'vp':
        return losses.vp_loss
    if kind == 've':
        return losses.ve_loss
    raise ValueError(f"loss.type must be one of 'edm', 'vp', 've', got {kind!r}")


def build_sampler(config) -> samplers.Sampler:
    """EDM's generalised sampler of `config.sample` (method edm)."""
    s = config.sample
    try:
        return samplers.Sampler(num_steps=s.num_steps, solver=s.solver, discretization=s.discretization,
                                schedule=s.schedule, scaling=s.scaling, S_churn=s.S_churn, S_min=s.S_min,
                                S_max=s.S_max, S_noise=s.S_noise)
    except ValueError as e:
        raise ValueError(str(e).replace('Sampler.', 'sample.')) from None


def check_method(config) -> None:
    if config.get('method') not in METHODS:
        raise ValueError(f'method must be one of {METHODS}, got {config.get("method")!r}')


def build_process(config):
    """The forward process of `config.process` (blurring: BlurringProcess; ihdm: HeatDissipation)."""
    cls = {'blurring': processes.BlurringProcess, 'ihdm': ihdm.HeatDissipation}[config.method]
    fields = config.process.to_dict()
    if config.method == 'blurring':
        fields['schedule'] = processes.Cosine(fields.pop('logsnr_min', -10.0), fields.pop('logsnr_max', 10.0))
    try:
        return cls(**fields)
    except TypeError as e:  # An unknown field.
        raise ValueError(f'process: {e}') from None
    except ValueError as e:
        raise ValueError(f'process: {str(e).replace(cls.__name__ + ".", "process.")}') from None


def model_factory(config) -> Callable:
    """`make_model(module, params, *, train=False, dropout_key=None)`: what the loss and the
    sampler call: a `precond.Denoiser` (edm), `precond.EpsModel` (blurring) or `ihdm.HeatModel`."""
    check_method(config)
    if config.method == 'edm':
        return functools.partial(precond.make_denoiser, precond=build_precond(config))
    if config.method == 'blurring':
        return precond.make_eps_model
    return ihdm.make_model


PROCESS_SOLVERS = ('ancestral', 'euler', 'heun', 'exp_heun', 'ddim', 'dpmpp_2m')


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a run draws samples: `draw(module, params, keys, labels) -> images` (jit-compiled
    inside), sample n from keys[n] alone. `num_evals`: network evaluations per sample."""
    draw: Callable
    num_steps: int
    num_evals: int
    description: str


def build_sampling(config, prior_images=None) -> Sampling:
    """The sampler of `config.sample` for `config.method`. ihdm needs `prior_images` (training
    images [M, H, W, C] in [-1, 1]) to fit its prior."""
    check_method(config)
    s = config.sample
    if config.method == 'edm':
        sampler, make = build_sampler(config), model_factory(config)

        def draw(module, params, keys, labels, image_shape):
            latents = samplers.latents_from_keys(keys, tuple(image_shape))
            return samplers.sample(sampler, make(module, params), latents, keys, labels)
        return Sampling(draw, sampler.num_steps, sampler.num_evals,
                        f'{sampler.solver} {sampler.num_steps} steps ({sampler.discretization} discretisation)')

    process = build_process(config)
    if s.num_steps < 1:
        raise ValueError(f'sample.num_steps must be at least 1, got {s.num_steps}')
    if config.method == 'blurring':
        if s.solver not in PROCESS_SOLVERS:
            raise ValueError(f'sample.solver must be one of {PROCESS_SOLVERS} for method blurring, got {s.solver!r}')
        spacing = s.get('spacing', 'uniform')
        if spacing not in ('uniform', 'rho'):
            raise ValueError(f"sample.spacing must be one of ('uniform', 'rho'), got {spacing!r}")
        lo, hi = samplers.grids.process_noise_range(process)
        grid = dict(discretization='uniform') if spacing == 'uniform' else dict(discretization='edm', sigma_min=lo,
                                                                                 sigma_max=hi)
        sampler = samplers.Sampler(solver=s.solver, num_steps=s.num_steps, **grid)
        cutoff = s.get('low_snr_cutoff', None) if s.solver != 'ancestral' else None

        def draw(module, params, keys, labels, image_shape):
            model = parameterize.make_model(module, params, process, 'eps')
            if cutoff is not None:
                model = parameterize.LowSNRCutoff(model, float(cutoff))
            latents = samplers.latents_from_keys(keys, tuple(image_shape))
            return samplers.sample(sampler, model, latents, keys, labels)
        return Sampling(draw, s.num_steps, sampler.num_evals, f'{s.solver} {s.num_steps} steps')

    if s.num_steps != process.K:
        raise ValueError(f'sample.num_steps must equal process.K = {process.K} for method ihdm (its sampler '
                         f'runs through every blur level), got {s.num_steps}')
    if prior_images is None:
        raise ValueError('method ihdm samples from a prior fitted on training images: pass prior_images')
    prior = ihdm.fit_prior(process, prior_images)

    def draw(module, params, keys, labels, image_shape):
        u_K = jax.vmap(lambda k: ihdm.sample_prior(prior, jax.random.fold_in(k, 0), 1)[0])(keys)
        return ihdm.sample(ihdm.make_model(module, params), u_K, keys, labels, process=process)
    return Sampling(draw, process.K, process.K, f'ihdm {process.K} steps')
