"""Evaluation runs: sample a model with fixed seeds, score the samples, write what was done.

Two entry points, independent of the launcher:

    result = evaluate_samples(config, sample_fn, step=step, workdir=workdir, denoise=denoise)
    info = compute_reference(config, 'runs/cifar10/ref_cifar10.npz')        # --mode=ref

`evaluate_samples` draws `config.eval.seed_sets` sets of `config.eval.num_samples` samples, set j
from the seeds

    config.eval.seed + j N, ..., config.eval.seed + (j + 1) N - 1,   N = config.eval.num_samples,

scores each set with the metrics of `config.eval.metrics` on the features of
`config.eval.features`, and writes `eval_<step:08d>.json` to the work directory (`eval_<step:08d>.1.json`,
... for later evaluations of the same step). EDM's protocol
(NVlabs/edm README, "Calculating FID": FID of 50,000 images with seeds 0-49999, 50000-99999 and
100000-149999; "In our paper, we calculated each FID three times and reported the minimum") is
`num_samples=50_000, seed_sets=3`: the headline figures are those of the set with the lowest FD,
and `over_sets` holds each figure's min/mean/max over the sets.

Metrics (`config.eval.metrics`, any subset of `METRICS`):

  'fd'    Fréchet distance of the sample features to the reference statistics (`metrics.
          frechet_distance`): FID with the Inception features.
  'kid'   kernel Inception distance (`metrics.kernel_inception_distance`, 100 subsets of
          min(1000, N, M)) against the reference features: `kid`, `kid_std`.
  'prdc'  improved precision/recall (k = 3) and density/coverage (k = 5) (`metrics.
          manifold_metrics`) of the first min(N, M) samples against the M reference features.
  'is'    Inception Score (`metrics.inception_score`, 10 splits) from the network's logits.
  'bpd'   bits/dim of `config.eval.bpd_num_images` data images through the probability-flow ODE
          (`likelihood.bits_per_dim`, adaptive RK45, one Rademacher Hutchinson probe, uniform
          dequantisation) of the process of `config.precond.type` (edm / vp / ve) for an EDM
          denoiser, or of the model's own process (`likelihood.bits_per_dim_of_model`: ddpm,
          score_sde, blurring). Needs the denoiser or model; computed once (it does not depend on
          the samples' seeds). IHDM has no likelihood.

Features (`config.eval.features`, one of `FEATURES`):

  'digits'     the project's digits classifier: `evaluate.digits_report` of the samples against
               all the embedded digits (FD, KID, precision/recall/density/coverage, each with its
               real-vs-real floor, class histogram; `'is'` adds the classifier's Inception-Score
               analogue). Needs data.name='digits' at 8x8. No reference file.
  'inception'  FID Inception-v3 (`nets.inception`, weights from `config.eval.inception_weights`)
               on the samples quantised to uint8 (as published FIDs are computed on saved images;
               one channel repeated to RGB, as EDM's fid.py does), against the reference file
               `config.eval.ref` (mu, sigma, and the reference features KID and PRDC need).
  'random'     the fixed random-CNN features of `nets.random_features` (D = 358 for RGB, 354 for
               one channel; weights drawn from numpy's default_rng(2020), nothing to download) on
               the samples quantised to uint8 as for Inception, against a reference file of the
               same network. Untrained: it measures colour, contrast, edges and texture at four
               scales, not semantics. Its FD is not FID and is comparable only with other runs'
               FD on random features of the same data at the same resolution. No logits: 'is' is
               an error with eval.features='random', and skipped (with a note) under 'auto'.
  'auto'       'digits' for the 8x8 one-channel digits data set; else 'inception' when
               `config.eval.inception_weights` is set; else 'random'.

Reference files (`compute_reference`, EDM's `fid.py ref`): an .npz with `mu` [D] and `sigma`
[D, D] (float64: all of the split's images, no flips), which EDM's fid.py reads as it is, plus
`features` [K, D] float32: the features of the K = min(eval.ref_num_features, size) images that
`data.eval_images(config.data, K, seed=0)` returns (a uniform random subset, in data-set order),
and `meta` (a JSON string: data set, resolution, network, counts). EDM's own reference files,
which have no `features`, give FD only (KID and PRDC are then skipped, with a note). A file is
used only with the network that made it (meta 'network'; a file without it is taken as
Inception, EDM's): another network's file is an error naming eval.ref. With eval.ref unset the
file is <workdir>/ref_<data.name>.npz (`default_ref_path`), or ref_<data.name>_random.npz for the
random features, so the two never overwrite each other. For an embedded data set
(`data.EMBEDDED`, at most 1,024 images) scored with the random features, a missing file is
computed on the spot (seconds) and written there, so a default run on the photos scores with no
`--mode=ref`; TFDS data sets, and Inception features, need the explicit `--mode=ref`.

Resuming a killed draw: with `blocks_root` (the runner: <workdir>/eval), each seed set is drawn
into its own directory `blocks_root/blocks_<step:08d>_seed<seed>_<hash>/` (`blocks_dir`), as
--mode=sample draws into `generate.sample_many`'s out_dir:

  manifest.json            `draw_manifest`: eval.num_samples, the set's first seed, eval.batch_size,
                           the image shape and, as its fingerprint, the checkpoint step, the
                           caller's sampler settings and what is kept (images, the features'
                           network); a directory whose manifest differs is refused, naming the field
  block_000000000.npz      what the draw keeps of the block of samples start .. start + batch_size
  ...                      - 1 (start in the name): `images` [n, H, W, C] when the samples are kept
                           (the digits; the first set when `first_set_fn` is given), `pool` [n, D]
                           and `logits` [n, C] of the feature network; each written to a temporary
                           name, then renamed

A later call with the same settings loads the finished blocks and draws only the others (the
results are those of an uninterrupted draw); the directories are removed once the scores are
written. Without `blocks_root` everything stays in memory.

Several processes: every process calls these functions. Each draws and scores its own share of
the seeds (contiguous blocks of `config.eval.batch_size` seeds), and the features are gathered
with `metrics.gather_features` in seed order, so the results do not depend on the number of
processes. `sample_fn` is called the same number of times with the same sizes on every process
(the last blocks are padded with seeds past the set, whose samples are dropped): a sampler over
parameters sharded across processes stays in step; so, resuming, a block is loaded only where
every process has finished its block at that place in its share. Each process writes its own
blocks; only the main process writes the other files.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from jaxdiff import data, generate, images, metrics
from jaxdiff.nets import random_features
from jaxdiff import workdir as wd
from jaxdiff.workdir import write_atomically
from jaxdiff.monitor import log as _logger

METRICS = ('fd', 'kid', 'prdc', 'is', 'bpd')
SAMPLE_METRICS = ('fd', 'kid', 'prdc', 'is')  # the ones that need samples
FEATURES = ('auto', 'digits', 'inception', 'random')
BPD_PROCESSES = ('edm', 'vp', 've')  # precond.type values with a likelihood.*_process
REF_SUBSET_SEED = 0  # reference features: the images of data.eval_images(config.data, K, seed=0)
IS_SPLITS = 10
MIN_REF_FEATURES = 6  # PRDC's k = 5 nearest neighbours need 6 reference vectors
MAX_SEED = 2 ** 32  # samplers.keys_from_seeds takes uint32 seeds

FeaturesFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Config checks


def check_config(config) -> None:
    """Raise ValueError naming the `eval.*` field that is invalid (names, counts, seeds); reads no
    file. `evaluate_samples` and `compute_reference` call it first; a launcher may call it at
    start-up."""
    e = config.eval
    metric_names = tuple(e.metrics) if isinstance(e.metrics, (tuple, list)) else None
    if not metric_names:
        raise ValueError(f'eval.metrics must be a non-empty tuple of metric names from {METRICS}, '
                         f'got {e.metrics!r}')
    unknown = [m for m in metric_names if m not in METRICS]
    if unknown:
        raise ValueError(f'eval.metrics: unknown metric(s) {unknown}; choose from {METRICS} '
                         f"('fd', 'kid', 'prdc', 'is' score samples, 'bpd' the data's likelihood)")
    if e.features not in FEATURES:
        raise ValueError(f'eval.features must be one of {FEATURES}, got {e.features!r}')
    if e.features == 'random' and 'is' in metric_names:
        raise ValueError("eval.metrics has 'is', which needs a classifier's logits, and "
                         "eval.features='random' has none: drop 'is' from eval.metrics")
    for field, low in (('num_samples', 2), ('seed_sets', 1), ('batch_size', 1), ('seed', 0),
                       ('ref_num_features', 0), ('bpd_num_images', 1)):
        value = e[field]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f'eval.{field} must be an integer >= {low}, got {value!r}')
    last = e.seed + e.seed_sets * e.num_samples + e.batch_size  # padding seeds included
    if last > MAX_SEED:
        raise ValueError(f'eval.seed + eval.seed_sets * eval.num_samples = {last - e.batch_size} '
                         f'(plus up to eval.batch_size padding seeds) must stay below 2**32: sample '
                         f'seeds are uint32')


def resolve_features(config) -> str:
    """'digits', 'inception' or 'random': `config.eval.features` with 'auto' resolved (digits for
    the 8x8 one-channel digits data set, else inception when eval.inception_weights is set, else
    random), checked against `config.data`."""
    kind, d = config.eval.features, config.data
    if kind not in FEATURES:
        raise ValueError(f'eval.features must be one of {FEATURES}, got {kind!r}')
    is_digits = d.name == 'digits' and d.resolution == 8 and d.channels == 1
    if kind == 'auto':
        kind = 'digits' if is_digits else 'inception' if config.eval.inception_weights else 'random'
    if kind == 'digits' and not is_digits:
        raise ValueError(f"eval.features='digits' scores the 8x8 digits with the digits classifier, "
                         f'but data is {d.name!r} at {d.resolution}x{d.resolution}x{d.channels}: '
                         f"use eval.features='random', 'inception' (or 'auto')")
    if kind == 'random' and d.resolution < random_features.MIN_SIZE:
        raise ValueError(f"eval.features={config.eval.features!r}: the random features need images of at "
                         f'least {random_features.MIN_SIZE}x{random_features.MIN_SIZE}, data.resolution '
                         f'is {d.resolution}: set eval.inception_weights (Inception resizes to 299)')
    return kind


def _ref_name(config, network: str) -> str:
    """ref_<data.name>.npz, ref_<data.name>_random.npz for the random features."""
    suffix = '_random' if network == 'random' else ''
    return f"ref_{config.data.name.replace('/', '_')}{suffix}.npz"


def default_ref_path(config, workdir) -> pathlib.Path:
    """Where `--mode=ref` writes when `eval.ref` is not set: <workdir>/ref_<data.name>.npz
    ('/' in TFDS names such as imagenet_resized/64x64 becomes '_'), or
    <workdir>/ref_<data.name>_random.npz when `resolve_features(config)` is 'random'."""
    return pathlib.Path(workdir) / _ref_name(config, resolve_features(config))


def _ref_command(config, workdir) -> str:
    where = f' --workdir={workdir}' if workdir is not None else ''
    return (f'`python launch.py --config=<this config> --mode=ref{where}` (writes '
            f'{default_ref_path(config, workdir if workdir is not None else "<workdir>")}, or '
            f'eval.ref if set)')


# ---------------------------------------------------------------------------------------------
# Feature networks


def _digits_features_fn(batch_size: int) -> FeaturesFn:
    from jaxdiff import evaluate
    return lambda x: evaluate.digits_features(x, batch_size=batch_size)


def inception_features_fn(params) -> FeaturesFn:
    """(pool3 [N, 2048], logits [N, 1008]) of images float32 NHWC in [-1, 1]: quantised to uint8
    (`images.to_uint8`), one channel repeated to three (EDM's fid.py), through the FID
    Inception-v3 with `params` (`nets.inception.load_inception_params`)."""
    from jaxdiff.nets import inception

    def features(x):
        x = np.asarray(x)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        elif x.shape[-1] != 3:
            raise ValueError(f'data.channels={x.shape[-1]}: Inception features need 1 or 3 channels')
        pool, logits = inception.inception_features_uint8(params, images.to_uint8(x))
        return np.asarray(pool), np.asarray(logits)
    return features


def load_inception(config) -> FeaturesFn:
    """`inception_features_fn` with the weights of `config.eval.inception_weights` (pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth or its .npz conversion, checked by SHA-256)."""
    from jaxdiff.nets import inception
    path = config.eval.inception_weights
    if not path:
        raise FileNotFoundError(
            f'eval.inception_weights is not set: Inception features (FID) need pytorch-fid\'s '
            f'{inception.FID_WEIGHTS_NAME}, which jaxdiff never downloads. Get it from '
            f'{inception.FID_WEIGHTS_URL} (or ~/.cache/torch/hub/checkpoints/), then pass '
            f'--config.eval.inception_weights=PATH (the .pth, or an .npz made by `python -m '
            f'jaxdiff.nets.inception --convert IN.pth OUT.npz`)')
    try:
        params = inception.load_inception_params(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f'eval.inception_weights: {error}') from None
    except inception.InceptionWeightsError as error:
        raise ValueError(f'eval.inception_weights: {error}') from None
    return inception_features_fn(params)


def random_features_fn(x) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], logits [N, 0]) of images float32 NHWC in [-1, 1] through the random CNN
    (`nets.random_features`), on the images quantised to uint8 and back, x -> round(127.5 (x + 1))
    / 127.5 - 1, as the Inception features see saved images."""
    x = images.to_uint8(x).astype(np.float32) / 127.5 - 1.0
    features, logits = random_features.random_features(x)
    return np.asarray(features), np.asarray(logits)


def _network(config, kind: str, features_fn: FeaturesFn | None) -> tuple[FeaturesFn, str]:
    """(features_fn, network name for the files): the injected function, or the one of `kind`."""
    if features_fn is not None:
        return features_fn, 'custom'
    if kind == 'digits':
        return _digits_features_fn(config.eval.batch_size), 'digits'
    if kind == 'random':
        return random_features_fn, 'random'
    return load_inception(config), 'inception'


def batched_features(features_fn: FeaturesFn, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`features_fn` over x in batches of exactly `batch_size` (the last one zero-padded, its
    padding dropped): one compilation for any N."""
    pools, logits = [], []
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        n = len(batch)
        if n < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)])
        p, l = features_fn(batch)
        pools.append(np.asarray(p, np.float32)[:n])
        logits.append(np.asarray(l, np.float32)[:n])
    return np.concatenate(pools), np.concatenate(logits)


# ---------------------------------------------------------------------------------------------
# Reference files


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference file: statistics (float64) of all the data, an optional subset of the
    features themselves (float32 [K, D], None in EDM's files), and the JSON metadata."""
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    meta: dict


def save_reference(path, mu, sigma, features=None, **meta) -> pathlib.Path:
    """Write `metrics.save_statistics`'s format (mu, sigma float64, meta JSON), which EDM's fid.py
    reads, plus `features` [K, D] float32 when given; to a temporary file renamed into place."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f'wrong shapes: mu {mu.shape}, sigma {sigma.shape}; expected [D], [D, D]')
    arrays = dict(mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, allow_nan=False)))
    if features is not None:
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != mu.size:
            raise ValueError(f'features must be [K, {mu.size}], got shape {features.shape}')
        arrays['features'] = features
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are 0600 whatever the umask, and the rename kept that mode.
    return write_atomically(path, lambda f: np.savez(f, **arrays))


def load_reference(path) -> Reference:
    """A reference file of `save_reference` or EDM's fid.py (mu, sigma only); errors from
    `metrics.load_statistics` name the path."""
    mu, sigma, meta = metrics.load_statistics(path)
    with np.load(path, allow_pickle=False) as npz:
        features = np.asarray(npz['features'], np.float32) if 'features' in npz.files else None
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
        raise ValueError(f'{path}: features have shape {features.shape}, expected [K, {mu.size}]')
    return Reference(mu, sigma, features, meta)


def _open_reference(config, workdir, network: str, log,
                    features_fn: FeaturesFn | None = None) -> tuple[Reference, pathlib.Path | None]:
    """The reference of eval.ref, else of <workdir>/`_ref_name`; for the random features of an
    embedded data set a missing file is computed with `features_fn` (and written when there is a
    workdir). Raises unless the file was made by `network` (module docstring)."""
    path = config.eval.ref
    if not path:
        fallback = pathlib.Path(workdir) / _ref_name(config, network) if workdir is not None else None
        exists = fallback is not None and fallback.is_file()
        if not exists and network == 'random' and config.data.name in data.EMBEDDED:
            return _reference_on_the_spot(config, fallback, features_fn, log), fallback
        if not exists:
            raise ValueError(f'eval.ref is not set: {"FID" if network == "inception" else "FD"} needs '
                             f'reference statistics of {config.data.name!r}. Make them with '
                             f'{_ref_command(config, workdir)} and pass --config.eval.ref=PATH (or leave '
                             f'it unset to use <workdir>/{_ref_name(config, network)}), or use EDM\'s '
                             f'published .npz')
        log('eval.ref not set: using %s', fallback)
        path = fallback
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'eval.ref={str(path)!r}: no such file; make it with '
                                f'{_ref_command(config, workdir)}')
    try:
        ref = load_reference(path)
    except ValueError as error:
        raise ValueError(f'eval.ref: {error}') from None
    made_by = ref.meta.get('network') or 'inception'  # EDM's files (no meta) hold Inception statistics
    if network != 'custom' and made_by != 'custom' and made_by != network:
        raise ValueError(f'eval.ref={str(path)!r} holds {made_by} features but the samples get '
                         f'{network} features (eval.features): make a matching file with --mode=ref')
    if network == 'random' and (ref.meta.get('random_seed') != random_features.SEED
                                or ref.mu.size != random_features.feature_dim(config.data.channels)):
        raise ValueError(f'eval.ref={str(path)!r} was made by another random network (seed '
                         f'{ref.meta.get("random_seed")}, {ref.mu.size} features; this one: seed '
                         f'{random_features.SEED}, {random_features.feature_dim(config.data.channels)}): '
                         f'delete it or make a new one with --mode=ref')
    for field in ('name', 'resolution'):
        recorded = ref.meta.get('dataset' if field == 'name' else field)
        if recorded is not None and recorded != config.data[field]:
            log('warning: eval.ref %s was made from data.%s=%r, this run has %r',
                path, field, recorded, config.data[field])
    return ref, path


def _reference_on_the_spot(config, path: pathlib.Path | None, features_fn: FeaturesFn, log) -> Reference:
    """`compute_reference`'s statistics of an embedded data set (at most 1,024 images), computed by
    this process alone (no collective: a process that sees no file, e.g. one given no work
    directory, computes the same figures by itself), written to `path` (main process) unless None."""
    ref, seconds = _reference_statistics(config, features_fn, 'random', log, shared=False)
    if path is not None and _is_main():
        save_reference(path, ref.mu, ref.sigma, ref.features if len(ref.features) else None, **ref.meta)
    log('eval.ref not set and no %s: computed the random-feature statistics of the %d %s images in '
        '%.1f s%s', path.name if path is not None else 'work directory', ref.meta['num_images'],
        config.data.name, seconds, f', wrote {path}' if path is not None else ' (not saved: no work directory)')
    return ref


# ---------------------------------------------------------------------------------------------
# Process shares


def process_share(total: int, batch_size: int, process_index: int | None = None,
                  process_count: int | None = None) -> list[tuple[int, int]]:
    """A process's blocks (start, count) of [0, total) (default: this process's): the
    ceil(total / batch_size) blocks of batch_size are dealt out in contiguous runs of
    R = ceil(blocks / processes), so process order is index order; every process gets R entries,
    with count short or 0 where its run passes the end."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    blocks = -(-total // batch_size)
    per = -(-blocks // count)
    first = index * per
    return [(k * batch_size, int(np.clip(total - k * batch_size, 0, batch_size)))
            for k in range(first, first + per)]


def _gather(x: np.ndarray) -> np.ndarray:
    """All processes' rows in process order (`metrics.gather_features` on the flattened rows)."""
    if jax.process_count() == 1:
        return x
    flat = x.reshape(len(x), math.prod(x.shape[1:]))
    return metrics.gather_features(flat).reshape(-1, *x.shape[1:])


def _is_main() -> bool:
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Scoring one set of samples


BLOCK_FILES = 'block_*.npz'


def block_path(blocks_dir, start: int) -> pathlib.Path:
    """blocks_dir/block_<start:09d>.npz: what a draw keeps of the samples start .. start +
    eval.batch_size - 1 of its set (seeds seed + start, ...)."""
    return pathlib.Path(blocks_dir) / f'block_{start:09d}.npz'


def draw_manifest(config, seed: int, *, step: int, keep_images: bool, network: str | None,
                  fingerprint=None) -> dict:
    """What the block files of the set from `seed` depend on (`generate.manifest`'s fields):
    eval.num_samples, seed, eval.batch_size, the data's image shape, and as the fingerprint the
    checkpoint `step`, the caller's `fingerprint` (JSON: the sampler's settings) and what is kept
    ('images': bool, 'features': the network's name or None)."""
    d = config.data
    return generate.manifest(config.eval.num_samples, seed, config.eval.batch_size,
                             (d.resolution, d.resolution, d.channels),
                             fingerprint={'step': int(step), 'sampler': fingerprint,
                                          'keeps': {'images': bool(keep_images), 'features': network}})


def blocks_dir(root, manifest: dict) -> pathlib.Path:
    """root/blocks_<step:08d>_seed<seed>_<hash>: the block files of one seed set; the hash of the
    whole manifest gives other settings another directory (as --mode=sample's batches_*)."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:8]
    return pathlib.Path(root) / f'blocks_{manifest["fingerprint"]["step"]:08d}_seed{manifest["seed"]}_{digest}'


def _load_block(path: pathlib.Path, count: int, keys: tuple[str, ...], image_shape) -> dict:
    """{key: float32 array} of one block file, which must hold exactly `keys`, `count` rows each
    (images of `image_shape`, pool and logits 2-D); a ValueError names the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            block = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f'{path} is not a readable .npz file ({type(e).__name__}: {e}): delete it to '
                         'draw that block again') from None
    shapes = {k: list(v.shape) for k, v in block.items()}
    good = (sorted(block) == sorted(keys) and all(v.dtype == np.float32 and len(v) == count for v in block.values())
            and ('images' not in block or block['images'].shape[1:] == tuple(image_shape))
            and all(block[k].ndim == 2 for k in ('pool', 'logits') if k in block))
    if not good:
        raise ValueError(f'{path} holds {shapes}, expected float32 {list(keys)} of {count} rows (images '
                         f'{list(image_shape)}): delete it to draw that block again')
    return block


def _finished_blocks(directory: pathlib.Path, manifest: dict, share: list[tuple[int, int]],
                     keys: tuple[str, ...]) -> dict[int, dict]:
    """{start: block} of the blocks of this process's `share` to load from `directory` (created, its
    manifest written or checked by `generate.check_manifest`, the stale temporary files of the
    share's blocks removed): those at the places in the share where every process has finished its
    block, so that all processes call sample_fn alike (a process's own finished block elsewhere is
    drawn again)."""
    directory.mkdir(parents=True, exist_ok=True)
    generate.check_manifest(directory, manifest, files=BLOCK_FILES)
    for start, _ in share:  # left by a run killed while writing; another process's are its own
        for stale in directory.glob(f'.{block_path(directory, start).name}.*.tmp'):
            stale.unlink(missing_ok=True)
    have = np.array([[block_path(directory, start).exists() for start, _ in share]], np.float32)
    everywhere = _gather(have).min(axis=0) > 0  # [processes, places] -> [places]
    return {start: _load_block(block_path(directory, start), count, keys, manifest['image_shape'])
            for (start, count), done in zip(share, everywhere) if done}


def _draw(sample_fn, config, seed: int, *, keep_images: bool, features_fn: FeaturesFn | None,
          progress_desc: str, directory=None, manifest: dict | None = None):
    """Sample this process's share of the seeds [seed, seed + N) in blocks of eval.batch_size
    (each block one `sample_fn(batch_size, block seed)` call, featurised whole: full batches only,
    the samples past the set dropped afterwards); return (images or None, pool or None, logits or
    None) of the whole set, gathered across processes in seed order, and the number of samples
    loaded (all processes').

    directory: optional; each finished block is written there (`block_path`), and the blocks an
    earlier call finished are loaded instead of drawn (`_finished_blocks`; `manifest` from
    `draw_manifest` identifies the draw). The result is the same either way."""
    n, bs = config.eval.num_samples, config.eval.batch_size
    keys = ('images',) * keep_images + ('pool', 'logits') * (features_fn is not None)
    share = process_share(n, bs)
    blocks = {}
    if directory is not None:
        directory = pathlib.Path(directory)
        blocks = _finished_blocks(directory, manifest, share, keys)
    places = {k for k, (start, _) in enumerate(share) if start in blocks}  # the same on every process
    loaded = sum(count for p in range(jax.process_count())
                 for k, (_, count) in enumerate(process_share(n, bs, p)) if k in places)
    bar = tqdm(total=n, initial=loaded, unit='img', desc=progress_desc, disable=not _is_main(),
               dynamic_ncols=True, mininterval=1.0, leave=False)
    try:
        for start, count in share:  # at least one block, maybe all padding
            if start in blocks:
                continue
            x = np.asarray(sample_fn(bs, seed + start), np.float32)
            if x.ndim != 4 or len(x) != bs:
                raise ValueError(f'sample_fn({bs}, seed) must return [{bs}, H, W, C] images, got {x.shape}')
            if directory is not None and list(x.shape[1:]) != manifest['image_shape']:
                raise ValueError(f'sample_fn returned images of shape {list(x.shape[1:])}, but the data '
                                 f'(data.resolution, data.channels) are {manifest["image_shape"]}')
            block = {'images': x[:count]} if keep_images else {}
            if features_fn is not None:
                p, l = batched_features(features_fn, x, bs)
                block.update(pool=p[:count], logits=l[:count])
            if directory is not None:
                wd.write_atomically(block_path(directory, start), lambda f: np.savez(f, **block))
            blocks[start] = block
            bar.update(count * jax.process_count())
    finally:
        bar.close()
    # every process gathers, in step
    whole = lambda key: _gather(np.concatenate([blocks[start][key] for start, _ in share])) if key in keys else None
    return whole('images'), whole('pool'), whole('logits'), loaded


def _remove_blocks(directories: list[pathlib.Path]) -> None:
    """Remove the seed sets' block directories once the scores are written: after every process
    gets here (the main one wrote the report), each removes them (several processes may share a
    file system, so a file another removed first is no error)."""
    if not directories:
        return
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('jaxdiff_eval_scores_written')
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=jax.process_count() > 1)


def _score_features(config, pool, logits, ref: Reference | None, wanted) -> dict:
    """The requested sample metrics of one set's features against the reference."""
    report, seed = {}, config.eval.seed
    if 'fd' in wanted:
        report['fd'] = metrics.frechet_distance(*metrics.feature_statistics(pool), ref.mu, ref.sigma)
    if ref is not None and ref.features is not None and len(ref.features) >= MIN_REF_FEATURES:
        real = ref.features
        if 'kid' in wanted:
            report['kid'], report['kid_std'] = metrics.kernel_inception_distance(pool, real, seed=seed)
        if 'prdc' in wanted:
            num = min(len(pool), len(real))
            report.update(metrics.manifold_metrics(real, pool[:num]))
            report['prdc_num_samples'] = num
        if wanted & {'kid', 'prdc'}:
            report['num_ref_features'] = len(real)
    if 'is' in wanted:
        report['is'], report['is_std'] = metrics.inception_score(logits, splits=min(IS_SPLITS, len(logits)))
    report['num_samples'] = len(pool)
    return report


def score_digits(config, samples, sample_labels=None, wanted=()) -> dict:
    """`evaluate.digits_report` of `samples` against all the embedded digits (with their labels);
    'is' in `wanted` adds the classifier's Inception-Score analogue."""
    from jaxdiff import evaluate
    real, real_labels = data.eval_images(config.data, data.dataset_info(config.data).num_examples)
    report = evaluate.digits_report(samples, real, seed=config.eval.seed, real_labels=real_labels,
                                    sample_labels=sample_labels)
    if 'is' in wanted:
        _, logits = evaluate.digits_features(samples, batch_size=config.eval.batch_size)
        report['is'], report['is_std'] = metrics.inception_score(logits, splits=min(IS_SPLITS, len(logits)))
    return report


def _log_set(log, kind: str, index: int, sets: int, seeds: str, report: dict) -> None:
    if kind == 'digits':
        log('Seed set %d/%d (seeds %s): digits Frechet distance %.3f (real-vs-real floor %.3f at %d '
            'samples); classes %s', index + 1, sets, seeds, report['fd'], report['fd_floor'],
            report['num_samples'], report['class_histogram'])
        if 'kid' in report and 'precision' in report:
            log('  KID %.3f (floor %.3f +- %.3f); precision %.3f, recall %.3f (floors %.3f, %.3f)', report['kid'],
                report['kid_floor'], report['kid_floor_std'], report['precision'], report['recall'],
                report['precision_floor'], report['recall_floor'])
        return
    names = {'fd': 'FD', 'kid': 'KID', 'precision': 'precision', 'recall': 'recall',
             'density': 'density', 'coverage': 'coverage', 'is': 'IS'}
    if kind == 'inception':
        names['fd'] = 'FID'
    parts = [f'{label} {report[key]:.4g}' for key, label in names.items() if key in report]
    log('Seed set %d/%d (seeds %s, %d samples): %s', index + 1, sets, seeds, report['num_samples'],
        ', '.join(parts))


# ---------------------------------------------------------------------------------------------
# bits/dim


def bpd_process(config):
    """The `likelihood` process (a `samplers.Sampler`) of `config.precond.type` for 'bpd' of an EDM
    denoiser, with the likelihood module's defaults (EDM [0.002, 80], score-SDE's VP and VE); a
    ValueError naming eval.metrics for any other preconditioning. None for the process methods
    (no `precond` block): their model's own process is integrated over its [t_min, t_max]."""
    from jaxdiff import likelihood
    if 'precond' not in config:
        return None
    processes = {'edm': likelihood.edm_process, 'vp': likelihood.vp_process, 've': likelihood.ve_process}
    kind = config.precond.type
    if kind not in processes:
        raise ValueError(f"eval.metrics: 'bpd' needs a process with a probability-flow ODE in "
                         f'jaxdiff.likelihood: precond.type must be one of {BPD_PROCESSES}, got '
                         f"{kind!r} (drop 'bpd' from eval.metrics)")
    return processes[kind]()


def _bits_per_dim(config, denoise, log) -> dict:
    """bits/dim of eval.bpd_num_images data images (`data.eval_images` with eval.seed) through
    the PF-ODE of precond.type's process (an EDM denoiser) or of the model's own process (a
    `parameterize` model). 8-bit levels (256) except for the digits at their native 8x8, whose
    17 levels (0..16) are modelled as such; data not on a 256-level grid (faces, resized digits)
    are rounded to it first."""
    from jaxdiff import likelihood
    process = bpd_process(config)
    if process is None:  # a model on its process
        kind = type(denoise.process.schedule).__name__
        bits_per_dim = functools.partial(likelihood.bits_per_dim_of_model, denoise)
    else:
        kind = config.precond.type
        bits_per_dim = functools.partial(likelihood.bits_per_dim, denoise, process=process)
    n, bs = config.eval.bpd_num_images, config.eval.batch_size
    info = data.dataset_info(config.data)
    x, labels = data.eval_images(config.data, min(n, info.num_examples), seed=config.eval.seed)
    n = len(x)
    levels = 17 if (config.data.name == 'digits' and config.data.resolution == 8) else 256
    ints = np.clip(np.rint((x + 1) * (levels - 1) / 2), 0, levels - 1).astype(np.int32)
    onehot = None
    if config.data.use_labels and labels is not None:
        onehot = np.eye(info.num_classes, dtype=np.float32)[labels]
    keys = jax.random.split(jax.random.key(config.eval.seed), n)  # image i: its own key, any batching
    start_time = time.perf_counter()
    rows = []
    for start, count in process_share(n, bs):
        idx = np.arange(start, start + bs) % n  # padding: repeats, dropped below
        out = bits_per_dim(ints[idx], keys[idx], num_levels=levels, labels=None if onehot is None else onehot[idx])
        rows.append(np.stack([np.asarray(v, np.float32) for v in (out.bpd, out.nfe, out.success)], 1)[:count])
    rows = _gather(np.concatenate(rows))
    bpd, nfe, success = rows[:, 0], rows[:, 1], rows[:, 2] > 0
    good = bpd[success & np.isfinite(bpd)]
    seconds = time.perf_counter() - start_time
    result = {
        'bpd': float(good.mean()) if len(good) else float('nan'),
        'bpd_std_err': float(good.std(ddof=1) / math.sqrt(len(good))) if len(good) > 1 else float('nan'),
        'bpd_num_images': int(n),
        'bpd_failed': int(n - len(good)),
        'bpd_mean_nfe': float(nfe.mean()),
        'bpd_levels': levels,
        'bpd_process': kind,
        'bpd_seconds': seconds,
    }
    log('bits/dim %.4f +- %.4f over %d images (%s process, %d levels, %d failed solves, %.0f '
        'evaluations each) in %.1f s', result['bpd'], result['bpd_std_err'], n, kind, levels,
        result['bpd_failed'], result['bpd_mean_nfe'], seconds)
    return result


# ---------------------------------------------------------------------------------------------
# evaluate_samples


def _unused_path(directory: pathlib.Path, stem: str, suffix: str) -> pathlib.Path:
    """directory/stem+suffix, or stem.1, stem.2, ... when taken: a second evaluation of one
    checkpoint (another sampler, more samples) never overwrites the first's report."""
    path, k = directory / (stem + suffix), 0
    while path.exists():
        k += 1
        path = directory / f'{stem}.{k}{suffix}'
    return path


def _jsonable(value):
    """Config values as JSON: tuples as lists, non-finite floats as strings ('inf')."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


SUMMARY = ('fd', 'kid', 'precision', 'recall', 'density', 'coverage', 'is')  # summarised over sets


def _over_sets(sets: list[dict]) -> dict:
    """{name: {'min', 'mean', 'max'}} over the sets of each figure of SUMMARY they have."""
    names = [k for k in SUMMARY if all(isinstance(s.get(k), float) for s in sets)]
    return {k: {'min': float(np.min([s[k] for s in sets])), 'mean': float(np.mean([s[k] for s in sets])),
                'max': float(np.max([s[k] for s in sets]))} for k in names}


def evaluate_samples(config, sample_fn: Callable[[int, int], np.ndarray], *, step: int, workdir=None,
                     denoise=None, features_fn: FeaturesFn | None = None, run_info: dict | None = None,
                     labels_fn: Callable | None = None, blocks_root=None, fingerprint=None,
                     first_set_fn: Callable[[np.ndarray], None] | None = None,
                     log: Callable = _logger.info) -> dict:
    """Sample `config.eval.seed_sets` sets of `config.eval.num_samples` images and score them with
    `config.eval.metrics` on the features of `config.eval.features` (module docstring); write
    `eval_<step:08d>.json` in `workdir` (main process; nothing when workdir is None) and return
    the same dict.

    sample_fn(num, seed): float32 NHWC images in [-1, 1], sample i drawn from seed `seed + i`
      alone (the runner's configured sampler; labels of a conditional model are its choice, best a
      function of the seed). Called with num = eval.batch_size only.
    denoise: `D(x, sigma, labels)` of the model, or a `parameterize` model on its process, needed
      only for 'bpd'.
    features_fn: images [B, H, W, C] in [-1, 1] -> (features [B, D], logits [B, C]) replacing the
      feature network (tests, other networks): the reference-file path is then taken whatever
      eval.features says.
    labels_fn(seeds) -> class indices: the classes a conditional model's samples were drawn for
      (digits: `label_agreement`, and `per_class_fd` by requested class).
    run_info: JSON-able fields recorded with the run fields (e.g. the sampler's description and
      network evaluations per sample).
    blocks_root: optional directory (e.g. <workdir>/eval; given on every process or on none) of
      the resumable block directories (module docstring), removed once the scores are written;
      None (the default) keeps everything in memory. The result is the same either way.
    fingerprint: JSON-able value kept in their manifests: what identifies `sample_fn` besides
      `step` (the sampler's settings); a later call with another draws into another directory.
    first_set_fn: optional, called (every process) with the first seed set's samples [N, H, W, C]
      float32 in seed order, all processes' (e.g. to write them); that set's blocks keep the
      images too, so a resumed draw has them.
    log: `log(fmt, *args)` for progress lines.

    The dict: run fields (step, method, data, features, metrics, num_samples, seed, seed_sets,
    seeds, sample, ref, sample_seconds), the headline figures (the set with the lowest 'fd', else
    set 0: `headline_set`), `sets` (every set's seeds and figures), `over_sets` ({figure: {min,
    mean, max}}), bits/dim figures ('bpd', ...) when asked for, and `skipped` ({metric: reason}).
    For the digits: `evaluate.digits_report`'s keys (fd, fd_floor, class_histogram, ...).
    """
    check_config(config)
    e = config.eval
    wanted = set(e.metrics)
    sample_metrics = wanted & set(SAMPLE_METRICS)
    kind = 'custom' if features_fn is not None else resolve_features(config)
    if 'bpd' in wanted:
        bpd_process(config)
        if denoise is None:
            raise ValueError("eval.metrics has 'bpd', which needs the model's denoiser or process model "
                             "(evaluate_samples(..., denoise=D)); this method has no likelihood (drop 'bpd')")
    # Everything that can fail is loaded before hours of sampling: the reference, the weights.
    ref = ref_path = network = network_name = None
    skipped = {}
    if sample_metrics and kind != 'digits':
        network, network_name = _network(config, kind, features_fn)
        ref, ref_path = _open_reference(config, workdir, network_name, log, network)
        if ref.features is None or len(ref.features) < MIN_REF_FEATURES:
            for m in sorted(sample_metrics & {'kid', 'prdc'}):
                skipped[m] = (f'{ref_path or "the reference"} holds no reference features (or fewer than '
                              f'{MIN_REF_FEATURES}; EDM\'s statistics files have none): make one with '
                              f'--mode=ref and eval.ref_num_features > 0')
        if kind == 'random' and 'is' in sample_metrics:  # eval.features='auto' (check_config refuses 'random')
            skipped['is'] = ("the random features have no classifier logits (set eval.inception_weights for "
                             "Inception features, or drop 'is' from eval.metrics)")

    n, sets_count = e.num_samples, e.seed_sets
    seeds = [e.seed + j * n for j in range(sets_count)]
    sets, sample_seconds, directories = [], 0.0, []
    for j, seed in enumerate(seeds if sample_metrics else []):
        seed_range = f'{seed}-{seed + n - 1}'
        keep_images = kind == 'digits' or (j == 0 and first_set_fn is not None)
        directory = manifest = None
        if blocks_root is not None:
            manifest = draw_manifest(config, seed, step=step, keep_images=keep_images,
                                     network=network_name, fingerprint=fingerprint)
            directory = blocks_dir(blocks_root, manifest)
            directories.append(directory)
        start = time.perf_counter()
        samples, pool, logits, loaded = _draw(sample_fn, config, seed, keep_images=keep_images, features_fn=network,
                                              progress_desc=f'eval set {j + 1}/{sets_count}', directory=directory,
                                              manifest=manifest)
        seconds = time.perf_counter() - start
        sample_seconds += seconds
        log('Sampled%s %d images (seeds %s) in %.1f s: %.1f images/s%s', ' and featurised' if network else '',
            n - loaded, seed_range, seconds, (n - loaded) / max(seconds, 1e-9),
            f'; {loaded} more loaded from the blocks in {directory}' if loaded else '')
        if j == 0 and first_set_fn is not None:
            first_set_fn(samples)
        if kind == 'digits':
            requested = None if labels_fn is None else np.asarray(labels_fn(np.arange(seed, seed + n)))
            report = score_digits(config, samples, requested, sample_metrics)
        else:
            report = _score_features(config, pool, logits, ref, sample_metrics - set(skipped))
        _log_set(log, kind, j, sets_count, seed_range, report)
        sets.append({'seed': seed, 'seeds': seed_range, **report, 'sample_seconds': seconds})

    result = {
        'step': int(step),
        'method': config.get('method'),
        'data': config.data.name,
        'features': kind,
        'metrics': list(e.metrics),
        'num_samples': n,
        'seed': e.seed,
        'seed_sets': sets_count,
        'seeds': [f'{s}-{s + n - 1}' for s in seeds] if sample_metrics else [],
        'sample_seed': e.seed,  # the first sample's seed (the runner's key before scoring.py)
        'sample': _jsonable(config.sample.to_dict()),
        'ref': str(ref_path) if ref_path is not None else None,
        'ref_meta': ref.meta if ref is not None else None,
        'inception_weights': e.inception_weights if kind == 'inception' else None,
        'sample_seconds': sample_seconds,
        **(run_info or {}),
    }
    if sets:
        best = int(np.argmin([s['fd'] for s in sets])) if 'fd' in sets[0] else 0
        headline = {k: v for k, v in sets[best].items() if k not in ('seed', 'seeds', 'sample_seconds')}
        result.update(headline)
        result.update(headline_set=best, sets=sets, over_sets=_over_sets(sets))
        if sets_count > 1 and 'fd' in sets[0]:
            summary = result['over_sets']['fd']
            log('%s over %d seed sets: min %.4g (set %d, reported), mean %.4g, max %.4g',
                'FID' if kind == 'inception' else 'FD', sets_count, summary['min'], best + 1,
                summary['mean'], summary['max'])
    if 'bpd' in wanted:
        result.update(_bits_per_dim(config, denoise, log))
    if skipped:
        result['skipped'] = skipped
        for metric, reason in skipped.items():
            log('Skipped %s: %s', metric, reason)
    if workdir is not None and _is_main():
        path = _unused_path(pathlib.Path(workdir), f'eval_{int(step):08d}', '.json')
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + '\n')
        log('Wrote %s', path)
    _remove_blocks(directories)
    return result


# ---------------------------------------------------------------------------------------------
# compute_reference


def _merge_across_processes(stats: metrics.FeatureStatistics, dim: int) -> metrics.FeatureStatistics:
    """The statistics of all processes' vectors: each process's (count, shift, S1, S2) packed in
    one float64 [D + 3, D] array, gathered exactly (`metrics.gather_features`), merged in order."""
    if jax.process_count() == 1:
        return stats
    packed = np.zeros((dim + 3, dim))
    if stats.count:
        packed[0, 0], packed[1], packed[2], packed[3:] = stats.count, stats.shift, stats.sum, stats.sum_outer
    gathered = metrics.gather_features(packed).reshape(jax.process_count(), dim + 3, dim)
    merged = metrics.FeatureStatistics()
    for part in gathered:
        if part[0, 0] > 0:
            other = metrics.FeatureStatistics(shift=part[1])
            other.count, other.sum, other.sum_outer = int(part[0, 0]), part[2].copy(), part[3:].copy()
            merged.merge(other)
    return merged


def compute_reference(config, out_path, *, features_fn: FeaturesFn | None = None,
                      log: Callable = _logger.info) -> dict:
    """Reference statistics of the whole `config.data` split (EDM's `fid.py ref`): every image
    (no flips) through the feature network of `config.eval.features` in batches of
    `config.eval.batch_size`, streamed into `metrics.FeatureStatistics`; written (main process)
    with `save_reference(out_path, mu, sigma, features, **meta)`, `features` being those of the
    min(eval.ref_num_features, size) images of `data.eval_images(config.data, K, seed=0)`.
    Several processes: each reads a contiguous slice of the records; the statistics are merged
    exactly. `features_fn` as in `evaluate_samples`. Returns the metadata written, with the path,
    the time taken and images/s.
    """
    check_config(config)
    kind = 'custom' if features_fn is not None else resolve_features(config)
    network, network_name = _network(config, kind, features_fn)
    ref, seconds = _reference_statistics(config, network, network_name, log)
    if _is_main():
        save_reference(out_path, ref.mu, ref.sigma, ref.features if len(ref.features) else None, **ref.meta)
    rate = ref.meta['num_images'] / max(seconds, 1e-9)
    log('Wrote %s: statistics of %d images and %d of their features in %.1f s (%.0f images/s)',
        out_path, ref.meta['num_images'], len(ref.features), seconds, rate)
    return {**ref.meta, 'path': str(out_path), 'seconds': seconds, 'images_per_sec': rate}


def _reference_statistics(config, network: FeaturesFn, network_name: str, log,
                          shared: bool = True) -> tuple[Reference, float]:
    """(Reference with mu, sigma float64 of all of config.data, the features [K, D] of its
    documented subset (K may be 0) and meta; seconds): `compute_reference` less the writing.
    shared: the processes split the records and merge (all must call it); else this one does all."""
    info, read = data._open(config.data)  # (validated info, read(records) -> images, labels)
    total, bs = info.num_examples, config.eval.batch_size
    num_features = min(config.eval.ref_num_features, total)
    subset = np.sort(np.random.default_rng(REF_SUBSET_SEED).choice(total, num_features, replace=False))
    p, count = (jax.process_index(), jax.process_count()) if shared else (0, 1)
    lo, hi = p * total // count, (p + 1) * total // count
    starts = range(lo, hi, bs)
    log('Reference statistics of %s (%s split, %d images, %dx%dx%d) with %s features; %d processes',
        info.name, config.data.get('split', 'train'), total, info.resolution, info.resolution, info.channels,
        network_name, count)

    stats, kept = metrics.FeatureStatistics(), []
    start_time = time.perf_counter()
    bar = tqdm(total=hi - lo, unit='img', desc='reference', disable=not _is_main(), dynamic_ncols=True,
               mininterval=1.0)

    def load(start):
        records = np.arange(start, min(start + bs, hi))
        return records, np.asarray(read(records)[0], np.float32)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # read batch k + 1 while batch k runs
        pending = pool.submit(load, starts[0]) if len(starts) else None
        for k in range(len(starts)):
            records, x = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(load, starts[k + 1])
            feats, _ = batched_features(network, x, bs)
            stats.update(feats)
            kept.append(feats[np.isin(records, subset)])
            bar.update(len(records))
    bar.close()
    seconds = time.perf_counter() - start_time
    dim = stats.dim if stats.dim is not None else _feature_dim(network, info, bs)
    features = np.concatenate(kept) if kept else np.zeros((0, dim), np.float32)
    if shared:
        stats, features = _merge_across_processes(stats, dim), _gather(features)
    mu, sigma = stats.finalize()
    meta = {
        'dataset': info.name,
        'split': config.data.get('split', 'train'),
        'resolution': info.resolution,
        'channels': info.channels,
        'num_images': int(stats.count),
        'network': network_name,
        'inception_weights': (os.path.basename(config.eval.inception_weights)
                              if network_name == 'inception' and config.eval.inception_weights else None),
        'feature_dim': int(dim),
        'num_features': int(len(features)),
        'features_subset': f'data.eval_images(config.data, {num_features}, seed={REF_SUBSET_SEED})',
        'quantized': network_name in ('inception', 'random'),
    }
    if network_name == 'random':
        meta['random_seed'] = random_features.SEED
    return Reference(mu, sigma, features, meta), seconds


def _feature_dim(network: FeaturesFn, info: data.DatasetInfo, batch_size: int) -> int:
    """The feature size, for a process whose slice is empty."""
    probe = np.zeros((1, info.resolution, info.resolution, info.channels), np.float32)
    return batched_features(network, probe, batch_size)[0].shape[1]
