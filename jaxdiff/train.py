"""Training state and the training step (EDM's training loop, Karras et al. 2022, App. F).

The state is an immutable pytree; `train_step` is a pure function of (state, batch, key) that
returns the next state and its metrics, jit-compiled once with the state donated and sharded
over a ('data', 'fsdp') mesh. EDM's conventions, in units of images:

  learning rate   lr * min(images_seen / warmup_images, 1), images_seen before the step; with
                  optim.cooldown_images > 0, times min((total_images - images_seen) / cooldown, 1)
  loss            sum of the per-element weighted loss / batch size (EDM's `loss.sum() / batch`)
  EMA             beta = 0.5 ** (batch / halflife), halflife = min(halflife_images,
                  rampup_ratio * images_seen); ema <- beta ema + (1 - beta) params

A step whose loss, gradients or resulting parameters (or EMA) are not finite leaves params, EMA
and optimiser state unchanged and is counted in `skipped`: a finite gradient can still give a
non-finite update (an overflowing Adam step, a learning rate of nan or inf). Random keys are derived from (seed, step), so a resumed run draws
the same noise as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
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
    label_dropout: float = 0.0     # P(a label is replaced by the null label, zeros) per image, for CFG


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


def check_number(config, field: str, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, allow_inf: bool = False) -> None:
    """Raise a ValueError naming `field` (dotted, e.g. 'optim.lr') unless its value is a number
    (an integer if `integer`), finite unless `allow_inf`, and within [low, high] (an end
    excluded when `low_open` / `high_open`)."""
    value = config
    for name in field.split('.'):
        value = value[name]
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f'{field} must be {"an integer" if integer else "a number"}, got {value!r}')
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f'{field} must be finite, got {value!r}')
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f'{field} must be {_range_text(low, high, low_open, high_open)}, got {value!r}')


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    """'in [0, 1)', '> 0', '<= 5', ... for `check_number`'s messages."""
    if low is not None and high is not None:
        return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    if low is not None:
        return f'{">" if low_open else ">="} {low}'
    return f'{"<" if high_open else "<="} {high}'


def check_config(config) -> None:
    """The numeric fields the training step reads (optim, ema, train, seed), each a ValueError
    naming the field: a learning rate of nan would otherwise train to non-finite weights."""
    check_number(config, 'seed', low=0, high=2 ** 31 - 1, high_open=True, integer=True)  # seed + 1 keys the noise
    check_number(config, 'optim.lr', low=0, low_open=True)
    for field in ('optim.warmup_images', 'optim.cooldown_images', 'optim.grad_clip', 'ema.halflife_images',
                  'ema.rampup_ratio'):
        check_number(config, field, low=0)
    for field in ('optim.beta1', 'optim.beta2'):
        check_number(config, field, low=0, high=1, high_open=True)
    check_number(config, 'optim.eps', low=0, low_open=True)
    check_number(config, 'train.batch_size', low=1, integer=True)
    check_number(config, 'train.total_images', low=1, integer=True)
    if 'label_dropout' in config.model:
        check_number(config, 'model.label_dropout', low=0, high=1)
    cooldown, total = config.optim.cooldown_images, config.train.total_images
    if not 0 <= cooldown <= total:
        raise ValueError(f'optim.cooldown_images={cooldown} must lie in [0, train.total_images={total}]')


def make_setup(config, module, make_model, loss_fn) -> TrainSetup:
    """The static training setup of a run's config (optimiser, EMA, batch size).

    make_model(module, params, *, train, dropout_key) builds what `loss_fn(model, images, key,
    labels)` trains: a denoiser (`builders.model_factory` of a preconditioning, EDM), a
    `parameterize` model on a process (ddpm, score_sde, blurring) or a heat model (IHDM)."""
    check_config(config)
    batch_size = config.train.batch_size
    cooldown, total = config.optim.cooldown_images, config.train.total_images
    schedule = functools.partial(learning_rate, lr=config.optim.lr, batch_size=batch_size,
                                 warmup_images=config.optim.warmup_images, cooldown_images=cooldown,
                                 total_images=total)
    return TrainSetup(module=module, make_model=make_model, loss_fn=loss_fn, lr_schedule=schedule,
                      optimizer=make_optimizer(config.optim), batch_size=batch_size,
                      ema_halflife_images=config.ema.halflife_images, ema_rampup_ratio=config.ema.rampup_ratio,
                      use_labels=config.data.use_labels, label_dropout=config.model.get('label_dropout', 0.0))


def init_state(setup: TrainSetup, key, image_shape, label_dim: int = 0) -> TrainState:
    """Fresh parameters (EDM's initialisation), EMA = params, zeroed optimiser state."""
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    labels = jnp.zeros((1, label_dim), jnp.float32) if label_dim else None
    params = setup.module.init(key, x, jnp.zeros((1,), jnp.float32), labels)['params']
    # The EMA starts as a copy: the state is donated to the step, and two leaves sharing one
    # buffer cannot both be donated.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=setup.optimizer.init(params), skipped=jnp.zeros((), jnp.int32))


def drop_labels(labels, key, rate: float):
    """Classifier-free guidance's training: each image's one-hot label becomes the null label (zeros)
    with probability `rate` (Ho & Salimans 2022, Alg. 1), independently per image."""
    keep = jax.random.uniform(key, (labels.shape[0],)) >= rate
    return labels * keep[:, None].astype(labels.dtype)


def loss_and_grads(setup: TrainSetup, params, batch, key):
    """The objective: sum of the per-element loss over the batch / batch size (EDM's), and its gradient.
    Returns (objective, mean per-element loss, gradients)."""
    noise_key, dropout_key = jax.random.split(key)
    labels = batch.get('label') if setup.use_labels else None
    if labels is not None and setup.label_dropout > 0:
        labels = drop_labels(labels, jax.random.fold_in(key, 2), setup.label_dropout)

    def objective(params):
        model = setup.make_model(setup.module, params, train=True, dropout_key=dropout_key)
        loss = setup.loss_fn(model, batch['image'], noise_key, labels)
        return loss.sum() / batch['image'].shape[0], loss.mean()

    (objective_value, mean_loss), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return objective_value, mean_loss, grads


def all_finite(tree) -> jax.Array:
    """True when every element of every leaf of `tree` is finite (a norm could overflow instead)."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


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
    finite = finite & all_finite(params) & all_finite(ema_params)  # The update itself, whatever its cause.
    # A conditional, not a jnp.where per leaf: every where would depend on the reduction over all
    # parameters, and XLA:CPU then took minutes to compile the step (ConvNeXt digits: 142 s against
    # 20 s; benchmarks/RESULTS.md §12). The values are the same.
    params, ema_params, opt_state = jax.lax.cond(
        finite, lambda: (params, ema_params, opt_state), lambda: (state.params, state.ema_params, state.opt_state))
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {'loss': mean_loss, 'grad_norm': grad_norm, 'skipped': new_state.skipped,
               'learning_rate': lr}
    return new_state, metrics


def compile_train_step(setup: TrainSetup, state_shardings, batch_sharding, replicated):
    """`train_step` jit-compiled for the mesh: state sharded and donated, batch split over devices."""
    return jax.jit(functools.partial(train_step, setup),
                   in_shardings=(state_shardings, batch_sharding, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
