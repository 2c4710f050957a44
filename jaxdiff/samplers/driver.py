"""The one sampling loop: a host float64 table (grids + steps), then one jit-compiled `lax.scan`.

Noise: a sample's noise depends only on its own key (pass one key per sample, e.g. from
`keys_from_seeds`), never on its batch: the latents come from fold_in(key, 0) and step i's noise
from fold_in(key, i + 1). `step_noise` ([num_steps, *latents.shape], or [num_steps, k, ...] for
samplers that draw k normals per step) injects the noise instead, which reproduces a recorded run.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parameterize, processes
from jaxdiff.samplers import grids, steps
from jaxdiff.samplers.sampler import Sampler


def keys_from_seeds(seeds) -> jax.Array:
    """One PRNG key per sample from integer seeds: a sample's randomness then depends on its seed
    alone, whatever batch it is drawn in."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, dtype=jnp.uint32))


def latents_from_keys(keys, shape, dtype=jnp.float32) -> jax.Array:
    """Unit-normal latents [len(keys), *shape], sample n drawn from keys[n] alone."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, dtype))(keys)


def step_noise_from_keys(keys, step, shape, dtype=jnp.float32, count: int = 1) -> jax.Array:
    """Step `step`'s unit-normal noise, [count, N, *shape], sample n from fold_in(keys[n], step + 1)."""
    if count == 1:
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step + 1), shape, dtype))(keys)[None]
    draws = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step + 1), (count,) + tuple(shape), dtype))(keys)
    return jnp.swapaxes(draws, 0, 1)


def bind(model, process=None):
    """(model, process): a model of `jaxdiff.parameterize` carries its process; a plain EDM denoiser
    D(x, sigma, labels, augment_labels) runs on EDM's process over the noise levels it supports."""
    if process is None:
        process = getattr(model, 'process', None)
    if process is None:
        lo, hi = getattr(model, 'sigma_min', 0.0), getattr(model, 'sigma_max', float('inf'))
        process = processes.GaussianProcess(processes.EDM(sigma_min=lo, sigma_max=hi))
    if not hasattr(model, 'predict'):
        model = parameterize.from_denoiser(model, process)
    return model, process


def build_table(sampler: Sampler, model, process, shape):
    """(table, initial scale of the latents in the basis, whether the sampler draws noise), on the host."""
    grid = grids.time_grid(sampler, process, model.sigma_min, model.sigma_max, model.round_sigma)
    if sampler.solver in ('euler', 'heun'):
        if sampler.discretization in ('edm', 'vp', 've', 'iddpm'):
            noise_range = grids.sigma_range(sampler, process, model.sigma_min, model.sigma_max)
        else:
            noise_range = (float(grid.sigma[-1]), float(grid.sigma[0]))
        table, init = steps.edm_table(sampler, process, grid, shape, noise_range, model.round_sigma)
        return table, init, bool(np.any(table.noise_scale > 0))
    if sampler.solver == 'ancestral' and (sampler.variance == 'learned_range') != bool(getattr(model, 'learned_variance', False)):
        raise ValueError("sample.variance='learned_range' needs a model with learned variance (model.learned_variance) "
                         'and a model with learned variance needs it')
    if sampler.solver == 'ancestral' and sampler.variance != 'fixed_small' and not process.schedule.variance_preserving:
        raise ValueError(f'sample.variance={sampler.variance!r} is DDPM\'s, for variance-preserving processes; '
                         f'{type(process.schedule).__name__} is not one (use fixed_small)')
    build = {'ddim': steps.gaussian_table, 'ancestral': steps.gaussian_table, 'exp_heun': steps.exp_heun_table,
             'dpmpp_2m': steps.dpmpp_2m_table, 'pc': steps.pc_table}[sampler.solver]
    table, init = build(sampler, process, grid, shape)
    return table, init, sampler.stochastic


def sample(sampler: Sampler, model, latents, key=None, labels=None, augment_labels=None, *, process=None,
           step_noise=None, return_trajectory: bool = False):
    """Draw samples from unit-normal `latents` (NHWC) with `sampler` (jit-compiled, once per shapes and solver).

    model: a `jaxdiff.parameterize` model (Model, DenoiserModel, Guided), or an EDM denoiser
      `D(x, sigma, labels=None, augment_labels=None)` such as a `precond.Denoiser` (its noise range
      and round_sigma are respected).
    key: one key per sample ([N], e.g. `keys_from_seeds(seeds)`) or a single key (split into N; a
      sample's noise then depends on its batch position). Needed only by samplers that draw noise.
    return_trajectory: also return the state at the start of every step, [num_steps, *latents.shape]
      (EDM's state s(t) x for euler/heun, in pixel space).
    """
    model, process = bind(model, process)
    table, init, stochastic = build_table(sampler, model, process, latents.shape)
    count = steps.num_noises(sampler)
    if step_noise is not None:
        expected = (sampler.num_steps,) + ((count,) if count > 1 else ()) + latents.shape
        if step_noise.shape != expected:
            raise ValueError(f'step_noise must have shape {expected}, got {step_noise.shape}')
        step_noise = step_noise.reshape((sampler.num_steps, count) + latents.shape)
        stochastic = True
    elif stochastic:
        if key is None:
            raise ValueError(f'The {sampler.solver} sampler draws noise (S_churn > 0, eta > 0, ancestral or pc): '
                             'pass a key or step_noise')
        if jnp.ndim(key) == 0:
            key = jax.random.split(key, latents.shape[0])
    two_stage = sampler.solver in ('heun', 'exp_heun')
    return _run(model=model, latents=latents, init=jnp.asarray(init, latents.dtype),
                table=steps.tree_cast(table, latents.dtype), keys=key if stochastic and step_noise is None else None,
                step_noise=step_noise, labels=labels, augment_labels=augment_labels, process=process,
                solver=sampler.solver, count=count if stochastic else 0,
                second_order_steps=sampler.num_steps - 1 if two_stage else 0,
                learned_variance=sampler.solver == 'ancestral' and sampler.variance == 'learned_range',
                snr=sampler.snr, corrector_steps=sampler.corrector_steps, return_trajectory=return_trajectory)


def scaled_denoiser(model, process, labels, augment_labels):
    """`denoise(x~, point) -> (D, variance_fraction)`: the model's x0_hat in the basis at scaled state x~."""
    def denoise(x, point):
        prediction = model.predict(process.from_basis(point.alpha * x), point.t, point.alpha, point.sigma,
                                   labels, augment_labels)
        return process.to_basis(prediction.x0), prediction.variance_fraction
    return denoise


@functools.partial(jax.jit, static_argnames=('process', 'solver', 'count', 'second_order_steps', 'learned_variance',
                                             'snr', 'corrector_steps', 'return_trajectory'))
def _run(*, model, latents, init, table, keys, step_noise, labels, augment_labels, process, solver, count,
         second_order_steps, learned_variance, snr, corrector_steps, return_trajectory):
    denoise = scaled_denoiser(model, process, labels, augment_labels)

    def step(state, row, noise, second_order):
        if solver in ('euler', 'heun'):
            return steps.edm_step(denoise, state, row, noise, second_order=second_order)
        if solver in ('ddim', 'ancestral'):
            return steps.gaussian_step(denoise, state, row, noise, learned_variance=learned_variance)
        if solver == 'exp_heun':
            return steps.exp_heun_step(denoise, state, row, noise, second_order=second_order)
        if solver == 'dpmpp_2m':
            return steps.dpmpp_2m_step(denoise, state, row, noise)
        return steps.pc_step(denoise, state, row, noise, snr=snr, corrector_steps=corrector_steps)

    def noise_at(i, given):
        if not count:
            return jnp.zeros((1,), latents.dtype)
        if given is not None:
            return given
        return step_noise_from_keys(keys, i, latents.shape[1:], latents.dtype, count)

    def body(second_order):
        def scan_step(state, inputs):
            row, i, given = inputs
            x = state[0] if solver == 'dpmpp_2m' else state
            return step(state, row, noise_at(i, given), second_order), (process.from_basis(x) if return_trajectory else None)
        return scan_step

    x = process.to_basis(latents) * init
    state = (x, jnp.zeros_like(x)) if solver == 'dpmpp_2m' else x
    num_steps = jax.tree.leaves(table)[0].shape[0]
    rows = (table, jnp.arange(num_steps), step_noise)
    trajectory = []
    if second_order_steps:
        state, traj = jax.lax.scan(body(True), state, jax.tree.map(lambda a: a[:second_order_steps], rows))
        trajectory.append(traj)
    # The remaining steps are first order: all of them, or for heun / exp_heun the last (into the data).
    state, traj = jax.lax.scan(body(False), state, jax.tree.map(lambda a: a[second_order_steps:], rows))
    trajectory.append(traj)
    x = process.from_basis(state[0] if solver == 'dpmpp_2m' else state)
    return (x, jnp.concatenate(trajectory)) if return_trajectory else x
