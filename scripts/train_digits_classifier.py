"""Train the digits classifier behind the "digits FD" and write `jaxdiff/assets/digits_classifier.npz`.

    python scripts/train_digits_classifier.py [--seed 0] [--steps 1500] [--out PATH]

Data: sklearn's 1,797 8x8 digits as [-1, 1] NHWC (pixel / 8 - 1), split 80% train / 20%
held out, stratified by class with `seed`. Training uses light augmentation, so that the features
are stable on generated samples, which are never pixel-exact digits:

- a random shift of each image by -1, 0 or +1 pixel in each direction (the border is filled with
  the background value -1);
- additive Gaussian noise with a per-image standard deviation drawn from U(0, 0.15).

AdamW with a warm-up + cosine learning-rate schedule, cross-entropy loss. The held-out accuracy
(on unaugmented images) goes into the npz's metadata. Deterministic given the seed on CPU.

The npz holds every parameter under 'params/<module>/<name>' (float32) and 'meta/json' (a JSON
string with the accuracy, seed, step count, architecture and SCRIPT_VERSION).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.nets.digits_classifier import DigitsClassifier, init_params

SCRIPT_VERSION = 1
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / 'jaxdiff' / 'assets' / 'digits_classifier.npz'
MAX_SHIFT = 1
MAX_NOISE_STD = 0.15


def load_digits_split(seed: int, train_fraction: float = 0.8):
    """(x_train, y_train, x_test, y_test): digits as float32 NHWC in [-1, 1], stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, train_size=train_fraction, stratify=labels, random_state=seed)
    return x_train, y_train, x_test, y_test


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """Random +-MAX_SHIFT pixel shift (background fill -1) and Gaussian noise, per image."""
    n, h, w, _ = x.shape
    shift_key, noise_key, std_key = jax.random.split(key, 3)
    padded = jnp.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * MAX_SHIFT + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    shifted = jax.vmap(crop)(padded, offsets)
    std = jax.random.uniform(std_key, (n, 1, 1, 1), maxval=MAX_NOISE_STD)
    return shifted + std * jax.random.normal(noise_key, x.shape)


def train(*, seed: int = 0, steps: int = 1500, batch_size: int = 128, learning_rate: float = 3e-3,
          weight_decay: float = 1e-4, train_fraction: float = 0.8, log_every: int = 500) -> dict:
    """Train from scratch; returns {'params', 'accuracy' (held out), 'meta'} (no file written)."""
    x_train, y_train, x_test, y_test = load_digits_split(seed, train_fraction)
    module = DigitsClassifier()
    init_key, data_key = jax.random.split(jax.random.key(seed))
    params = init_params(module, init_key)['params']
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=max(1, steps // 20), decay_steps=max(steps, 2))
    optimizer = optax.adamw(schedule, weight_decay=weight_decay)
    opt_state = optimizer.init(params)
    x_train_dev, y_train_dev = jnp.asarray(x_train), jnp.asarray(y_train)

    def loss_fn(params, x, y, dropout_key):
        _, logits = module.apply({'params': params}, x, train=True, rngs={'dropout': dropout_key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, step):
        # Every random draw is derived from (seed, step): the run needs no key state.
        batch_key, aug_key, dropout_key = jax.random.split(jax.random.fold_in(data_key, step), 3)
        idx = jax.random.choice(batch_key, x_train_dev.shape[0], (batch_size,), replace=False)
        x = augment(aug_key, x_train_dev[idx])
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y_train_dev[idx], dropout_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, x):
        return jnp.argmax(module.apply({'params': params}, x)[1], -1)

    start = time.perf_counter()
    for step in range(steps):
        params, opt_state, loss = train_step(params, opt_state, step)
        if log_every and (step + 1) % log_every == 0:
            print(f'step {step + 1}/{steps}  loss {float(loss):.4f}', flush=True)
    params = jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    accuracy = float(np.mean(np.asarray(predict(params, jnp.asarray(x_test))) == y_test))
    meta = {
        'script': 'scripts/train_digits_classifier.py', 'script_version': SCRIPT_VERSION,
        'seed': seed, 'steps': steps, 'batch_size': batch_size, 'learning_rate': learning_rate,
        'weight_decay': weight_decay, 'train_fraction': train_fraction,
        'num_train': int(len(y_train)), 'num_test': int(len(y_test)), 'test_accuracy': accuracy,
        'augment': {'max_shift': MAX_SHIFT, 'max_noise_std': MAX_NOISE_STD},
        'module': {'widths': list(module.widths), 'feature_dim': module.feature_dim,
                   'num_classes': module.num_classes},
        'train_seconds': round(seconds, 1),
    }
    return {'params': params, 'accuracy': accuracy, 'meta': meta}


def save_classifier(path, params, meta: dict) -> None:
    """Write params as float32 under 'params/<path>' and meta as a JSON string under 'meta/json'."""
    flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep='/')
    arrays = {f'params/{k}': np.asarray(v, np.float32) for k, v in sorted(flat.items())}
    arrays['meta/json'] = np.array(json.dumps(meta, sort_keys=True))
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--out', default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    result = train(seed=args.seed, steps=args.steps)
    meta = result['meta']
    print(f"held-out accuracy {result['accuracy']:.4f} ({meta['num_test']} digits), "
          f"{meta['train_seconds']} s for {meta['steps']} steps")
    save_classifier(args.out, result['params'], meta)
    print(f'wrote {args.out} ({pathlib.Path(args.out).stat().st_size / 1024:.0f} KiB)')


if __name__ == '__main__':
    main()
