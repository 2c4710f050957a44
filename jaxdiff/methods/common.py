"""What the Gaussian methods (ddpm, score_sde, blurring, and edm's sampler) share: the process,
the sampler and the model of a config."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from jaxdiff import parameterize, precond, processes, samplers


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a run draws samples: `draw(module, params, keys, labels, image_shape) -> images`
    (jit-compiled inside), sample n from keys[n] alone. `num_evals`: network evaluations per sample."""
    draw: Callable
    num_steps: int
    num_evals: int
    description: str


def _errors_name(prefix: str):
    """Re-raise a ValueError/TypeError of a constructor as one naming the config block."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except TypeError as e:  # an unknown field
                raise ValueError(f'{prefix}: {e}') from None
            except ValueError as e:
                message = str(e)
                for name in ('Sampler.', 'GaussianProcess.', 'BlurringProcess.', 'Discrete.', 'ShiftedCosine.',
                             'InterpolatedCosine.', 'Cosine.'):
                    message = message.replace(name, f'{prefix}.')
                raise ValueError(message) from None
        return inner
    return wrap


@_errors_name('process')
def build_process(config):
    """`config.process`: `schedule` (a name in `processes.SCHEDULES`) and its fields, plus the
    blurring fields (sigma_blur_max, min_scale) for a BlurringProcess. The resolution-shifted
    cosines take `image_d` from `data.resolution` unless it is set."""
    fields = dict(config.process.to_dict())
    kind = fields.pop('schedule', 'cosine')
    if kind not in processes.SCHEDULES:
        raise ValueError(f'process.schedule must be one of {tuple(processes.SCHEDULES)}, got {kind!r}')
    blur = {k: fields.pop(k) for k in ('sigma_blur_max', 'min_scale') if k in fields}
    if kind in ('cosine_shifted', 'cosine_interpolated') and fields.get('image_d') is None:
        fields['image_d'] = config.data.resolution  # simple diffusion: the schedule follows the image size
    if 'beta_kwargs' in fields:
        fields['beta_kwargs'] = tuple(sorted(dict(fields['beta_kwargs']).items()))
    schedule = processes.SCHEDULES[kind](**fields)
    if blur:
        return processes.BlurringProcess(schedule, **blur)
    return processes.GaussianProcess(schedule)


SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(samplers.Sampler))


@_errors_name('sample')
def build_sampler(config) -> samplers.Sampler:
    """The `samplers.Sampler` of `config.sample` (its fields that are Sampler fields)."""
    s = config.sample
    return samplers.Sampler(**{name: s[name] for name in SAMPLER_FIELDS if name in s})


def model_factory(config, process) -> Callable:
    """make(module, params, *, train, dropout_key) -> a `parameterize.Model` of `config.model`."""
    m = config.model
    kwargs = dict(output=m.get('output', 'eps'), noise_labels=m.get('noise_labels', 'schedule'),
                  learned_variance=m.get('learned_variance', False))
    try:
        parameterize.check(process, **kwargs)
    except ValueError as e:
        raise ValueError(str(e)) from None
    if kwargs['output'] == 'edm':
        kwargs['precond'] = precond.EDMPrecond(sigma_data=m.get('sigma_data', 0.5))
    return functools.partial(parameterize.make_model, process=process, **kwargs)


def guidance(config) -> tuple[float, tuple | None]:
    """(s, interval) of `sample.guidance` (s = 1: none) and `sample.guidance_interval` ((lo, hi)
    noise levels sigma / alpha, or None: everywhere); a ValueError naming the field."""
    s = config.sample.get('guidance', 1.0)
    interval = config.sample.get('guidance_interval', None)
    if s != 1.0:
        from jaxdiff import train
        train.check_number(config, 'sample.guidance')
        if not config.data.use_labels:
            raise ValueError(f'sample.guidance={s} guides a class-conditional model: it needs data.use_labels=True')
    if interval is not None:
        interval = tuple(float(v) for v in interval)
        if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
            raise ValueError(f'sample.guidance_interval must be (lo, hi) noise levels with 0 <= lo < hi, got {interval}')
    return float(s), interval


def guided(config, model):
    """The model with classifier-free guidance (`parameterize.Guided`) when sample.guidance != 1."""
    s, interval = guidance(config)
    if s == 1.0:
        return model
    return parameterize.Guided(samplers.bind(model)[0], s, interval)


def sampling(config, make: Callable, *, wrap=lambda model: model) -> Sampling:
    """Draw with `build_sampler(config)` from unit-normal latents of each sample's key, with
    classifier-free guidance when `sample.guidance` != 1 (each guided step evaluates the network
    on the conditional and the null label: twice the network work, same step count)."""
    sampler = build_sampler(config)
    s, _ = guidance(config)

    clip = config.sample.get('clip_denoised', False)

    def draw(module, params, keys, labels, image_shape):
        latents = samplers.latents_from_keys(keys, tuple(image_shape))
        model = guided(config, wrap(make(module, params)))
        if clip:
            model = parameterize.ClipDenoised(samplers.bind(model)[0])
        return samplers.sample(sampler, model, latents, keys, labels)
    description = f'{sampler.solver} {sampler.num_steps} steps ({sampler.discretization} grid)'
    return Sampling(draw, sampler.num_steps, sampler.num_evals * (2 if s != 1.0 else 1),
                    description + (f', guidance {s:g}' if s != 1.0 else '') + (', x0 clipped' if clip else ''))
