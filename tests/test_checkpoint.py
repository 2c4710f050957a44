"""Tests of jaxdiff.checkpoint: round trips, keep-last-N, async saves, corruption, sharding.

How a step looks on disk with orbax-checkpoint 0.12.8 (see the module docstring) and how the
corruption tests damage it realistically:

    <step>/state/ocdbt.process_0/d/<hash>   the zstd-compressed array chunks (the largest file):
                                            'garble' flips one byte in its middle (bit rot;
                                            orbax itself would restore wrong numbers silently),
                                            'truncate' cuts it to half (a short write / full disk)
    <step>/state/manifest.ocdbt             root of the OCDBT index: 'manifest' deletes it
    <step>/state/_METADATA                  orbax's tree structure: 'tree' deletes it (orbax
                                            then restores dicts, not the TrainState class)
    <step>/meta/metadata                    our JSON (data state, checksums): 'meta' deletes it
    <step> -> <step>.orbax-checkpoint-tmp   'unfinished': what a process killed mid-save leaves
                                            (orbax writes the tmp directory, renames on finalize)
"""
import errno
import gc
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler

from jaxdiff import checkpoint
from jaxdiff.checkpoint import CheckpointError, Checkpointer, CheckpointSaveError, config_of

# orbax 0.12.8 leaves the coroutines of a failed array read to the garbage collector, which then
# reports 'Exception ignored in <coroutine _read_array_index_and_device_put>'; harmless here.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture(autouse=True)
def collect_garbage():
    """Collects those coroutines inside the test, where the filter above applies."""
    yield
    gc.collect()


class TrainState(flax.struct.PyTreeNode):
    """Shaped like jaxdiff.train.TrainState."""
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState


@jax.jit  # one compilation instead of one per eager op (most of this file's run time)
def make_state(seed) -> TrainState:
    """A small train state; the 128x128 random kernel is the largest array chunk on disk."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {'dense': {'kernel': jax.random.normal(k1, (128, 128)),
                        'bias': jax.random.normal(k2, (128,))},
              'scale': jnp.asarray(seed, jnp.float32)}
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial mu, nu and count
    ema = jax.tree.map(lambda p: 0.5 * p, params)
    return TrainState(step=jnp.asarray(seed, jnp.int32), params=params, ema_params=ema, opt_state=opt_state)


def abstract_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def save_steps(ckpt, steps):
    for step in steps:
        assert ckpt.save(step, make_state(step), data_state={'index': 10 * step})
    ckpt.wait()


def test_round_trip_is_bit_exact_with_data_state_and_config(tmp_path):
    state = make_state(3)
    config = {'lr': 1e-3, 'model': {'channels': [64, 128]}, 'name': 'edm'}
    data_state = {'next_index': 1234, 'worker_states': [{'seed': 7}], 'shard': 'a/b'}
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.save(5, state, data_state=data_state, config=config)
    ckpt.close()

    step, restored, restored_data = Checkpointer(tmp_path).restore_latest(abstract_of(state))
    assert step == 5 and restored_data == data_state
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert_bit_equal(restored, state)
    assert config_of(tmp_path) == config and config_of(tmp_path, 5) == config


def test_config_of_without_config_or_checkpoint_is_none(tmp_path):
    assert config_of(tmp_path) is None
    save_steps(Checkpointer(tmp_path), [1])
    assert config_of(tmp_path) is None


def test_keep_last_n_keeps_the_newest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    save_steps(ckpt, [1, 2, 3, 4])
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ['3', '4']


def test_async_save_then_wait_then_restore(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=True)
    assert ckpt.restore_latest(abstract_of(make_state(0))) is None  # empty directory
    assert ckpt.save(7, make_state(7), data_state={'index': 70})
    ckpt.wait()
    step, state, data_state = Checkpointer(tmp_path).restore_latest(abstract_of(make_state(0)))
    assert (step, data_state) == (7, {'index': 70})
    assert_bit_equal(state, make_state(7))


def test_existing_step_is_never_overwritten(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path)
    save_steps(ckpt, [1, 2])
    with caplog.at_level(logging.WARNING):
        assert not ckpt.save(2, make_state(99), force=True)  # exists: no-op with a warning
        assert not ckpt.save(1, make_state(99))              # older than the latest
    assert 'step 2 already exists' in caplog.text
    _, state, _ = ckpt.restore_latest(abstract_of(make_state(0)))
    assert_bit_equal(state, make_state(2))


def _largest_chunk_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((step_dir / 'state').glob('ocdbt.process_*/d/*'), key=lambda p: p.stat().st_size)


def corrupt(step_dir: pathlib.Path, how: str):
    """Damages one saved step as described in the module docstring."""
    if how == 'garble':
        chunk = _largest_chunk_file(step_dir)
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    elif how == 'truncate':
        chunk = _largest_chunk_file(step_dir)
        chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])
    elif how == 'manifest':
        (step_dir / 'state' / 'manifest.ocdbt').unlink()
    elif how == 'tree':
        (step_dir / 'state' / '_METADATA').unlink()
    elif how == 'meta':
        (step_dir / 'meta' / 'metadata').unlink()
    elif how == 'unfinished':
        step_dir.rename(step_dir.with_name(step_dir.name + '.orbax-checkpoint-tmp'))


@pytest.mark.parametrize('how', ['garble', 'truncate', 'manifest', 'tree', 'meta', 'unfinished'])
def test_corrupt_latest_falls_back_and_later_saves_still_rotate(tmp_path, caplog, how):
    save_steps(Checkpointer(tmp_path, keep=2), [1, 2, 3])
    corrupt(tmp_path / '3', how)

    ckpt = Checkpointer(tmp_path, keep=2)  # a restarted run
    with caplog.at_level(logging.WARNING, logger='jaxdiff.checkpoint'):
        step, state, data_state = ckpt.restore_latest(abstract_of(make_state(0)))
    assert (step, data_state) == (2, {'index': 20})
    assert_bit_equal(state, make_state(2))
    assert 'step 3' in caplog.text
    set_aside = [p.name for p in tmp_path.iterdir() if '.corrupt-' in p.name or '-tmp' in p.name]
    assert len(set_aside) == 1 and set_aside[0].startswith('3.')  # kept, not deleted

    # The resumed run reaches step 3 again and goes on; keep-last-N counts good steps only.
    save_steps(ckpt, [3, 4])
    assert ckpt.all_steps() == [3, 4]
    assert Checkpointer(tmp_path).restore_latest(abstract_of(make_state(0)))[0] == 4
    if how != 'unfinished':  # orbax reuses (replaces) a tmp dir when that step is saved again
        assert set_aside[0] in os.listdir(tmp_path)


def test_deleted_bookkeeping_files_are_harmless(tmp_path):
    """The abstract state supplies shapes and shardings; these files are not needed to restore."""
    save_steps(Checkpointer(tmp_path), [1, 2])
    for name in ['_CHECKPOINT_METADATA', 'commit_success.txt', 'state/_sharding',
                 'state/array_metadatas/process_0']:
        (tmp_path / '2' / name).unlink()
    step, state, _ = Checkpointer(tmp_path).restore_latest(abstract_of(make_state(0)))
    assert step == 2
    assert_bit_equal(state, make_state(2))


def test_all_corrupt_raises_listing_every_step_and_renames_nothing(tmp_path):
    save_steps(Checkpointer(tmp_path), [1, 2])
    corrupt(tmp_path / '1', 'truncate')
    corrupt(tmp_path / '2', 'garble')
    for _ in range(2):  # a second restart must not start from scratch either
        # The garbled chunk fails tensorstore's checksum or, read in another order, zstd's own
        # frame check ("Data corruption detected"): both name the damage (seen in loaded runs).
        with pytest.raises(CheckpointError, match=r'step 2: .*(checksum|Data corruption).*step 1: ') as e:
            Checkpointer(tmp_path).restore_latest(abstract_of(make_state(0)))
        # One line, with tensorstore's own error rather than orbax's wrapper and its page-long spec.
        assert '\n' not in str(e.value) and 'TensorStore details' not in str(e.value)
        assert 'step 1: ValueError: OUT_OF_RANGE: Error reading' in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ['1', '2']


def test_failed_restore_leftovers_are_not_printed(monkeypatch):
    """After a failed restore of a real network (hundreds of arrays), every read still in flight
    raised 'Event loop is closed' in a tensorstore callback: about 2,000 unraisable-exception
    tracebacks on the console around the one-line error. The Checkpointer drops those (and
    orbax coroutines collected unfinished); every other one reaches the previous hook."""
    reached = []
    monkeypatch.setattr(sys, 'unraisablehook', reached.append)
    checkpoint._install_unraisable_filter()

    async def _read_array_index_and_device_put():  # stands in for orbax's coroutine
        pass

    coroutine = _read_array_index_and_device_put()
    coroutine.close()
    orbax_like = types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename='/x/orbax/checkpoint/y.py'))
    for dropped in (types.SimpleNamespace(exc_value=RuntimeError('Event loop is closed'), object=None),
                    types.SimpleNamespace(exc_value=RuntimeError('coroutine ignored GeneratorExit'), object=orbax_like)):
        sys.unraisablehook(dropped)
    assert reached == []
    for kept in (types.SimpleNamespace(exc_value=RuntimeError('something else'), object=None),
                 types.SimpleNamespace(exc_value=ValueError('x'), object=coroutine)):  # not orbax's
        sys.unraisablehook(kept)
    assert len(reached) == 2


def test_mismatched_abstract_state_raises_and_renames_nothing(tmp_path):
    save_steps(Checkpointer(tmp_path), [1, 2])
    wrong = abstract_of(make_state(0).replace(step=jnp.zeros(3, jnp.int32)))
    with pytest.raises(CheckpointError, match=r'steps 2, 1: ValueError: the stored state does not fit the model '
                                              r'\(1 arrays differ: step stored \(\), wanted \(3,\)\)'):
        Checkpointer(tmp_path).restore_latest(wrong)
    assert sorted(os.listdir(tmp_path)) == ['1', '2']


def _disk_full(directory):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))


def test_failed_async_save_keeps_the_previous_and_says_so(tmp_path, monkeypatch):
    """A full disk while the background thread writes step 3 (keep=2): steps 1 and 2 stay (orbax
    rotates only after a complete save), a one-line CheckpointSaveError names step 3 and the
    intact step 2, and the next successful save removes step 3's tmp directory."""
    ckpt = Checkpointer(tmp_path, keep=2)
    save_steps(ckpt, [1, 2])
    original = json_handler.JsonCheckpointHandler._save_fn

    async def disk_full(self, x, directory):
        raise _disk_full(directory)

    monkeypatch.setattr(json_handler.JsonCheckpointHandler, '_save_fn', disk_full)
    assert ckpt.save(3, make_state(3), data_state={'index': 30})
    with pytest.raises(CheckpointSaveError, match=r'^could not save checkpoint step 3 in \S+ \(OSError: \[Errno 28\] '
                                                  r'No space left on device.*\); the previous checkpoint \(step 2\) '
                                                  r'is intact and a rerun resumes from it') as e:
        ckpt.wait()
    assert '\n' not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ['1', '2', '3.orbax-checkpoint-tmp']
    step, state, _ = Checkpointer(tmp_path).restore_latest(abstract_of(make_state(0)))
    assert step == 2
    assert_bit_equal(state, make_state(2))

    monkeypatch.setattr(json_handler.JsonCheckpointHandler, '_save_fn', original)
    save_steps(ckpt, [4])
    assert sorted(os.listdir(tmp_path)) == ['2', '4']
    ckpt.close()


def test_failed_save_start_and_unwritable_directory(tmp_path, monkeypatch):
    """A save that fails as it starts (e.g. the step directory cannot be created) raises the
    same one-line error; with nothing saved before, it says there is no earlier checkpoint."""
    ckpt = Checkpointer(tmp_path)

    def fails(*args, **kwargs):
        raise _disk_full(tmp_path / '1.orbax-checkpoint-tmp')

    monkeypatch.setattr(ckpt._manager, 'save', fails)
    with pytest.raises(CheckpointSaveError, match=r'could not save checkpoint step 1 .*; there is no earlier '
                                                  r'checkpoint: free disk space or fix the directory'):
        ckpt.save(1, make_state(1))
    ckpt.close()


def test_stale_tmp_directories_are_removed_after_a_successful_save(tmp_path):
    (tmp_path / '7.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)  # an interrupted save
    ckpt = Checkpointer(tmp_path)
    assert ckpt.restore_latest(abstract_of(make_state(0))) is None
    assert (tmp_path / '7.orbax-checkpoint-tmp').is_dir()  # kept until a save succeeds
    save_steps(ckpt, [1])
    assert os.listdir(tmp_path) == ['1']
    ckpt.close()


def test_only_set_aside_checkpoints_left_raises(tmp_path):
    save_steps(Checkpointer(tmp_path), [1, 2])
    corrupt(tmp_path / '2', 'garble')
    assert Checkpointer(tmp_path).restore_latest(abstract_of(make_state(0)))[0] == 1
    (tmp_path / '1').rename(tmp_path / 'elsewhere')  # the good one goes away
    with pytest.raises(CheckpointError, match='set aside as corrupt'):
        Checkpointer(tmp_path).restore_latest(abstract_of(make_state(0)))


def test_sigterm_requests_a_preemption_save(tmp_path):
    ckpt = Checkpointer(tmp_path)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        ckpt.catch_sigterm()
        assert not ckpt.reached_preemption(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert ckpt.reached_preemption(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


SHARDED = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxdiff.checkpoint import Checkpointer

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ('data',))
    rows, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
    state = {'w': jax.device_put(jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3), rows),
             'step': jax.device_put(jnp.int32(11), replicated)}
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(11, state, data_state={'i': 1})
    ckpt.wait()

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    step, restored, _ = Checkpointer(sys.argv[1]).restore_latest(abstract)
    assert step == 11
    assert restored['w'].sharding == rows and restored['step'].sharding == replicated
    assert len(restored['w'].addressable_shards) == 8
    assert all(s.data.shape == (8, 3) for s in restored['w'].addressable_shards)
    np.testing.assert_array_equal(restored['w'], np.arange(64 * 3).reshape(64, 3))
    # Restoring onto another sharding (here: replicated) reshards on read.
    other = dict(abstract, w=jax.ShapeDtypeStruct((64, 3), jnp.float32, sharding=replicated))
    _, again, _ = Checkpointer(sys.argv[1]).restore_latest(other)
    assert again['w'].sharding == replicated
    np.testing.assert_array_equal(again['w'], restored['w'])
    print('OK')
''')


def test_sharded_state_restores_onto_its_sharding(tmp_path):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
               JAX_PLATFORMS='cpu')
    result = subprocess.run([sys.executable, '-c', SHARDED, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
    """orbax's array store rejects relative paths inside its async save; the launcher's default
    work directory is relative, so the Checkpointer must make it absolute."""
    monkeypatch.chdir(tmp_path)
    state = {'w': jnp.arange(6.0).reshape(2, 3)}
    ckpt = Checkpointer('runs/relative/checkpoints', keep=2)
    ckpt.save(1, state, data_state={'next_index': 1})
    ckpt.wait()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    step, restored, data_state = ckpt.restore_latest(abstract)
    ckpt.close()
    assert step == 1 and data_state == {'next_index': 1}
    np.testing.assert_array_equal(restored['w'], state['w'])
