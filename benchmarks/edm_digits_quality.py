"""Sample quality against training images and seconds on the digits: NVlabs/edm (PyTorch) vs jaxdiff.

One training run per framework, with snapshots: at each image count of --snapshots the EMA
network draws --seed-sets sets of 1,024 samples (seeds 0..1023, 1024..2047, ...) with each
--sampler (default: EDM's deterministic 18 Heun steps for EDM, the preset's sampler for jaxdiff)
and they are scored by jaxdiff's digits report (Fréchet distance of the project's
digits-classifier features against all 1,797 digits, its real-vs-real floor, class balance),
the figures averaged over the sets. Training seconds
exclude sampling, scoring and jaxdiff's one-time compilation (reported separately). Warm-up and
EMA are defined in images, independent of the run length, so a snapshot at k images is what a
run of k images ends with.

    python benchmarks/edm_digits_quality.py --framework jaxdiff                  # the digits preset
    python benchmarks/edm_digits_quality.py --framework jaxdiff --set optim.lr=1e-3 --set ...
    python benchmarks/edm_digits_quality.py --framework edm --edm /tmp/edm --torch-python /tmp/torchenv/bin/python

EDM runs `training.networks.EDMPrecond` with the network of `edm_digits_cpu.NET_KWARGS` (the
issue's bar: DDPM++ with 2 blocks per resolution and dropout 0.1, 1.03M parameters), `training.loss.EDMLoss`, Adam and EDM's EMA, as its
training loop does (see edm_digits_cpu.py), with --edm-lr (default 1e-3, the issue's bar),
--edm-warmup images (default 10k: EDM's own 10M would keep the learning rate near zero) and EDM's
default EMA (half-life 500k images ramped up at 0.05 of the images seen). Its sampler is EDM's
`generate.edm_sampler`. Wall-clock figures depend on the machine's load: each snapshot records
how many cores other processes kept busy (see edm_digits_cpu.Meter); compare frameworks by
images/s measured on a quiet machine (edm_digits_cpu.py).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jaxdiff  # noqa: E402,F401  (before jax starts: jaxdiff sets its XLA:CPU flags)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import edm_digits_cpu as cpu  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_SAMPLES = 1024


def edm_worker(args) -> dict:
    """Under the torch interpreter: train EDM, saving samples at each snapshot; one JSON line out."""
    import copy

    import torch
    sys.path.insert(0, str(pathlib.Path(args.edm).resolve()))
    from generate import edm_sampler
    from training.loss import EDMLoss
    from training.networks import EDMPrecond

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images_all = torch.from_numpy(np.load(args.data_npy)).permute(0, 3, 1, 2).contiguous()
    batch = args.batch
    net = EDMPrecond(img_resolution=8, img_channels=1, **cpu.NET_KWARGS).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.edm_lr, betas=(0.9, 0.999), eps=1e-8)
    rng = np.random.default_rng(args.seed)
    order, pos, nimg = rng.permutation(len(images_all)), 0, 0
    out = {'framework': 'edm', 'torch': torch.__version__, 'params': sum(p.numel() for p in net.parameters()),
           'snapshots': []}
    train_seconds = 0.0
    for target in args.snapshots:
        with cpu.Meter() as m:
            while nimg < target:
                if pos + batch > len(order):
                    order, pos = np.concatenate([order[pos:], rng.permutation(len(images_all))]), 0
                images = images_all[torch.from_numpy(order[pos:pos + batch])]
                pos += batch
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(net=net, images=images, labels=None, augment_pipe=None)
                loss.sum().mul(1 / batch).backward()
                for g in optimizer.param_groups:
                    g['lr'] = args.edm_lr * min(nimg / max(args.edm_warmup, 1e-8), 1)
                for p in net.parameters():
                    if p.grad is not None:
                        torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
                optimizer.step()
                nimg += batch
                halflife = min(500_000, nimg * 0.05)
                beta = 0.5 ** (batch / max(halflife, 1e-8))
                for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                    p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        train_seconds += m.seconds

        @torch.no_grad()
        def draw(spec):
            samples = []
            for lo in range(0, NUM_SAMPLES * args.seed_sets, 256):
                # Latents from seed lo; the churn noise comes from torch's global generator.
                latents = torch.randn([256, 1, 8, 8], generator=torch.Generator().manual_seed(lo))
                samples.append(edm_sampler(ema, latents, None, **sampler_kwargs(spec)))
            return torch.cat(samples).permute(0, 2, 3, 1).numpy()
        out['snapshots'].append(snapshot(args, 'edm', nimg, train_seconds, m.other, args.samplers or ['num_steps=18'], draw))
        print(f'EDM {nimg} images: {train_seconds:.0f} s training', file=sys.stderr, flush=True)
    return out


def snapshot(args, framework, nimg, train_seconds, other, specs, draw) -> dict:
    """One snapshot's record: for each sampler spec, the samples `draw(spec)` returns (saved for
    `score`) and the seconds they took."""
    snap = {'images': nimg, 'train_seconds': train_seconds, 'other': other, 'samplers': []}
    for i, spec in enumerate(specs):
        with cpu.Meter() as ms:
            samples = draw(spec)
        path = os.path.join(args.out_dir, f'{framework}_{nimg}_{i}.npy')
        np.save(path, samples)
        snap['samplers'].append({'sampler': spec, 'sample_seconds': ms.seconds, 'samples': path})
    return snap


def jaxdiff_run(args) -> dict:
    """In this process: the launcher's training path (as edm_digits_cpu.JaxBench) with snapshots."""
    import jax
    sys.path.insert(0, str(REPO))
    from configs import edm as edm_config
    from jaxdiff import builders, data, generate, parallel, samplers, train

    config = edm_config.get_config('digits')
    for item in args.set:
        key, value = item.split('=', 1)
        node = config
        *path, leaf = key.split('.')
        for part in path:
            node = node[part]
        node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
    config.seed = args.seed
    module = builders.build_module(config)
    precond = builders.build_precond(config)
    mesh = parallel.make_mesh(1, 1, devices=jax.devices()[:1])
    setup = train.make_setup(config, module, builders.model_factory(config), builders.build_loss(config))
    init_fn = lambda key: train.init_state(setup, key, (8, 8, 1))
    shardings = parallel.state_shardings(mesh, jax.eval_shape(init_fn, jax.random.key(0)))
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
    step_fn = train.compile_train_step(setup, shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh))
    base_key = jax.random.key(config.seed + 1)
    iterator = data.train_iterator(config.data, global_batch_size=config.train.batch_size, seed=config.seed)
    batch = config.train.batch_size
    out = {'framework': 'jaxdiff', 'overrides': args.set, 'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
           'snapshots': []}
    t0 = time.perf_counter()
    state, metrics = step_fn(state, parallel.global_batch(mesh, next(iterator)), base_key)
    jax.block_until_ready(metrics)
    out['compile_seconds'] = time.perf_counter() - t0
    nimg, train_seconds = batch, 0.0
    for target in args.snapshots:
        with cpu.Meter() as m:
            while nimg < target:
                state, metrics = step_fn(state, parallel.global_batch(mesh, next(iterator)), base_key)
                nimg += batch
            jax.block_until_ready(state)
        train_seconds += m.seconds

        def draw(spec):
            sampler = builders.build_sampler(config) if spec == 'preset' else samplers.Sampler(**sampler_kwargs(spec))
            return generate.sample_images(module, state.ema_params, precond, sampler, NUM_SAMPLES * args.seed_sets,
                                          image_shape=(8, 8, 1), seed=0, batch_size=256)
        out['snapshots'].append(snapshot(args, 'jaxdiff', nimg, train_seconds, m.other, args.samplers or ['preset'], draw))
        print(f'jaxdiff {nimg} images: {train_seconds:.0f} s training (+{out["compile_seconds"]:.0f} s compile)',
              file=sys.stderr, flush=True)
    return out


def score(result) -> None:
    sys.path.insert(0, str(REPO))
    from jaxdiff import evaluate
    real = cpu.load_digits_nhwc()
    for snap in result['snapshots']:
        for entry in snap['samplers']:
            samples = np.clip(np.load(entry.pop('samples')), -1, 1)
            reports = [evaluate.digits_report(samples[lo:lo + NUM_SAMPLES], real, seed=0)
                       for lo in range(0, len(samples), NUM_SAMPLES)]
            fds = [r['fd'] for r in reports]
            entry.update(fds=fds, fd=float(np.mean(fds)),
                         fd_floor=reports[0]['fd_floor'],
                         class_balance=float(np.mean([r['class_balance'] for r in reports])),
                         mean_confidence=float(np.mean([r['mean_confidence'] for r in reports])))


def sampler_kwargs(spec: str) -> dict:
    """'num_steps=40,S_churn=40,S_min=0.01,S_max=1' -> keyword arguments of both frameworks' EDM sampler."""
    kwargs = {}
    for item in filter(None, spec.split(',')):
        key, value = item.split('=')
        kwargs[key] = int(value) if key == 'num_steps' else float(value)
    return kwargs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--framework', choices=['edm', 'jaxdiff'], required=True)
    p.add_argument('--snapshots', type=cpu.int_list, default=[60_000, 120_000, 200_000, 300_000])
    p.add_argument('--set', action='append', default=[], help='jaxdiff config override key=value (JSON value)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch', type=int, default=128, help='EDM batch (jaxdiff: the preset, or --set)')
    p.add_argument('--edm', help='NVlabs/edm checkout')
    p.add_argument('--torch-python')
    p.add_argument('--edm-lr', type=float, default=1e-3)
    p.add_argument('--edm-warmup', type=float, default=10_000)
    p.add_argument('--seed-sets', type=int, default=1,
                   help='score this many sets of 1,024 samples (seeds 0-1023, 1024-2047, ...); FD is their mean')
    p.add_argument('--sampler', dest='samplers', action='append', default=[],
                   help="EDM sampler arguments, e.g. 'num_steps=40,S_churn=40,S_min=0.01,S_max=1' (repeatable); "
                        "default: EDM's 18 Heun steps, jaxdiff's config.sample ('preset')")
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', help='append the result as one JSON line to this file')
    p.add_argument('--run-edm-worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--data-npy', help=argparse.SUPPRESS)
    p.add_argument('--out-dir', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_edm_worker:
        print(json.dumps(edm_worker(args)))
        return

    load_before = cpu.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        args.out_dir = tmp
        if args.framework == 'edm':
            if not (args.edm and args.torch_python):
                p.error('--framework edm needs --edm and --torch-python')
            data_npy = os.path.join(tmp, 'digits.npy')
            np.save(data_npy, cpu.load_digits_nhwc())
            cmd = [args.torch_python, __file__, '--run-edm-worker', '--framework', 'edm', '--edm', args.edm,
                   '--data-npy', data_npy, '--out-dir', tmp, '--snapshots', ','.join(map(str, args.snapshots)),
                   '--seed', str(args.seed), '--batch', str(args.batch), '--edm-lr', str(args.edm_lr),
                   '--edm-warmup', str(args.edm_warmup), '--threads', str(args.threads),
                   '--seed-sets', str(args.seed_sets)] + [f'--sampler={spec}' for spec in args.samplers]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode:
                raise SystemExit(f'EDM worker failed ({proc.returncode})')
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            result = jaxdiff_run(args)
        score(result)
    result.update(cpu=cpu.cpu_model(), load_before=load_before, load_after=cpu.load_average(),
                  date=time.strftime('%Y-%m-%d %H:%M %Z'), command=' '.join(sys.argv))
    print(f"{result['framework']} {' '.join(args.set)} ({result['params']} parameters)")
    print('| images | training s | other cores busy | sampler | sampling s | FD (mean of sets) | sets | floor | class balance | confidence |')
    print('| ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: |')
    for s in result['snapshots']:
        for e in s['samplers']:
            print(f"| {s['images']} | {s['train_seconds']:.0f} | {s['other'] if s['other'] is not None else float('nan'):.2f} "
                  f"| {e['sampler']} | {e['sample_seconds']:.0f} | {e['fd']:.2f} | {', '.join(f'{f:.2f}' for f in e['fds'])} "
                  f"| {e['fd_floor']:.2f} | {e['class_balance']:.3f} | {e['mean_confidence']:.3f} |")
    if args.json:
        with open(args.json, 'a') as f:
            f.write(json.dumps(result) + '\n')


if __name__ == '__main__':
    main()
