"""Record SongUNet references for the options the shared EDM refs do not cover.

The shared refs (tests/data/edm) exercise the standard and residual encoders with the standard
decoder only. This script runs NVlabs/edm's own `SongUNet` (PyTorch, float32, eval mode) on tiny
random networks with `encoder_type='skip'` and/or `decoder_type='skip'` and stores, per config,
the state dict, the inputs and the output in tests/data/edm_extra/songunet_skip.npz.

It needs PyTorch and an EDM checkout; the tests only read the npz. For example:

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy
    git -C /path/to/edm show HEAD:training/networks.py > /tmp/edm_networks.py
    /tmp/torchenv/bin/python tests/data/make_songunet_skip_ref.py --networks /tmp/edm_networks.py

Layout (NCHW, as the shared refs): `<cfg>/params/<state-dict name>`, `<cfg>/x`,
`<cfg>/noise_labels`, `<cfg>/class_labels`, `<cfg>/augment_labels`, `<cfg>/F`; `meta/json`
holds each config's constructor kwargs, the torch version and the sha256 of networks.py.
Parameters are randomised as in the shared refs (weights N(0, 1/fan_in), GroupNorm weights
1 + 0.1 N(0, 1), other 1-D parameters 0.1 N(0, 1)) so that every path, including the
near-zero-initialised output convolutions, contributes O(1) to the output.
"""
import argparse
import hashlib
import json
import pathlib
import sys
import types

import numpy as np
import torch

CONFIGS = {
    # Both skip paths, a 4-tap filter, three levels (two aux_down and two aux_up steps),
    # class and augmentation labels, and out_channels != in_channels.
    'skip_skip': dict(
        img_resolution=8, in_channels=3, out_channels=2, label_dim=4, augment_dim=3,
        model_channels=8, channel_mult=[1, 2, 1], channel_mult_emb=1, num_blocks=1,
        attn_resolutions=[4], dropout=0.1, embedding_type='positional', channel_mult_noise=1,
        encoder_type='skip', decoder_type='skip', resample_filter=[1, 3, 3, 1]),
    # NCSN++-style residual encoder with the skip decoder, Fourier embedding, two blocks per level.
    'residual_skip': dict(
        img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 1],
        channel_mult_emb=1, num_blocks=2, attn_resolutions=[8], dropout=0.1,
        embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
        decoder_type='skip', resample_filter=[1, 1]),
}
BATCH = 3
NOISE_LABELS = [-1.3, 0.25, 2.0]


def load_edm_networks(path: pathlib.Path):
    """Import EDM's networks.py with `torch_utils.persistence` stubbed out (it only pickles)."""
    persistence = types.ModuleType('torch_utils.persistence')
    persistence.persistent_class = lambda cls: cls
    torch_utils = types.ModuleType('torch_utils')
    torch_utils.persistence = persistence
    sys.modules.setdefault('torch_utils', torch_utils)
    sys.modules.setdefault('torch_utils.persistence', persistence)
    module = types.ModuleType('edm_networks')
    exec(compile(path.read_text(), str(path), 'exec'), module.__dict__)
    return module


def randomise(net: torch.nn.Module, norm_type: type, gen: torch.Generator) -> None:
    norm_weights = {id(m.weight) for m in net.modules() if isinstance(m, norm_type)}
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))
            elif id(p) in norm_weights:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = pathlib.Path(__file__).resolve().parent
    parser.add_argument('--networks', required=True, type=pathlib.Path, help="EDM's training/networks.py")
    parser.add_argument('--out', default=here / 'edm_extra' / 'songunet_skip.npz', type=pathlib.Path)
    parser.add_argument('--seed', default=2024, type=int)
    args = parser.parse_args()

    edm = load_edm_networks(args.networks)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # EDM's own initialisation draws from the global generator.
    arrays, meta = {}, {'configs': CONFIGS, 'batch': BATCH, 'torch_version': torch.__version__,
                        'networks_py_sha256': hashlib.sha256(args.networks.read_bytes()).hexdigest()}
    for cfg, kwargs in CONFIGS.items():
        net = edm.SongUNet(**kwargs).eval()
        randomise(net, edm.GroupNorm, gen)
        res, cin = kwargs['img_resolution'], kwargs['in_channels']
        x = torch.randn([BATCH, cin, res, res], generator=gen)
        noise = torch.tensor(NOISE_LABELS, dtype=torch.float32)
        labels = augment = None
        if kwargs.get('label_dim'):
            labels = torch.nn.functional.one_hot(torch.arange(BATCH) % kwargs['label_dim'],
                                                 kwargs['label_dim']).float()
        if kwargs.get('augment_dim'):
            augment = torch.randn([BATCH, kwargs['augment_dim']], generator=gen)
        with torch.no_grad():
            out = net(x, noise, labels, augment)
        for name, value in net.state_dict().items():
            arrays[f'{cfg}/params/{name}'] = value.numpy().astype(np.float32)
        arrays[f'{cfg}/x'] = x.numpy()
        arrays[f'{cfg}/noise_labels'] = noise.numpy()
        if labels is not None:
            arrays[f'{cfg}/class_labels'] = labels.numpy()
        if augment is not None:
            arrays[f'{cfg}/augment_labels'] = augment.numpy()
        arrays[f'{cfg}/F'] = out.numpy()
        print(f'{cfg}: {sum(p.numel() for p in net.parameters())} parameters, |F| max {out.abs().max():.3g}')
    arrays['meta/json'] = np.array(json.dumps(meta))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f'wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)')


if __name__ == '__main__':
    main()
