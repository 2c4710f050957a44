"""Device memory of one EDM preset's training step: XLA's own accounting, optionally a measured peak.

    python benchmarks/train_memory.py --preset cifar10 --batch 512            # compile only (any backend)
    python benchmarks/train_memory.py --preset imagenet64 --batch 128 --run 5  # also run 5 steps

Builds the step exactly as `runner.run_training` does (`train.make_setup`, `parallel` shardings,
`train.compile_train_step`) on a one-device mesh, compiles it for `--batch` images per device
(no data set is opened: the data's shape comes from the preset), and prints
`compiled.memory_analysis()`: arguments (the train state: params, EMA, Adam moments; the batch),
outputs (the new state; donated, so aliased onto the arguments) and temporaries (activations kept
for the backward pass, workspace). peak = arguments + outputs - aliased + temporaries is what the
step needs on one device, before the allocator's own overhead. With `--run N` it also runs N steps
on zeros and prints the allocator's peak (`device.memory_stats()`, GPU/TPU only) and the step time.
One JSON line per preset, for RESULTS tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import edm  # noqa: E402
from jaxdiff import builders, parallel, train  # noqa: E402

NUM_CLASSES = {'cifar10': 10, 'imagenet_resized/64x64': 1000}


def measure(preset: str, batch: int, run_steps: int = 0) -> dict:
    config = edm.get_config(preset)
    config.train.batch_size = batch
    label_dim = NUM_CLASSES[config.data.name] if config.data.use_labels else 0
    module = builders.build_module(config, label_dim=label_dim)
    setup = train.make_setup(config, module, builders.model_factory(config), builders.build_loss(config))
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    shape = (config.data.resolution, config.data.resolution, config.data.channels)
    shapes = jax.eval_shape(lambda key: train.init_state(setup, key, shape, label_dim), jax.random.key(0))
    shardings = parallel.state_shardings(mesh, shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    batch_sharding = parallel.batch_sharding(mesh)
    abstract_batch = {'image': jax.ShapeDtypeStruct((batch,) + shape, jnp.float32, sharding=batch_sharding)}
    if label_dim:
        abstract_batch['label'] = jax.ShapeDtypeStruct((batch, label_dim), jnp.float32, sharding=batch_sharding)
    step = train.compile_train_step(setup, shardings, batch_sharding, parallel.replicated(mesh))
    start = time.perf_counter()
    compiled = step.lower(abstract, abstract_batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    gib = lambda b: round(b / 2**30, 3)
    result = dict(preset=preset, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                  batch_per_device=batch, model=config.model.type, dtype=config.model.dtype,
                  params_M=round(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes.params)) / 1e6, 2),
                  compile_s=round(compile_s, 1),
                  arguments_GiB=gib(m.argument_size_in_bytes), outputs_GiB=gib(m.output_size_in_bytes),
                  aliased_GiB=gib(m.alias_size_in_bytes), temp_GiB=gib(m.temp_size_in_bytes),
                  peak_GiB=gib(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                               + m.temp_size_in_bytes))
    if run_steps:
        state = jax.jit(lambda key: train.init_state(setup, key, shape, label_dim), out_shardings=shardings)(
            jax.random.key(0))
        data = {k: jax.device_put(jnp.zeros(v.shape, v.dtype), batch_sharding) for k, v in abstract_batch.items()}
        state, metrics = compiled(state, data, jax.random.key(0))  # warm-up
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(run_steps):
            state, metrics = compiled(state, data, jax.random.key(0))
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / run_steps
        result.update(step_s=round(seconds, 4), images_per_s=round(batch / seconds, 1))
        stats = jax.devices()[0].memory_stats() or {}
        if 'peak_bytes_in_use' in stats:
            result['allocator_peak_GiB'] = gib(stats['peak_bytes_in_use'])
        del state
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', action='append', required=True, choices=sorted(edm.PRESETS))
    parser.add_argument('--batch', type=int, action='append', required=True,
                        help='images per device; one per --preset, or one for all')
    parser.add_argument('--run', type=int, default=0, help='also run this many steps (GPU/TPU: allocator peak)')
    args = parser.parse_args()
    batches = args.batch * len(args.preset) if len(args.batch) == 1 else args.batch
    for preset, batch in zip(args.preset, batches):
        print(json.dumps(measure(preset, batch, args.run)), flush=True)


if __name__ == '__main__':
    main()
