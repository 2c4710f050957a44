"""Speed of jaxdiff's compiled training step and EDM sampler, per network x dtype (issue 15).

Each case (a network preset of configs/edm.py at one compute dtype) runs in a fresh process, on
every device JAX sees (data-parallel over the launcher's ('data', 'fsdp') mesh), on a fixed
synthetic batch (no data pipeline: grain and TFDS are not needed), and records:

  train    img/s of the launcher's step (train.make_setup, init_state, compile_train_step with
           parallel's shardings, EDM's loss from builders.build_loss): lowering, compilation
           (jit(...).lower(...).compile()) and the first call timed apart, `--warmup` untimed
           steps, then the median of `--windows` windows of `--steps` steps, each window ended by
           block_until_ready; FLOPs per step (XLA's count for the step lowered for the CPU: the
           model's FLOPs; the device's own counts are kept beside it), achieved TFLOP/s and its
           fraction of a MEASURED peak: the best rate of an n^3 jnp.matmul in the case's dtype
           on one device (--peak-n: 8192, 1024 on CPU), times the devices;
  sample   img/s of EDM's deterministic Heun sampler, 18 steps = 35 network evaluations (the
           launcher's builders.build_sampling draw, samplers.sample's lax.scan), compiled apart;
  forward  img/s of one denoiser call at the same batch: `35 x sample / forward` is the share of
           the bare network rate that the sampler loop keeps (1.0: the scan costs nothing). The
           sampler's FLOPs are the forward's x 35 (XLA's cost analysis counts a loop body once);
  memory   XLA's estimate for the train step (temp + arguments + outputs - donated bytes) and,
           where the device reports it, the allocator's peak bytes in use during the case.

    python benchmarks/speed.py --quick                  # CPU smoke run: digits + a small CIFAR net
    python benchmarks/speed.py --cases cifar10:bfloat16,imagenet64 --batch imagenet64=64 --time-budget 400
    bash benchmarks/gpu.sh [EDM_CHECKOUT]               # the prepared GPU run

--cases lists the cases in the order to run: `name` (each dtype of --dtypes) or `name:dtype`.
Each case's JSON row is appended to --out as it finishes and the markdown table so far rewritten
to --md. A case that fails (an exception, a crash, out of memory) writes an error row and the next
runs; after --time-budget seconds no case starts (skipped rows) and a running one is stopped 120 s
later, keeping what it measured (a 'partial' row). --vs-edm PATH also times NVlabs/edm's own code
from that checkout on the same network, batch and device (benchmarks/speed_edm.py under
--torch-python) after the last jaxdiff case of the network, with jaxdiff/EDM ratios; without
torch or the checkout its row says so.

GPU: jaxdiff/__init__.py appends an XLA:CPU flag to XLA_FLAGS that another jaxlib may not know;
where an NVIDIA driver is present this script keeps XLA_FLAGS as they are (JAXDIFF_KEEP_XLA_FLAGS=1,
which benchmarks/gpu.sh also sets). configs/edm.py needs ml_collections.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
if os.path.exists('/proc/driver/nvidia/version'):  # before jaxdiff is imported (module docstring)
    os.environ.setdefault('JAXDIFF_KEEP_XLA_FLAGS', '1')
from edm_digits_cpu import Meter, cpu_model, load_average  # noqa: E402  (imports jaxdiff, not jax)

NUM_STEPS = 18  # EDM's deterministic Heun sampler: 18 steps, 2 * 18 - 1 = 35 network evaluations
NUM_EVALS = 2 * NUM_STEPS - 1
OVERRUN_S = 120  # how long past --time-budget a started case may run


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
    # The preset's batch is 4096, 128 per GPU on EDM's 32 GPUs. XLA:CPU's memory analysis of the
    # bfloat16 step: 128 GiB at batch 128, 249 GiB at 256 (a CPU keeps most activations in
    # float32, a GPU in bfloat16: 128 should fit one 141 GB H200, 256 hardly).
    'imagenet64': Case('imagenet64', 128, 'ADM ImageNet-64, class-conditional', label_dim=1000),
    'digits': Case('digits', 128, 'DDPM++ digits 8x8 (the default preset)'),
    # --quick: CIFAR-10's data shape through a small DDPM++ (16 channels, one block per level).
    'cifar10-small': Case('cifar10', 8, 'DDPM++ CIFAR-10 32x32, shrunken',
                          model_kwargs=(('model_channels', 16), ('channel_mult', (1, 2)), ('num_blocks', 1))),
}
DEFAULTS = dict(cases='cifar10,imagenet64,digits', steps=20, windows=3, warmup=3, sample_windows=3)
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
# XLA's figures (cost and memory analysis), timing, and the arithmetic on them.

def cost_flops(stage) -> float | None:
    """FLOPs of a jax Lowered/Compiled stage from its cost_analysis(): a dict in recent jax, a
    list of per-program dicts in older ones, or nothing at all; None without a positive count."""
    try:
        cost = stage.cost_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get('flops')
    return float(flops) if flops is not None and flops > 0 else None


def cpu_lowered_flops(fn, *args) -> float | None:
    """XLA's FLOP count of jax.jit(fn) lowered for one CPU device at the shapes of `args`: the
    unoptimised program, i.e. the model's FLOPs, whatever device runs it. (On GPU the lowered
    count has come back empty and the compiled one has missed cuBLAS/cuDNN custom calls: jax
    issues 16008, 20184, 22249, 22713.)"""
    import jax
    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
        return cost_flops(jax.jit(fn).lower(*shapes))
    except Exception:  # noqa: BLE001 (no CPU backend: the device's counts remain)
        return None


def program_flops(lowered, compiled, num_devices: int, cpu_flops: float | None = None) -> dict:
    """FLOPs of one call over all devices: `cpu_flops`, else the lowered program's (global) count,
    else the compiled program's per-device count x devices; every count is kept."""
    per_device, lowered_flops = cost_flops(compiled), cost_flops(lowered)
    flops = cpu_flops or lowered_flops or (per_device and per_device * num_devices)
    counts = (('cpu lowered', cpu_flops), ('lowered', lowered_flops), ('compiled', per_device))
    return {'flops': flops, 'flops_source': next((name for name, v in counts if v), None),
            'flops_cpu_lowered': cpu_flops, 'flops_lowered': lowered_flops, 'flops_compiled_per_device': per_device}


def memory_figures(compiled) -> dict:
    """XLA's memory estimate of a compiled program, in bytes (None where not reported)."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        stats = None
    out = {k: getattr(stats, f'{k}_size_in_bytes', None) for k in ('temp', 'argument', 'output', 'alias')}
    out['peak'] = getattr(stats, 'peak_memory_in_bytes', None)
    parts = [out['temp'], out['argument'], out['output']]
    out['total'] = sum(parts) - (out['alias'] or 0) if None not in parts else None
    return out


def device_peak_bytes(devices) -> int | None:
    """The allocator's peak bytes in use, max over `devices` (None where not reported, e.g. CPU)."""
    peaks = []
    for d in devices:
        try:
            peaks.append((d.memory_stats() or {}).get('peak_bytes_in_use'))
        except Exception:  # noqa: BLE001
            pass
    return max((p for p in peaks if p is not None), default=None)


def achieved_flops(flops_per_call, calls_per_s):
    return None if flops_per_call is None or calls_per_s is None else flops_per_call * calls_per_s


def fraction_of_peak(achieved, peak_per_device, num_devices: int):
    """Achieved FLOP/s over the measured peak of all devices (None when either is unknown)."""
    return None if achieved is None or not peak_per_device else achieved / (peak_per_device * num_devices)


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


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype: str, n: int, windows: int = 3, reps: int = 10) -> float:
    """The best FLOP/s of an n x n x n jnp.matmul in `dtype` on one device (2 n^3 FLOPs a call)."""
    import jax
    import jax.numpy as jnp
    key_a, key_b = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.float32).astype(dtype) for k in (key_a, key_b))
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    jax.block_until_ready(matmul(a, b))
    runs = timed_windows(lambda: matmul(a, b), jax.block_until_ready, windows, reps)
    return 2.0 * n ** 3 * reps / min(w['seconds'] for w in runs)


# ---------------------------------------------------------------------------------------------
# One jaxdiff case (in the child process).

def compile_timed(jitted, *args) -> tuple:
    """(lowered, compiled, lowering seconds, compilation seconds) of a jitted function for `args`."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return lowered, compiled, t1 - t0, time.perf_counter() - t1


def image_shape(config) -> tuple:
    return (config.data.resolution, config.data.resolution, config.data.channels)


def synthetic_batch(config, case: Case, batch: int, mesh, key) -> dict:
    """{'image': uniform [-1, 1] NHWC, 'label': one-hot (conditional networks)}, split over the mesh."""
    import jax
    import jax.numpy as jnp
    from jaxdiff import parallel
    out = {'image': jax.random.uniform(key, (batch,) + image_shape(config), jnp.float32, -1.0, 1.0)}
    if case.label_dim:
        out['label'] = jax.nn.one_hot(jnp.arange(batch) % case.label_dim, case.label_dim, dtype=jnp.float32)
    return jax.device_put(out, parallel.batch_sharding(mesh))


def bench_train(config, case: Case, mesh, args) -> tuple[dict, object, object]:
    """The training step's figures, and the module and state it leaves (for the sampler)."""
    import jax
    from jaxdiff import builders, parallel, train
    batch = config.train.batch_size
    parallel.check_batch_size(batch, mesh)
    module = builders.build_module(config, label_dim=case.label_dim)
    setup = train.make_setup(config, module, builders.model_factory(config), builders.build_loss(config))
    init_fn = lambda key: train.init_state(setup, key, image_shape(config), case.label_dim)
    shardings = parallel.state_shardings(mesh, jax.eval_shape(init_fn, jax.random.key(0)))
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
    data, base_key = synthetic_batch(config, case, batch, mesh, jax.random.key(1)), jax.random.key(2)
    step = train.compile_train_step(setup, shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh))
    lowered, compiled, lower_s, compile_s = compile_timed(step, state, data, base_key)
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, data, base_key))
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, metrics = compiled(state, data, base_key)
    jax.block_until_ready(state)

    def one_step():
        nonlocal state, metrics
        state, metrics = compiled(state, data, base_key)
        return metrics
    windows = timed_windows(one_step, jax.block_until_ready, args.windows, args.steps)
    img_s = rate(windows, args.steps * batch)
    step_fn = functools.partial(train.train_step, setup)  # what compile_train_step jits, unsharded
    flops = program_flops(lowered, compiled, mesh.size, cpu_lowered_flops(step_fn, state, data, base_key))
    achieved, peak = achieved_flops(flops['flops'], img_s / batch), measured_peak_flops(config.model.dtype, args.peak_n)
    row = dict(params=int(sum(x.size for x in jax.tree.leaves(state.params))), train_img_s=img_s,
               train_windows=windows, train_lower_s=lower_s, train_compile_s=compile_s, train_first_step_s=first_s,
               train_flops_per_step=flops.pop('flops'), **{f'train_{k}': v for k, v in flops.items()},
               train_achieved_tflops=achieved and achieved / 1e12, peak_tflops_per_device=peak / 1e12,
               peak_matmul=f'{args.peak_n}^3 {config.model.dtype}',
               fraction_of_peak=fraction_of_peak(achieved, peak, mesh.size),
               train_memory=memory_figures(compiled), train_loss_finite=bool(jax.numpy.isfinite(metrics['loss'])))
    return row, module, state


def bench_sample(config, case: Case, mesh, module, params, batch: int, args) -> dict:
    """EDM's 18-step Heun sampler (35 evaluations) and one bare denoiser call, at `batch`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxdiff import builders, parallel, samplers
    parallel.check_batch_size(batch, mesh)
    sampling, make_model = builders.build_sampling(config), builders.model_factory(config)
    split = parallel.batch_sharding(mesh)
    assert sampling.num_evals == NUM_EVALS, sampling.description
    keys = jax.device_put(samplers.keys_from_seeds(np.arange(batch)), split)
    labels = synthetic_batch(config, case, batch, mesh, jax.random.key(3)).get('label')
    draw = jax.jit(lambda params, keys, labels: sampling.draw(module, params, keys, labels, image_shape(config)))
    _, draw_c, lower_s, compile_s = compile_timed(draw, params, keys, labels)
    t0 = time.perf_counter()
    images = jax.block_until_ready(draw_c(params, keys, labels))
    first_s = time.perf_counter() - t0
    sample_windows = timed_windows(lambda: draw_c(params, keys, labels), jax.block_until_ready, args.sample_windows, 1)
    sample_img_s = rate(sample_windows, batch)

    x = jax.device_put(jax.random.normal(jax.random.key(4), (batch,) + image_shape(config)), split)
    sigma = jax.device_put(jnp.ones((batch,), jnp.float32), split)
    forward_fn = lambda params, x, sigma, labels: make_model(module, params)(x, sigma, labels)
    f_low, f_comp, _, f_compile_s = compile_timed(jax.jit(forward_fn), params, x, sigma, labels)
    jax.block_until_ready(f_comp(params, x, sigma, labels))
    f_windows = timed_windows(lambda: f_comp(params, x, sigma, labels), jax.block_until_ready, args.windows, args.steps)
    forward_img_s = rate(f_windows, args.steps * batch)
    f_flops = program_flops(f_low, f_comp, mesh.size, cpu_lowered_flops(forward_fn, params, x, sigma, labels))['flops']
    achieved = achieved_flops(f_flops and f_flops * NUM_EVALS, sample_img_s / batch)
    peak = measured_peak_flops(config.model.dtype, args.peak_n)
    return dict(sample_batch=batch, sample_steps=NUM_STEPS, sample_evals=NUM_EVALS, sample_img_s=sample_img_s,
                sample_windows=sample_windows, sample_lower_s=lower_s, sample_compile_s=compile_s,
                sample_first_call_s=first_s, sample_finite=bool(jnp.isfinite(images).all()),
                sample_memory=memory_figures(draw_c), sample_achieved_tflops=achieved and achieved / 1e12,
                sample_fraction_of_peak=fraction_of_peak(achieved, peak, mesh.size), forward_img_s=forward_img_s,
                forward_compile_s=f_compile_s, forward_windows=f_windows,
                forward_flops_per_image=f_flops and f_flops / batch,
                scan_ratio=sample_img_s * NUM_EVALS / forward_img_s)


def run_case_here(name: str, dtype: str, args) -> dict:
    """All figures of one (case, dtype) in this process, on all its devices. Prints the training
    figures as a JSON line before sampling, for the parent to keep should the case be stopped."""
    import jax
    from configs import edm as edm_config
    from jaxdiff import parallel
    if args.matmul_precision:
        jax.config.update('jax_default_matmul_precision', args.matmul_precision)
    devices = jax.devices()
    args.peak_n = args.peak_n or (1024 if devices[0].platform == 'cpu' else 8192)
    case = CASES[name]
    batch = args.batch.get(name, case.batch)
    config = case_config(case, dtype, batch)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    row = dict(device_kind=devices[0].device_kind, platform=devices[0].platform, devices=len(devices),
               network=f'{config.model.type}: {case.network}', preset=case.preset, batch=batch,
               preset_batch=edm_config.get_config(case.preset).train.batch_size)
    train_row, module, state = bench_train(config, case, mesh, args)
    row.update(train_row, device_peak_bytes=device_peak_bytes(devices))
    if dtype in args.sample_dtypes:
        print(json.dumps(row, default=str), flush=True)
        row.update(bench_sample(config, case, mesh, module, state.ema_params, args.sample_batch.get(name, batch), args))
        row['device_peak_bytes'] = device_peak_bytes(devices)
    return row


# ---------------------------------------------------------------------------------------------
# The parent: each case in a fresh process (fresh device memory; a crash or an out-of-memory error
# costs one row). It never starts a JAX backend itself, which would hold device memory.

def host_environment(args) -> dict:
    """Versions, CPU and date, without importing jax."""
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
    return dict(jax=version('jax'), jaxlib=version('jaxlib'), python=platform.python_version(), cpu=cpu_model(),
                cores=os.cpu_count(), date=time.strftime('%Y-%m-%d %H:%M %Z'),
                xla_flags=os.environ.get('XLA_FLAGS', ''), matmul_precision=args.matmul_precision or 'default')


def last_json_line(text: str) -> dict | None:
    """The JSON object on the last line of `text` that holds one (None if no line does)."""
    return next((json.loads(line) for line in reversed(text.splitlines()) if line.startswith('{')), None)


def json_subprocess(cmd: list[str], timeout: float | None, log) -> dict:
    """Run `cmd`, passing its stderr on to `log` line by line as it comes, and return the JSON object
    of its last stdout line; stopped at `timeout`, the last one it printed (status 'partial'), else
    a TimeoutError. A non-zero exit raises a RuntimeError with the end of its stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = [], collections.deque(maxlen=60)

    def echo_stderr():
        for line in proc.stderr:
            err.append(line)
            log(line.rstrip())
    readers = [threading.Thread(target=lambda: out.extend(proc.stdout)), threading.Thread(target=echo_stderr)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=timeout)
        stopped = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        stopped = True
    for t in readers:
        t.join()
    last = last_json_line(''.join(out))
    if stopped:
        reason = f'stopped after {timeout:.0f} s (--time-budget + {OVERRUN_S} s)'
        if last is None:
            raise TimeoutError(reason)
        return {**last, 'status': 'partial', 'reason': reason}
    if proc.returncode:
        raise RuntimeError(f"{pathlib.Path(cmd[1]).name} exited with {proc.returncode}: {''.join(err).strip()[-3000:]}")
    return last


def time_left(args) -> float | None:
    """Seconds until a started case is stopped (None: never)."""
    return None if args.deadline is None else max(args.deadline - time.perf_counter(), 30.0)


def run_case_subprocess(name: str, dtype: str, args, log=print) -> dict:
    """`run_case_here` in a fresh interpreter with this run's flags."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *args.argv, '--run-case', f'{name}:{dtype}']
    return json_subprocess(cmd, time_left(args), log)


def run_edm_case(name: str, dtypes: list[str], args, log=print) -> dict:
    """EDM's train and sampling img/s for case `name` at `dtypes` (benchmarks/speed_edm.py under
    --torch-python); status 'unavailable', with the reason, without the checkout or torch."""
    case = CASES[name]
    batch = args.batch.get(name, case.batch)
    config = case_config(case, 'float32', batch)
    checkout = pathlib.Path(args.vs_edm).expanduser()
    if not (checkout / 'training' / 'networks.py').is_file():
        return {'status': 'unavailable', 'reason': f'no NVlabs/edm checkout at {checkout}'}
    python = shutil.which(args.torch_python)
    if python is None:
        return {'status': 'unavailable', 'reason': f'no interpreter {args.torch_python!r}'}
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in config.model.kwargs.to_dict().items()}
    spec = dict(model_type=config.model.type, model_kwargs=kwargs, img_resolution=config.data.resolution,
                img_channels=config.data.channels, label_dim=case.label_dim, batch=batch,
                sample_batch=args.sample_batch.get(name, batch), dtypes=dtypes, lr=config.optim.lr,
                warmup_images=config.optim.warmup_images, ema_halflife_images=config.ema.halflife_images,
                ema_rampup_ratio=config.ema.rampup_ratio, steps=args.edm_steps, windows=args.edm_windows,
                warmup=args.warmup, sample_windows=args.edm_sample_windows, num_steps=NUM_STEPS,
                # float32 matmuls and convolutions as jaxdiff's: JAX's default precision is TF32 on
                # NVIDIA GPUs that have it (EDM's own training loop turns TF32 off).
                allow_tf32=args.matmul_precision in (None, 'default', 'fastest', 'tensorfloat32'),
                require_cuda=os.path.exists('/proc/driver/nvidia/version'))
    cmd = [python, str(HERE / 'speed_edm.py'), '--edm', str(checkout), '--spec', json.dumps(spec)]
    return json_subprocess(cmd, time_left(args), log)


def run_jobs(jobs, *, base_row: dict, out_path, md_path=None, time_budget=None, log=print) -> list[dict]:
    """Run `jobs`, a list of (fields, fn) with fn() -> more fields, in order. Each gives one row
    (base_row + fields + fn's fields, status 'ok' unless fn says otherwise; 'error' with the
    exception when fn raises; 'skipped' once `time_budget` seconds have passed), appended to the
    JSON-lines `out_path` at once; the markdown table so far is rewritten to `md_path` after each."""
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
                row.update(status='error', error=f'{type(e).__name__}: {e}'[:4000], traceback=traceback.format_exc()[-4000:])
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
    """'cifar10:bfloat16,imagenet64' -> [(case, dtype), ...]; a case without ':dtype' takes each of `dtypes`."""
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


def plan_jobs(args, log=print) -> list[tuple[dict, object]]:
    """The jaxdiff cases in --cases order; with --vs-edm, EDM's run of a network right after the
    last jaxdiff case of that network, at the same dtypes."""
    pairs, jobs = parse_cases(args.cases, args.dtypes), []
    for i, (name, dtype) in enumerate(pairs):
        jobs.append(({'kind': 'jaxdiff', 'case': name, 'dtype': dtype},
                     lambda name=name, dtype=dtype: run_case_subprocess(name, dtype, args, log)))
        if args.vs_edm and name not in [n for n, _ in pairs[i + 1:]]:
            dtypes = [d for n, d in pairs if n == name]
            jobs.append(({'kind': 'edm', 'case': name, 'dtype': ','.join(dtypes)},
                         lambda name=name, dtypes=dtypes: run_edm_case(name, dtypes, args, log)))
    return jobs


# ---------------------------------------------------------------------------------------------
# Reporting.

def fmt(value, spec: str = '.0f', scale: float = 1.0) -> str:
    return '' if value is None else format(value / scale, spec)


def fmt_rate(value) -> str:
    """An img/s figure: whole numbers from 10 up, three significant digits below (a CPU's CIFAR-10)."""
    return '' if value is None else format(value, '.0f' if value >= 10 else '.3g')


def ratio(a, b):
    return a / b if a and b else None


def has_figures(row: dict) -> bool:
    return row.get('status') in ('ok', 'partial')


def why(row: dict) -> str:
    """A row's reason, or the last line of its error (where a traceback names the cause)."""
    lines = [line for line in (row.get('reason') or row.get('error') or '').splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ''


def find_row(rows, kind: str, case: str, dtype: str | None = None) -> dict:
    """The row with figures of `kind` for `case` (and `dtype`), {} if none."""
    return next((r for r in rows if r['kind'] == kind and r['case'] == case and has_figures(r)
                 and dtype in (None, r['dtype'])), {})


def edm_result(rows, case: str, dtype: str) -> dict:
    """EDM's figures for (case, dtype), {} if none."""
    return find_row(rows, 'edm', case).get('results', {}).get(dtype, {})


def summary_line(row: dict, rows: list[dict]) -> str:
    """The log line(s) of a finished row."""
    head = f"[{row['kind']}] {row['case']} {row['dtype']}: {row['status']}"
    if not has_figures(row):
        return f'{head} ({why(row)})'
    if row['kind'] == 'edm':
        return head + ''.join(
            f"\n  {dtype} ({res['precision']}): EDM train {fmt_rate(res['train_img_s'])}, sample {fmt_rate(res['sample_img_s'])} "
            f"img/s; jaxdiff/EDM train {fmt(ratio(mine.get('train_img_s'), res['train_img_s']), '.2f')}, "
            f"sample {fmt(ratio(mine.get('sample_img_s'), res['sample_img_s']), '.2f')}"
            for dtype, res in row.get('results', {}).items() for mine in [find_row(rows, 'jaxdiff', row['case'], dtype)])
    return (f"{head}: train {fmt_rate(row.get('train_img_s'))} img/s (compile {fmt(row.get('train_compile_s'), '.1f')} s), "
            f"{fmt(row.get('train_achieved_tflops'), '.3g')} TFLOP/s = {fmt(row.get('fraction_of_peak'), '.1%')} of "
            f"peak; sample {fmt_rate(row.get('sample_img_s'))} img/s, forward {fmt_rate(row.get('forward_img_s'))} img/s")


COLUMNS = ('case', 'network', 'params', 'dtype', 'batch', 'train img/s', 'compile s (train / sampler)',
           f'sample img/s ({NUM_STEPS} Heun, {NUM_EVALS} NFE)', 'forward img/s', f'{NUM_EVALS} x sample / forward',
           'train TFLOP/s', 'peak TFLOP/s (measured)', 'fraction of peak', 'XLA memory GiB', 'device peak GiB',
           'EDM train / sample img/s', 'jaxdiff / EDM (train, sample)', 'load')


def table_cells(r: dict, rows: list[dict]) -> list[str]:
    """The cells after `batch` of a jaxdiff row with figures."""
    edm, gib = edm_result(rows, r['case'], r['dtype']), 2 ** 30
    peak = r.get('peak_tflops_per_device') and r['peak_tflops_per_device'] * r.get('devices', 1)
    return [fmt_rate(r.get('train_img_s')), f"{fmt(r.get('train_compile_s'), '.1f')} / {fmt(r.get('sample_compile_s'), '.1f')}",
            fmt_rate(r.get('sample_img_s')), fmt_rate(r.get('forward_img_s')), fmt(r.get('scan_ratio'), '.2f'),
            fmt(r.get('train_achieved_tflops'), '.3g'), fmt(peak, '.3g'), fmt(r.get('fraction_of_peak'), '.1%'),
            fmt((r.get('train_memory') or {}).get('total'), '.2f', gib), fmt(r.get('device_peak_bytes'), '.2f', gib),
            f"{fmt_rate(edm['train_img_s'])} / {fmt_rate(edm['sample_img_s'])} ({edm['precision']})" if edm else '',
            (f"{fmt(ratio(r.get('train_img_s'), edm['train_img_s']), '.2f')}, "
             f"{fmt(ratio(r.get('sample_img_s'), edm['sample_img_s']), '.2f')}") if edm else '',
            (r.get('load_average') or '').split(' ')[0]]


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table: the machine and versions above it; below it, notes on the rows
    that did not finish and on EDM's runs."""
    env = next((r for r in rows if r.get('device_kind')), rows[0] if rows else {})
    lines = [f"{env.get('device_kind')} x {env.get('devices')} ({env.get('platform')}); jax {env.get('jax')}, "
             f"jaxlib {env.get('jaxlib')}, python {env.get('python')}; CPU {env.get('cpu')}, {env.get('cores')} cores; "
             f"matmul precision {env.get('matmul_precision')}; {env.get('date')}. Throughput: median of the timing "
             f"windows. Peak: the best rate of a large matmul in the case's dtype on one device, x devices. XLA "
             f"memory: the train step's temp + arguments + outputs - donated bytes. Load: load average before the case.",
             '', '| ' + ' | '.join(COLUMNS) + ' |', '|' + ' --- |' * 5 + ' ---: |' * (len(COLUMNS) - 5)]
    for r in (r for r in rows if r['kind'] == 'jaxdiff'):
        sample_batch = r.get('sample_batch')
        batch = f"{r.get('batch', '')}" + (f' ({sample_batch})' if sample_batch not in (None, r.get('batch')) else '')
        params = fmt(r.get('params'), '.1f', 1e6) + ('M' if r.get('params') else '')
        cells = table_cells(r, rows) if has_figures(r) else [r['status']] + [''] * (len(COLUMNS) - 6)
        lines.append('| ' + ' | '.join([r['case'], r.get('network', ''), params, r['dtype'], batch] + cells) + ' |')
    notes = [f"{r['kind']} {r['case']} {r['dtype']}: {r['status']}: {why(r)}" for r in rows if r['status'] != 'ok']
    notes += [f"EDM {r['case']}: NVlabs/edm's code under torch {r.get('torch')} on {r.get('edm_device')}"
              + (f"; stand-ins for its absent helper modules {r['stubbed_modules']}" if r.get('stubbed_modules') else '')
              for r in rows if r['kind'] == 'edm' and has_figures(r)]
    return '\n'.join(lines + [''] + [f'- {n}' for n in notes]) + '\n'


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
    add = p.add_argument
    add('--quick', action='store_true', help='CPU smoke run: ' + ', '.join(f'{k}={v}' for k, v in QUICK.items()))
    add('--cases', help=f"comma list of name or name:dtype from {sorted(CASES)} (default {DEFAULTS['cases']})")
    add('--dtypes', default='bfloat16,float32', help='dtypes of the cases given without one')
    add('--sample-dtypes', default='bfloat16,float32', help='dtypes whose cases also time the sampler and forward')
    add('--steps', type=int, help=f"timed steps (and forward calls) per window (default {DEFAULTS['steps']})")
    add('--windows', type=int, help=f"timing windows, the median reported (default {DEFAULTS['windows']})")
    add('--warmup', type=int, help=f"untimed steps after the first call (default {DEFAULTS['warmup']})")
    add('--sample-windows', type=int, help=f"timed sampler calls (default {DEFAULTS['sample_windows']})")
    add('--batch', help="training batch: N for every case or 'case=N,...' (defaults: "
                        + ', '.join(f'{k} {v.batch}' for k, v in CASES.items()) + ')')
    add('--sample-batch', help='sampling and forward batch, as --batch (default: the training batch)')
    add('--peak-n', type=int, help='n of the n^3 peak matmul (default 8192; 1024 on CPU)')
    add('--matmul-precision', help="jax_default_matmul_precision, e.g. 'highest' (default: JAX's own)")
    add('--time-budget', type=float, help=f'seconds: no case starts later, a running one stops {OVERRUN_S} s later')
    add('--out', default='runs/speed/speed.jsonl', help='JSON-lines file the rows are appended to')
    add('--md', default='runs/speed/speed.md', help='markdown table of this run (rewritten after each case)')
    add('--vs-edm', help='path of an NVlabs/edm checkout: time its code on the same cases')
    add('--torch-python', default='python3', help='interpreter with torch for --vs-edm')
    add('--edm-steps', type=int, default=10, help='EDM: timed training steps per window (eager: no compilation)')
    add('--edm-windows', type=int, default=2, help='EDM: training timing windows')
    add('--edm-sample-windows', type=int, default=2, help='EDM: timed sampler calls')
    add('--run-case', help=argparse.SUPPRESS)  # internal: one case here, its row as JSON on stdout
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtypes, args.sample_dtypes = args.dtypes.split(','), args.sample_dtypes.split(',')
    args.batch, args.sample_batch = per_case_ints(args.batch), per_case_ints(args.sample_batch)
    args.deadline = None if args.time_budget is None else time.perf_counter() + args.time_budget + OVERRUN_S
    return args


def main(argv=None):
    args = parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    if args.run_case:
        name, _, dtype = args.run_case.partition(':')
        print(json.dumps(run_case_here(name, dtype, args), default=str), flush=True)
        return
    for path in (args.out, args.md):
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    env = host_environment(args)
    log(f"jax {env['jax']}; CPU {env['cpu']} ({env['cores']} cores), load {load_average()}")
    rows = run_jobs(plan_jobs(args, log), base_row=env, out_path=args.out, md_path=args.md,
                    time_budget=args.time_budget, log=log)
    print(markdown_table(rows))
    log(f'rows appended to {args.out}; table in {args.md}')


if __name__ == '__main__':
    main()
