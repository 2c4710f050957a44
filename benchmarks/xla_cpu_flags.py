"""Training and sampling throughput of the digits preset with and without XLA:CPU's YNNPACK fusions.

jaxdiff appends `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions) to XLA_FLAGS when
it is imported before JAX starts (jaxdiff/__init__.py). This script measures why: each setting
runs in its own process (XLA reads its flags once), alternating, R rounds; JAXDIFF_KEEP_XLA_FLAGS=1
keeps jaxlib's default (fusions on) in the 'default' runs.

    python benchmarks/xla_cpu_flags.py --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SETTINGS = {'jaxlib default (YNNPACK fusions on)': {'JAXDIFF_KEEP_XLA_FLAGS': '1', 'XLA_FLAGS': ''},
            'jaxdiff (YNNPACK fusions off)': {'XLA_FLAGS': ''}}


def worker(steps: int) -> dict:
    sys.path.insert(0, str(HERE))
    import edm_digits_cpu as cpu  # imports jaxdiff first, which sets the flag unless told not to
    bench = cpu.JaxBench(128, 2e-3)
    bench.train(3)
    train = [bench.train(steps) for _ in range(3)]
    bench.sample(256)  # compile
    sample = [bench.sample(256) for _ in range(2)]
    return {'xla_flags': os.environ.get('XLA_FLAGS', ''), 'compile_s': bench.compile_s,
            'train': train, 'sample': sample}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps)))
        return
    sys.path.insert(0, str(HERE))
    import edm_digits_cpu as cpu
    rows = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            e = {k: v for k, v in os.environ.items() if k not in ('JAXDIFF_KEEP_XLA_FLAGS', 'XLA_FLAGS')}
            e.update(env)
            out = subprocess.run([sys.executable, __file__, '--worker', '--steps', str(args.steps)], env=e,
                                 capture_output=True, text=True, check=True)
            rows[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f'{cpu.cpu_model()}, {os.cpu_count()} cores; load before/after in the rows\' "other" column.\n')
    print('| XLA:CPU setting | train img/s (batch 128) | cores used | sample img/s (batch 256, 35 evals) | other cores busy |')
    print('| --- | ---: | ---: | ---: | ---: |')
    for name, runs in rows.items():
        train = [r for run in runs for r in run['train']]
        sample = [r for run in runs for r in run['sample']]
        other = [r['other'] for r in train + sample if r['other'] is not None]
        print(f"| {name} | {cpu.cell(train)} | {sum(r['own'] for r in train) / len(train):.2f} | {cpu.cell(sample)} "
              f"| {max(other):.2f} max |")


if __name__ == '__main__':
    main()
