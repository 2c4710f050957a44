"""Checkpoints: a thin wrapper over orbax-checkpoint's `CheckpointManager` (`args` API).

A step is one directory, written to `<step>.orbax-checkpoint-tmp` and renamed to `<step>` once
complete (orbax 0.12.8 on a local or POSIX file system), so a process killed mid-save leaves only
a tmp directory that orbax never lists as a step (and replaces when that step is saved again):

    <directory>/<step>/
      _CHECKPOINT_METADATA, commit_success.txt   orbax bookkeeping (item handlers, commit time)
      state/    StandardSave of the train state: an OCDBT key-value store of zarr v2 arrays --
                manifest.ocdbt and d/ (the merged b-tree) index ocdbt.process_<i>/d/<hash>, the
                zstd-compressed chunks each process wrote; _METADATA (tree structure), _sharding
      meta/     JsonSave: {'data_state': <iterator state>, 'checksums': {leaf path: [s0, s1]}}
      config/   JsonSave of the run's config (when given)

Corruption. A truncated or deleted chunk file or b-tree node makes tensorstore fail loudly, but
one flipped byte inside a zstd chunk usually decodes to wrong numbers without any error (zarr v2
chunks carry no checksum), so `save` stores two 32-bit checksums per array leaf, computed on the
devices where the arrays live, and restoring recomputes and compares them. `restore_latest`
tries steps newest first. A step that fails while an older one restores with the same abstract
state is corrupt: it is renamed to `<step>.corrupt-<time>` (kept for inspection, out of orbax's
sight, so it neither blocks saving that step again nor takes a keep-last-N slot) with a warning
naming the step and the reason. If no step restores, nothing is renamed -- the likelier cause is
an abstract state that no longer matches (a changed model) -- and a one-line `CheckpointError`
lists every step and its error: a workdir full of unreadable checkpoints must not silently
restart training from step 0 (and then rotate the evidence away).

Failed saves. A save that fails (a full disk, an unwritable directory) stops at its tmp
directory: orbax deletes the steps that keep-last-N rotates out only after the new step is
complete, so the previous checkpoints stay intact, and `save` or `wait` raise a one-line
`CheckpointSaveError` naming the step that failed and the newest one on disk. The tmp
directories of interrupted or failed saves are removed once a later save succeeds. orbax logs
such failures with tracebacks through absl; those records go to log.txt as one line each.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import sys
import threading
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxdiff import monitor

log = logging.getLogger(__name__)

CORRUPT_TAG = '.corrupt-'
TMP_TAG = '.orbax-checkpoint-tmp'


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored (the message lists what was tried)."""


class CheckpointSaveError(CheckpointError):
    """A save failed; the message names the step and the newest checkpoint left intact."""


class _OrbaxTracebacksToLogFile(logging.Filter):
    """Takes orbax's records that carry a traceback (e.g. a save that failed in its background
    thread) off the console and puts their first line in log.txt (`monitor.FILE_ONLY`): the
    Checkpointer raises the error itself, in one line that says what it means for the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and 'orbax' in record.pathname):
            return True
        text = record.getMessage().strip()
        log.info('orbax: %s (%s)', text.splitlines()[0] if text else '', _short(record.exc_info[1]),
                    extra=monitor.FILE_ONLY)
        return False


def _install_orbax_log_filter() -> None:
    """Once per process, on the 'absl' logger that orbax logs through."""
    absl_logger = logging.getLogger('absl')
    if not any(isinstance(f, _OrbaxTracebacksToLogFile) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxTracebacksToLogFile())


def _is_restore_leftover(unraisable) -> bool:
    """An unraisable exception that a failed restore leaves behind: orbax reads arrays in an event
    loop that it closes when one read fails, and every read still in flight then raises 'Event
    loop is closed' in a tensorstore callback (a thousand tracebacks for a small network), or
    is garbage-collected as an orbax coroutine never finished. The restore's own error is what
    `restore_latest` reports."""
    error, obj = unraisable.exc_value, unraisable.object
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
        return True
    code = getattr(obj, 'cr_code', None)
    return code is not None and 'orbax' in code.co_filename


def _install_unraisable_filter() -> None:
    """Once per process: `_is_restore_leftover` exceptions dropped, every other one passed on."""
    previous = sys.unraisablehook
    if getattr(previous, 'drops_restore_leftovers', False):
        return

    def hook(unraisable):
        if not _is_restore_leftover(unraisable):
            previous(unraisable)

    hook.drops_restore_leftovers = True
    sys.unraisablehook = hook


def _leaf_checksum(x):
    """Two uint32 sums of the leaf's bits: sum(w_i) and sum((2i + 1) w_i), modulo 2^32.

    Integer sums do not depend on reduction order, so any sharding gives the same answer. A
    change of one word changes both sums (an odd weight is invertible modulo 2^32); other damage
    (bytes swapped, several words) goes unnoticed with odds of about 2^-32.
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:  # 8-byte dtypes become two uint32 words (a trailing axis of 2)
        bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
    # Flat index from per-axis iotas rather than ravel(): no resharding of sharded arrays.
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return words.sum(dtype=jnp.uint32), (words * (2 * index + 1)).sum(dtype=jnp.uint32)


_checksum_leaves = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])
_checksum_leaf = jax.jit(_leaf_checksum)


def state_checksums(state) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of every leaf of `state`; see `_leaf_checksum`."""
    with_paths = jax.tree_util.tree_leaves_with_path(state)
    paths, leaves = [p for p, _ in with_paths], [x for _, x in with_paths]
    try:  # one program for the whole state
        sums = _checksum_leaves(leaves)
    except ValueError:  # leaves committed to different device sets cannot share one program
        sums = [_checksum_leaf(x) for x in leaves]
    # The sums are scalars, hence replicated: every process can read its own copy.
    host = lambda s: int(np.asarray(s.addressable_data(0)))
    return {jax.tree_util.keystr(p): [host(a), host(b)] for p, (a, b) in zip(paths, sums)}


def _json_crc(value) -> int:
    return zlib.crc32(json.dumps(value, sort_keys=True).encode())


def _short(error: BaseException, limit: int = 300, root=None) -> str:
    """First line of an error, capped; for orbax's read errors, which carry TensorStore's
    page-long spec, the tensorstore error beneath (e.g. 'OUT_OF_RANGE: Error reading ...').
    Paths under `root` are written relative to it ('./2/state/'), so a long directory name does
    not push the cause itself past the cap."""
    inner = error.__cause__ or error.__context__
    if inner is not None and 'See full TensorStore details' in str(error):
        error = inner
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    if root is not None:
        text = text.replace(str(root).rstrip('/'), '.')
    return f'{type(error).__name__}: {text[:limit]}{"..." if len(text) > limit else ""}'


def _path_text(path) -> str:
    """'params/enc/conv/kernel' of a tree path, whatever kinds of keys it has (orbax's metadata
    keys every level by name, a train state by attribute, optimiser states by index)."""
    names = [getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in path]
    return '/'.join(str(n) for n in names)


def _check_layout(state_dir, abstract_state) -> None:
    """A ValueError naming the first few arrays whose stored shape differs from `abstract_state`'s,
    or that are missing on one side, read from the step's metadata alone (before any array: a
    restore that fails on a shape leaves orbax's readers printing tracebacks at exit). Does
    nothing when the metadata cannot be read (the restore itself then decides)."""
    try:
        stored = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
        stored = {_path_text(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(stored)}
    except Exception:  # pylint: disable=broad-except
        return
    wanted = {_path_text(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
    problems = [f'{p} stored {stored[p]}, wanted {wanted[p]}' for p in wanted if p in stored and stored[p] != wanted[p]]
    problems += [f'{p} not stored' for p in wanted if p not in stored]
    problems += [f'{p} stored, not wanted' for p in stored if p not in wanted]
    if problems:
        raise ValueError(f'the stored state does not fit the model ({len(problems)} arrays differ: '
                         f'{"; ".join(problems[:3])})')


class Checkpointer:
    """Saves and restores (step, train state, data-iterator state, config) under `directory`.

    keep: how many of the newest checkpoints to keep. async_save: `save` returns once the arrays
    are copied off the devices and writes in a background thread; `wait` blocks until done.
    """

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        # orbax's array store needs an absolute path; a relative one fails only inside the async save.
        self.directory = epath.Path(directory)
        if '://' not in str(directory):
            self.directory = epath.Path(os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        _install_orbax_log_filter()
        _install_unraisable_filter()
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._sigterm = threading.Event()
        self._pending = None  # the step being saved in the background, until `wait` sees it done

    def save(self, step: int, state, *, data_state: dict | None = None,
             config: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` (+ JSON `data_state`, `config`) as `step`; True if it does.

        An existing step is never overwritten: that is a no-op with a warning, not an error, so
        a final save that repeats the last periodic one is harmless. A step older than the latest
        is skipped with a warning too, unless `force`.
        """
        step = int(step)
        self.wait()  # the previous save's error, if any, surfaces here, naming its step
        if step in self._manager.all_steps():
            log.warning('Checkpoint step %d already exists in %s; not overwriting it.',
                        step, self.directory)
            return False
        meta = {'data_state': data_state, 'data_state_crc32': _json_crc(data_state),
                'checksums': state_checksums(state)}
        items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
        if config is not None:
            items['config'] = ocp.args.JsonSave(config)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:  # pylint: disable=broad-except
            raise self._save_error(step, error) from error
        if not saved:
            log.warning('Checkpoint step %d not saved: not newer than the latest step %s.',
                        step, self._manager.latest_step())
        self._pending = step if saved else None
        return saved

    def _save_error(self, step, error: BaseException) -> CheckpointSaveError:
        """The one-line error of a failed save of `step`, naming the newest intact step."""
        self._manager.reload()  # what is on disk, not orbax's in-memory list (already rotated)
        intact = self._manager.latest_step()
        kept = (f'the previous checkpoint (step {intact}) is intact and a rerun resumes from it'
                if intact is not None else 'there is no earlier checkpoint')
        return CheckpointSaveError(f'could not save checkpoint step {step} in {self.directory} '
                                   f'({_short(error, 200)}); {kept}: free disk space or fix the '
                                   'directory, then run again')

    def _remove_unfinished(self) -> None:
        """Deletes the tmp directories of interrupted or failed saves (process 0; after a save
        succeeded, so none of them is being written)."""
        if jax.process_index() != 0:
            return
        for tmp in self.directory.glob(f'*{TMP_TAG}*'):
            log.info('Removing %s, left by an interrupted or failed save.', tmp)
            shutil.rmtree(os.fspath(tmp), ignore_errors=True)

    def restore_latest(self, abstract_state):
        """(step, state, data_state) of the newest readable checkpoint, or None if there is none.

        `abstract_state`: pytree of `jax.ShapeDtypeStruct` (with `.sharding`) that arrays are
        restored onto. Raises `CheckpointError` when checkpoints exist but none can be restored.
        """
        self.wait()
        self._manager.reload()
        for tmp in sorted(self.directory.glob(f'*{TMP_TAG}*')):
            log.warning('Ignoring unfinished checkpoint step %s at %s (its save was interrupted).',
                        tmp.name.split('.')[0], tmp)
        failures = []
        for step in reversed(self._manager.all_steps()):
            try:
                state, data_state = self._restore_step(step, abstract_state)
            except Exception as error:  # pylint: disable=broad-except
                log.warning('Checkpoint step %d in %s is unreadable (%s); trying an older one.',
                            step, self.directory, _short(error))
                failures.append((step, error))
                continue
            for bad_step, error in failures:
                self._set_aside(bad_step, error)
            return step, state, data_state
        if failures:
            by_error = {}  # one mention of each distinct error, with the steps that gave it
            for s, e in failures:
                by_error.setdefault(_short(e, 240, root=self.directory), []).append(str(s))
            tried = '; '.join(f'step{"s" if len(steps) > 1 else ""} {", ".join(steps)}: {error}'
                              for error, steps in by_error.items())
            raise CheckpointError(
                f'no checkpoint in {self.directory} could be restored ({tried}): if the model or '
                'the code changed, run with the config and code that wrote them; otherwise move '
                'the directory away to start afresh')
        set_aside = sorted(p.name for p in self.directory.glob(f'*{CORRUPT_TAG}*'))
        if set_aside:
            raise CheckpointError(
                f'{self.directory} holds only checkpoints set aside as corrupt ({", ".join(set_aside)}): '
                'remove them (or the directory) to start training afresh')
        return None

    def _restore_step(self, step: int, abstract_state):
        """Restores one step and checks its checksums; raises on any mismatch."""
        _check_layout(self.directory / str(step) / 'state', abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        state, meta = restored.state, restored.meta
        if _json_crc(meta['data_state']) != meta['data_state_crc32']:
            raise ValueError('data_state does not match its crc32')
        expected, actual = meta['checksums'], state_checksums(state)
        wrong = [path for path in actual if expected.get(path) != actual[path]]
        if wrong or expected.keys() != actual.keys():
            raise ValueError(f'checksum mismatch in {wrong[:5] or "the tree structure"}')
        return state, meta['data_state']

    def _set_aside(self, step: int, error: BaseException):
        """Renames a corrupt step out of orbax's sight (keeps it for inspection)."""
        source = self.directory / str(step)
        stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
        target = self.directory / f'{step}{CORRUPT_TAG}{stamp}'
        log.warning('Moving corrupt checkpoint step %d (%s) aside to %s.',
                    step, _short(error), target)
        if jax.process_index() == 0:
            try:
                source.rename(target)
            except OSError as rename_error:  # e.g. a store without directory renames
                log.error('Could not move %s aside (%s); it stays in place, and saves up to '
                          'step %d will be skipped.', source, rename_error, step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'jaxdiff_checkpoint_set_aside_{step}')
        self._manager.reload()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def wait(self):
        """Blocks until a pending async save is on disk; a `CheckpointSaveError` if it failed.
        After a save succeeded, removes what interrupted or failed saves left behind."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # pylint: disable=broad-except
            raise self._save_error(step if step is not None else '(pending)', error) from error
        if step is not None:
            self._remove_unfinished()

    def close(self):
        """Waits for a pending save (raising its error), closes the manager, and gives SIGTERM
        back to whoever had it before `catch_sigterm`."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # pylint: disable=broad-except
                pass  # the save's error was raised by wait() (orbax raises it once more here)
            if getattr(self, '_previous_sigterm', None) is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    def catch_sigterm(self):
        """Makes SIGTERM set a flag that `reached_preemption` reports (single-process runs).

        Multi-process runs leave this to JAX's preemption service, which makes all processes
        agree on the step to save at (a flag on one host alone would deadlock the save).
        """
        if jax.process_count() == 1:
            self._previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: self._sigterm.set())

    def reached_preemption(self, step: int) -> bool:
        """True when the run should save now and stop (SIGTERM or JAX's preemption sync point)."""
        return self._sigterm.is_set() or self._manager.reached_preemption(int(step))


@contextlib.contextmanager
def _absl_errors_only():
    """absl (orbax's) log records below ERROR dropped for the context."""
    absl_logger = logging.getLogger('absl')
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def config_of(directory, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: the latest step), or None if there is none."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with _absl_errors_only():  # orbax warns that a read-only directory is read-only
        manager = ocp.CheckpointManager(epath.Path(directory), options=options)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored.config
    except KeyError:  # orbax: 'Item "config" was not found in the checkpoint'
        return None
    finally:
        manager.close()
