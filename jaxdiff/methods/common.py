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
                for name in ('Sampler.', 'GaussianProcess.', 'BlurringProcess.', 'Discrete.', 'Cosine.'):
                    message = message.replace(name, f'{prefix}.')
                raise ValueError(message) from None
        return inner
    return wrap


@_errors_name('process')
def build_process(config):
    """`config.process`: `schedule` (cosine | vp | ve | edm | discrete) and its fields, plus the
    blurring fields (sigma_blur_max, min_scale) for a BlurringProcess."""
    fields = dict(config.process.to_dict())
    kind = fields.pop('schedule', 'cosine')
    if kind not in processes.SCHEDULES:
        raise ValueError(f'process.schedule must be one of {tuple(processes.SCHEDULES)}, got {kind!r}')
    blur = {k: fields.pop(k) for k in ('sigma_blur_max', 'min_scale') if k in fields}
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


def sampling(config, make: Callable, *, wrap=lambda model: model) -> Sampling:
    """Draw with `build_sampler(config)` from unit-normal latents of each sample's key."""
    sampler = build_sampler(config)

    def draw(module, params, keys, labels, image_shape):
        latents = samplers.latents_from_keys(keys, tuple(image_shape))
        return samplers.sample(sampler, wrap(make(module, params)), latents, keys, labels)
    return Sampling(draw, sampler.num_steps, sampler.num_evals,
                    f'{sampler.solver} {sampler.num_steps} steps ({sampler.discretization} grid)')
