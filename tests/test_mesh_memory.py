"""benchmarks/mesh_memory.py: the per-device memory of a training step on a simulated CPU mesh.

A miniature of the digits preset (16 channels, one resolution, no attention) is compiled in a
subprocess with 8 host devices, data-parallel (8x1) and FSDP (1x8); the slow test compiles it as
two jax.distributed processes over gloo, 4 devices each."""
import json
import os
import pathlib
import subprocess
import sys
import types

import pytest

REPO = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(REPO / 'benchmarks'))
import mesh_memory  # noqa: E402

TINY = ['--preset', 'digits', '--set', 'model.kwargs.model_channels=16', '--set', 'model.kwargs.channel_mult=[1]',
        '--set', 'model.kwargs.attn_resolutions=[]']


def run_script(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COORDINATOR') and k != 'JAX_PROCESS_ID'}
    proc = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'mesh_memory.py'), *TINY, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]


@pytest.fixture(scope='module')
def rows():
    """8 host devices, the data-parallel and the FSDP mesh, 2 images per device."""
    dp, fsdp = run_script('--devices', '8', '--mesh', '8x1', '--mesh', '1x8', '--batch', '2')
    return dp, fsdp


def test_fsdp_splits_the_state_over_the_devices(rows):
    dp, fsdp = rows
    assert (dp['mesh'], fsdp['mesh']) == ('8x1', '1x8')
    for row in rows:
        assert row['devices'] == 8 and row['processes'] == 1
        assert row['batch_per_device'] == 2 and row['global_batch'] == 16
    state = dp['state_bytes']
    # Data-parallel: every device holds the whole state (and its 2 images).
    assert dp['bytes']['arguments'] >= 0.99 * state
    # FSDP: each leaf's largest divisible axis over 8 devices; the few indivisible leaves (biases
    # of odd length are none here, but the scalar step counters are) stay whole.
    assert fsdp['bytes']['arguments'] < dp['bytes']['arguments'] / 6
    assert fsdp['bytes']['arguments'] > dp['bytes']['arguments'] / 10
    # The donated state is aliased onto the new one in both.
    for row in rows:
        assert row['bytes']['aliased'] > 0.95 * row['bytes']['outputs']


def test_peak_is_arguments_plus_outputs_minus_aliased_plus_temporaries(rows):
    for row in rows:
        b = row['bytes']
        assert b['peak'] == b['arguments'] + b['outputs'] - b['aliased'] + b['temp']
        assert b['temp'] > 0
        for name in ('arguments', 'outputs', 'aliased', 'temp', 'peak'):
            key = 'temp_GiB' if name == 'temp' else f'{name}_GiB'
            assert row[key] == round(b[name] / 2**30, 3)


def test_memory_row_arithmetic():
    analysis = types.SimpleNamespace(argument_size_in_bytes=3 * 2**30, output_size_in_bytes=2 * 2**30,
                                     alias_size_in_bytes=2**30, temp_size_in_bytes=2**29)
    row = mesh_memory.memory_row(analysis)
    assert row['peak_GiB'] == 4.5 and row['bytes']['peak'] == 9 * 2**29
    assert (row['arguments_GiB'], row['outputs_GiB'], row['aliased_GiB'], row['temp_GiB']) == (3, 2, 1, 0.5)


def test_fit_batch_is_the_line_through_the_extreme_batches():
    row = lambda b, gib: {'batch_per_device': b, 'bytes': {'peak': gib * 2**30}}
    # peak = 1 + 0.25 b GiB: 16 GiB reached at b = 60, so 32 is the largest power of two.
    fit = mesh_memory.fit_batch([row(32, 9.0), row(8, 3.0), row(16, 99.0)], 16)
    assert fit['from_batches'] == [8, 32]
    assert fit['GiB_at_0'] == 1.0 and fit['GiB_per_image'] == 0.25
    assert fit['largest_pow2_batch_per_device'] == 32 and fit['peak_GiB_at_that_batch'] == 9.0
    assert mesh_memory.fit_batch([row(8, 3.0), row(32, 9.0)], 1.1)['largest_pow2_batch_per_device'] == 0
    assert mesh_memory.fit_batch([row(8, 3.0), row(32, 9.0)], 1.25)['largest_pow2_batch_per_device'] == 1


def test_device_env_replaces_the_device_count_and_keeps_other_flags():
    env = mesh_memory.device_env(16, {'XLA_FLAGS': '--xla_force_host_platform_device_count=2 --xla_foo=1'})
    assert env['XLA_FLAGS'] == '--xla_foo=1 --xla_force_host_platform_device_count=16'
    assert env['JAX_PLATFORMS'] == 'cpu'
    assert mesh_memory.parse_mesh('2x8') == (2, 8)


@pytest.mark.slow
def test_two_processes_compile_the_global_mesh(rows):
    """Two jax.distributed processes over gloo, 4 host devices each, compile the FSDP step for the
    8-device global mesh; process 0's row matches the one-process 1x8 row."""
    (row,) = run_script('--devices', '8', '--processes', '2', '--mesh', '1x8', '--batch', '2')
    assert row['processes'] == 2 and row['devices'] == 8 and row['global_batch'] == 16
    one = rows[1]
    assert row['bytes']['arguments'] == one['bytes']['arguments']
    assert row['bytes']['outputs'] == one['bytes']['outputs']
