"""Draw many samples from a trained network in fixed-size batches, with per-sample seeds.

Sample i is drawn from seed `seed + i` alone (its latents and its sampler noise), so any subset
of a set of samples can be regenerated, and the result does not depend on the batch size.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import precond as pc
from jaxdiff import samplers


def sample_many(draw, module, params, num: int, *, image_shape, seed: int = 0, batch_size: int = 256,
                labels: np.ndarray | None = None, progress=None) -> np.ndarray:
    """`num` samples as float32 NHWC in [-1, 1] (clipped), in batches of `batch_size`.

    draw(module, params, keys, labels, image_shape) -> images: one batch, sample n from keys[n]
      alone (`builders.Sampling.draw`).
    labels: optional one-hot [num, label_dim] for a conditional network (None: zeros, i.e. the
      network's unconditional behaviour as in EDM).
    progress: optional callable(done, total, seconds).
    """
    out = []
    start = time.perf_counter()
    for lo in range(0, num, batch_size):
        n = min(batch_size, num - lo)
        seeds = np.arange(seed + lo, seed + lo + batch_size)  # Pad the last batch: one compilation.
        keys = samplers.keys_from_seeds(seeds)
        batch_labels = None
        if labels is not None:
            batch_labels = np.zeros((batch_size, labels.shape[1]), np.float32)
            batch_labels[:n] = labels[lo:lo + n]
            batch_labels = jnp.asarray(batch_labels)
        images = draw(module, params, keys, batch_labels, tuple(image_shape))
        out.append(np.asarray(jax.device_get(images))[:n])
        if progress is not None:
            progress(lo + n, num, time.perf_counter() - start)
    return np.clip(np.concatenate(out), -1, 1)


def sample_images(module, params, precond, sampler: samplers.Sampler, num: int, *, image_shape,
                  seed: int = 0, batch_size: int = 256, labels: np.ndarray | None = None,
                  progress=None) -> np.ndarray:
    """`sample_many` with EDM's generalised `sampler` on the denoiser of `module` under `precond`."""
    def draw(module, params, keys, labels, image_shape):
        latents = samplers.latents_from_keys(keys, image_shape)
        return samplers.sample(sampler, pc.make_denoiser(module, params, precond), latents, keys, labels)
    return sample_many(draw, module, params, num, image_shape=image_shape, seed=seed, batch_size=batch_size,
                       labels=labels, progress=progress)


def labels_for_seeds(seeds, num_classes: int, classes=None) -> np.ndarray:
    """One-hot labels [len(seeds), num_classes] that depend on each sample's seed alone: seed s gets
    class classes[s mod len(classes)] (`sample.labels`; default all classes, so any num_classes
    consecutive seeds cover every class once). A ValueError names a class out of range."""
    classes = np.arange(num_classes) if classes is None or len(classes) == 0 else np.asarray(classes)
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f'sample.labels must be class indices in [0, {num_classes}), got {classes.tolist()}')
    return np.eye(num_classes, dtype=np.float32)[classes[np.asarray(seeds) % len(classes)]]
