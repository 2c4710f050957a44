"""The launcher's three modes: train (resumable), sample, eval. `launch.py` parses flags and calls
these; everything here is orchestration of the pure pieces in the other modules.

A work directory holds:

  config.json         the run's config (also saved beside each checkpoint)
  log.txt             the log, with the loss and images/s every train.log_every_steps
  .lock               locked while a mode runs (`jaxdiff.workdir.lock`): one process at a time
  checkpoints/<step>  orbax checkpoints (train state, data-iterator position, config)
  samples/            samples_<step>.npz (uint8 NHWC under `images`, `labels`), grid_<step>.png;
                      a later write for the same step adds .1, .2, ... (never overwrites);
                      batches_<step>_seed<seed>_<hash>/ while --mode=sample draws (`sample_mode`)
  eval_<step>.json    scores of the samples
  eval/               blocks_<step>_seed<seed>_<hash>/ while an evaluation draws a seed set
                      (`sample_and_score`)
  tb/                 TensorBoard scalars (loss, learning rate, skipped updates, images/s) and grids

Every mode checks, before it writes anything, that the config matches the one the checkpoints
were trained with in each field that changes the training trajectory (`config_changes`).
Mistakes are ValueErrors (or the errors below) with one-line messages, which launch.py prints.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxdiff import builders, checkpoint, methods, data, generate, images, monitor, parallel, scoring, train, workdir as wd
from jaxdiff.monitor import log

# Config fields that may differ from the checkpoint's: they do not change the training trajectory
# (evaluation, sampling, logging and checkpoint cadence, the run's length, the device mesh, where
# TFDS keeps its files and XLA its compiled programs, the preset's name). Every other field is
# compared (`config_changes`).
TRAJECTORY_FREE = ('preset', 'sample', 'eval', 'mesh', 'data.data_dir', 'train.total_images',
                   'train.log_every_steps', 'train.checkpoint_every_steps', 'train.keep_checkpoints',
                   'train.sample_every_steps', 'train.allow_config_change', 'train.compilation_cache')
# Fields added to the configs after runs were made with them absent, and the value that behaves as
# their absence did: an older workdir resumes unless the field was set to something else.
ADDED_FIELDS = {'model.label_dropout': 0.0, 'loss.vlb_weight': 0.0, 'loss.multiscale_lowest': 0,
                'loss.min_snr_gamma': 0.0, 'data.random_crop': False,
                'loss.sigmoid_bias': None}
MAX_CHANGES_SHOWN = 8


class RunError(RuntimeError):
    """A run cannot go on for a reason the message explains (launch.py prints it, no traceback)."""


class OutOfMemory(RunError):
    """The devices ran out of memory; the message names the batch size to lower."""


class NonFiniteSamples(RunError):
    """Samples came out nan or inf; nothing was written."""


@dataclasses.dataclass(frozen=True)
class Run:
    """The pieces of a run that every mode needs, built (and validated) from its config."""
    config: object
    workdir: pathlib.Path
    info: data.DatasetInfo
    label_dim: int
    module: object
    make_model: object   # a method's model_factory: (module, params, *, train, dropout_key) -> model
    sampling: object     # methods.Sampling
    mesh: object

    @property
    def image_shape(self):
        return (self.info.resolution, self.info.resolution, self.info.channels)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def prepare(config, workdir) -> Run:
    """Validate the config against the data set and the devices, and build the run's pieces.
    Every problem is a ValueError naming the config field, raised before anything is compiled."""
    workdir = pathlib.Path(workdir).absolute()
    builders.check_method(config)
    data.validate(config.data)
    info = data.dataset_info(config.data)
    label_dim = info.num_classes if config.data.use_labels else 0
    if label_dim:
        generate.labels_for_seeds([0], label_dim, config.sample.get('labels'))  # validates sample.labels
    module = builders.build_module(config, label_dim=label_dim)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.check_batch_size(config.train.batch_size, mesh)
    if config.train.total_images < config.train.batch_size:
        raise ValueError(f'train.total_images={config.train.total_images} is less than one batch')
    for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
        if config.train[field] < 1:
            raise ValueError(f'train.{field} must be at least 1, got {config.train[field]}')
    _check_numbers(config)
    builders.check(config)
    scoring.check_config(config)
    _check_module_builds(module, info, label_dim)
    prior_images = None
    if methods.get(config).NEEDS_PRIOR_IMAGES:  # IHDM samples from a prior fitted on (blurred) training images.
        prior_images, _ = data.eval_images(config.data, min(info.num_examples, 50_000))
    return Run(config, workdir, info, label_dim, module, builders.model_factory(config),
               builders.build_sampling(config, prior_images), mesh)


def _check_numbers(config) -> None:
    """Numeric fields that would otherwise pass as nan or inf (or out of range) and turn up only
    as non-finite weights or samples: a ValueError naming the field."""
    train.check_config(config)
    train.check_number(config, 'train.sample_every_steps', low=0, integer=True)
    for field in ('sample.S_churn', 'sample.S_min', 'sample.S_noise'):
        train.check_number(config, field, low=0)
    train.check_number(config, 'sample.S_max', low=0, allow_inf=True)


def _check_module_builds(module, info, label_dim) -> None:
    """Trace the network's initialisation (no compilation) so an impossible architecture, e.g.
    channel counts GroupNorm cannot split, is a config error naming model.kwargs."""
    x = jax.ShapeDtypeStruct((1, info.resolution, info.resolution, info.channels), jnp.float32)
    labels = jax.ShapeDtypeStruct((1, label_dim), jnp.float32) if label_dim else None
    try:
        jax.eval_shape(lambda x, s, y: module.init(jax.random.key(0), x, s, y), x,
                       jax.ShapeDtypeStruct((1,), jnp.float32), labels)
    except (TypeError, ValueError) as e:
        raise ValueError(f'model.kwargs: the network cannot be built: {str(e).splitlines()[0]}') from None


def _abstract_state(run: Run, setup: train.TrainSetup):
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    shapes = jax.eval_shape(lambda key: train.init_state(setup, key, run.image_shape, run.label_dim),
                            jax.random.key(0))
    shardings = parallel.state_shardings(run.mesh, shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


# ------------------------------------------------------------------------------------------------
# The work directory: created, locked, and its config checked before anything is written.

def _flatten(tree: dict, prefix: str = '') -> dict:
    """{'a.b.c': value} of a nested dict, sequences as lists (JSON's view of tuples)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
    return flat


def _as_json(config) -> dict:
    """The config as the checkpoints store it (ConfigDict.to_dict through JSON: tuples as lists)."""
    return json.loads(json.dumps(config.to_dict() if hasattr(config, 'to_dict') else config))


_ABSENT = object()


def _show(value) -> str:
    return '(absent)' if value is _ABSENT else value if isinstance(value, str) else json.dumps(value)


def config_differences(saved: dict, current: dict) -> list[str]:
    """'field old -> new' for every field outside TRAJECTORY_FREE in which two configs (plain
    dicts, as JSON stores them) differ, a field missing on one side included (one of ADDED_FIELDS
    missing counts as its neutral value); sorted by field."""
    saved, current = _flatten(_as_json(saved)), _flatten(_as_json(current))
    free = lambda field: any(field == f or field.startswith(f + '.') for f in TRAJECTORY_FREE)
    changes = []
    for field in sorted(set(saved) | set(current)):
        old, new = saved.get(field, _ABSENT), current.get(field, _ABSENT)
        if field in ADDED_FIELDS:
            old, new = (ADDED_FIELDS[field] if v is _ABSENT else v for v in (old, new))
        if not free(field) and (old is _ABSENT or new is _ABSENT or old != new):
            changes.append(f'{field} {_show(old)} -> {_show(new)}')
    return changes


def saved_config(workdir: pathlib.Path) -> dict | None:
    """The config the latest checkpoint in `workdir` was trained with (config.json when the
    checkpoint's own copy cannot be read), or None when there is no checkpoint."""
    directory = workdir / 'checkpoints'
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        return None
    try:
        saved = checkpoint.config_of(directory)
    except Exception:  # pylint: disable=broad-except  # an unreadable checkpoint: see config.json
        saved = None
    if saved is None:
        try:
            saved = json.loads((workdir / 'config.json').read_text())
        except (OSError, ValueError):
            return None
    return saved


def config_changes(run: Run) -> list[str]:
    """The trajectory fields in which `run.config` differs from the config of the work directory's
    checkpoints. A ValueError naming them unless train.allow_config_change is set."""
    saved = saved_config(run.workdir)
    changes = [] if saved is None else config_differences(saved, run.config)
    if changes and not run.config.train.get('allow_config_change', False):
        shown = ', '.join(changes[:MAX_CHANGES_SHOWN])
        more = f' and {len(changes) - MAX_CHANGES_SHOWN} more' if len(changes) > MAX_CHANGES_SHOWN else ''
        raise ValueError(f'{run.workdir} was trained with a different config: {shown}{more}; pass '
                         '--config.train.allow_config_change=True to go on anyway, or another --workdir')
    return changes


@contextlib.contextmanager
def _open_workdir(run: Run, *, create: bool):
    """The run's work directory, created if `create`, locked (main process) and with its config
    checked against the checkpoints' for the context; logging to its log.txt from then on."""
    if create:
        wd.make(run.workdir)
    with wd.lock(run.workdir) if run.is_main else contextlib.nullcontext():
        changes = config_changes(run)
        monitor.setup_logging(run.workdir, run.is_main)
        cache = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
        log.info('Compilation cache: %s', cache or 'off')
        if changes:
            log.warning('Config differs from the checkpoints\' (train.allow_config_change=True): %s',
                        ', '.join(changes))
        yield


def _save_config(run: Run) -> None:
    if run.is_main:
        text = run.config.to_json_best_effort(indent=2) + '\n'
        wd.write_atomically(run.workdir / 'config.json', lambda f: f.write(text.encode()))


def _is_oom(error: BaseException) -> bool:
    """Whether `error` is XLA's out-of-memory error (RESOURCE_EXHAUSTED)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and 'RESOURCE_EXHAUSTED' in str(error)


def _xla_summary(error: BaseException) -> str:
    """XLA's first line, capped (its allocation size), for the end of our message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return text[:120] + ('...' if len(text) > 120 else '')


def _training_oom(run: Run, error: BaseException) -> OutOfMemory:
    batch, devices = run.config.train.batch_size, run.mesh.size
    return OutOfMemory(f'out of device memory training with train.batch_size={batch} ({batch // devices} '
                       f'images per device on {devices} device{"s" if devices > 1 else ""}): pass a smaller '
                       f'--config.train.batch_size or run on more devices ({_xla_summary(error)})')


# ------------------------------------------------------------------------------------------------
# The persistent compilation cache: launch.py turns it on before anything compiles.

CACHE_MIN_COMPILE_SECONDS = 0.1  # JAX's default, 1 s, would leave sub-second CPU compiles out
CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'     # jax.monitoring: an executable loaded
CACHE_WRITE_EVENT = '/jax/compilation_cache/cache_misses'  # ... and one compiled and written


def compilation_cache_dir(setting: str, environ) -> pathlib.Path | None:
    """The directory that `train.compilation_cache` = `setting` names: '' the user's cache,
    $XDG_CACHE_HOME/jaxdiff/xla (~/.cache/jaxdiff/xla without XDG_CACHE_HOME); 'none' (any case)
    no cache; anything else that path (~ expanded).

    The default is per user and machine, not per work directory: a fresh workdir (another seed,
    a sweep, the same command twice) compiles the programs the last run compiled, and only a
    resume would find them in a workdir's cache; a per-user directory is also what JAX asks of a
    cache it loads executables from (it trusts them), and on a multi-host job each host has its
    own on local disk. Nothing prunes it: a few MB per config on the digits; delete it any time.
    """
    setting = (setting or '').strip()
    if setting.lower() == 'none':
        return None
    if setting:
        return pathlib.Path(setting).expanduser().absolute()
    base = environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
    return pathlib.Path(base).absolute() / 'jaxdiff' / 'xla'


def enable_compilation_cache(setting: str, environ=None) -> str | None:
    """Turn on JAX's persistent compilation cache in `compilation_cache_dir(setting)`, so a
    second run or a resume loads the train step, the state's initialisation and the sampler
    instead of compiling them (each 5-20 s on a CPU). Returns the directory, or None when off.

    The environment wins: JAX_COMPILATION_CACHE_DIR keeps its directory (whatever `setting`
    says), JAX_ENABLE_COMPILATION_CACHE=false keeps it off, and
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS its threshold; otherwise programs that took
    CACHE_MIN_COMPILE_SECONDS or more to compile are written (the ~10 ms compiles of eager ops
    are not: reading one back would save nothing). JAX's size threshold stays at its default, 0
    on a local disk. In a multi-process run JAX writes entries from process 0 only; every
    process reads its own directory, so the other hosts gain only from a shared path. A
    directory JAX cannot create or read costs a warning and the compilation, never the run.
    """
    environ = os.environ if environ is None else environ
    if not jax.config.jax_enable_compilation_cache:
        return None
    if environ.get('JAX_COMPILATION_CACHE_DIR'):
        path = jax.config.jax_compilation_cache_dir
    else:
        path = compilation_cache_dir(setting, environ)
        if path is None:
            return None
        path = str(path)  # JAX creates it at the first compile (a run that fails before leaves no trace)
        jax.config.update('jax_compilation_cache_dir', path)
    if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in environ:
        jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_SECONDS)
    return path


class CacheEvents:
    """Counts, until `close`, the executables JAX loads from its persistent compilation cache
    (`hits`) and those it compiles and writes there (`writes`), from its monitoring events."""

    def __init__(self):
        self.hits = self.writes = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **kwargs) -> None:
        del kwargs
        if event == CACHE_HIT_EVENT:
            self.hits += 1
        elif event == CACHE_WRITE_EVENT:
            self.writes += 1

    def close(self) -> None:
        jax.monitoring.unregister_event_listener(self._on_event)


# ------------------------------------------------------------------------------------------------
# Training.

def train_and_evaluate(config, workdir) -> dict:
    """Train (resuming from the latest checkpoint), then sample and score if configured. A run
    stopped by a pre-emption notice returns {'step': ..., 'preempted': True} (launch.py exits 75)."""
    run = prepare(config, workdir)
    with _open_workdir(run, create=True):
        state = run_training(run)
        step = int(state.step)
        if step < config.train.total_images // config.train.batch_size:
            return {'step': step, 'preempted': True}  # No sampling: there is no time left.
        result = {}
        if config.eval.after_training:
            writer = monitor.Writer(run.workdir / 'tb', enabled=run.is_main)
            try:
                result = sample_and_score(run, state.ema_params, step, writer, strict=False)
            finally:
                writer.close()
        return result


def run_training(run: Run):
    """Restore (or initialise) the train state, write config.json, train to train.total_images
    (or a pre-emption notice), saving checkpoints; returns the final state."""
    config = run.config
    setup = train.make_setup(config, run.module, run.make_model, builders.build_loss(config))
    abstract, shardings = _abstract_state(run, setup)
    ckpt = checkpoint.Checkpointer(run.workdir / 'checkpoints', keep=config.train.keep_checkpoints)
    try:
        ckpt.catch_sigterm()
        iterator = data.train_iterator(config.data, global_batch_size=config.train.batch_size, seed=config.seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())
        state = _initial_state(run, setup, abstract, shardings, ckpt, iterator)
        _save_config(run)  # only now: the config has restored the checkpoint (or there is none)
        return _train_loop(run, setup, shardings, ckpt, iterator, state)
    except jax.errors.JaxRuntimeError as e:
        if _is_oom(e):
            raise _training_oom(run, e) from None
        raise
    finally:
        ckpt.close()  # waits for the last save, raising a CheckpointSaveError if it failed


def _initial_state(run: Run, setup, abstract, shardings, ckpt, iterator):
    """The latest checkpoint's state (the iterator set to its position), or a fresh one."""
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        init = jax.jit(lambda key: train.init_state(setup, key, run.image_shape, run.label_dim),
                       out_shardings=shardings)
        log.info('Starting a new run in %s', run.workdir)
        return init(jax.random.key(run.config.seed))
    step, state, data_state = restored
    iterator.set_state(data_state)
    log.info('Resumed from step %d (%d images) in %s', step, step * run.config.train.batch_size, run.workdir)
    return state


def _train_loop(run: Run, setup, shardings, ckpt, iterator, state):
    """The steps from state.step to the end (or a pre-emption), with logs, checkpoints, grids."""
    config = run.config
    total_steps = config.train.total_images // config.train.batch_size
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info('%s with %.2fM parameters; %d devices; batch %d; %d steps (%d images)', config.model.type,
             n_params / 1e6, run.mesh.size, config.train.batch_size, total_steps, total_steps * config.train.batch_size)

    step_fn = train.compile_train_step(setup, shardings, parallel.batch_sharding(run.mesh), parallel.replicated(run.mesh))
    base_key = jax.random.key(config.seed + 1)
    step, skipped = int(state.step), int(state.skipped)
    if step < total_steps:
        log.info('Compiling the training step: seconds on a GPU or TPU, up to minutes on a busy CPU, where '
                 'XLA may print a "Very slow compile?" banner after 2 minutes (not an error)')
    writer = monitor.Writer(run.workdir / 'tb', enabled=run.is_main)
    progress = monitor.Progress(total_steps, step, config.train.batch_size, enabled=run.is_main)
    start_time = time.perf_counter()
    compiled = False
    cache_events = CacheEvents()
    try:
        while step < total_steps:
            batch = parallel.global_batch(run.mesh, next(iterator))
            state, metrics = step_fn(state, batch, base_key)
            step += 1
            progress.advance(step)
            if not compiled:  # The first step compiles: keep it out of images/s.
                jax.block_until_ready(metrics)
                loaded = cache_events.hits and not cache_events.writes
                log.info('Compiled the training step in %.1f s%s', time.perf_counter() - start_time,
                         ' (loaded from the compilation cache)' if loaded else '')
                progress.reset_clock()
                compiled = True
            if step % config.train.log_every_steps == 0 or step == total_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values['images_per_sec'] = progress.report(values)
                writer.scalars(step, values)
                skipped = _log_metrics(step, total_steps, values, skipped)
            if step % config.train.checkpoint_every_steps == 0 or step == total_steps or ckpt.reached_preemption(step):
                ckpt.save(step, state, data_state=iterator.get_state(), config=config.to_dict())
                if ckpt.reached_preemption(step):
                    ckpt.wait()
                    log.warning('Pre-empted: saved step %d, stopping', step)
                    break
                progress.reset_clock()
            if config.train.sample_every_steps and step % config.train.sample_every_steps == 0:
                _sample_grid(run, state.ema_params, step, writer)
                progress.reset_clock()
    finally:
        cache_events.close()
        progress.close()
        writer.close()
    log.info('Trained to step %d in %.1f s', step, time.perf_counter() - start_time)
    return state


def _log_metrics(step: int, total_steps: int, values: dict, skipped_before: int) -> int:
    """The periodic line of log.txt (the console has the progress bar), and a warning on the
    console too when updates were skipped since the last one. Returns the skipped count."""
    log.info('step %d/%d: loss %.4f, %.1f images/s, learning rate %.3g, gradient norm %.3g, %d skipped',
             step, total_steps, values['loss'], values['images_per_sec'], values['learning_rate'],
             values['grad_norm'], values['skipped'], extra=monitor.FILE_ONLY)
    skipped = int(values['skipped'])
    if skipped > skipped_before:
        log.warning('%d update(s) skipped by step %d (%d in all): non-finite loss, gradients or weights',
                    skipped - skipped_before, step, skipped)
    return skipped


def _write_samples(run: Run, samples: np.ndarray, step: int, prefix: str = '', *, grid_samples=None,
                   paths=None) -> tuple[pathlib.Path, pathlib.Path, Image.Image]:
    """samples/<prefix>samples_<step>.npz and <prefix>grid_<step>.png (of `grid_samples`, default
    all), under fresh names (`paths`, or .1, .2, ... when taken) and written atomically. Returns
    the two paths and the grid."""
    out = run.workdir / 'samples'
    out.mkdir(parents=True, exist_ok=True)
    npz_path, grid_path = paths or _sample_paths(run, step, prefix)
    arrays = {'images': images.to_uint8(samples)}
    if run.label_dim:  # the classes the samples were drawn for (`_labels`, from sample.seed on)
        arrays['labels'] = _labels(run, run.config.sample.seed, len(samples)).argmax(1)
    wd.write_atomically(npz_path, lambda f: np.savez(f, **arrays))
    grid = images.image_grid(samples if grid_samples is None else grid_samples,
                             upscale=max(1, 64 // run.info.resolution))
    wd.write_atomically(grid_path, lambda f: grid.save(f, format='PNG'))
    return npz_path, grid_path, grid


def _sample_paths(run: Run, step: int, prefix: str = '') -> list[pathlib.Path]:
    return wd.fresh_names(run.workdir / 'samples', [f'{prefix}samples_{step:08d}.npz', f'{prefix}grid_{step:08d}.png'])


def _sample_grid(run: Run, ema_params, step: int, writer=None, num: int = 64) -> np.ndarray | None:
    """A grid of `num` samples in samples/ and TensorBoard during training; a warning instead
    when the samples are not finite (training goes on: its updates never make weights so)."""
    try:
        samples = _sample(run, ema_params, num)
    except NonFiniteSamples as e:
        log.warning('No sample grid at step %d: %s', step, e)
        return None
    grid = images.image_grid(samples, upscale=max(1, 64 // run.info.resolution))
    if run.is_main:
        (run.workdir / 'samples').mkdir(parents=True, exist_ok=True)
        path, = wd.fresh_names(run.workdir / 'samples', [f'grid_{step:08d}.png'])
        wd.write_atomically(path, lambda f: grid.save(f, format='PNG'))
        if writer is not None:
            writer.image(step, 'samples', np.asarray(grid))
    return samples


def _labels(run: Run, seed: int, num: int) -> np.ndarray:
    """One-hot labels of samples seed .. seed + num - 1: `sample.labels` cycled by seed, or every class."""
    return generate.labels_for_seeds(np.arange(seed, seed + num), run.label_dim, run.config.sample.get('labels'))


class _SampleProgress:
    """sample_many's progress callback: records (done, seconds) marks for `timing`, and with
    `enabled` shows a tqdm bar over images (the training bar's style) with images/s since the
    first drawn batch (so without its compilation)."""

    def __init__(self, enabled: bool, desc: str = 'sample'):
        self.marks, self.enabled, self.desc, self.bar = [], enabled, desc, None

    def __call__(self, done: int, total: int, seconds: float) -> None:
        self.marks.append((done, seconds))
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(total=total, initial=done, unit='img', desc=self.desc, dynamic_ncols=True,
                            smoothing=0.05, mininterval=1.0)
            return
        self.bar.update(done - self.bar.n)
        if len(self.marks) > 2:
            (first, t0), (now, t1) = self.marks[1], self.marks[-1]
            self.bar.set_postfix(img_s=f'{(now - first) / max(t1 - t0, 1e-9):.0f}')

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def timing(self) -> dict:
        """{'loaded'} and, when a batch was drawn, the first drawn batch's count and seconds
        (compilation included) and the rest's (`_log_sampling`)."""
        if not self.marks:
            return {}
        loaded = self.marks[0][0]
        if len(self.marks) == 1:
            return {'loaded': loaded}
        (first, t_first), (done, t_last) = self.marks[1], self.marks[-1]
        return dict(loaded=loaded, first_batch=first - loaded, first_batch_seconds=t_first,
                    rest=done - first, rest_seconds=t_last - t_first)


def _sample(run: Run, params, num: int, seed: int | None = None, timing: dict | None = None, sampling=None,
            *, out_dir=None, fingerprint=None, bar: bool = False):
    """`num` samples (sample i from seed `seed + i`) with the run's sampling (or `sampling`).
    `timing`, if given, receives `_SampleProgress.timing()`: the samples loaded from `out_dir`, the
    seconds of the first drawn batch (compilation included) and of the rest. out_dir, fingerprint:
    resumable batch files (`generate.sample_many`); bar: a progress bar with images/s."""
    config = run.config
    sampling = run.sampling if sampling is None else sampling
    seed = config.sample.seed if seed is None else seed
    labels = _labels(run, seed, num) if run.label_dim else None
    batch_size = min(config.sample.batch_size, num)
    progress = _SampleProgress(bar and run.is_main)
    try:
        samples = generate.sample_many(sampling.draw, run.module, params, num, image_shape=run.image_shape,
                                       seed=seed, batch_size=batch_size, labels=labels, progress=progress,
                                       out_dir=out_dir, fingerprint=fingerprint)
    except jax.errors.JaxRuntimeError as e:
        if _is_oom(e):
            raise OutOfMemory(f'out of device memory sampling batches of {batch_size} images: pass a smaller '
                              f'--config.sample.batch_size (and --config.eval.batch_size) ({_xla_summary(e)})') from None
        raise
    finally:
        progress.close()
    bad = int(np.sum(~np.isfinite(samples).reshape(len(samples), -1).all(axis=1)))
    if bad:
        raise NonFiniteSamples(f'{bad} of {num} samples (seeds {seed}-{seed + num - 1}) are not finite (nan or '
                               'inf), so none were written or scored: the model\'s weights are probably not '
                               'finite (look for skipped updates in log.txt)')
    if timing is not None:
        timing.update(progress.timing())
    return samples


def _log_sampling(run: Run, num: int, timing: dict) -> None:
    """One log line: `num` samples, how many were loaded from earlier batches (timing['loaded']),
    the first drawn batch's seconds (compilation included) and the rest's images/s."""
    s = run.sampling
    loaded = timing.get('loaded', 0)
    if 'first_batch' not in timing:
        log.info(f'All {num} samples loaded from the batches an earlier run finished ({s.description})')
        return
    text = (f'Sampled {num - loaded} images ({s.description}, {s.num_evals} network evaluations each) in '
            f'{timing["first_batch_seconds"] + timing["rest_seconds"]:.1f} s; first batch of {timing["first_batch"]} '
            f'(compilation included) {timing["first_batch_seconds"]:.1f} s')
    if timing['rest']:
        text += f'; then {timing["rest"] / max(timing["rest_seconds"], 1e-9):.1f} images/s'
    if loaded:
        text += f'; {loaded} more loaded from the batches an earlier run finished'
    log.info(text)


SWEEP_FIELDS = ('fd', 'kid', 'precision', 'recall', 'label_agreement', 'per_class_fd')


def _guidance_sweep(run: Run, params, labels_fn) -> list[dict]:
    """eval.guidance_sweep: for each guidance scale s, eval.num_samples samples from eval.seed with
    sample.guidance = s, scored on the digits (SWEEP_FIELDS)."""
    config, rows = run.config, []
    n, seed = config.eval.num_samples, config.eval.seed
    for s in config.eval.guidance_sweep:
        swept = copy.deepcopy(config)
        swept.sample.guidance = float(s)
        sampling = builders.build_sampling(swept)
        start = time.perf_counter()
        samples = _sample(run, params, n, seed=seed, sampling=sampling)
        report = scoring.score_digits(config, samples, labels_fn(np.arange(seed, seed + n)))
        rows.append({'guidance': float(s), **{k: report[k] for k in SWEEP_FIELDS},
                     'seconds': time.perf_counter() - start})
        log.info('Guidance %g (seeds %d-%d, %s): FD %.3f, KID %.3f, precision %.3f, recall %.3f, label '
                 'agreement %.3f', s, seed, seed + n - 1, sampling.description, report['fd'], report['kid'],
                 report['precision'], report['recall'], report['label_agreement'])
    return rows


def sample_and_score(run: Run, params, step: int, writer=None, *, prefix: str = '', strict: bool = True) -> dict:
    """Score samples with `scoring.evaluate_samples` (config.eval: metrics, seed sets; writes
    eval_<step>.json) and write the first set's samples (`samples/<prefix>samples_<step>.npz`) and a
    PNG grid of `config.sample.num_samples` of them (`<prefix>grid_<step>.png`); `prefix` keeps
    --mode=eval from overwriting what --mode=sample wrote. With `strict=False` (after training), an
    evaluation that cannot run (no Inception weights or reference statistics configured) is a
    warning, and only the samples are written.

    Each seed set is drawn into <workdir>/eval/blocks_<step>_seed<seed>_<hash>/ (one file per
    finished block, `scoring.evaluate_samples`' blocks_root): a killed evaluation, started again
    with the same settings, loads those and draws only the rest. The directories are removed once
    eval_<step>.json is written."""
    config = run.config
    first_set, seconds = {}, []

    def sample_fn(num, seed):
        start = time.perf_counter()
        samples = _sample(run, params, num, seed=seed)
        seconds.append(time.perf_counter() - start)
        return samples

    denoise = methods.get(config).likelihood_model(config, run.make_model, run.module, params)
    paths = _sample_paths(run, step, prefix)
    run_info = {'sampler': run.sampling.description, 'num_evals': run.sampling.num_evals}
    labels_fn = None
    if run.label_dim:
        labels_fn = lambda seeds: generate.labels_for_seeds(seeds, run.label_dim, config.sample.get('labels')).argmax(1)
        if config.eval.get('guidance_sweep'):
            run_info['guidance_sweep'] = _guidance_sweep(run, params, labels_fn)
    keep_first_set = bool(set(config.eval.metrics) & set(scoring.SAMPLE_METRICS) and config.eval.seed == config.sample.seed
                          and config.eval.num_samples >= config.sample.num_samples)
    if keep_first_set:  # the .npz will hold the scored set
        run_info['samples_file'] = str(paths[0].relative_to(run.workdir))
    blocks_root = run.workdir / 'eval'
    try:
        result = scoring.evaluate_samples(config, sample_fn, step=step, workdir=run.workdir if run.is_main else None,
                                          denoise=denoise, run_info=run_info, labels_fn=labels_fn,
                                          blocks_root=blocks_root, fingerprint=_sampler_settings(config),
                                          first_set_fn=(lambda x: first_set.update(samples=x)) if keep_first_set else None)
    except (ValueError, FileNotFoundError) as e:
        if strict:
            raise
        log.warning('Not scoring the samples: %s', e)
        result = {'step': step}
    if seconds:
        timing = dict(first_batch=config.eval.batch_size, first_batch_seconds=seconds[0],
                      rest=config.eval.batch_size * (len(seconds) - 1), rest_seconds=sum(seconds[1:]))
        _log_sampling(run, config.eval.batch_size * len(seconds), timing)
        if timing['rest']:
            result['images_per_sec_after_compile'] = timing['rest'] / max(timing['rest_seconds'], 1e-9)

    with contextlib.suppress(OSError):  # eval/ itself, once no evaluation has blocks there
        blocks_root.rmdir()
    # The first seed set, in seed order, when evaluation drew it; else draw the grid's samples.
    samples = first_set.get('samples')
    if samples is None:
        samples = _sample(run, params, config.sample.num_samples)
    if run.is_main:
        npz_path, grid_path, grid = _write_samples(run, samples, step, prefix, paths=paths,
                                                   grid_samples=samples[:config.sample.num_samples])
        if writer is not None:
            writer.image(step, 'samples', np.asarray(grid))
            writer.scalars(step, {f'eval/{k}': result[k] for k in ('fd', 'fd_floor', 'kid', 'precision', 'recall', 'bpd')
                                  if isinstance(result.get(k), (int, float))})
        log.info('Wrote %s and %s', npz_path, grid_path)
    return result


def _require_checkpoints(run: Run) -> None:
    """Fail before anything is written (log, empty directories) when the workdir has no checkpoints."""
    directory = run.workdir / 'checkpoints'
    if not directory.is_dir():
        raise FileNotFoundError(f'No checkpoint directory {directory}: train first (--mode=train), '
                                f'or pass the --workdir of a trained run')


def _restore_ema(run: Run):
    """(step, EMA params) of the latest checkpoint in the work directory."""
    directory = run.workdir / 'checkpoints'
    setup = train.make_setup(run.config, run.module, run.make_model, builders.build_loss(run.config))
    abstract, _ = _abstract_state(run, setup)
    ckpt = checkpoint.Checkpointer(directory, keep=run.config.train.keep_checkpoints)
    try:
        restored = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f'No checkpoint in {run.workdir / "checkpoints"}: train first (--mode=train)')
    step, state, _ = restored
    return step, state.ema_params


def _sampler_settings(config) -> dict:
    """The sample.* settings that change the samples (not how many, the batch size or the first
    seed): part of the fingerprint of --mode=sample's batches and of the evaluation's blocks."""
    return {k: v for k, v in _as_json(config)['sample'].items() if k not in ('num_samples', 'batch_size', 'seed')}


def _batches_dir(run: Run, step: int) -> tuple[pathlib.Path, dict]:
    """(samples/batches_<step>_seed<seed>_<hash>/, its fingerprint): where --mode=sample keeps its
    finished batches until the .npz is written. The fingerprint (checkpoint step and every
    sample.* setting) and the hash of everything in the manifest key the directory, so another
    setting draws afresh beside it and the same settings resume it."""
    config = run.config
    fingerprint = {'step': int(step), 'sample': _sampler_settings(config)}
    num, seed = config.sample.num_samples, config.sample.seed
    key = generate.manifest(num, seed, min(config.sample.batch_size, num), run.image_shape,
                            _labels(run, seed, num) if run.label_dim else None, fingerprint)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return run.workdir / 'samples' / f'batches_{step:08d}_seed{seed}_{digest}', fingerprint


def sample_mode(config, workdir) -> dict:
    """config.sample.num_samples samples of the latest checkpoint: samples/samples_<step>.npz and
    grid_<step>.png, or .1, .2, ... beside what training or an earlier call wrote for that step.

    More than one batch (num_samples > sample.batch_size, e.g. EDM's 50,000) is drawn with a
    progress bar into `_batches_dir` (one file per finished batch): a killed run, started again
    with the same settings, loads those and draws only the rest. The directory is removed once the
    .npz is written. One batch, or a multi-process run (each process would need the same files),
    samples in memory."""
    run = prepare(config, workdir)
    _require_checkpoints(run)
    with _open_workdir(run, create=False):
        step, ema = _restore_ema(run)
        timing, out_dir, fingerprint = {}, None, None
        if config.sample.num_samples > config.sample.batch_size and jax.process_count() == 1:
            out_dir, fingerprint = _batches_dir(run, step)
            log.info('Sampling into %s (resumable: a run with the same settings loads its finished batches)', out_dir)
        samples = _sample(run, ema, config.sample.num_samples, timing=timing, out_dir=out_dir,
                          fingerprint=fingerprint, bar=True)
        _log_sampling(run, len(samples), timing)
        result = {'step': step, 'num_samples': len(samples)}
        if run.is_main:
            npz_path, grid_path, _ = _write_samples(run, samples, step)
            log.info('Wrote %d samples of step %d to %s and %s', len(samples), step, npz_path, grid_path)
            result['samples_file'] = str(npz_path)
            if out_dir is not None:
                shutil.rmtree(out_dir)
        return result


def eval_mode(config, workdir) -> dict:
    """Sample and score the latest checkpoint (`sample_and_score`, files prefixed eval_)."""
    run = prepare(config, workdir)
    _require_checkpoints(run)
    with _open_workdir(run, create=False):
        step, ema = _restore_ema(run)
        return sample_and_score(run, ema, step, prefix='eval_')
