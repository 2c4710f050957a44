"""The measured effect of simple diffusion's schedule shift and multiscale loss on the photo crops.

Trains `configs/simple_diffusion.py` at 64 px (a CPU-sized U-ViT, the same for every run) on the
same data stream, seed and number of training images in three settings, samples the same seeds
and scores them against the fixed photo patches:

  unshifted            process.noise_d = 64 (the plain cosine at 64 px), plain eps loss
  shifted              process.noise_d = 32 (lambda + 2 log(32/64)),      plain eps loss
  shifted+multiscale   process.noise_d = 32,                             multiscale loss from 16

so 'shifted' vs 'unshifted' isolates the schedule and 'shifted+multiscale' vs 'shifted' the loss.
Each run is `python launch.py` in its own process, one after another (timings are only comparable
on a quiet machine); the eval JSON of each workdir gives the figures. Usage:

    python benchmarks/simple_diffusion_effect.py --out=/tmp/sd_effect [--images=24000] [--runs=...]

prints a markdown table (and writes it to <out>/table.md) with FD, KID, precision/recall, the
feature network used, train img/s and wall time.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A CPU-sized U-ViT at 64 px: 4x4 patches to 16x16, one conv level there, 4 transformer blocks of
# width 128 on the 8x8 tokens.
COMMON = ['--config.data.resolution=64',
          '--config.model.kwargs.patch_size=4', '--config.model.kwargs.model_channels=64',
          '--config.model.kwargs.transformer_channels=128', '--config.model.kwargs.num_transformer_blocks=4']
RUNS = {
    'unshifted': ['--config.process.noise_d=64', '--config.loss.multiscale_lowest=0'],
    'shifted': ['--config.process.noise_d=32', '--config.loss.multiscale_lowest=0'],
    'shifted+multiscale': ['--config.process.noise_d=32', '--config.loss.multiscale_lowest=16'],
}


def run(name: str, out: pathlib.Path, images: int, extra: list[str]) -> dict:
    workdir = out / name.replace('+', '_')
    cmd = [sys.executable, 'launch.py', '--config=configs/simple_diffusion.py', f'--workdir={workdir}',
           f'--config.train.total_images={images}', '--config.train.compilation_cache=none',  # cold compiles: comparable walls
           *COMMON, *RUNS[name], *extra]
    start = time.time()
    with open(out / f"{name.replace('+', '_')}.log", 'w') as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - start
    report = json.loads(pathlib.Path(sorted(glob.glob(str(workdir / 'eval_*.json')))[-1]).read_text())
    text = (out / f"{name.replace('+', '_')}.log").read_text()
    train_s = next((float(line.split(' in ')[1].split(' s')[0]) for line in text.splitlines()
                    if 'Trained to step' in line), float('nan'))
    compile_s = next((float(line.split(' in ')[1].split(' s')[0]) for line in text.splitlines()
                      if 'Compiled the training step' in line), 0.0)
    return dict(name=name, report=report, wall=wall, img_s=images / max(train_s - compile_s, 1e-9), cmd=' '.join(cmd[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, type=pathlib.Path)
    parser.add_argument('--images', type=int, default=24_000, help='training images per run')
    parser.add_argument('--runs', default=','.join(RUNS), help=f'comma-separated subset of {list(RUNS)}')
    parser.add_argument('extra', nargs='*', help='more --config overrides for every run')
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if 'model name' in line), '?')
    rows = []
    for name in args.runs.split(','):
        loads = os.getloadavg()
        result = run(name, args.out, args.images, args.extra)
        result['load'] = f'{loads[0]:.1f} -> {os.getloadavg()[0]:.1f}'
        rows.append(result)
        print(f"{name}: done in {result['wall']:.0f} s", flush=True)
    lines = [f'{time.strftime("%Y-%m-%d %H:%M")}, {cpu}, {os.cpu_count()} cores; {args.images} training images per run',
             '', '| run | features | FD | KID | precision | recall | train img/s | job wall | load (start -> end) |',
             '|---|---|---:|---:|---:|---:|---:|---:|---|']
    for r in rows:
        e = r['report']
        fd = e.get('fd', e.get('fid', float('nan')))
        lines.append(f"| {r['name']} | {e.get('features', '?')} | {fd:.2f} | {e.get('kid', float('nan')):.4g} | "
                     f"{e.get('precision', float('nan')):.3f} | {e.get('recall', float('nan')):.3f} | {r['img_s']:.0f} | "
                     f"{r['wall']:.0f} s | {r['load']} |")
    lines += ['', 'Commands (from the repository root):', ''] + [f'    python {r["cmd"]}' for r in rows]
    table = '\n'.join(lines)
    (args.out / 'table.md').write_text(table + '\n')
    print(table)


if __name__ == '__main__':
    main()
