"""Training state and the training step (EDM's training loop, Karras et al. 2022, App. F).

The state is an immutable pytree; `train_step` is a pure function of (state, batch, key) that
returns the next state and its metrics, jit-compiled once with the state donated and sharded
over a ('data', 'fsdp') mesh. EDM's conventions, in units of images:

  learning rate   lr * min(images_seen / warmup_images, 1), images_seen before the step; with
                  optim.cooldown_images > 0, times min((total_images - images_seen) / cooldown, 1)
  loss            sum of the per-element weighted loss / batch size (EDM's `loss.sum() / batch`)
  EMA             beta = 0.5 ** (batch / halflife), halflife = min(halflife_images,
                  rampup_ratio * images_seen); ema <- beta ema + (1 - beta) params

A step whose loss or gradients are not finite leaves params, EMA and optimiser state unchanged
and is counted in `skipped`. Random keys are derived from (seed, step), so a resumed run draws
the same noise as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array      # int32: steps taken (= images seen / batch size)
    params: Any
    ema_params: Any
    opt_state: Any
    skipped: jax.Array   # int32: non-finite updates skipped so far


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything static about a training run (hashable; closed over by the compiled step)."""
    module: Any
    make_model: Callable           # (module, params, *, train, dropout_key) -> what loss_fn takes
    loss_fn: Callable
    lr_schedule: Callable          # step -> learning rate
    optimizer: optax.GradientTransformation
    batch_size: int
    ema_halflife_images: float
    ema_rampup_ratio: float
    use_labels: bool = False


def learning_rate(step, *, lr: float, batch_size: int, warmup_images: float,
                  cooldown_images: float = 0.0, total_images: float = 0.0):
    """EDM's linear warm-up, lr * min(images / warmup_images, 1) with images = step * batch (0 at
    the first step), and optionally a linear cool-down to 0 over the last `cooldown_images` of
    `total_images` (warm-up, stable, decay): times min((total_images - images) / cooldown_images, 1).
    """
    images = jnp.asarray(step, jnp.float32) * batch_size  # float: step * batch overflows int32
    rate = jnp.asarray(lr, jnp.float32)
    if warmup_images > 0:
        rate = rate * jnp.minimum(images / warmup_images, 1.0)
    if cooldown_images > 0:
        rate = rate * jnp.clip((total_images - images) / cooldown_images, 0.0, 1.0)
    return rate


def ema_beta(step, *, batch_size: int, halflife_images: float, rampup_ratio: float):
    """EDM's EMA decay per step: 0.5 ** (batch / halflife), halflife ramped up with the images seen."""
    halflife = jnp.asarray(halflife_images, jnp.float32)
    if rampup_ratio > 0:
        halflife = jnp.minimum(halflife, jnp.asarray(step, jnp.float32) * batch_size * rampup_ratio)
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))


def make_optimizer(optim_config) -> optax.GradientTransformation:
    """Adam's direction (optional global-norm clipping first), without the learning rate: the
    step applies lr(images seen) itself, so a skipped step cannot shift the schedule."""
    adam = optax.scale_by_adam(b1=optim_config.beta1, b2=optim_config.beta2, eps=optim_config.eps)
    if optim_config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_config.grad_clip), adam)
    return adam


def make_setup(config, module, make_model, loss_fn) -> TrainSetup:
    """The static training setup of a run's config (optimiser, EMA, batch size).

    make_model(module, params, *, train, dropout_key) builds what `loss_fn(model, images, key,
    labels)` trains: a denoiser (`builders.model_factory` of a preconditioning, EDM), an eps model
    (blurring diffusion) or a heat model (IHDM)."""
    batch_size = config.train.batch_size
    cooldown, total = config.optim.cooldown_images, config.train.total_images
    if not 0 <= cooldown <= total:
        raise ValueError(f'optim.cooldown_images={cooldown} must lie in [0, train.total_images={total}]')
    schedule = functools.partial(learning_rate, lr=config.optim.lr, batch_size=batch_size,
                                 warmup_images=config.optim.warmup_images, cooldown_images=cooldown,
                                 total_images=total)
    return TrainSetup(module=module, make_model=make_model, loss_fn=loss_fn, lr_schedule=schedule,
                      optimizer=make_optimizer(config.optim), batch_size=batch_size,
                      ema_halflife_images=config.ema.halflife_images, ema_rampup_ratio=config.ema.rampup_ratio,
                      use_labels=config.data.use_labels)


def init_state(setup: TrainSetup, key, image_shape, label_dim: int = 0) -> TrainState:
    """Fresh parameters (EDM's initialisation), EMA = params, zeroed optimiser state."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    labels = jnp.zeros((1, label_dim), jnp.float32) if label_dim else None
    params = setup.module.init(key, x, jnp.zeros((1,), jnp.float32), labels)['params']
    # The EMA starts as a copy: the state is donated to the step, and two leaves sharing one
    # buffer cannot both be donated.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=setup.optimizer.init(params), skipped=jnp.zeros((), jnp.int32))


def loss_and_grads(setup: TrainSetup, params, batch, key):
    """The objective: sum of the per-element loss over the batch / batch size (EDM's), and its gradient.
    Returns (objective, mean per-element loss, gradients)."""
    noise_key, dropout_key = jax.random.split(key)
    labels = batch.get('label') if setup.use_labels else None

    def objective(params):
        model = setup.make_model(setup.module, params, train=True, dropout_key=dropout_key)
        loss = setup.loss_fn(model, batch['image'], noise_key, labels)
        return loss.sum() / batch['image'].shape[0], loss.mean()

    (objective_value, mean_loss), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return objective_value, mean_loss, grads


def train_step(setup: TrainSetup, state: TrainState, batch: dict, base_key) -> tuple[TrainState, dict]:
    """One optimiser step on one global batch; non-finite updates are skipped and counted."""
    key = jax.random.fold_in(base_key, state.step)
    _, mean_loss, grads = loss_and_grads(setup, state.params, batch, key)
    direction, opt_state = setup.optimizer.update(grads, state.opt_state, state.params)
    lr = setup.lr_schedule(state.step)
    params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
    beta = ema_beta(state.step, batch_size=setup.batch_size, halflife_images=setup.ema_halflife_images,
                    rampup_ratio=setup.ema_rampup_ratio)
    ema_params = jax.tree.map(lambda e, p: beta * e + (1 - beta) * p, state.ema_params, params)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(mean_loss) & jnp.isfinite(grad_norm)  # A non-finite gradient makes the norm so.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1,
                           params=keep(params, state.params),
                           ema_params=keep(ema_params, state.ema_params),
                           opt_state=keep(opt_state, state.opt_state),
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {'loss': mean_loss, 'grad_norm': grad_norm, 'skipped': new_state.skipped,
               'learning_rate': lr}
    return new_state, metrics


def compile_train_step(setup: TrainSetup, state_shardings, batch_sharding, replicated):
    """`train_step` jit-compiled for the mesh: state sharded and donated, batch split over devices."""
    return jax.jit(functools.partial(train_step, setup),
                   in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
