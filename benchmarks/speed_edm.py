"""NVlabs/edm's own code timed on one network (the --vs-edm side of benchmarks/speed.py).

    python benchmarks/speed_edm.py --edm PATH_TO_NVLABS_EDM_CHECKOUT --spec JSON

runs under a torch interpreter (it imports torch and EDM from the checkout, never jax) and
prints one JSON line: per dtype, the training img/s of EDM's training-loop step (EDMPrecond over
its SongUNet or DhariwalUNet, EDMLoss, loss.sum() * loss_scaling / batch, backward, nan_to_num on
the gradients, Adam, EMA lerp) and the img/s of its generate.edm_sampler (18 Heun steps, 35
network evaluations) on the EMA network, with torch.cuda.synchronize around every timing window.
Backend settings are the training loop's (cuDNN autotuning on, TF32 off) unless the spec's
allow_tf32 matches float32 to jaxdiff's (JAX's default precision uses TF32 on NVIDIA GPUs). jaxdiff's
bfloat16 stands against EDM's mixed precision, `use_fp16=True` (float16 on CUDA; EDM ignores it
elsewhere), with EDM's ImageNet loss scaling of 100. A spec gives the network (model_type, model_kwargs,
img_resolution, img_channels, label_dim), batch, sample_batch, dtypes, lr, warmup_images,
ema_halflife_images, ema_rampup_ratio, steps, windows, warmup, sample_windows, num_steps,
allow_tf32 and require_cuda (report 'unavailable' rather than run a GPU-sized case on the CPU).

EDM's code is under its own non-commercial licence; nothing of it is copied here.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import pathlib
import statistics
import sys
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from edm_digits_cpu import Meter  # noqa: E402  (imports neither jax nor torch)

# Imported by EDM's modules (generate.py's CLI, dnnlib) but never run by the timed code.
HELPER_MODULES = ('click', 'tqdm', 'PIL', 'PIL.Image', 'requests', 'distutils', 'distutils.util')


class StandIn:
    """Stands in for an absent helper package: applied to a function (a click decorator) it
    returns the function; any other call or attribute gives another stand-in."""

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and not kwargs and callable(args[0]) else StandIn()

    def __getattr__(self, name):
        if name.startswith('__'):  # the import machinery and copy/pickle probe dunders
            raise AttributeError(name)
        return StandIn()


@contextlib.contextmanager
def stand_ins_for_missing(names=HELPER_MODULES):
    """While EDM's modules are imported: a StandIn module in sys.modules for each of `names` that
    does not import (yields their names); removed afterwards, so that torch's own probes for these
    packages (torch._dynamo's skip lists) find them absent, as they are."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            module = types.ModuleType(name)
            module.__getattr__ = StandIn().__getattr__
            sys.modules[name] = module
            missing.append(name)
    try:
        yield missing
    finally:
        for name in missing:
            sys.modules.pop(name, None)


def edm_worker(checkout: str, spec: dict) -> dict:
    """EDM's figures at each of spec['dtypes'] ({'status': 'unavailable', ...} without torch)."""
    try:
        import torch
    except ImportError as e:
        return {'status': 'unavailable', 'reason': f'no torch in {sys.executable}: {e}'}
    sys.path.insert(0, str(pathlib.Path(checkout).resolve()))
    with stand_ins_for_missing() as stood_in:
        from generate import edm_sampler
        from training.loss import EDMLoss
        from training.networks import EDMPrecond

    cuda = torch.cuda.is_available()
    if spec.get('require_cuda') and not cuda:  # on CPU EDM's GPU-sized cases would outlast any budget
        return {'status': 'unavailable', 'reason': f'torch {torch.__version__} sees no CUDA device'}
    # training/training_loop.py's settings, except TF32 where the spec asks for it (jaxdiff's precision)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(spec.get('allow_tf32'))
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    out = {'status': 'ok', 'torch': torch.__version__, 'stubbed_modules': stood_in,
           'edm_device': torch.cuda.get_device_name() if cuda else f'cpu, {torch.get_num_threads()} threads',
           'results': {}}
    for dtype in spec['dtypes']:
        out['results'][dtype] = edm_measure(torch, (EDMPrecond, EDMLoss, edm_sampler), spec, dtype, cuda)
        print(json.dumps(out), flush=True)  # the figures so far, should a later dtype not finish
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return out


def edm_measure(torch, edm, spec: dict, dtype: str, cuda: bool) -> dict:
    """Train and sampling img/s of EDM's code at one dtype (median over the timing windows)."""
    EDMPrecond, EDMLoss, edm_sampler = edm
    device = torch.device('cuda' if cuda else 'cpu')
    use_fp16 = dtype == 'bfloat16'
    loss_scaling = 100.0 if use_fp16 else 1.0  # EDM's ImageNet-64 command: --fp16=1 --ls=100
    torch.manual_seed(0)
    c, r, n, label_dim = spec['img_channels'], spec['img_resolution'], spec['batch'], spec['label_dim']
    net = EDMPrecond(img_resolution=r, img_channels=c, label_dim=label_dim, use_fp16=use_fp16,
                     model_type=spec['model_type'], **spec['model_kwargs']).train().requires_grad_(True).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn, optimizer = EDMLoss(), torch.optim.Adam(net.parameters(), lr=spec['lr'], betas=(0.9, 0.999), eps=1e-8)

    def one_hot(m):
        return torch.eye(label_dim, device=device)[torch.arange(m, device=device) % label_dim] if label_dim else None
    images, labels = torch.rand([n, c, r, r], device=device) * 2 - 1, one_hot(n)
    cur_nimg = 0

    def train_step():  # training/training_loop.py: one accumulation round, no augmentation, no DDP
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

    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def windows(fn, count, reps):
        out = []
        for _ in range(count):
            sync()
            with Meter() as m:
                for _ in range(reps):
                    fn()
                sync()
            out.append({'seconds': m.seconds, 'other_cores': m.other})
        return out

    for _ in range(spec['warmup'] + 1):  # +1: as jaxdiff's first (compiling) call is left out
        train_step()
    train = windows(train_step, spec['windows'], spec['steps'])
    sb = spec['sample_batch']
    latents, sample_labels = torch.randn([sb, c, r, r], device=device), one_hot(sb)
    draw = lambda: edm_sampler(ema, latents, sample_labels, num_steps=spec['num_steps'])
    first = windows(draw, 1, 1)[0]['seconds']
    sample = windows(draw, spec['sample_windows'], 1)
    float32 = 'float32, TF32 ' + ('on' if cuda and spec.get('allow_tf32') else 'off')
    precision = ('float16 (use_fp16)' if cuda else 'float32 (use_fp16 is CUDA-only)') if use_fp16 else float32
    return {'precision': precision,
            'params': sum(p.numel() for p in net.parameters()), 'batch': n, 'sample_batch': sb,
            'train_img_s': statistics.median(spec['steps'] * n / w['seconds'] for w in train), 'train_windows': train,
            'sample_img_s': statistics.median(sb / w['seconds'] for w in sample), 'sample_windows': sample,
            'sample_first_call_s': first, 'peak_memory_bytes': torch.cuda.max_memory_allocated() if cuda else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--edm', required=True, help='path of an NVlabs/edm checkout')
    p.add_argument('--spec', required=True, help='the network, batch and timing settings, as JSON')
    args = p.parse_args()
    print(json.dumps(edm_worker(args.edm, json.loads(args.spec))), flush=True)


if __name__ == '__main__':
    main()
