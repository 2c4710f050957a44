"""A trained model's denoising error by noise level, next to the scalar Wiener filter.

For a Gaussian-process model (eps / x0 / v output) in a work directory, on the data set's first
`--images` evaluation images and one fixed noise draw, prints per t: logSNR, the model's eps and
x0 mean squared errors, and two baselines that need no network:

  wiener   x0_hat = m + a var / (a^2 var + s^2) (z - a m), the best denoiser that treats every
           pixel as independent Gaussian data with the data's mean m and variance var;
  noisy    x0_hat = z / a (no denoising): (s / a)^2.

A model near `wiener` at mid noise has not learnt the images' spatial structure yet: its ODE
samples are close to independent per-pixel noise with the data's colours (what an undertrained
simple-diffusion run looks like). The optimal denoiser's x0 error grows with t; a model whose
error falls again towards t = 1 is far from it where the error bulges. Usage (from the repo root):

    python benchmarks/denoiser_error.py --config=configs/simple_diffusion.py --workdir=runs/simple_diffusion-photos32 \
        [--images=256] [field=value ...]    # the overrides the run was trained with, e.g. train.batch_size=8
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxdiff import data, runner  # noqa: E402

TIMES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.98)


def load_config(spec: str, overrides: list[str]):
    path, _, preset = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('config_module', ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
    for item in overrides:
        key, value = item.split('=', 1)
        *parents, last = key.split('.')
        node = config
        for name in parents:
            node = node[name]
        node[last] = value if isinstance(node[last], str) else ast.literal_eval(value)
    return config


def denoiser_errors(model, images, key, times=TIMES) -> list[dict]:
    process = model.process
    noise = jax.random.normal(key, images.shape, images.dtype)
    mean, var = float(jnp.mean(images)), float(jnp.var(images))
    predict = jax.jit(lambda z, t: model(z, t))
    rows = []
    for t in times:
        tt = jnp.full((images.shape[0],), t, images.dtype)
        z = process.diffuse(images, tt, noise)
        prediction = predict(z, tt)
        a, s = (float(np.ravel(v)[0]) for v in process.scale_sigma(tt, images.shape, images.dtype))
        wiener = mean + a * var / (a * a * var + s * s) * (z - a * mean)
        rows.append(dict(t=t, logsnr=2 * np.log(a / s), eps=float(jnp.mean((prediction.eps - noise) ** 2)),
                         x0=float(jnp.mean((prediction.x0 - images) ** 2)),
                         wiener=float(jnp.mean((wiener - images) ** 2)), noisy=(s / a) ** 2))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', required=True, help='config file[:preset], as launch.py takes it')
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--images', type=int, default=256)
    parser.add_argument('overrides', nargs='*', help='field=value, as the run was trained')
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    run = runner.prepare(config, args.workdir)
    step, ema = runner._restore_ema(run)  # pylint: disable=protected-access
    images, _ = data.eval_images(config.data, args.images)
    rows = denoiser_errors(run.make_model(run.module, ema), jnp.asarray(images), jax.random.key(0))
    print(f'{args.workdir}, step {step}, {args.images} images, EMA parameters\n')
    print('| t | logSNR | eps MSE | x0 MSE | Wiener x0 MSE | no-denoising x0 MSE |\n|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['t']:.2f} | {r['logsnr']:.2f} | {r['eps']:.4f} | {r['x0']:.4f} | {r['wiener']:.4f} | {r['noisy']:.4g} |")


if __name__ == '__main__':
    main()
