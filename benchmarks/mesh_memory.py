"""Per-device memory of an EDM preset's training step on a data x fsdp mesh, compiled for a
simulated multi-device CPU (a TPU pod's mesh shape without the pod).

    python benchmarks/mesh_memory.py --preset cifar10 --devices 8 --mesh 8x1 --mesh 1x8 --batch 64
    python benchmarks/mesh_memory.py --preset cifar10 --devices 16 --mesh 16x1 --mesh 1x16 --batch 32
    python benchmarks/mesh_memory.py --preset imagenet64 --devices 16 --mesh 1x16 --batch 256 --batch 64 --fit-gib 16
    python benchmarks/mesh_memory.py --preset cifar10 --devices 16 --processes 2 --mesh 1x16 --batch 32

The process sees `--devices` CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
set here before JAX starts; jaxdiff still appends its own flag). For each `--mesh DATAxFSDP` and
each `--batch` (images per device; global batch = per-device batch x devices) the step is built
as `runner.run_training` builds it (`train.make_setup`, `parallel.state_shardings`,
`train.compile_train_step`) and lowered on abstract inputs (`jax.ShapeDtypeStruct`s carrying the
shardings: no state is allocated), then compiled. One JSON row each, with the per-device sizes of
`compiled.memory_analysis()` in GiB:

    peak = arguments + outputs - aliased + temporaries

(arguments: this device's share of the train state and the batch; outputs: the new state, donated
and so aliased onto the arguments; temporaries: activations kept for the backward pass, gathered
FSDP weights, workspace). `--fit-gib G` adds, for a mesh compiled at two or more batches, a line
with the straight line peak(b) = a + k b through the two most distant ones and the largest
power-of-two per-device batch with peak <= G (an interpolation, said so in the line).

`--processes P` starts P local processes (jax.distributed over gloo CPU collectives, coordinator
on localhost), each with devices / P host devices; every one compiles the step for the global
mesh, and process 0's rows are printed (with `processes`: P).

These are XLA:CPU's figures: the TPU compiler assigns buffers (and fuses, rematerialises, lays
out bf16) differently, so on a TPU they are estimates, not measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = {'cifar10': 10, 'imagenet_resized/64x64': 1000}
GIB = 2 ** 30


def parse_mesh(text: str) -> tuple[int, int]:
    """'8x1' -> (data, fsdp) = (8, 1)."""
    data, fsdp = text.lower().split('x')
    return int(data), int(fsdp)


def memory_row(analysis) -> dict:
    """Per-device GiB of a `compiled.memory_analysis()`, peak = args + outputs - aliased + temps."""
    args, outs = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
    alias, temps = analysis.alias_size_in_bytes, analysis.temp_size_in_bytes
    gib = lambda b: round(b / GIB, 3)
    return dict(arguments_GiB=gib(args), outputs_GiB=gib(outs), aliased_GiB=gib(alias), temp_GiB=gib(temps),
                peak_GiB=gib(args + outs - alias + temps),
                bytes=dict(arguments=args, outputs=outs, aliased=alias, temp=temps,
                           peak=args + outs - alias + temps))


def fit_batch(rows: list[dict], limit_gib: float) -> dict:
    """The line peak(b) = a + k b through the rows (one mesh) of the smallest and largest per-device
    batch b, and the largest power of two b with a + k b <= limit_gib (0 when not even b = 1)."""
    lo, hi = min(rows, key=lambda r: r['batch_per_device']), max(rows, key=lambda r: r['batch_per_device'])
    b0, b1 = lo['batch_per_device'], hi['batch_per_device']
    p0, p1 = lo['bytes']['peak'] / GIB, hi['bytes']['peak'] / GIB
    k = (p1 - p0) / (b1 - b0)
    a = p0 - k * b0
    best = 0
    b = 1
    while a + k * b <= limit_gib and b <= 2 ** 20:
        best, b = b, 2 * b
    return dict(fit='linear interpolation of peak over per-device batch', from_batches=[b0, b1],
                GiB_at_0=round(a, 3), GiB_per_image=round(k, 5), limit_GiB=limit_gib,
                largest_pow2_batch_per_device=best,
                peak_GiB_at_that_batch=round(a + k * best, 3) if best else None)


def measure(preset: str, data: int, fsdp: int, batch_per_device: int, overrides: dict | None = None) -> dict:
    """Compile the preset's training step on a (data, fsdp) mesh of all of jax.devices() for
    `batch_per_device` images per device; its per-device memory row (see the module docstring).
    `overrides`: {'a.b': value} config fields set after the preset (tests shrink the network)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from configs import edm
    from jaxdiff import builders, parallel, train

    config = edm.get_config(preset)
    for field, value in (overrides or {}).items():
        *path, last = field.split('.')
        node = config
        for name in path:
            node = node[name]
        node[last] = value
    mesh = parallel.make_mesh(data, fsdp)
    global_batch = batch_per_device * mesh.size
    config.train.batch_size = global_batch
    parallel.check_batch_size(global_batch, mesh)
    label_dim = NUM_CLASSES[config.data.name] if config.data.use_labels else 0
    module = builders.build_module(config, label_dim=label_dim)
    setup = train.make_setup(config, module, builders.model_factory(config), builders.build_loss(config))
    shape = (config.data.resolution, config.data.resolution, config.data.channels)
    # As runner._abstract_state: shapes by tracing, shardings from them, nothing allocated.
    shapes = jax.eval_shape(lambda key: train.init_state(setup, key, shape, label_dim), jax.random.key(0))
    shardings = parallel.state_shardings(mesh, shapes)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    batch_sharding, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    batch = {'image': jax.ShapeDtypeStruct((global_batch,) + shape, jnp.float32, sharding=batch_sharding)}
    if label_dim:
        batch['label'] = jax.ShapeDtypeStruct((global_batch, label_dim), jnp.float32, sharding=batch_sharding)
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=replicated)
    step = train.compile_train_step(setup, shardings, batch_sharding, replicated)
    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.params))
    state_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
    return dict(preset=preset, model=config.model.type, dtype=config.model.dtype, params_M=round(n_params / 1e6, 2),
                state_GiB=round(state_bytes / GIB, 3), state_bytes=state_bytes, devices=mesh.size, processes=jax.process_count(),
                mesh=f'{data}x{fsdp}', data=data, fsdp=fsdp, batch_per_device=batch_per_device,
                global_batch=global_batch, compile_s=round(compile_s, 1), **memory_row(compiled.memory_analysis()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def device_env(devices: int, environ=None) -> dict:
    """The environment of a CPU process with `devices` host devices (XLA_FLAGS kept, the device
    count replaced)."""
    env = dict(os.environ if environ is None else environ)
    flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
    env['JAX_PLATFORMS'] = 'cpu'
    return env


def launch_processes(argv: list[str], devices: int, processes: int, timeout: float = 3600) -> list[str]:
    """Run this script with `argv` as `processes` local jax.distributed processes over gloo, each
    with devices // processes host devices; their outputs (process 0 first)."""
    if devices % processes:
        raise ValueError(f'--devices={devices} is not divisible by --processes={processes}')
    address = f'127.0.0.1:{free_port()}'
    procs = []
    for i in range(processes):
        env = device_env(devices // processes)
        env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i),
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode:
            raise RuntimeError(f'process {i} exited {p.returncode}:\n{out[-4000:]}')
    return outputs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--preset', required=True)
    p.add_argument('--devices', type=int, required=True, help='host devices in all (all processes together)')
    p.add_argument('--mesh', action='append', required=True, help='DATAxFSDP, e.g. 8x1 (repeatable)')
    p.add_argument('--batch', type=int, action='append', required=True, help='images per device (repeatable)')
    p.add_argument('--processes', type=int, default=1, help='local jax.distributed processes over gloo')
    p.add_argument('--fit-gib', type=float, default=0, help='per-device limit for the interpolated batch line')
    p.add_argument('--set', action='append', default=[], metavar='FIELD=JSON', help='config override (tests)')
    return p


def _tuples(value):
    """JSON lists as tuples (the configs' sequence fields are tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    child = 'JAX_PROCESS_ID' in os.environ
    if args.processes > 1 and not child:
        outputs = launch_processes(argv, args.devices, args.processes)
        print(''.join(line + '\n' for line in outputs[0].splitlines() if line.startswith('{')), end='', flush=True)
        return
    if not child:
        os.environ.update(device_env(args.devices))  # before JAX starts its CPU backend
    sys.path.insert(0, REPO)
    import jax
    from jaxdiff import parallel
    parallel.initialize_distributed()  # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (children)
    if jax.device_count() != args.devices:
        raise RuntimeError(f'expected {args.devices} devices, JAX sees {jax.device_count()}')
    overrides = {k: _tuples(json.loads(v)) for k, v in (s.split('=', 1) for s in args.set)}
    for mesh in args.mesh:
        data, fsdp = parse_mesh(mesh)
        rows = []
        for batch in args.batch:
            rows.append(measure(args.preset, data, fsdp, batch, overrides))
            if jax.process_index() == 0:
                print(json.dumps(rows[-1]), flush=True)
        if args.fit_gib and len(rows) > 1 and jax.process_index() == 0:
            print(json.dumps(dict(preset=args.preset, devices=args.devices, mesh=mesh,
                                  **fit_batch(rows, args.fit_gib))), flush=True)


if __name__ == '__main__':
    main()
