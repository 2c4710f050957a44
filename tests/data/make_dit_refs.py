"""Record facebookresearch/DiT's `DiT` (models.py) on fixed weights and inputs, for
tests/nets/test_dit.py. The project's tests never import torch.

DiT is not on PyPI and its licence is non-commercial: nothing of it is copied here. Point DIT at
a directory holding its `models.py` (e.g. `git --git-dir=<DiT clone>/.git archive HEAD models.py
| tar -x -C /tmp/dit`); this script imports it and calls it. DiT imports timm's PatchEmbed,
Attention and Mlp: install timm without dependencies (`pip install --no-deps timm`, plus
pyyaml, huggingface_hub and safetensors if missing). timm imports torchvision at module level
(transforms, FrozenBatchNorm2d) but none of the three layers uses it; a torchvision wheel that
does not match the installed torch fails to load, so this script installs a stub `torchvision`
(every attribute a dummy class) before importing timm. Run with the torch of
tests/data/make_gaussian_refs.py:

    DIT=/tmp/dit DIT_COMMIT=<sha> /work/refvenv/bin/python tests/data/make_dit_refs.py

Weights. DiT-S/2 has 33M parameters (130 MB), too many to ship, so every tensor is drawn from a
counter-based generator (`hashed_uniform`: splitmix64 of the tensor name's CRC-32 and the element
index, pure uint64 arithmetic, reproducible by any numpy) that tests/nets/test_dit.py repeats;
the file keeps each tensor's shape and a fingerprint (sum, sum of |w|, first values) so the
test can tell a generator mismatch from a network mismatch. Draws: linear and patch weights
xavier-uniform (DiT's own init), every bias U(-0.2, 0.2) and the label table U(-0.5, 0.5), and,
unlike DiT's zero init, random adaLN modulations and final layer, so every block contributes.

Configurations (NCHW in torch, stored NHWC; learn_sigma, so 2 * in_channels outputs):
  s2    DiT-S/2 (hidden 384, depth 12, 6 heads) at 32x32x4, 10 classes (+ DiT's null row)
  tiny  patch 4, hidden 64, depth 2, 2 heads, mlp_ratio 2, 16x16x3, 5 classes (+ null row)
Arrays, per config: {cfg}/shape/{name}, {cfg}/fingerprint/{name}, {cfg}/x (NHWC), {cfg}/t,
{cfg}/y (class indices), {cfg}/f32/out and {cfg}/f64/out (NHWC), and for tiny also
tiny/null/out (float32 output with DiT's null label, `force_drop_ids`). f64 runs DiT in float64
with two helpers that DiT fixes to float32 recomputed in float64 (the same formulas): the
timestep features (`t.float()`, float32 frequencies) and the pos_embed buffer.
Also: freqs (DiT's float32 timestep frequencies), tiny/pos_embed (DiT's float64
`get_2d_sincos_pos_embed(64, 4)`) and param_counts/{DiT-S/2,...}: DiT's parameter count (as
its train.py prints it, pos_embed and the null label row included) at 32x32x4, 1000 classes.
"""
import importlib.abc
import importlib.machinery
import json
import math
import os
import pathlib
import sys
import types
import zlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).parent / 'nets' / 'dit_ref.npz'


class _AnyAttribute(type):
    def __getattr__(cls, name):
        if name.startswith('__'):
            raise AttributeError(name)
        sub = _AnyAttribute(name, (cls,), {})  # A distinct class per name (timm uses some as dict keys).
        setattr(cls, name, sub)
        return sub


class _Stub(metaclass=_AnyAttribute):
    def __init__(self, *args, **kwargs):
        raise RuntimeError('torchvision is a stub here (tests/data/make_dit_refs.py)')


class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of torchvision and its submodules give modules whose every attribute is a stub."""

    def find_spec(self, name, path=None, target=None):
        if name == 'torchvision' or name.startswith('torchvision.'):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def getattr_(attr):
            if attr.startswith('__'):
                raise AttributeError(attr)
            return _Stub
        module.__getattr__ = getattr_
        return module

    def exec_module(self, module):
        pass


def hashed_uniform(seed_name, shape):
    """U(-1, 1) draws, float64: splitmix64 of (crc32(seed_name) * golden + index) mapped to 53 bits.
    tests/nets/test_dit.py has the same function."""
    n = int(np.prod(shape))
    offset = (zlib.crc32(seed_name.encode()) * 0x9E3779B97F4A7C15) % 2**64
    z = np.arange(n, dtype=np.uint64) + np.uint64(offset)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0).reshape(shape)


def draw_weight(cfg, name, shape):
    """The float32 value of state-dict entry `name` of config `cfg` (the test repeats this rule)."""
    if name.endswith('embedding_table.weight'):
        bound = 0.5
    elif name.endswith('.weight'):  # Linear [out, in] or patch conv [out, in, p, p]: xavier as DiT.
        fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
        bound = math.sqrt(6 / (fan_in + fan_out))
    else:
        bound = 0.2
    return (bound * hashed_uniform(f'{cfg}/{name}', shape)).astype(np.float32)


def fingerprint(w):
    w = np.asarray(w, np.float64).ravel()
    return np.concatenate([[w.sum(), np.abs(w).sum()], w[:4]])


def timestep_embedding_float64(t, dim, max_period=10000):
    """DiT's `TimestepEmbedder.timestep_embedding` without its float32 casts."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float64) / half)
    args = t[:, None].double() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


CONFIGS = {
    's2': dict(model='DiT-S/2', kwargs=dict(input_size=32, in_channels=4, num_classes=10, learn_sigma=True),
               t=[0.0, 17.5, 500.0, 999.0], y=[3, 0, 9, 5]),
    'tiny': dict(model=None, kwargs=dict(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=2,
                                         num_heads=2, mlp_ratio=2.0, num_classes=5, learn_sigma=True),
                 t=[3.0, 250.25, 998.0], y=[4, 1, 2]),
}


def main():
    sys.meta_path.insert(0, _StubTorchvision())
    sys.path.insert(0, os.environ['DIT'])
    import models  # noqa: E402  (DiT's models.py)
    import timm  # noqa: E402

    torch.set_num_threads(1)
    out = {}
    for cfg, spec in CONFIGS.items():
        build = models.DiT_models[spec['model']] if spec['model'] else models.DiT
        net = build(**spec['kwargs']).eval()
        state = {}
        for name, value in net.state_dict().items():
            if name == 'pos_embed':
                continue
            state[name] = draw_weight(cfg, name, tuple(value.shape))
            out[f'{cfg}/shape/{name}'] = np.array(value.shape, np.int64)
            out[f'{cfg}/fingerprint/{name}'] = fingerprint(state[name])
        missing = net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        assert list(missing.missing_keys) == ['pos_embed'] and not missing.unexpected_keys, missing

        res, channels = spec['kwargs']['input_size'], spec['kwargs']['in_channels']
        rng = np.random.default_rng(zlib.crc32(cfg.encode()))
        x = rng.standard_normal((len(spec['t']), res, res, channels)).astype(np.float32)
        t, y = np.array(spec['t'], np.float32), np.array(spec['y'], np.int64)
        out.update({f'{cfg}/x': x, f'{cfg}/t': t, f'{cfg}/y': y})
        nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        nhwc = lambda a: a.detach().numpy().transpose(0, 2, 3, 1)
        with torch.no_grad():
            out[f'{cfg}/f32/out'] = nhwc(net(nchw, torch.from_numpy(t), torch.from_numpy(y)))
            if cfg == 'tiny':  # Index num_classes is DiT's null (unconditional) label.
                null = torch.full_like(torch.from_numpy(y), net.y_embedder.num_classes)
                out[f'{cfg}/null/out'] = nhwc(net(nchw, torch.from_numpy(t), null))
            net = net.double()
            grid = int(net.x_embedder.num_patches ** 0.5)
            net.pos_embed.data.copy_(torch.from_numpy(models.get_2d_sincos_pos_embed(net.pos_embed.shape[-1], grid))[None])
            original = models.TimestepEmbedder.__dict__['timestep_embedding']  # The staticmethod.
            models.TimestepEmbedder.timestep_embedding = staticmethod(timestep_embedding_float64)
            out[f'{cfg}/f64/out'] = nhwc(net(nchw.double(), torch.from_numpy(t).double(), torch.from_numpy(y)))
            models.TimestepEmbedder.timestep_embedding = original

    half = 128  # DiT's timestep frequencies, exactly as `timestep_embedding` forms them.
    out['freqs'] = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half).numpy()
    out['tiny/pos_embed'] = models.get_2d_sincos_pos_embed(64, 4)

    for name, build in models.DiT_models.items():
        with torch.device('meta'):
            net = build(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
        out[f'param_counts/{name}'] = np.array(sum(p.numel() for p in net.parameters()), np.int64)

    meta = dict(torch=torch.__version__, timm=timm.__version__,
                dit='github.com/facebookresearch/DiT models.py at ' + os.environ.get('DIT_COMMIT', '(commit not given)'))
    out['meta/json'] = np.array(json.dumps(meta))
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **out)
    print('wrote', OUT, f'{OUT.stat().st_size / 1e6:.2f} MB')


if __name__ == '__main__':
    main()
