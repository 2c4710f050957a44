"""Training img/s of the digits preset with GroupNorm's closed-form derivative against autodiff's.

`layers.standardize` (GroupNorm's (x - mean) / sqrt(var + eps)) carries a hand-written JVP; this
script builds the launcher's training step twice in one process, once with it and once with the
plain formula left to autodiff, and alternates timing windows between the two (the machine's
drift hits both alike). It reports the median img/s of each and the median of the paired ratios.

    python benchmarks/edm_digits_cpu.py --help   # the step it times (JaxBench, --net preset)
    python benchmarks/groupnorm_derivative.py --rounds 10
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import edm_digits_cpu as cpu  # noqa: E402  (imports jaxdiff before JAX starts)


def autodiff_standardize(x, axes, eps):
    """GroupNorm's standardisation with no custom derivative (what JAX differentiates by itself)."""
    import jax
    import jax.numpy as jnp
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(axis=axes, keepdims=True) + eps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=10)
    p.add_argument('--steps', type=int, default=15, help='training steps per window')
    p.add_argument('--batch', type=int, default=128)
    args = p.parse_args()

    from jaxdiff.nets import layers
    variants = {'autodiff': autodiff_standardize, 'closed form': layers.standardize}
    benches = {}
    for name, fn in variants.items():
        layers.standardize = fn  # GroupNorm looks it up when the step is traced (here, in JaxBench)
        benches[name] = cpu.JaxBench(args.batch, 1e-3, net='preset')
        benches[name].train(3, with_iterator=False)
    load_before = cpu.load_average()
    img_s = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, bench in benches.items():
            img_s[name].append(bench.train(args.steps, with_iterator=False)['img_s'])
    ratios = [a / b for a, b in zip(img_s['closed form'], img_s['autodiff'])]
    print(f'{cpu.cpu_model()}, load {load_before} -> {cpu.load_average()}; {args.rounds} rounds x {args.steps} steps, batch {args.batch}')
    for name, v in img_s.items():
        print(f'{name}: median {statistics.median(v):.0f} img/s ({min(v):.0f}-{max(v):.0f}); '
              f'compile {benches[name].compile_s:.1f} s')
    print(f'closed form / autodiff, paired: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})')


if __name__ == '__main__':
    main()
