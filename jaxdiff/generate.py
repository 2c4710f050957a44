"""Draw many samples from a trained network in fixed-size batches, with per-sample seeds.

Sample i is drawn from seed `seed + i` alone (its latents and its sampler noise), so any subset
of a set of samples can be regenerated, and the result does not depend on the batch size.

`sample_many` keeps the device busy: it dispatches batch k+1 (JAX dispatch is asynchronous)
before it copies batch k to the host, so the copy and the host's work (clipping, writing a file,
the progress bar) overlap the next batch's sampling. With `out_dir` every finished batch is a file
there, and a later call with the same settings loads them and draws only the missing batches: a
killed run of 50,000 samples resumes at its last finished batch.

out_dir holds

  manifest.json        num, seed, batch_size, image_shape, a hash of the labels and the caller's
                       `fingerprint` (e.g. the checkpoint step and the sampler's settings);
                       a later call with any of them different is refused, naming the field
  batch_000000.npy     float32 [n, H, W, C] in [-1, 1]: samples index*batch_size .. + n - 1
  ...                  (each written to a temporary name, then renamed: a file is whole or absent)
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import precond as pc
from jaxdiff import samplers
from jaxdiff import workdir as wd

MANIFEST = 'manifest.json'


def batch_path(out_dir, index: int) -> pathlib.Path:
    """out_dir/batch_<index:06d>.npy: samples index*batch_size .. (index+1)*batch_size - 1."""
    return pathlib.Path(out_dir) / f'batch_{index:06d}.npy'


def _flatten(value, prefix: str = '') -> dict:
    """{'a.b': leaf} of nested dicts (a non-dict value is one leaf under `prefix`)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out = {}
    for k, v in value.items():
        out.update(_flatten(v, f'{prefix}.{k}' if prefix else str(k)))
    return out


def manifest(num: int, seed: int, batch_size: int, image_shape, labels=None, fingerprint=None) -> dict:
    """What a batch file's contents depend on, as JSON values (`fingerprint`: anything JSON can hold
    that identifies the network and the sampler, e.g. {'step': 1000, 'sampler': ...})."""
    labels_hash = None
    if labels is not None:
        labels = np.ascontiguousarray(labels, np.float32)
        labels_hash = hashlib.sha256(repr(labels.shape).encode() + labels.tobytes()).hexdigest()[:16]
    value = {'num': int(num), 'seed': int(seed), 'batch_size': int(batch_size),
             'image_shape': [int(d) for d in image_shape], 'labels_sha256': labels_hash,
             'fingerprint': fingerprint}
    return json.loads(json.dumps(value))  # tuples as lists: compares equal to what is read back


def check_manifest(out_dir: pathlib.Path, expected: dict, files: str = 'batch_*.npy') -> None:
    """Write out_dir/manifest.json, or check the one there against `expected`: a ValueError names
    the first field that differs. `files`: the glob of the data files (`sample_many`'s batches,
    `scoring`'s blocks), refused when they are there without a manifest."""
    path = out_dir / MANIFEST
    if not path.exists():
        if any(out_dir.glob(files)):
            raise ValueError(f'{out_dir} holds {files.split("_")[0]} files but no {MANIFEST}: they cannot be checked '
                             'against this call\'s settings; pass another out_dir or delete them')
        wd.write_atomically(path, lambda f: f.write(json.dumps(expected, indent=1).encode()))
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f'{path} is not readable JSON ({e}): delete {out_dir} to draw afresh') from None
    saved_flat, expected_flat = _flatten(saved), _flatten(expected)
    for field in list(expected_flat) + [k for k in saved_flat if k not in expected_flat]:
        old, new = saved_flat.get(field, '<absent>'), expected_flat.get(field, '<absent>')
        if old != new:
            raise ValueError(f'{path} was written with {field}={old!r}, this call has {field}={new!r}: '
                             f'its batches are other samples; pass another out_dir or delete {out_dir}')


def _load_batch(path: pathlib.Path, n: int, image_shape) -> np.ndarray:
    """The samples in one batch file, which must be float32 [n, *image_shape]; a ValueError names the file."""
    expected = (n, *image_shape)
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f'{path} is not a readable .npy file ({type(e).__name__}: {e}): delete it to '
                         'draw that batch again') from None
    if x.dtype != np.float32 or x.shape != expected:
        raise ValueError(f'{path} holds {x.dtype} {list(x.shape)}, expected float32 {list(expected)}: '
                         'delete it to draw that batch again')
    return x


def _batch_inputs(index: int, num: int, seed: int, batch_size: int, labels):
    """(n, keys, labels) of batch `index`: n real samples, padded to batch_size with the seeds after
    them (one compiled program for every batch; the padding's samples are dropped)."""
    lo = index * batch_size
    n = min(batch_size, num - lo)
    keys = samplers.keys_from_seeds(np.arange(seed + lo, seed + lo + batch_size))
    batch_labels = None
    if labels is not None:
        batch_labels = np.zeros((batch_size, labels.shape[1]), np.float32)
        batch_labels[:n] = labels[lo:lo + n]
        batch_labels = jnp.asarray(batch_labels)
    return n, keys, batch_labels


def sample_many(draw, module, params, num: int, *, image_shape, seed: int = 0, batch_size: int = 256,
                labels: np.ndarray | None = None, progress=None, out_dir=None, fingerprint=None) -> np.ndarray:
    """`num` samples as float32 NHWC in [-1, 1] (clipped), in batches of `batch_size`.

    draw(module, params, keys, labels, image_shape) -> images: one batch, sample n from keys[n]
      alone (`builders.Sampling.draw`).
    labels: optional one-hot [num, label_dim] for a conditional network (None: zeros, i.e. the
      network's unconditional behaviour as in EDM).
    progress: optional callable(done, total, seconds): once before the first draw (done = the
      samples loaded from out_dir, seconds = 0) and after each batch is on the host (done counts
      the loaded ones too; seconds since that first call, so the first drawn batch's includes
      compilation).
    out_dir: optional directory (created) of resumable batch files (module docstring): the batches
      found there are loaded, checked, and not drawn again; each drawn one is written there.
      None (the default) keeps everything in memory. The result is the same either way.
    fingerprint: JSON-able value kept in out_dir's manifest: pass what identifies `params` and
      `draw` (a checkpoint step, the sampler's settings); a later call with another is refused.

    Batch k+1 is dispatched before batch k is copied to the host, so two batches' outputs are on
    the device at once; every batch runs the same program on the same inputs as a loop that
    fetches each batch before drawing the next, so the samples are identical to that loop's.
    """
    image_shape = tuple(int(d) for d in image_shape)
    num_batches = -(-num // batch_size)
    found = {}
    if out_dir is not None:
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        check_manifest(out_dir, manifest(num, seed, batch_size, image_shape, labels, fingerprint))
        for stale in out_dir.glob('.batch_*.tmp'):  # left by a run killed while writing
            stale.unlink(missing_ok=True)
        for index in range(num_batches):
            path = batch_path(out_dir, index)
            if path.exists():
                found[index] = _load_batch(path, min(batch_size, num - index * batch_size), image_shape)
    done = sum(len(x) for x in found.values())
    start = time.perf_counter()
    if progress is not None:
        progress(done, num, 0.0)

    def finish(index: int, n: int, images) -> None:
        nonlocal done
        x = np.clip(np.asarray(jax.device_get(images), np.float32)[:n], -1, 1)
        if out_dir is not None:
            wd.write_atomically(batch_path(out_dir, index), lambda f: np.save(f, x, allow_pickle=False))
        found[index] = x
        done += n
        if progress is not None:
            progress(done, num, time.perf_counter() - start)

    pending = None  # (index, n, images still on the device) of the batch dispatched last
    for index in (i for i in range(num_batches) if i not in found):
        n, keys, batch_labels = _batch_inputs(index, num, seed, batch_size, labels)
        images = draw(module, params, keys, batch_labels, image_shape)
        if hasattr(images, 'copy_to_host_async'):
            images.copy_to_host_async()  # the copy starts as soon as the batch is done, before we ask
        if pending is not None:
            finish(*pending)
        pending = (index, n, images)
    if pending is not None:
        finish(*pending)
    return np.concatenate([found[i] for i in range(num_batches)])


def sample_images(module, params, precond, sampler: samplers.Sampler, num: int, *, image_shape,
                  seed: int = 0, batch_size: int = 256, labels: np.ndarray | None = None,
                  progress=None, out_dir=None, fingerprint=None) -> np.ndarray:
    """`sample_many` with EDM's generalised `sampler` on the denoiser of `module` under `precond`."""
    def draw(module, params, keys, labels, image_shape):
        latents = samplers.latents_from_keys(keys, image_shape)
        return samplers.sample(sampler, pc.make_denoiser(module, params, precond), latents, keys, labels)
    return sample_many(draw, module, params, num, image_shape=image_shape, seed=seed, batch_size=batch_size,
                       labels=labels, progress=progress, out_dir=out_dir, fingerprint=fingerprint)


def labels_for_seeds(seeds, num_classes: int, classes=None) -> np.ndarray:
    """One-hot labels [len(seeds), num_classes] that depend on each sample's seed alone: seed s gets
    class classes[s mod len(classes)] (`sample.labels`; default all classes, so any num_classes
    consecutive seeds cover every class once). A ValueError names a class out of range."""
    classes = np.arange(num_classes) if classes is None or len(classes) == 0 else np.asarray(classes)
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0 or classes.max() >= num_classes:
        raise ValueError(f'sample.labels must be class indices in [0, {num_classes}), got {classes.tolist()}')
    return np.eye(num_classes, dtype=np.float32)[classes[np.asarray(seeds) % len(classes)]]
