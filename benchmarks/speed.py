"""Speed of jaxdiff's compiled training step and EDM sampler, per network x dtype (issue 15).

Each case (a network preset of configs/edm.py at one compute dtype) runs on whatever devices JAX
sees, data-parallel over a ('data', 'fsdp') mesh of all local devices as the launcher builds it,
on a fixed synthetic batch (no data pipeline: grain/TFDS are not needed), and records:

  train    images/s of the launcher's step (train.make_setup, init_state, compile_train_step with
           parallel's shardings, EDM's loss from builders.build_loss): lowering and compilation
           timed apart (jit(...).lower(...).compile()), the first call apart, `--warmup` untimed
           steps, then the median of `--windows` windows of `--steps` steps (block_until_ready
           at each window's end); FLOPs per step from XLA's cost analysis of the compiled step
           (per device, times the devices; the lowered program's count where the compiled one
           has none), achieved TFLOP/s, and their fraction of a MEASURED peak: the best rate of
           a large jnp.matmul in the case's dtype on one device, times the devices.
  sample   images/s of EDM's deterministic Heun sampler, 18 steps = 35 network evaluations
           (builders.build_sampling's draw, i.e. samplers.sample's lax.scan), compiled apart, and
  forward  images/s of one denoiser call at the same batch: sample img/s x 35 / forward img/s is
           what the sampler loop keeps of the bare network rate (1.0: the scan costs nothing).
           The sampler's FLOPs are the forward's x 35 (XLA's cost analysis counts a loop body once).
  memory   XLA's estimate for the compiled train step (temp + arguments + outputs - donated,
           aliased bytes) and, where the device reports it, the allocator's peak bytes in use
           (process-wide: the peak over this case and the ones before it).

    python benchmarks/speed.py --quick                      # CPU smoke test, about a minute on 2 cores
    python benchmarks/speed.py --cases cifar10:bfloat16,imagenet64 --batch imagenet64=128 --time-budget 400
    bash benchmarks/gpu.sh [EDM_CHECKOUT]                   # the prepared GPU run (see that file)

`--cases` lists cases in the order to run them: `name` (every dtype of --dtypes) or `name:dtype`.
One JSON row per case is appended to --out (flushed after each, so a killed run keeps what
finished) and the markdown table is rewritten to --md after each; a failing case writes an error
row, and once --time-budget seconds have passed the remaining cases write 'skipped' rows.

`--vs-edm PATH` also runs NVlabs/edm's own code from that checkout (EDMPrecond over its SongUNet or
DhariwalUNet, EDMLoss, Adam, EMA lerp, its generate.edm_sampler) on the same network, batch and
device, in a subprocess of `--torch-python` (this file with --run-edm-worker; it imports torch and
EDM, never jax), right after the last jaxdiff case of that network: float32 as EDM's training loop
runs it (TF32 off), and bfloat16's counterpart is EDM's mixed precision, `use_fp16=True` (float16,
CUDA only). EDM's code is under its own non-commercial licence; nothing of it is copied here.

GPU: jaxdiff/__init__.py appends an XLA:CPU flag to XLA_FLAGS that another jaxlib may not know;
this script keeps XLA_FLAGS untouched (JAXDIFF_KEEP_XLA_FLAGS=1) when it sees an NVIDIA driver, and
benchmarks/gpu.sh sets it too. configs/edm.py needs ml_collections (gpu.sh installs a carried wheel).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
if os.path.exists('/proc/driver/nvidia/version'):  # before jaxdiff is imported (module docstring)
    os.environ.setdefault('JAXDIFF_KEEP_XLA_FLAGS', '1')
from edm_digits_cpu import Meter, cpu_model, load_average  # noqa: E402  (imports jaxdiff, not jax)

NUM_STEPS = 18  # EDM's deterministic Heun sampler: 18 steps, 2 * 18 - 1 = 35 network evaluations
NUM_EVALS = 2 * NUM_STEPS - 1


@dataclasses.dataclass(frozen=True)
class Case:
    """A network preset of configs/edm.py, its batch here and (optionally) a shrunken network."""
    preset: str
    batch: int
    network: str
    label_dim: int = 0
    model_kwargs: tuple = ()  # overrides of config.model.kwargs, as (key, value) pairs


CASES = {
    'cifar10': Case('cifar10', 512, 'DDPM++ CIFAR-10 32x32'),
    # The preset's batch is 4096 (32 GPUs in EDM); 256 fits one GPU. --batch imagenet64=N changes it.
    'imagenet64': Case('imagenet64', 256, 'ADM ImageNet-64, class-conditional', label_dim=1000),
    'digits': Case('digits', 128, 'DDPM++ digits 8x8 (the default preset)'),
    # --quick: CIFAR-10's data shape through a small DDPM++, so CPU can compile and run it.
    'cifar10-small': Case('cifar10', 8, 'DDPM++ CIFAR-10 32x32, shrunken (quick)',
                          model_kwargs=(('model_channels', 16), ('channel_mult', (1, 2)), ('num_blocks', 1))),
}
QUICK = dict(cases='digits:float32,cifar10-small:float32', batch='digits=64', steps=3, windows=2, warmup=1,
             sample_windows=1, peak_n=1024)


def case_config(case: Case, dtype: str, batch: int):
    """The preset's config at `dtype` and `batch`, sampling with EDM's deterministic 18 Heun steps."""
    from configs import edm as edm_config
    config = edm_config.get_config(case.preset)
    for key, value in case.model_kwargs:
        config.model.kwargs[key] = value
    config.model.dtype = dtype
    config.train.batch_size = batch
    s = config.sample
    s.num_steps, s.solver, s.discretization, s.schedule, s.scaling = NUM_STEPS, 'heun', 'edm', 'linear', 'none'
    s.S_churn, s.S_min, s.S_max, s.S_noise = 0.0, 0.0, float('inf'), 1.0
    config.mesh.data, config.mesh.fsdp = -1, 1
    return config


# ---------------------------------------------------------------------------------------------
# XLA's figures (cost and memory analysis) and the arithmetic on them.

def cost_flops(stage) -> float | None:
    """FLOPs of a jax Lowered/Compiled stage from its cost_analysis(): a dict in recent jax, a
    list of per-program dicts in older ones, or nothing at all; None when no positive count."""
    try:
        cost = stage.cost_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get('flops')
    return float(flops) if flops is not None and flops > 0 else None


def program_flops(lowered, compiled, num_devices: int) -> dict:
    """FLOPs of one call over all devices: the compiled (partitioned, per-device) count x devices,
    else the lowered (global) count; both raw counts are kept."""
    per_device, lowered_flops = cost_flops(compiled), cost_flops(lowered)
    flops = per_device * num_devices if per_device else lowered_flops
    source = 'compiled' if per_device else ('lowered' if lowered_flops else None)
    return {'flops': flops, 'flops_source': source, 'flops_compiled_per_device': per_device,
            'flops_lowered': lowered_flops}


def memory_figures(compiled) -> dict:
    """XLA's memory estimate of a compiled program, in bytes (None where not reported)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        stats = None
    get = lambda name: getattr(stats, name, None) if stats is not None else None
    out = {k: get(f'{k}_size_in_bytes') for k in ('temp', 'argument', 'output', 'alias')}
    out['peak'] = get('peak_memory_in_bytes')
    parts = [out['temp'], out['argument'], out['output']]
    out['total'] = sum(parts) - (out['alias'] or 0) if all(p is not None for p in parts) else None
    return out


def device_peak_bytes(devices) -> int | None:
    """The allocator's peak bytes in use, max over `devices` (None where not reported, e.g. CPU)."""
    peaks = []
    for d in devices:
        try:
            peaks.append((d.memory_stats() or {}).get('peak_bytes_in_use'))
        except Exception:  # noqa: BLE001
            pass
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def achieved_flops(flops_per_call, calls_per_s):
    return None if flops_per_call is None or calls_per_s is None else flops_per_call * calls_per_s


def fraction_of_peak(achieved, peak_per_device, num_devices: int):
    """Achieved FLOP/s over the measured peak of all devices (None when either is unknown)."""
    if achieved is None or not peak_per_device:
        return None
    return achieved / (peak_per_device * num_devices)


def timed_windows(call, block, windows: int, reps: int) -> list[dict]:
    """`windows` windows of `reps` calls each, dispatched asynchronously and blocked on at the end;
    per window: seconds and the cores other processes kept busy (edm_digits_cpu.Meter)."""
    out = []
    for _ in range(windows):
        with Meter() as m:
            result = None
            for _ in range(reps):
                result = call()
            block(result)
        out.append({'seconds': m.seconds, 'other_cores': m.other})
    return out


def rate(windows: list[dict], items_per_window: float) -> float:
    """Median items/s over the windows."""
    return statistics.median(items_per_window / w['seconds'] for w in windows)


_PEAKS: dict = {}


def measured_peak_flops(dtype: str, n: int, windows: int = 3, reps: int = 10) -> float:
    """The best FLOP/s of an n x n x n jnp.matmul in `dtype` on one device (2 n^3 FLOPs a call)."""
    if (dtype, n) not in _PEAKS:
        import jax
        import jax.numpy as jnp
        key_a, key_b = jax.random.split(jax.random.key(0))
        a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in (key_a, key_b))
        matmul = jax.jit(jnp.matmul).lower(a, b).compile()
        jax.block_until_ready(matmul(a, b))
        runs = timed_windows(lambda: matmul(a, b), jax.block_until_ready, windows, reps)
        _PEAKS[dtype, n] = 2.0 * n ** 3 * reps / min(w['seconds'] for w in runs)
    return _PEAKS[dtype, n]


# ---------------------------------------------------------------------------------------------
# One jaxdiff case.

def compile_timed(jitted, *args) -> tuple:
    """(lowered, compiled, lower seconds, compile seconds) of a jitted function for `args`."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return lowered, compiled, t1 - t0, time.perf_counter() - t1


def synthetic_inputs(config, case: Case, batch: int, mesh, key):
    """A batch dict {'image': uniform [-1, 1] NHWC, 'label': one-hot} sharded over the mesh."""
    import jax
    import jax.numpy as jnp
    from jaxdiff import parallel
    shape = (batch, config.data.resolution, config.data.resolution, config.data.channels)
    out = {'image': jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)}
    if case.label_dim:
        out['label'] = jax.nn.one_hot(jnp.arange(batch) % case.label_dim, case.label_dim, dtype=jnp.float32)
    return jax.device_put(out, parallel.batch_sharding(mesh))


def bench_train(config, case: Case, mesh, args) -> tuple[dict, object, object]:
    """Train-step figures; also returns the module and the trained state (for the sampler)."""
    import jax
    from jaxdiff import builders, parallel, train
    batch, n_dev = config.train.batch_size, mesh.size
    parallel.check_batch_size(batch, mesh)
    image_shape = (config.data.resolution,) * 2 + (config.data.channels,)
    module = builders.build_module(config, label_dim=case.label_dim)
    setup = train.make_setup(config, module, builders.model_factory(config), builders.build_loss(config))
    init_fn = lambda key: train.init_state(setup, key, image_shape, case.label_dim)
    shardings = parallel.state_shardings(mesh, jax.eval_shape(init_fn, jax.random.key(0)))
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
    data, base_key = synthetic_inputs(config, case, batch, mesh, jax.random.key(1)), jax.random.key(2)
    step = train.compile_train_step(setup, shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh))
    lowered, compiled, lower_s, compile_s = compile_timed(step, state, data, base_key)

    t0 = time.perf_counter()
    state, metrics = compiled(state, data, base_key)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, data, base_key)
    jax.block_until_ready(state)

    def one_step():
        nonlocal state
        state, out = compiled(state, data, base_key)
        return out
    windows = timed_windows(one_step, jax.block_until_ready, args.windows, args.steps)
    img_s = rate(windows, args.steps * batch)
    flops = program_flops(lowered, compiled, n_dev)
    achieved = achieved_flops(flops['flops'], img_s / batch)
    peak = measured_peak_flops(config.model.dtype, args.peak_n)
    row = dict(params=int(sum(x.size for x in jax.tree.leaves(state.params))), train_img_s=img_s,
               train_windows=windows, train_lower_s=lower_s, train_compile_s=compile_s, train_first_step_s=first_s,
               train_flops_per_step=flops['flops'], train_flops_source=flops['flops_source'],
               train_flops_compiled_per_device=flops['flops_compiled_per_device'],
               train_flops_lowered=flops['flops_lowered'], train_achieved_tflops=achieved and achieved / 1e12,
               peak_tflops_per_device=peak / 1e12, peak_matmul=f'{args.peak_n}^3 {config.model.dtype}',
               fraction_of_peak=fraction_of_peak(achieved, peak, n_dev),
               train_memory=memory_figures(compiled), train_loss_finite=bool(jax.numpy.isfinite(metrics['loss'])))
    return row, module, state


def bench_sample(config, case: Case, mesh, module, params, batch: int, args) -> dict:
    """EDM's 18-step Heun sampler (35 evaluations) and one bare denoiser call, at `batch`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxdiff import builders, parallel, samplers
    parallel.check_batch_size(batch, mesh)
    image_shape = (config.data.resolution,) * 2 + (config.data.channels,)
    sampling, make_model = builders.build_sampling(config), builders.model_factory(config)
    assert sampling.num_evals == NUM_EVALS, sampling.description
    split = parallel.batch_sharding(mesh)
    keys = jax.device_put(samplers.keys_from_seeds(np.arange(batch)), split)
    labels = synthetic_inputs(config, case, batch, mesh, jax.random.key(3)).get('label')
    draw = jax.jit(lambda params, keys, labels: sampling.draw(module, params, keys, labels, image_shape))
    _, draw_c, lower_s, compile_s = compile_timed(draw, params, keys, labels)
    t0 = time.perf_counter()
    images = jax.block_until_ready(draw_c(params, keys, labels))
    first_s = time.perf_counter() - t0
    sample_windows = timed_windows(lambda: draw_c(params, keys, labels), jax.block_until_ready, args.sample_windows, 1)
    sample_img_s = rate(sample_windows, batch)

    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((batch,) + image_shape), jnp.float32), split)
    sigma = jax.device_put(jnp.full((batch,), 1.0, jnp.float32), split)
    forward = jax.jit(lambda params, x, sigma, labels: make_model(module, params)(x, sigma, labels))
    f_low, f_comp, _, f_compile_s = compile_timed(forward, params, x, sigma, labels)
    jax.block_until_ready(f_comp(params, x, sigma, labels))
    f_windows = timed_windows(lambda: f_comp(params, x, sigma, labels), jax.block_until_ready, args.windows, args.steps)
    forward_img_s = rate(f_windows, args.steps * batch)
    f_flops = program_flops(f_low, f_comp, mesh.size)['flops']
    sample_flops = f_flops and f_flops * NUM_EVALS  # per sampler call (one batch)
    achieved = achieved_flops(sample_flops, sample_img_s / batch)
    peak = measured_peak_flops(config.model.dtype, args.peak_n)
    return dict(sample_batch=batch, sample_steps=NUM_STEPS, sample_evals=NUM_EVALS, sample_img_s=sample_img_s,
                sample_windows=sample_windows, sample_lower_s=lower_s, sample_compile_s=compile_s,
                sample_first_call_s=first_s, sample_finite=bool(jnp.isfinite(images).all()),
                sample_memory=memory_figures(draw_c), sample_achieved_tflops=achieved and achieved / 1e12,
                sample_fraction_of_peak=fraction_of_peak(achieved, peak, mesh.size),
                forward_img_s=forward_img_s, forward_compile_s=f_compile_s, forward_windows=f_windows,
                forward_flops_per_image=f_flops and f_flops / batch,
                scan_ratio=sample_img_s * NUM_EVALS / forward_img_s)


def environment(args) -> dict:
    """What the figures depend on besides the code: devices, versions, CPU and its load."""
    import jax
    try:
        import jaxlib
        jaxlib_version = jaxlib.__version__
    except (ImportError, AttributeError):
        jaxlib_version = None
    devices = jax.devices()
    return dict(device_kind=devices[0].device_kind, platform=devices[0].platform, devices=len(devices),
                jax=jax.__version__, jaxlib=jaxlib_version, python=platform.python_version(), cpu=cpu_model(),
                cores=os.cpu_count(), load_average=load_average(), date=time.strftime('%Y-%m-%d %H:%M %Z'),
                xla_flags=os.environ.get('XLA_FLAGS', ''), matmul_precision=args.matmul_precision or 'default')


def run_jaxdiff_case(name: str, dtype: str, args) -> dict:
    """All figures of one (case, dtype) on all local devices."""
    import jax
    from jaxdiff import parallel
    case = CASES[name]
    batch = args.batch.get(name, case.batch)
    config = case_config(case, dtype, batch)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    from configs import edm as edm_config
    row = dict(network=f'{config.model.type}: {case.network}', preset=case.preset, batch=batch,
               preset_batch=edm_config.get_config(case.preset).train.batch_size)
    train_row, module, state = bench_train(config, case, mesh, args)
    row.update(train_row)
    if dtype in args.sample_dtypes:
        row.update(bench_sample(config, case, mesh, module, state.ema_params, args.sample_batch.get(name, batch), args))
    row['device_peak_bytes'] = device_peak_bytes(jax.local_devices())
    del state
    jax.clear_caches()
    return row


# ---------------------------------------------------------------------------------------------
# Running the cases: one row each, written as soon as it is known.

def run_jobs(jobs, *, base_row: dict, out_path, md_path=None, time_budget=None, log=print) -> list[dict]:
    """Run `jobs`, a list of (fields, fn) with fn() -> more fields, in order. Each gives one row
    (base_row + fields + fn's fields + status 'ok'; 'error' with the exception when fn raises;
    'skipped' once `time_budget` seconds have passed), appended to the JSON-lines `out_path` at
    once; the markdown table of the rows so far is rewritten to `md_path` after each."""
    start, rows = time.perf_counter(), []
    for fields, fn in jobs:
        row = {**base_row, **fields, 'load_average': load_average()}
        elapsed = time.perf_counter() - start
        if time_budget is not None and elapsed >= time_budget:
            row.update(status='skipped', reason=f'time budget of {time_budget:g} s spent after {elapsed:.0f} s')
        else:
            t0 = time.perf_counter()
            try:
                row.update(fn())
                row.setdefault('status', 'ok')
            except Exception as e:  # noqa: BLE001 (one case's failure must not stop the others)
                row.update(status='error', error=f'{type(e).__name__}: {e}'[:2000],
                           traceback=traceback.format_exc()[-4000:])
            row['case_seconds'] = time.perf_counter() - t0
        row['load_average_after'] = load_average()
        rows.append(row)
        with open(out_path, 'a') as f:
            f.write(json.dumps(row, default=str) + '\n')
        if md_path:
            pathlib.Path(md_path).write_text(markdown_table(rows))
        log(summary_line(row, rows))
    return rows


def parse_cases(text: str, dtypes: list[str]) -> list[tuple[str, str]]:
    """'cifar10:bfloat16,imagenet64' -> [(case, dtype), ...]; a case without ':dtype' takes all `dtypes`."""
    pairs = []
    for item in filter(None, text.split(',')):
        name, _, dtype = item.partition(':')
        if name not in CASES:
            raise SystemExit(f'unknown case {name!r}; choose from {sorted(CASES)}')
        for d in [dtype] if dtype else dtypes:
            if d not in ('float32', 'bfloat16'):
                raise SystemExit(f'unknown dtype {d!r} in --cases/--dtypes; use float32 or bfloat16')
            pairs.append((name, d))
    return pairs


def plan_jobs(args) -> list[tuple[dict, object]]:
    """The jaxdiff cases in --cases order; with --vs-edm, EDM's run of a network right after the
    last jaxdiff case of that network, at the same dtypes."""
    pairs, jobs = parse_cases(args.cases, args.dtypes), []
    for i, (name, dtype) in enumerate(pairs):
        jobs.append(({'kind': 'jaxdiff', 'case': name, 'dtype': dtype},
                     lambda name=name, dtype=dtype: run_jaxdiff_case(name, dtype, args)))
        if args.vs_edm and name not in [n for n, _ in pairs[i + 1:]]:
            dtypes = [d for n, d in pairs if n == name]
            jobs.append(({'kind': 'edm', 'case': name, 'dtype': ','.join(dtypes)},
                         lambda name=name, dtypes=dtypes: run_edm_case(name, dtypes, args)))
    return jobs


def fmt(value, spec: str = '.0f', scale: float = 1.0) -> str:
    return '' if value is None else format(value / scale, spec)


def edm_result(rows, case: str, dtype: str) -> dict:
    """EDM's figures for (case, dtype) from an 'edm' row of `rows` ({} if none)."""
    for r in rows:
        if r.get('kind') == 'edm' and r.get('case') == case and r.get('status') == 'ok':
            return r.get('results', {}).get(dtype, {})
    return {}


def ratio(a, b):
    return a / b if a and b else None


def summary_line(row: dict, rows: list[dict]) -> str:
    head = f"[{row['kind']}] {row['case']} {row['dtype']}: {row['status']}"
    if row['status'] != 'ok':
        return f"{head} ({row.get('reason') or row.get('error', '')})"
    if row['kind'] == 'edm':
        parts = []
        for dtype, res in row.get('results', {}).items():
            mine = next((r for r in rows if r['kind'] == 'jaxdiff' and r['case'] == row['case']
                         and r['dtype'] == dtype and r['status'] == 'ok'), {})
            parts.append(f"{dtype} ({res.get('precision')}): EDM train {fmt(res.get('train_img_s'))} img/s, sample "
                         f"{fmt(res.get('sample_img_s'))} img/s; jaxdiff/EDM train "
                         f"{fmt(ratio(mine.get('train_img_s'), res.get('train_img_s')), '.2f')}, sample "
                         f"{fmt(ratio(mine.get('sample_img_s'), res.get('sample_img_s')), '.2f')}")
        return head + '\n  ' + '\n  '.join(parts)
    return (f"{head}: train {fmt(row.get('train_img_s'))} img/s (compile {fmt(row.get('train_compile_s'), '.1f')} s), "
            f"sample {fmt(row.get('sample_img_s'))} img/s, forward {fmt(row.get('forward_img_s'))} img/s, "
            f"{fmt(row.get('train_achieved_tflops'), '.2f')} TFLOP/s = {fmt(row.get('fraction_of_peak'), '.1%')} of peak")


COLUMNS = ('case', 'network', 'params', 'dtype', 'batch', 'train img/s', 'compile s (train / sampler)',
           f'sample img/s ({NUM_STEPS} Heun, {NUM_EVALS} NFE)', 'forward img/s', f'{NUM_EVALS} x sample / forward',
           'train TFLOP/s', 'peak TFLOP/s (measured)', 'fraction of peak', 'XLA memory GiB', 'device peak GiB',
           'EDM train / sample img/s', 'jaxdiff / EDM (train, sample)', 'load')


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, with the machine and versions above it."""
    env = rows[0] if rows else {}
    lines = [f"{env.get('device_kind')} x {env.get('devices')} ({env.get('platform')}); jax {env.get('jax')}, "
             f"jaxlib {env.get('jaxlib')}, python {env.get('python')}; CPU {env.get('cpu')}, {env.get('cores')} "
             f"cores; matmul precision {env.get('matmul_precision')}; {env.get('date')}. Throughput is the median "
             f"of the timing windows; peak = best rate of a large matmul in the case's dtype on one device x devices; "
             f"XLA memory = the train step's temp + arguments + outputs - donated bytes; load = load average "
             f"before the case.", '',
             '| ' + ' | '.join(COLUMNS) + ' |', '|' + ' --- |' * 5 + ' ---: |' * (len(COLUMNS) - 5)]
    gib = 2 ** 30
    for r in rows:
        if r['kind'] != 'jaxdiff':
            continue
        head = [r['case'], r.get('network', ''), fmt(r.get('params'), '.1f', 1e6) + ('M' if r.get('params') else ''),
                r['dtype'], f"{r.get('batch', '')}" + (f" ({r['sample_batch']})" if r.get('sample_batch') not in
                                                       (None, r.get('batch')) else '')]
        if r['status'] != 'ok':
            text = r.get('reason') or (r.get('error') or '').splitlines()[0][:120]
            lines.append('| ' + ' | '.join(head + [f"{r['status']}: {text}"] + [''] * (len(COLUMNS) - 6)) + ' |')
            continue
        edm = edm_result(rows, r['case'], r['dtype'])
        peak = r.get('peak_tflops_per_device') and r['peak_tflops_per_device'] * r.get('devices', 1)
        cells = [fmt(r.get('train_img_s')),
                 f"{fmt(r.get('train_compile_s'), '.1f')} / {fmt(r.get('sample_compile_s'), '.1f')}",
                 fmt(r.get('sample_img_s')), fmt(r.get('forward_img_s')), fmt(r.get('scan_ratio'), '.2f'),
                 fmt(r.get('train_achieved_tflops'), '.2f'), fmt(peak, '.1f'), fmt(r.get('fraction_of_peak'), '.1%'),
                 fmt((r.get('train_memory') or {}).get('total'), '.2f', gib), fmt(r.get('device_peak_bytes'), '.2f', gib),
                 f"{fmt(edm.get('train_img_s'))} / {fmt(edm.get('sample_img_s'))} ({edm['precision']})" if edm else '',
                 (f"{fmt(ratio(r.get('train_img_s'), edm.get('train_img_s')), '.2f')}, "
                  f"{fmt(ratio(r.get('sample_img_s'), edm.get('sample_img_s')), '.2f')}") if edm else '',
                 (r.get('load_average') or '').split(' ')[0]]
        lines.append('| ' + ' | '.join(head + cells) + ' |')
    notes = [f"EDM ({r['case']}): {r['status']}: {r.get('reason') or r.get('error', '')}".splitlines()[0]
             for r in rows if r['kind'] == 'edm' and r['status'] != 'ok']
    notes += [f"EDM ({r['case']}): torch {r.get('torch')} on {r.get('edm_device')}"
              + (f"; stand-ins for absent helper modules {r['stubbed_modules']}" if r.get('stubbed_modules') else '')
              for r in rows if r['kind'] == 'edm' and r['status'] == 'ok']
    return '\n'.join(lines + ([''] + notes if notes else [])) + '\n'


# ---------------------------------------------------------------------------------------------
# NVlabs/edm (PyTorch) on the same network: the parent's side, then the worker's.

def run_edm_case(name: str, dtypes: list[str], args) -> dict:
    """EDM's train and sampling img/s for case `name` at `dtypes`, from a --torch-python subprocess;
    status 'unavailable' (with the reason) when the checkout or torch is missing."""
    case = CASES[name]
    batch = args.batch.get(name, case.batch)
    config = case_config(case, 'float32', batch)
    checkout = pathlib.Path(args.vs_edm).expanduser()
    if not (checkout / 'training' / 'networks.py').is_file():
        return {'status': 'unavailable', 'reason': f'no NVlabs/edm checkout at {checkout}'}
    python = shutil.which(args.torch_python)
    if python is None:
        return {'status': 'unavailable', 'reason': f'no interpreter {args.torch_python!r}'}
    spec = dict(model_type=config.model.type, img_resolution=config.data.resolution, img_channels=config.data.channels,
                label_dim=case.label_dim, batch=batch, sample_batch=args.sample_batch.get(name, batch), dtypes=dtypes,
                model_kwargs={k: list(v) if isinstance(v, tuple) else v for k, v in config.model.kwargs.to_dict().items()},
                lr=config.optim.lr, warmup_images=config.optim.warmup_images, ema_halflife_images=config.ema.halflife_images,
                ema_rampup_ratio=config.ema.rampup_ratio, steps=args.steps, windows=args.windows, warmup=args.warmup,
                sample_windows=args.sample_windows, num_steps=NUM_STEPS)
    timeout = None if args.deadline is None else max(args.deadline - time.perf_counter(), 60.0)
    cmd = [python, str(pathlib.Path(__file__).resolve()), '--run-edm-worker', '--vs-edm', str(checkout),
           '--edm-spec', json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f'EDM worker exited with {proc.returncode}:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _StandIn:
    """Stands in for a helper package that EDM's modules import but the timed code never runs
    (click's decorators on generate.py's CLI, tqdm, PIL, requests, distutils on Python >= 3.12):
    applied to a function it returns the function, anything else gives another stand-in."""

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and not kwargs and callable(args[0]) else _StandIn()

    def __getattr__(self, name):
        return _StandIn()


def stand_in_missing(names=('click', 'tqdm', 'PIL', 'PIL.Image', 'requests', 'distutils', 'distutils.util')):
    """Put a `_StandIn` module in sys.modules for each of `names` that does not import; their names."""
    import importlib
    import types
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__getattr__ = lambda attr: _StandIn()
            sys.modules[name] = module
            parent, _, child = name.rpartition('.')
            if parent in sys.modules:
                setattr(sys.modules[parent], child, module)
            missing.append(name)
    return missing


def edm_worker(checkout: str, spec: dict) -> dict:
    """Runs under the torch interpreter: EDM's code at spec's network, batch and dtypes."""
    try:
        import torch
    except ImportError as e:
        return {'status': 'unavailable', 'reason': f'no torch in {sys.executable}: {e}'}
    stood_in = stand_in_missing()
    sys.path.insert(0, str(pathlib.Path(checkout).resolve()))
    from generate import edm_sampler
    from training.loss import EDMLoss
    from training.networks import EDMPrecond

    cuda = torch.cuda.is_available()
    # EDM's training loop's backend settings (training/training_loop.py): cuDNN autotuning, no TF32.
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    out = {'status': 'ok', 'torch': torch.__version__, 'stubbed_modules': stood_in,
           'edm_device': torch.cuda.get_device_name() if cuda else f'cpu, {torch.get_num_threads()} threads',
           'results': {}}
    for dtype in spec['dtypes']:
        out['results'][dtype] = edm_measure(torch, EDMPrecond, EDMLoss, edm_sampler, spec, dtype, cuda)
        if cuda:
            torch.cuda.empty_cache()
    return out


def edm_measure(torch, EDMPrecond, EDMLoss, edm_sampler, spec: dict, dtype: str, cuda: bool) -> dict:
    """Train img/s (EDM's training-loop step: loss.sum() * loss_scaling / batch, backward, nan_to_num,
    Adam, EMA lerp) and img/s of generate.edm_sampler (18 Heun steps) on the EMA network."""
    import copy
    device = torch.device('cuda' if cuda else 'cpu')
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    use_fp16 = dtype == 'bfloat16'  # EDM's mixed precision is float16, on CUDA only
    loss_scaling = 100.0 if use_fp16 else 1.0  # EDM's ImageNet-64 command: --fp16=1 --ls=100
    torch.manual_seed(0)
    c, r, n, label_dim = spec['img_channels'], spec['img_resolution'], spec['batch'], spec['label_dim']
    net = EDMPrecond(img_resolution=r, img_channels=c, label_dim=label_dim, use_fp16=use_fp16,
                     model_type=spec['model_type'], **spec['model_kwargs']).train().requires_grad_(True).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn, optimizer = EDMLoss(), torch.optim.Adam(net.parameters(), lr=spec['lr'], betas=(0.9, 0.999), eps=1e-8)
    one_hot = lambda m: torch.eye(label_dim, device=device)[torch.arange(m, device=device) % label_dim] if label_dim else None
    images, labels = torch.rand([n, c, r, r], device=device) * 2 - 1, one_hot(n)
    cur_nimg = 0

    def train_step():
        nonlocal cur_nimg
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net=net, images=images, labels=labels, augment_pipe=None)
        loss.sum().mul(loss_scaling / n).backward()
        for g in optimizer.param_groups:
            g['lr'] = spec['lr'] * min(cur_nimg / max(spec['warmup_images'], 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        halflife = min(spec['ema_halflife_images'], cur_nimg * spec['ema_rampup_ratio'])
        beta = 0.5 ** (n / max(halflife, 1e-8))
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        cur_nimg += n

    def timed(fn, reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return time.perf_counter() - t0

    for _ in range(spec['warmup'] + 1):  # +1: the step this side's first call stands for
        train_step()
    train_s = [timed(train_step, spec['steps']) for _ in range(spec['windows'])]
    sb = spec['sample_batch']
    latents, sample_labels = torch.randn([sb, c, r, r], device=device), one_hot(sb)
    draw = lambda: edm_sampler(ema, latents, sample_labels, num_steps=spec['num_steps'])
    first_s = timed(draw, 1)
    sample_s = [timed(draw, 1) for _ in range(spec['sample_windows'])]
    return {'precision': ('float16 (use_fp16)' if use_fp16 and cuda else 'float32, TF32 off'),
            'params': sum(p.numel() for p in net.parameters()), 'batch': n, 'sample_batch': sb,
            'train_img_s': statistics.median(spec['steps'] * n / s for s in train_s), 'train_seconds': train_s,
            'sample_img_s': statistics.median(sb / s for s in sample_s), 'sample_seconds': sample_s,
            'sample_first_call_s': first_s,
            'peak_memory_bytes': torch.cuda.max_memory_allocated() if cuda else None}


# ---------------------------------------------------------------------------------------------

def per_case_ints(text: str | None) -> dict:
    """'256' -> every case 256; 'imagenet64=128,cifar10=256' -> those cases."""
    if not text:
        return {}
    if '=' not in text:
        return {name: int(text) for name in CASES}
    return {name: int(value) for name, value in (item.split('=') for item in text.split(',') if item)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--quick', action='store_true', help='CPU smoke run: ' + ', '.join(f'{k}={v}' for k, v in QUICK.items()))
    p.add_argument('--cases', help=f'comma list of name or name:dtype, names from {sorted(CASES)} '
                                   '(default cifar10,imagenet64,digits)')
    p.add_argument('--dtypes', default='bfloat16,float32', help='dtypes of the cases given without one')
    p.add_argument('--sample-dtypes', help='dtypes whose cases also time the sampler and the forward pass (default: all)')
    p.add_argument('--steps', type=int, help='timed steps (and forward calls) per window (default 20)')
    p.add_argument('--windows', type=int, help='timing windows; the median is reported (default 3)')
    p.add_argument('--warmup', type=int, help='untimed steps after the first call (default 3)')
    p.add_argument('--sample-windows', type=int, help='timed sampler calls, one batch each (default 3)')
    p.add_argument('--batch', help="training batch: N for every case or 'case=N,...' (defaults: "
                                   + ', '.join(f'{k} {v.batch}' for k, v in CASES.items()) + ')')
    p.add_argument('--sample-batch', help='sampling and forward batch, as --batch (default: the training batch)')
    p.add_argument('--peak-n', type=int, help='size n of the n^3 peak matmul (default 8192; 1024 on CPU)')
    p.add_argument('--matmul-precision', help="jax_default_matmul_precision (e.g. 'highest'; default: JAX's)")
    p.add_argument('--time-budget', type=float, help='seconds; cases not started by then write skipped rows')
    p.add_argument('--out', default='runs/speed/speed.jsonl', help='JSON-lines file the rows are appended to')
    p.add_argument('--md', default='runs/speed/speed.md', help='markdown table of this run (rewritten per case)')
    p.add_argument('--vs-edm', help='path of an NVlabs/edm checkout: time its code on the same cases')
    p.add_argument('--torch-python', default='python3', help='interpreter with torch for --vs-edm')
    p.add_argument('--run-edm-worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--edm-spec', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = dict(cases='cifar10,imagenet64,digits', steps=20, windows=3, warmup=3, sample_windows=3)
    for key, value in {**defaults, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtypes = [d for d in args.dtypes.split(',') if d]
    args.sample_dtypes = args.sample_dtypes.split(',') if args.sample_dtypes else ['float32', 'bfloat16']
    args.batch, args.sample_batch = per_case_ints(args.batch), per_case_ints(args.sample_batch)
    args.deadline = None
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run_edm_worker:
        print(json.dumps(edm_worker(args.vs_edm, json.loads(args.edm_spec))))
        return
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    import jax
    if args.matmul_precision:
        jax.config.update('jax_default_matmul_precision', args.matmul_precision)
    env = environment(args)
    if args.peak_n is None:
        args.peak_n = 1024 if env['platform'] == 'cpu' else 8192
    if args.time_budget is not None:  # An EDM subprocess may run 2 minutes past the budget at most.
        args.deadline = time.perf_counter() + args.time_budget + 120
    for path in (args.out, args.md):
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    log(f"{env['device_kind']} x {env['devices']}, jax {env['jax']}; CPU {env['cpu']}, load {env['load_average']}")
    rows = run_jobs(plan_jobs(args), base_row=env, out_path=args.out, md_path=args.md,
                    time_budget=args.time_budget, log=log)
    print(markdown_table(rows))
    log(f'rows appended to {args.out}; table in {args.md}')


if __name__ == '__main__':
    main()
