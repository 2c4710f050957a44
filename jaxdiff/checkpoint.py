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
an abstract state that no longer matches (a changed model) -- and a `CheckpointError` lists
every step and its error: a workdir full of unreadable checkpoints must not silently restart
training from step 0 (and then rotate the evidence away).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import threading
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

CORRUPT_TAG = '.corrupt-'
TMP_TAG = '.orbax-checkpoint-tmp'


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored (the message lists what was tried)."""


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


def _short(error: BaseException) -> str:
    """First line of an error, capped: tensorstore errors carry a page-long spec."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {text[:300]}'


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
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._sigterm = threading.Event()

    def save(self, step: int, state, *, data_state: dict | None = None,
             config: dict | None = None, force: bool = False) -> bool:
        """Starts saving `state` (+ JSON `data_state`, `config`) as `step`; True if it does.

        An existing step is never overwritten: that is a no-op with a warning, not an error, so
        a final save that repeats the last periodic one is harmless. A step older than the latest
        is skipped with a warning too, unless `force`.
        """
        step = int(step)
        if step in self._manager.all_steps():
            log.warning('Checkpoint step %d already exists in %s; not overwriting it.',
                        step, self.directory)
            return False
        meta = {'data_state': data_state, 'data_state_crc32': _json_crc(data_state),
                'checksums': state_checksums(state)}
        items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
        if config is not None:
            items['config'] = ocp.args.JsonSave(config)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if not saved:
            log.warning('Checkpoint step %d not saved: not newer than the latest step %s.',
                        step, self._manager.latest_step())
        return saved

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
            tried = '\n'.join(f'  step {s}: {_short(e)}' for s, e in failures)
            raise CheckpointError(
                f'No checkpoint in {self.directory} could be restored; tried:\n{tried}\n'
                'If the state layout changed, restore with the matching code; otherwise move '
                'the directory away to start afresh.')
        set_aside = sorted(p.name for p in self.directory.glob(f'*{CORRUPT_TAG}*'))
        if set_aside:
            raise CheckpointError(
                f'{self.directory} holds only checkpoints set aside as corrupt: {set_aside}. '
                'Remove them (or the directory) to start training afresh.')
        return None

    def _restore_step(self, step: int, abstract_state):
        """Restores one step and checks its checksums; raises on any mismatch."""
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
        """Blocks until pending async saves are on disk (re-raising their errors)."""
        self._manager.wait_until_finished()

    def close(self):
        """Closes the manager and gives SIGTERM back to whoever had it before `catch_sigterm`."""
        self._manager.close()
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


def config_of(directory, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: the latest step), or None if there is none."""
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
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
