"""Check jaxdiff.nets.edm_pickle and the test writer against pickles written by torch + NVlabs/edm.

Not part of the test suite: it needs torch and a checkout of NVlabs/edm (whose code is not part
of this project and is only imported from the path given). Two steps, in two environments:

    # 1. With torch (e.g. torch==2.13.0 CPU) and numpy; EDM's dnnlib needs `requests`, which is
    #    stubbed here because nothing is downloaded.
    python tests/data/make_real_edm_pickle_check.py write --edm /path/to/edm --out /tmp/edm_pkls
    # 2. In the project's environment (no torch needed):
    python tests/data/make_real_edm_pickle_check.py check --out /tmp/edm_pkls

`write` builds small EDMPrecond/VPPrecond/VEPrecond(SongUNet) and iDDPMPrecond(DhariwalUNet)
networks through EDM's own `construct_class_by_name`, with random weights, and pickles snapshots
the way EDM's training loop does (deep copies in eval mode without gradients, in a dict with
ema/loss_fn/augment_pipe/dataset_kwargs). It also writes one network with extra buffers (bf16
transposed, uint16, shared storage with offsets, non-persistent, Python attributes on tensors).
Next to each `X.pkl` it saves `net.state_dict()` as `X.pkl.state.npz` (bf16 as raw int16 bits).
Then it re-writes every real snapshot with tests/nets/edm_pickle_writer.py (giving it the real
module source), loads that with real `pickle.load`, and compares state dicts and outputs, and
the symbolic structure (globals, calls, storage blobs) of both pickles.

`check` loads every `X.pkl` with `load_edm_pickle` and requires bit-equal arrays, in order.
"""
import argparse
import collections
import copy
import glob
import io
import os
import pathlib
import pickle
import pickletools
import sys
import types

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SNAPSHOTS = {
    'edm_songunet': dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
                         embedding_type='fourier', encoder_type='residual',
                         decoder_type='standard', channel_mult_noise=2,
                         resample_filter=[1, 3, 3, 1], label_dim=0),
    'vp_songunet': dict(class_name='training.networks.VPPrecond', model_type='SongUNet',
                        embedding_type='positional', encoder_type='standard',
                        decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                        augment_dim=9, use_fp16=True, label_dim=0),
    've_songunet': dict(class_name='training.networks.VEPrecond', model_type='SongUNet',
                        embedding_type='fourier', encoder_type='skip', decoder_type='skip',
                        channel_mult_noise=2, resample_filter=[1, 3, 3, 1], label_dim=0),
    'iddpm_dhariwal': dict(class_name='training.networks.iDDPMPrecond',
                           model_type='DhariwalUNet', label_dim=10),
}
COMMON = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
              dropout=0.1, img_resolution=16, img_channels=3)


# ------------------------------------------------------------------------------------------
# Step 1 (torch + EDM).
# ------------------------------------------------------------------------------------------

def import_edm(edm: str):
    sys.modules.setdefault('requests', types.ModuleType('requests'))  # Only used to download.
    sys.path.insert(0, edm)
    import dnnlib  # noqa: F401  (EDM's, from the path above)
    return sys.modules['dnnlib']


def snapshot_dict(torch, dnnlib, net, augment: bool) -> dict:
    """What EDM's training loop pickles, built the same way (deep copies, eval, no grad)."""
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ema.parameters():
            p.copy_(torch.randn_like(p))  # EDM zero-initialises some layers; make them all vary.
    construct = dnnlib.util.construct_class_by_name
    data = dict(ema=ema, loss_fn=construct(class_name='training.loss.EDMLoss'),
                augment_pipe=construct(class_name='training.augment.AugmentPipe', p=0.12,
                                       xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
                                       translate_frac=1) if augment else None,
                dataset_kwargs=dict(dnnlib.EasyDict(
                    class_name='training.dataset.ImageFolderDataset', path='x.zip',
                    use_labels=False)))
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
    return data


def save(torch, data: dict, path: pathlib.Path) -> None:
    with open(path, 'wb') as f:
        pickle.dump(data, f)
    state = {}
    for key, value in data['ema'].state_dict().items():
        if value.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the raw bits.
            value = value.contiguous().view(torch.int16)
        state[key] = value.numpy()
    np.savez(str(path) + '.state.npz', **state)


def add_odd_buffers(torch, net) -> None:
    """Tensors that exercise strides, offsets, shared storages and rarer reducers."""
    m = net.model
    m.register_buffer('x_bf16', torch.randn(3, 5).to(torch.bfloat16).t())
    m.register_buffer('x_u16', torch.tensor([[0, 1, 2], [3, 4, 65535]]).to(torch.uint16))
    base = torch.arange(20, dtype=torch.float64)
    m.register_buffer('x_shared_a', base[2:8].view(2, 3))
    m.register_buffer('x_shared_b', base[5:].view(3, 5)[:, ::2])
    m.register_buffer('x_nonpersistent', torch.ones(2), persistent=False)
    m.register_buffer('x_empty', torch.zeros(0, 3))
    m.register_buffer('x_scalar', torch.tensor(7))
    m.register_buffer('x_half', torch.randn(4, 4).half()[1:, ::2])
    p = torch.nn.Parameter(torch.randn(2, 2), requires_grad=False)
    p.note = 'python attribute'  # -> _rebuild_parameter_with_state
    m.x_param_state = p
    t = torch.randn(3)
    t.note = 'python attribute'  # -> _rebuild_from_type_v2
    m.register_buffer('x_tensor_attr', t)


def write(args) -> None:
    import torch
    dnnlib = import_edm(args.edm)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, kwargs in SNAPSHOTS.items():
        net = dnnlib.util.construct_class_by_name(**COMMON, **kwargs)
        save(torch, snapshot_dict(torch, dnnlib, net, augment='songunet' in name),
             out / f'{name}.pkl')
    net = dnnlib.util.construct_class_by_name(**dict(COMMON, channel_mult=[1]),
                                              **SNAPSHOTS['edm_songunet'])
    net = copy.deepcopy(net).eval().requires_grad_(False)
    add_odd_buffers(torch, net)
    save(torch, dict(ema=net), out / 'odd_buffers.pkl')
    for fmt in ('zip', 'legacy'):  # Bare storage blobs in both torch.save formats.
        blob = io.BytesIO()
        torch.save(torch.arange(5, dtype=torch.float32).untyped_storage(), blob,
                   _use_new_zipfile_serialization=fmt == 'zip')
        (out / f'storage_{fmt}.bin').write_bytes(blob.getvalue())
    for name in SNAPSHOTS:
        compare_writer(torch, out / f'{name}.pkl')


def to_writer(torch, W, obj):
    """The test writer's description of a real EDM object (module source included)."""
    def tensor(t, parameter):
        storage = t.untyped_storage()
        flat = np.frombuffer(bytes(storage), dtype=t.numpy().dtype).copy()
        return W.Tensor(W.Storage(flat, key=str(storage._cdata)), t.storage_offset(),
                        tuple(t.shape), t.stride(), parameter)

    cls = type(obj)
    persistent = hasattr(cls, '_orig_module_src')
    if isinstance(obj, torch.nn.Module):
        d = vars(obj)
        node = W.Module(
            getattr(cls, '_orig_class_name', cls.__name__),
            params={k: v if v is None else tensor(v, True) for k, v in d['_parameters'].items()},
            buffers={k: v if v is None else tensor(v, False) for k, v in d['_buffers'].items()},
            children={k: to_writer(torch, W, v) for k, v in d['_modules'].items()},
            attrs={k: v for k, v in d.items()
                   if k not in W.MODULE_BOILERPLATE and k not in ('_init_args', '_init_kwargs')},
            persistent=persistent,
            non_persistent_buffers=frozenset(d['_non_persistent_buffers_set']))
    elif persistent:
        d = vars(obj)
        node = W.PersistentObject(cls._orig_class_name, attrs={
            k: v for k, v in d.items() if k not in ('_init_args', '_init_kwargs')})
    else:
        return obj
    if persistent:
        node.module_src = cls._orig_module_src
        node.init_args = d['_init_args']
        node.init_kwargs = d['_init_kwargs']
    return node


class _Call:
    """A call recorded by the symbolic unpickler."""

    def __init__(self, name, args):
        self.name, self.args, self.state = name, args, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f'{self.name}{self.args!r}' + ('' if self.state is None else f'<{self.state!r}>')


def _blob_structure(blob: bytes) -> tuple:
    """Opcodes of a legacy storage blob (memo ops and storage keys masked) and its raw data."""
    f, ops = io.BytesIO(blob), []
    for _ in range(5):
        for op, arg, _pos in pickletools.genops(f):
            if op.name not in ('BINPUT', 'BINGET', 'MEMOIZE'):
                ops.append((op.name, 'KEY' if isinstance(arg, str) and arg.isdigit() else arg))
    return tuple(ops) + (blob[f.tell():],)


class _SymbolicUnpickler(pickle._Unpickler):
    """Unpickles into a tree of named calls; nothing is imported or run."""

    def find_class(self, module, name):
        full = f'{module}.{name}'
        self.seen[full] += 1

        def new(cls, *args):
            if full == 'torch.storage._load_from_bytes':
                args = (_blob_structure(args[0]),)
            return _Call(full, args)
        return type(full, (), {'__new__': new})


def structure(data: bytes):
    u = _SymbolicUnpickler(io.BytesIO(data))
    u.seen = collections.Counter()
    return repr(u.load()), dict(u.seen)


def compare_writer(torch, path: pathlib.Path) -> None:
    """Re-write a real snapshot with the test writer; real pickle.load must accept it."""
    sys.path.insert(0, str(HERE.parent / 'nets'))
    import edm_pickle_writer as W
    real_bytes = path.read_bytes()
    real = pickle.loads(real_bytes)
    written = W.dumps({k: to_writer(torch, W, v) for k, v in real.items()})
    (real_tree, real_globals), (w_tree, w_globals) = structure(real_bytes), structure(written)
    loaded = pickle.loads(written)
    net, ref = loaded['ema'], real['ema']
    sd, ref_sd = net.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    torch.manual_seed(1)
    x = torch.randn(2, ref.img_channels, ref.img_resolution, ref.img_resolution)
    labels = torch.eye(ref.label_dim)[:2] if ref.label_dim else None
    kwargs = dict(augment_labels=torch.randn(2, 9)) if ref.model.map_augment is not None else {}
    with torch.no_grad():
        diff = (net(x, torch.tensor([0.5, 3.0]), labels, **kwargs)
                - ref(x, torch.tensor([0.5, 3.0]), labels, **kwargs)).abs().max().item()
    print(f'{path.name}: writer output loads as {type(net).__name__}({type(net.model).__name__}), '
          f'state_dict equal, output max|diff| {diff}; same symbolic structure: '
          f'{real_tree == w_tree}; same globals: {real_globals == w_globals} '
          f'{sorted(real_globals)}')
    assert diff == 0 and real_tree == w_tree and real_globals == w_globals


# ------------------------------------------------------------------------------------------
# Step 2 (project environment, no torch).
# ------------------------------------------------------------------------------------------

def check(args) -> None:
    from jaxdiff.nets.edm_pickle import _load_storage_blob, load_edm_pickle
    out = pathlib.Path(args.out)
    for path in sorted(glob.glob(str(out / '*.pkl'))):
        loaded = load_edm_pickle(path)
        ref = np.load(path + '.state.npz')
        assert list(loaded.state_dict) == list(ref.files), path
        for key in ref.files:
            got, want = loaded.state_dict[key], ref[key]
            if str(got.dtype) == 'bfloat16':
                got = got.view(np.int16)
            assert got.dtype == want.dtype and got.shape == want.shape, key
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key
        print(f'{os.path.basename(path)}: {len(ref.files)} arrays bit-equal; {loaded.precond} '
              f'{loaded.precond_kwargs}; {loaded.model_type} {loaded.model_kwargs}')
    for fmt in ('zip', 'legacy'):
        storage = _load_storage_blob((out / f'storage_{fmt}.bin').read_bytes())
        assert storage.array.view(np.float32).tolist() == [0, 1, 2, 3, 4], fmt
    assert 'torch' not in sys.modules
    print('all checks passed; torch was not imported')


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('step', choices=('write', 'check'))
    parser.add_argument('--edm', help='path of an NVlabs/edm checkout (write step)')
    parser.add_argument('--out', required=True, help='folder for the pickles')
    args = parser.parse_args()
    if args.step == 'write':
        if not args.edm:
            parser.error('write needs --edm')
        write(args)
    else:
        check(args)


if __name__ == '__main__':
    main()
