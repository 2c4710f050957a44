"""Training throughput on a shared CPU: what a competing process costs jaxdiff (and EDM).

XLA:CPU splits each operation over its thread pool (one thread per core it may use) and waits for
the slowest thread, so a process that takes one of two cores can cost more than half the speed.
This script measures the digits preset's training step (`edm_digits_cpu.py`'s workers: jaxdiff
through the launcher's code path, EDM's PyTorch training loop) with and without a competitor, in
each of these settings:

  jaxdiff              as it runs by default (all cores)
  jaxdiff, 1 core      pinned to one core with `taskset -c 0` (XLA sizes its pool from the affinity)
  jaxdiff, 1 thread    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false (single-threaded Eigen ops)
  EDM, 2 / 1 threads   torch.set_num_threads (with --edm and --torch-python)

The competitor is a Python busy loop (`--competitors` of them, nice 0 unless --competitor-nice),
started before the worker and killed after it. Every (condition, setting) pair runs in its own
process, alternating, `--rounds` times; the table gives the median img/s and its ratio to the same
setting's quiet figure.

    python benchmarks/shared_cpu.py --rounds 2
    python benchmarks/shared_cpu.py --rounds 2 --edm /tmp/edm --torch-python /tmp/torchenv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def jax_settings() -> dict:
    """name -> (command prefix, extra XLA_FLAGS) of each jaxdiff setting."""
    return {'jaxdiff': ([], ''),
            'jaxdiff, 1 core': (['taskset', '-c', '0'], ''),
            'jaxdiff, 1 thread': ([], '--xla_cpu_multi_thread_eigen=false')}


def run_jax(setting: tuple, args) -> float:
    """Median training img/s of one jaxdiff worker process (`edm_digits_cpu.py --run-jax-worker`)."""
    prefix, flags = setting
    cmd = prefix + [sys.executable, str(HERE / 'edm_digits_cpu.py'), '--run-jax-worker', '--net', 'preset',
                    '--train-batches', str(args.batch), '--steps', str(args.steps), '--warmup', '5',
                    '--repeats', str(args.windows), '--sample-batches=']
    env = dict(os.environ)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + flags).strip()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f'jaxdiff worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return statistics.median(r['img_s'] for r in out['results'][str(args.batch)]['train'])


def run_edm(threads: int, args, data_npy: str) -> float:
    """Training img/s of one EDM worker process (`edm_digits_cpu.run_edm`) over windows x steps steps."""
    import edm_digits_cpu as cpu
    ns = argparse.Namespace(torch_python=args.torch_python, edm=args.edm, steps=args.steps * args.windows, warmup=5,
                            wait_quiet=0.0, batch=args.batch, lr=1e-3, num_steps=18, sample_batches=[], net='preset')
    return cpu.run_edm(ns, data_npy, threads)['train'][0]['img_s']


def start_competitors(n: int, nice: int) -> list:
    code = 'while True: pass'
    return [subprocess.Popen(['nice', '-n', str(nice), sys.executable, '-c', code]) for _ in range(n)]


def stop(procs: list) -> None:
    for p in procs:
        p.kill()
        p.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--windows', type=int, default=3, help='timed windows per worker (median taken)')
    p.add_argument('--steps', type=int, default=20, help='training steps per window')
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--competitors', type=int, default=1)
    p.add_argument('--competitor-nice', type=int, default=0)
    p.add_argument('--edm', help='NVlabs/edm checkout (measure EDM too)')
    p.add_argument('--torch-python', help='python with torch for EDM')
    p.add_argument('--json', help='also write the raw results here')
    args = p.parse_args()

    import edm_digits_cpu as cpu
    settings = {name: (lambda s=s: run_jax(s, args)) for name, s in jax_settings().items()}
    tmp = tempfile.TemporaryDirectory()
    if args.edm and args.torch_python:
        import numpy as np
        data_npy = os.path.join(tmp.name, 'digits.npy')
        np.save(data_npy, cpu.load_digits_nhwc())
        for threads in (2, 1):
            settings[f'EDM, {threads} thread{"s" * (threads > 1)}'] = lambda t=threads: run_edm(t, args, data_npy)

    conditions = {'quiet': 0, f'{args.competitors} busy process{"es" * (args.competitors > 1)}': args.competitors}
    results = {c: {s: [] for s in settings} for c in conditions}
    load_before, t0 = cpu.load_average(), time.perf_counter()
    for r in range(args.rounds):
        for cond, n in conditions.items():
            for name, fn in settings.items():
                procs = start_competitors(n, args.competitor_nice)
                try:
                    time.sleep(0.5 if n else 0.0)
                    results[cond][name].append(fn())
                finally:
                    stop(procs)
                print(f'[{r + 1}/{args.rounds}] {cond}, {name}: {results[cond][name][-1]:.0f} img/s',
                      file=sys.stderr, flush=True)
    quiet, loaded = conditions
    lines = [f'{cpu.cpu_model()}, {os.cpu_count()} cores, load {load_before} -> {cpu.load_average()}, '
             f'{time.strftime("%Y-%m-%d %H:%M %Z")}, {time.perf_counter() - t0:.0f} s; competitor nice '
             f'{args.competitor_nice}; medians of {args.rounds} rounds x {args.windows} windows x {args.steps} steps',
             '', f'| setting | {quiet} img/s | {loaded} img/s | loaded / quiet |', '|---|---:|---:|---:|']
    for name in settings:
        q, l = statistics.median(results[quiet][name]), statistics.median(results[loaded][name])
        lines.append(f'| {name} | {q:.0f} | {l:.0f} | {l / q:.2f} |')
    print('\n'.join(lines))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(args=vars(args), results=results), indent=2) + '\n')


if __name__ == '__main__':
    main()
