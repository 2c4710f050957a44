"""Training and sampling throughput on CPU: NVlabs/edm (PyTorch) vs jaxdiff, same network.

The network is the issue's bar (EDM's SongUNet, 8x8x1, model_channels 32, channel_mult [1, 2],
2 blocks, attention at 4x4, dropout 0.1, about 1.03M parameters; with `--net preset`, the digits
preset's network of `configs/edm.py` on both sides), trained with EDM's
loss, Adam (lr 1e-3 unless --lr) and EMA on sklearn's digits (x / 8 - 1), and sampled with EDM's
deterministic Heun sampler (18 steps, 35 network evaluations).

    python benchmarks/edm_digits_cpu.py                                    # jaxdiff only
    python benchmarks/edm_digits_cpu.py --edm /tmp/edm --torch-python /tmp/torchenv/bin/python

jaxdiff runs in this process, through the launcher's code path (`builders`, `train.make_setup`,
`train.init_state`, `train.compile_train_step` with the `parallel` mesh and shardings, the
`data.train_iterator` stream; sampling with `generate.sample_many` over `builders.build_sampling`). EDM runs in a subprocess of
the given torch interpreter (this file with --run-edm-worker; it imports EDM's `training.networks`,
`training.loss` and `generate.edm_sampler` from --edm, and never jaxdiff or jax). Its training
step is EDM's training loop's: loss.sum() / batch, backward, nan_to_num on the gradients, Adam
step, EMA lerp; its data are the same digits, reshuffled every epoch, from memory.

Repeats alternate the two frameworks (EDM worker, then jaxdiff, R times) and the table reports
medians. Extras (jaxdiff only): the batch-256 training step, and a ('data'=2) mesh over two CPU
"devices" (XLA_FLAGS=--xla_force_host_platform_device_count=2, in a subprocess, since the flag
must be set before jax starts). Timings on a shared machine are noisy: the script records the
load average before and after.

The EDM code is NVlabs's, under its own (non-commercial) licence; nothing of it is copied here.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import jaxdiff  # noqa: E402,F401  (before jax starts: jaxdiff sets its XLA:CPU flags)

REPO = pathlib.Path(__file__).resolve().parents[1]
# The bar: EDM's SongUNet/DDPM++ at 8x8 with 1.03M parameters (two blocks per resolution,
# dropout 0.1). `--net preset` measures both frameworks on the digits preset's network instead.
NET_KWARGS = dict(model_type='SongUNet', model_channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4],
                  dropout=0.1, embedding_type='positional', encoder_type='standard', decoder_type='standard',
                  channel_mult_noise=1, resample_filter=[1, 1])
# EDM's training loop ramps the learning rate up over `lr_rampup_kimg` and the EMA half-life with
# the images seen; both sides use the digits preset's values (they do not change the cost).
WARMUP_IMAGES = 20_000
EMA_HALFLIFE_IMAGES = 20_000
EMA_RAMPUP = 0.05


def net_kwargs(which: str) -> dict:
    """EDM SongUNet kwargs of the 'bar' network (NET_KWARGS) or of configs/edm.py's digits preset."""
    if which == 'bar':
        return dict(NET_KWARGS)
    from configs import edm as edm_config
    kw = edm_config.get_config('digits').model.kwargs.to_dict()
    return dict(model_type='SongUNet', **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()})


def load_digits_nhwc() -> np.ndarray:
    """sklearn's 1,797 digits as float32 [N, 8, 8, 1] in [-1, 1] (x / 8 - 1)."""
    from sklearn.datasets import load_digits
    return (load_digits().images.astype(np.float32) / 8.0 - 1.0)[..., None]


def load_average() -> str:
    try:
        return ' '.join(pathlib.Path('/proc/loadavg').read_text().split()[:3])
    except OSError:
        return 'n/a'


def cpu_model() -> str:
    try:
        for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


class Meter:
    """Wall-clock seconds of a timed block, and how many cores *other* processes kept busy
    meanwhile: (busy CPU time of the whole machine from /proc/stat - this process's and its
    children's CPU time) / wall time. 0 on an idle machine; 1 means one core's worth of
    competition. Linux only (None elsewhere). `own`: cores this process and its children used."""

    @staticmethod
    def _busy():
        try:
            fields = [int(v) for v in pathlib.Path('/proc/stat').read_text().split('\n', 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self):
        self.busy0, self.own0, self.t0 = self._busy(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        busy1, own1 = self._busy(), self._own()
        self.own = (own1 - self.own0) / self.seconds  # cores this process (and children) used
        self.other = (None if self.busy0 is None or busy1 is None
                      else max(0.0, ((busy1 - self.busy0) - (own1 - self.own0)) / self.seconds))
        return False


QUIET = 0.25  # A measurement is "quiet" when other processes kept less than this many cores busy.


def wait_quiet(max_wait: float, log=None) -> None:
    """Wait (up to `max_wait` s) until other processes leave the machine idle for 2 s."""
    deadline = time.perf_counter() + max_wait
    while time.perf_counter() < deadline:
        with Meter() as m:
            time.sleep(2.0)
        if m.other is None or m.other < QUIET:
            return
    if log and max_wait > 0:
        log(f'  (machine still busy after waiting {max_wait:.0f} s; measuring anyway)')


# ---------------------------------------------------------------------------------------------
# EDM (PyTorch) worker: runs under the torch interpreter, prints one JSON line.

def edm_worker(args) -> dict:
    import copy

    import torch
    sys.path.insert(0, str(pathlib.Path(args.edm).resolve()))
    from training.networks import EDMPrecond
    from training.loss import EDMLoss
    from generate import edm_sampler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device('cpu')
    images_all = torch.from_numpy(np.load(args.data_npy)).permute(0, 3, 1, 2).contiguous()  # NCHW
    batch = args.batch
    out = {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'batch': batch}

    net = EDMPrecond(img_resolution=8, img_channels=1, **json.loads(args.net_kwargs)).train().requires_grad_(True).to(device)
    out['params'] = sum(p.numel() for p in net.parameters())
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)

    rng = np.random.default_rng(0)
    order, pos = rng.permutation(len(images_all)), 0
    cur_nimg = 0

    def next_batch():
        nonlocal order, pos
        if pos + batch > len(order):
            order, pos = np.concatenate([order[pos:], rng.permutation(len(images_all))]), 0
        idx = torch.from_numpy(order[pos:pos + batch])
        pos += batch
        return images_all[idx]

    def train_step():  # EDM's training_loop.py: one accumulation round, no augmentation, no DDP.
        nonlocal cur_nimg
        optimizer.zero_grad(set_to_none=True)
        images = next_batch().to(device).to(torch.float32)
        loss = loss_fn(net=net, images=images, labels=None, augment_pipe=None)
        loss.sum().mul(1 / batch).backward()
        for g in optimizer.param_groups:
            g['lr'] = args.lr * min(cur_nimg / max(WARMUP_IMAGES, 1e-8), 1)
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        halflife = min(EMA_HALFLIFE_IMAGES, cur_nimg * EMA_RAMPUP)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        for p_ema, p_net in zip(ema.parameters(), net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        cur_nimg += batch

    # Warm-up steps (allocator, oneDNN primitive caches) are left out of the timing.
    for _ in range(args.warmup):
        train_step()
    out['train'] = []
    for _ in range(args.repeats):
        wait_quiet(args.wait_quiet)
        with Meter() as m:
            for _ in range(args.steps):
                train_step()
        out['train'].append({'img_s': args.steps * batch / m.seconds, 'other': m.other, 'own': m.own})

    out['sample'] = {}
    gen = torch.Generator().manual_seed(1)
    for sb in args.sample_batches:
        def draw():  # generate.py's call: float32 latents, the EMA network (no gradients).
            latents = torch.randn([sb, 1, 8, 8], generator=gen)
            return edm_sampler(ema, latents, None, num_steps=args.num_steps)
        with Meter() as m:
            images = draw()
        assert images.shape == (sb, 1, 8, 8) and torch.isfinite(images).all()
        runs = []
        for _ in range(args.repeats):
            wait_quiet(args.wait_quiet)
            with Meter() as m2:
                draw()
            runs.append({'img_s': sb / m2.seconds, 'other': m2.other, 'own': m2.own})
        out['sample'][str(sb)] = {'first_s': m.seconds, 'runs': runs}
    return out


def run_edm(args, data_npy: str, threads: int) -> dict:
    """One EDM measurement (warm-up, then one timed training run and one timed sampling run per
    batch size) in a fresh torch process."""
    cmd = [args.torch_python, str(pathlib.Path(__file__).resolve()), '--run-edm-worker', '--edm', args.edm,
           '--data-npy', data_npy, '--steps', str(args.steps), '--warmup', str(args.warmup),
           '--repeats', '1', '--wait-quiet', str(args.wait_quiet), '--batch', str(args.batch), '--lr', str(args.lr),
           '--num-steps', str(args.num_steps), '--threads', str(threads),
           '--sample-batches', ','.join(map(str, args.sample_batches)), '--net-kwargs', json.dumps(net_kwargs(args.net))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f'EDM worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# jaxdiff: the launcher's code path.

class JaxBench:
    """jaxdiff's compiled training step (and sampler) for one (batch, mesh) setting, built as
    `jaxdiff.runner.run_training` builds it."""

    def __init__(self, batch: int, lr: float, mesh_data: int = 1, num_steps: int = 18, net: str = 'bar'):
        import jax
        sys.path.insert(0, str(REPO))
        from configs import edm as edm_config
        from jaxdiff import builders, data, parallel, train

        self.jax = jax
        config = edm_config.get_config('digits')
        if net == 'bar':  # else the preset's network, as it is
            for key, value in NET_KWARGS.items():
                if key != 'model_type':
                    config.model.kwargs[key] = tuple(value) if isinstance(value, list) else value
        config.train.batch_size = batch
        config.optim.lr = lr
        config.optim.warmup_images = WARMUP_IMAGES
        config.ema.halflife_images = EMA_HALFLIFE_IMAGES
        config.ema.rampup_ratio = EMA_RAMPUP
        config.sample.num_steps = num_steps
        config.mesh.data = mesh_data
        self.config, self.batch, self.image_shape = config, batch, (8, 8, 1)

        self.module = builders.build_module(config)
        self.sampling = builders.build_sampling(config)
        self.mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices=jax.devices()[:mesh_data])
        parallel.check_batch_size(batch, self.mesh)
        self.setup = setup = train.make_setup(config, self.module, builders.model_factory(config), builders.build_loss(config))
        init_fn = lambda key: train.init_state(setup, key, self.image_shape)
        shardings = parallel.state_shardings(self.mesh, jax.eval_shape(init_fn, jax.random.key(0)))
        self.state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
        self.params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
        self.step_fn = train.compile_train_step(setup, shardings, parallel.batch_sharding(self.mesh),
                                                parallel.replicated(self.mesh))
        self.base_key = jax.random.key(config.seed + 1)
        self.iterator = data.train_iterator(config.data, global_batch_size=batch, seed=config.seed)
        self.global_batch = lambda b: parallel.global_batch(self.mesh, b)

        # The first step compiles (the runner logs it as "Compiled the training step in ...").
        with Meter() as m:
            self.state, metrics = self.step_fn(self.state, self.global_batch(next(self.iterator)), self.base_key)
            jax.block_until_ready(metrics)
        self.compile_s = m.seconds
        self.fixed_batch = self.global_batch(next(self.iterator))

    def train(self, steps: int, with_iterator: bool = True) -> dict:
        """images/s over `steps` steps, dispatched asynchronously as in the runner's loop. Without
        the iterator, every step reuses one batch already on the device (the step alone)."""
        with Meter() as m:
            for _ in range(steps):
                b = self.global_batch(next(self.iterator)) if with_iterator else self.fixed_batch
                self.state, metrics = self.step_fn(self.state, b, self.base_key)
            self.jax.block_until_ready((self.state, metrics))
        return {'img_s': steps * self.batch / m.seconds, 'other': m.other, 'own': m.own}

    def sample(self, batch: int) -> dict:
        """One call of `generate.sample_many` (the run's sampler) for `batch` images in one batch (the launcher's path)."""
        from jaxdiff import generate
        with Meter() as m:
            images = generate.sample_many(self.sampling.draw, self.module, self.state.ema_params, batch,
                                          image_shape=self.image_shape, seed=0, batch_size=batch)
        assert images.shape == (batch,) + self.image_shape and np.isfinite(images).all()
        return {'img_s': batch / m.seconds, 'seconds': m.seconds, 'other': m.other, 'own': m.own}


def jax_worker(args) -> dict:
    """The jaxdiff runs that need a process of their own (a 2-device mesh): prints one JSON line."""
    import jax
    out = {'devices': len(jax.devices()), 'mesh_data': args.mesh_data, 'results': {}}
    for batch in args.train_batches:
        bench = JaxBench(batch, args.lr, mesh_data=args.mesh_data, num_steps=args.num_steps, net=args.net)
        bench.train(args.warmup)
        res = {'compile_s': bench.compile_s, 'train': [], 'sample': {}}
        for _ in range(args.repeats):
            wait_quiet(args.wait_quiet)
            res['train'].append(bench.train(args.steps))
        if batch == args.train_batches[0]:
            for sb in args.sample_batches:
                first = bench.sample(sb)['seconds']
                runs = []
                for _ in range(args.repeats):
                    wait_quiet(args.wait_quiet)
                    runs.append(bench.sample(sb))
                res['sample'][str(sb)] = {'first_s': first, 'runs': runs}
        out['results'][str(batch)] = res
        del bench
    return out


# ---------------------------------------------------------------------------------------------

def med(runs, key='img_s'):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def cell(runs) -> str:
    """Median (min-max) images/s of the quiet runs (other processes busy < QUIET cores) when
    there are any, else of all runs, saying how many were quiet or how busy the machine was."""
    if not runs:
        return 'skipped'
    quiet = [r for r in runs if r.get('other') is not None and r['other'] < QUIET]
    use = quiet or runs
    vals = [r['img_s'] for r in use]
    text = f'{statistics.median(vals):.0f}'
    notes = [f'{min(vals):.0f}-{max(vals):.0f}'] if len(vals) > 1 else []
    if quiet:
        notes.append(f'{len(quiet)}/{len(runs)} quiet')
    elif med(runs, 'other') is not None:
        notes.append(f'busy: +{med(runs, "other"):.1f} cores')
    return text + (f' ({"; ".join(notes)})' if notes else '')


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--edm', help='path of an NVlabs/edm checkout (run EDM too)')
    p.add_argument('--torch-python', help='python interpreter with torch (and click, tqdm, pillow, requests, '
                                          "which EDM's modules import) for the EDM runs")
    p.add_argument('--steps', type=int, default=40, help='timed training steps per repeat')
    p.add_argument('--warmup', type=int, default=5, help='untimed training steps first')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--num-steps', type=int, default=18, help='Heun sampler steps (2N-1 network evaluations)')
    p.add_argument('--sample-batches', type=int_list, default=[64, 256])
    p.add_argument('--edm-threads', type=int_list, default=[2],
                   help='torch.set_num_threads values to measure EDM with (e.g. 2,1)')
    p.add_argument('--wait-quiet', type=float, default=0.0,
                   help='before each measurement, wait up to this many seconds for other processes to '
                        'leave the machine idle (it is shared)')
    p.add_argument('--no-extras', action='store_true', help='skip jaxdiff batch 2x and the 2-device mesh')
    p.add_argument('--json', help='also write the raw results here')
    p.add_argument('--net', choices=['bar', 'preset'], default='bar',
                   help="the network both frameworks train and sample: 'bar', the issue's 1.03M-parameter "
                        "DDPM++ (2 blocks, dropout 0.1), or 'preset', configs/edm.py's digits network")
    # Internal: subprocess workers.
    p.add_argument('--run-edm-worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--run-jax-worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--threads', type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument('--data-npy', help=argparse.SUPPRESS)
    p.add_argument('--net-kwargs', help=argparse.SUPPRESS)
    p.add_argument('--mesh-data', type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument('--train-batches', type=int_list, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.run_edm_worker:
        print(json.dumps(edm_worker(args)))
        return
    if args.run_jax_worker:
        print(json.dumps(jax_worker(args)))
        return

    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    run_edm_too = bool(args.edm and args.torch_python)
    if bool(args.edm) != bool(args.torch_python):
        log('note: EDM needs both --edm and --torch-python; measuring jaxdiff only')
    load_before = load_average()
    t0 = time.perf_counter()

    import jax
    log(f'jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} device(s); load {load_before}')
    bench = JaxBench(args.batch, args.lr, num_steps=args.num_steps, net=args.net)
    jd = {'params': bench.params, 'compile_s': bench.compile_s, 'train': [], 'train_step_only': [],
          'sample_first_s': {}, 'sample': {str(sb): [] for sb in args.sample_batches}}
    log(f'jaxdiff: {bench.params} parameters; training step compiled in {bench.compile_s:.1f} s')
    bench.train(args.warmup)
    for sb in args.sample_batches:
        jd['sample_first_s'][str(sb)] = bench.sample(sb)['seconds']  # compilation + one batch
    log('jaxdiff sampler, first call (compilation included): '
        + ', '.join(f'batch {sb}: {s:.1f} s' for sb, s in jd['sample_first_s'].items()))

    edm = {str(t): [] for t in args.edm_threads} if run_edm_too else {}
    with tempfile.TemporaryDirectory() as tmp:
        data_npy = os.path.join(tmp, 'digits.npy')
        np.save(data_npy, load_digits_nhwc())
        for r in range(args.repeats):  # Alternate: EDM, then jaxdiff.
            for threads in (args.edm_threads if run_edm_too else []):
                wait_quiet(args.wait_quiet, log)
                res = run_edm(args, data_npy, threads)
                edm[str(threads)].append(res)
                log(f'[{r + 1}/{args.repeats}] EDM ({threads} threads): train {cell(res["train"])}, sample '
                    + ', '.join(f'{sb}: {cell(v["runs"])}' for sb, v in res['sample'].items()) + ' img/s')
            wait_quiet(args.wait_quiet, log)
            jd['train'].append(bench.train(args.steps))
            wait_quiet(args.wait_quiet, log)
            jd['train_step_only'].append(bench.train(args.steps, with_iterator=False))
            for sb in args.sample_batches:
                wait_quiet(args.wait_quiet, log)
                jd['sample'][str(sb)].append(bench.sample(sb))
            log(f'[{r + 1}/{args.repeats}] jaxdiff: train {cell(jd["train"][-1:])} (step alone '
                f'{cell(jd["train_step_only"][-1:])}), sample '
                + ', '.join(f'{sb}: {cell(v[-1:])}' for sb, v in jd['sample'].items()) + ' img/s')
    del bench

    extras = {}
    if not args.no_extras:
        b2 = 2 * args.batch
        big = JaxBench(b2, args.lr, num_steps=args.num_steps, net=args.net)
        big.train(args.warmup)
        extras['batch'] = {'batch': b2, 'compile_s': big.compile_s, 'train': []}
        for _ in range(args.repeats):
            wait_quiet(args.wait_quiet, log)
            extras['batch']['train'].append(big.train(args.steps))
        log(f'jaxdiff batch {b2}: compiled in {big.compile_s:.1f} s, train {cell(extras["batch"]["train"])} img/s')
        del big
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), '--run-jax-worker', '--mesh-data', '2',
               '--steps', str(args.steps), '--warmup', str(args.warmup), '--repeats', str(args.repeats),
               '--wait-quiet', str(args.wait_quiet), '--lr', str(args.lr), '--num-steps', str(args.num_steps), '--train-batches', f'{args.batch},{b2}', '--net', args.net,
               '--sample-batches', ','.join(map(str, args.sample_batches))]
        env = dict(os.environ)
        env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2').strip()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            log(f'2-device jaxdiff worker failed:\n{proc.stderr[-3000:]}')
        else:
            extras['mesh2'] = json.loads(proc.stdout.strip().splitlines()[-1])
            for batch, res in extras['mesh2']['results'].items():
                log(f"jaxdiff ('data'=2) mesh, batch {batch}: compiled in {res['compile_s']:.1f} s, "
                    f"train {cell(res['train'])} img/s")

    results = dict(cpu=cpu_model(), cores=os.cpu_count(), load_before=load_before, load_after=load_average(),
                   date=time.strftime('%Y-%m-%d %H:%M %Z'), python=platform.python_version(), jax=jax.__version__,
                   torch=next(iter(edm.values()))[0]['torch'] if edm else None, args=vars(args),
                   command=' '.join(sys.argv), edm=edm, jaxdiff=jd, extras=extras)
    print(markdown_table(results, args))
    log(f'total {time.perf_counter() - t0:.0f} s')
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + '\n')


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(',') if v]


def markdown_table(results, args) -> str:
    edm, jd, extras = results['edm'], results['jaxdiff'], results['extras']
    threads = list(edm)
    cols = [f'EDM, {t} thread{"s" if t != "1" else ""}' for t in threads] or ['EDM']
    lines = [f"{results['cpu']}, {results['cores']} cores; load average {results['load_before']} before, "
             f"{results['load_after']} after; python {results['python']}, jax {results['jax']}"
             + (f", torch {results['torch']}" if results['torch'] else '') + f"; {results['date']}; "
             f"network: --net {args.net}.",
             '',
             f"Images/s, median (min-max) of {args.repeats} repeats ({args.steps} training steps each after "
             f"{args.warmup} warm-up steps; sampling: {args.num_steps} Heun steps, {2 * args.num_steps - 1} "
             f"network evaluations, one batch). Each measurement records how many cores other processes "
             f"kept busy meanwhile; medians are over the quiet ones (< {QUIET} cores) when there are any.",
             '',
             '| | ' + ' | '.join(cols) + ' | jaxdiff |',
             '| --- |' + ' ---: |' * (len(cols) + 1)]

    def row(label, edm_cells, jax_cell):
        edm_cells = edm_cells or ['skipped']
        lines.append(f'| {label} | ' + ' | '.join(edm_cells) + f' | {jax_cell} |')

    row('parameters', [str(edm[t][0]['params']) for t in threads], str(jd['params']))
    row(f'train, batch {args.batch}', [cell([r['train'][0] for r in edm[t]]) for t in threads], cell(jd['train']))
    row(f'train, batch {args.batch}, step alone (one batch already on the device)', ['' for _ in threads],
        cell(jd['train_step_only']))
    row('compile the training step, s', ['(eager)' for _ in threads], f"{jd['compile_s']:.1f}")
    for sb in args.sample_batches:
        row(f'sample, batch {sb}', [cell([r['sample'][str(sb)]['runs'][0] for r in edm[t]]) for t in threads],
            cell(jd['sample'][str(sb)]))
        first = jd['sample_first_s'][str(sb)]
        row(f'sample, batch {sb}, first call (jaxdiff: compilation included), s',
            [f"{statistics.median(r['sample'][str(sb)]['first_s'] for r in edm[t]):.2f}" for t in threads],
            f'{first:.1f} ({sb / first:.0f} img/s)')
    if 'batch' in extras:
        e = extras['batch']
        row(f"train, batch {e['batch']} (compile {e['compile_s']:.1f} s)", ['' for _ in threads], cell(e['train']))
    if 'mesh2' in extras:
        for batch, res in extras['mesh2']['results'].items():
            row(f"('data'=2) mesh over 2 CPU devices: train, batch {batch} (compile {res['compile_s']:.1f} s)",
                ['' for _ in threads], cell(res['train']))
            for sb, v in res['sample'].items():
                row(f"('data'=2) mesh: sample, batch {sb} (not split over the mesh; first call {v['first_s']:.1f} s)",
                    ['' for _ in threads], cell(v['runs']))
    if not edm:
        lines += ['', 'EDM part skipped (pass --edm PATH and --torch-python PYTHON to run it).']
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
