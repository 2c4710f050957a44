"""Time the orthonormal 2-D DCT round trip (dct2 then idct2) in its two forms, jit-compiled:

  matrix: `jaxdiff.dct` (two small matrix products per image, basis built in float64 and cast);
  fft:    `jax.scipy.fft.dctn` / `idctn` with norm='ortho' over the H, W axes.

For each batch shape it reports the median wall time of `--repeats` calls (after compilation and
one warm-up call), the maximum round-trip error and the error against scipy's float64 DCT, in
float32 and float64. The machine is shared, so the table records the load average at the start
and end of the run: compare only figures taken in one run.

    python benchmarks/dct_timing.py --repeats 30 --out benchmarks/dct_timing.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft

from jaxdiff import dct

SHAPES = ((64, 32, 32, 3), (16, 64, 64, 3), (4, 256, 256, 3))


def fft_dct2(x):
    return jax.scipy.fft.dctn(x, type=2, axes=(-3, -2), norm='ortho')


def fft_idct2(u):
    return jax.scipy.fft.idctn(u, type=2, axes=(-3, -2), norm='ortho')


FORMS = {'matrix': (dct.dct2, dct.idct2), 'fft': (fft_dct2, fft_idct2)}


def cpu_model() -> str:
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith('Model name:'):
                return line.split(':', 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or 'unknown'


def time_call(fn, x, repeats: int) -> float:
    jax.block_until_ready(fn(x))  # compile
    jax.block_until_ready(fn(x))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape, dtype, repeats: int):
    rng = np.random.default_rng(0)
    x64 = rng.normal(size=shape)
    ref = scipy.fft.dctn(x64, type=2, axes=(1, 2), norm='ortho')
    x = jnp.asarray(x64, dtype)
    rows = {}
    for name, (fwd, inv) in FORMS.items():
        round_trip = jax.jit(lambda x, fwd=fwd, inv=inv: inv(fwd(x)))
        seconds = time_call(round_trip, x, repeats)
        forward_err = float(np.max(np.abs(np.asarray(jax.jit(fwd)(x), np.float64) - ref)))
        round_err = float(np.max(np.abs(np.asarray(round_trip(x), np.float64) - np.asarray(x, np.float64))))
        rows[name] = (seconds, forward_err, round_err)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--out', default=None, help='write the markdown table here')
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    lines = []
    for dtype_name in ('float32', 'float64'):
        with jax.enable_x64(dtype_name == 'float64'):
            for shape in SHAPES:
                rows = measure(shape, getattr(jnp, dtype_name), args.repeats)
                (tm, em, rm), (tf, ef, rf) = rows['matrix'], rows['fft']
                lines.append(f'| {dtype_name} | {"x".join(map(str, shape))} | {tm * 1e3:.2f} | {tf * 1e3:.2f} | '
                             f'{tf / tm:.2f} | {em:.1e} / {rm:.1e} | {ef:.1e} / {rf:.1e} |')
                print(lines[-1], flush=True)
    load_end = os.getloadavg()

    header = [
        '## DCT round trip (dct2 then idct2): matrix form vs jax.scipy.fft, jit-compiled',
        '',
        f'Machine: {cpu_model()}, {os.cpu_count()} cores (shared with other jobs), jax {jax.__version__}, '
        f'backend {jax.default_backend()}.',
        f'Command: `python {" ".join(["benchmarks/dct_timing.py"] + (argv if argv is not None else sys.argv[1:]))}`; '
        f'date {datetime.date.today().isoformat()}.',
        f'Load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, '
        f'at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}.',
        f'Median of {args.repeats} calls after compilation and one warm-up call. Errors: max |DCT - scipy float64 DCT| '
        '/ max |idct2(dct2(x)) - x| for x ~ N(0, 1).',
        '',
        '| dtype | batch NxHxWxC | matrix ms | fft ms | fft / matrix | matrix err (fwd / round trip) | '
        'fft err (fwd / round trip) |',
        '|---|---|---|---|---|---|---|',
    ]
    text = '\n'.join(header + lines) + '\n'
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)
    print(text)


if __name__ == '__main__':
    main()
