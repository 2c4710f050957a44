"""Record reference outputs of the ConvNeXt U-Net ("TwoResUNet" of the DDPM-from-scratch tutorials).

The reference is a PyTorch module written in this script from the architecture description in
jaxdiff/nets/convnext_unet.py (itself the tutorial's network plus a class-label embedding); it
exists only here. Its submodules carry the Flax module's parameter names, so its state dict
loads through `jaxdiff.nets.convert.params_from_state_dict`. Each net is randomised with a fixed
seed (weights N(0, 1/fan_in), GroupNorm weights 1 + 0.1 N(0, 1), other 1-D parameters
0.1 N(0, 1)) and run in eval mode on fixed inputs.

    /work/refvenv/bin/python tests/data/make_convnext_refs.py     # torch, einops, numpy

Layout of tests/data/nets/convnext_ref.npz (images NHWC, parameters in PyTorch layout):
  meta/json                    torch version, seed, per net its constructor kwargs, per call its
                               net, kwargs and whether labels are passed, parameter counts
  params/<net>/<state-dict key>
  inputs/x<res>                [N, res, res, 3] float32
  inputs/noise_labels          [N] (EDM-like small labels and DDPM step indices up to 999)
  inputs/class_labels          [N, 5] one-hot rows and one all-zero row (the null label)
  out/<call>/f32, out/<call>/f64   the reference output in float32 (and float64 where recorded)
"""
import argparse
import json
import pathlib

import einops
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

MAX_PERIOD = 10000
BATCH = 4
NOISE_LABELS = [-1.3, 0.25, 17.0, 999.0]
LABEL_DIM = 5

# Nets (constructor kwargs of jaxdiff's ConvNeXtUNet) and the calls recorded with them. `deep_plain`
# reuses the weights of `deep` without the label embedding and the gates; `deep` uses ConvNeXt
# expansion mult=1 (also keeping the file under 2 MB).
NETS = {
    'small': dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2]),
    'small_cond_gated': dict(img_resolution=16, in_channels=3, out_channels=6, label_dim=LABEL_DIM,
                             model_channels=8, channel_mult=[1, 2], use_skip_attention=True),
    'deep': dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=LABEL_DIM, model_channels=4,
                 channel_mult=[1, 2, 4, 8], mult=1, use_skip_attention=True),
}
CALLS = {
    'small': dict(net='small', labels=False, f64=False),
    'small_cond_gated': dict(net='small_cond_gated', labels=True, f64=True),
    'deep_cond_gated': dict(net='deep', labels=True, f64=False),
    'deep_plain': dict(net='deep', labels=False, f64=False, overrides=dict(label_dim=0, use_skip_attention=False)),
}
# The tutorial's default network: TwoResUNet(dim=64, channels=3) and its AttentionUNet twin.
TUTORIAL_DEFAULT = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=64,
                        channel_mult=[1, 2, 4, 8])


class Block(nn.Module):
    """ConvNeXt block: dwconv7x7 + Dense(GELU(emb)) -> GN1 -> conv3x3 (mult*out) -> GELU -> GN1 -> conv3x3, + res."""

    def __init__(self, cin, cout, emb_dim, mult):
        super().__init__()
        self.dwconv = nn.Conv2d(cin, cin, 7, padding=3, groups=cin)
        self.emb_proj = nn.Linear(emb_dim, cin)
        self.norm0 = nn.GroupNorm(1, cin)
        self.conv0 = nn.Conv2d(cin, cout * mult, 3, padding=1)
        self.norm1 = nn.GroupNorm(1, cout * mult)
        self.conv1 = nn.Conv2d(cout * mult, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):
        h = self.dwconv(x) + self.emb_proj(F.gelu(emb))[:, :, None, None]
        h = self.conv1(self.norm1(F.gelu(self.conv0(self.norm0(h)))))
        return h + (self.skip(x) if self.skip is not None else x)


class Gate(nn.Module):
    """skip * sigmoid(conv1x1 -> 1 channel of ReLU(conv1x1(g) + conv1x1(skip)))."""

    def __init__(self, g_channels, skip_channels):
        super().__init__()
        self.gate_conv = nn.Conv2d(g_channels, g_channels, 1)
        self.skip_conv = nn.Conv2d(skip_channels, g_channels, 1)
        self.attn_conv = nn.Conv2d(g_channels, 1, 1)

    def forward(self, g, skip):
        return skip * torch.sigmoid(self.attn_conv(F.relu(self.gate_conv(g) + self.skip_conv(skip))))


class Reference(nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=64,
                 channel_mult=(1, 2, 4, 8), mult=2, use_skip_attention=False):
        super().__init__()
        c = model_channels
        self.c, self.levels, self.gated = c, len(channel_mult), use_skip_attention
        widths = [c] + [c * m for m in channel_mult]
        self.init_conv = nn.Conv2d(in_channels, c, 7, padding=3)
        self.time_mlp0 = nn.Linear(c, 4 * c)
        self.time_mlp1 = nn.Linear(4 * c, 4 * c)
        self.label_embed = nn.Linear(label_dim, 4 * c, bias=False) if label_dim else None
        last = self.levels - 1
        for l in range(self.levels):
            for i in range(2):
                self.add_module(f'enc{l}_block{i}', Block(widths[l], widths[l], 4 * c, mult))
            if l < last:
                self.add_module(f'enc{l}_down', nn.Conv2d(4 * widths[l], widths[l + 1], 1))
            else:
                self.add_module(f'enc{l}_conv', nn.Conv2d(widths[l], widths[l + 1], 3, padding=1))
        self.mid_block0 = Block(widths[-1], widths[-1], 4 * c, mult)
        self.mid_block1 = Block(widths[-1], widths[-1], 4 * c, mult)
        for l in range(self.levels):
            if use_skip_attention:
                self.add_module(f'dec{l}_gate', Gate(widths[l + 1], widths[l]))
            for i in range(2):
                self.add_module(f'dec{l}_block{i}', Block(widths[l + 1] + widths[l], widths[l + 1], 4 * c, mult))
            self.add_module(f'dec{l}_up' if l > 0 else 'dec0_conv', nn.Conv2d(widths[l + 1], widths[l], 3, padding=1))
        self.final_block = Block(2 * c, c, 4 * c, mult)
        self.final_conv = nn.Conv2d(c, out_channels, 1)

    def forward(self, x, t, labels=None):
        half = self.c // 2
        freqs = np.exp(-np.log(MAX_PERIOD) * np.arange(half, dtype=np.float64) / (half - 1))
        arg = t[:, None] * torch.tensor(freqs, dtype=t.dtype)[None, :]
        emb = self.time_mlp1(F.gelu(self.time_mlp0(torch.cat([arg.sin(), arg.cos()], dim=1))))
        if self.label_embed is not None:
            emb = emb + self.label_embed(labels if labels is not None else
                                         torch.zeros(x.shape[0], self.label_embed.in_features, dtype=x.dtype))
        x = self.init_conv(x)
        r = x
        skips = []
        for l in range(self.levels):
            for i in range(2):
                x = getattr(self, f'enc{l}_block{i}')(x, emb)
                skips.append(x)
            if l < self.levels - 1:
                # Space-to-depth in the tutorial's channel order, written with einops as it is.
                x = einops.rearrange(x, 'b c (h p1) (w p2) -> b (c p1 p2) h w', p1=2, p2=2)
                x = getattr(self, f'enc{l}_down')(x)
            else:
                x = getattr(self, f'enc{l}_conv')(x)
        x = self.mid_block1(self.mid_block0(x, emb), emb)
        for l in reversed(range(self.levels)):
            for i in range(2):
                skip = skips.pop()
                if self.gated:
                    skip = getattr(self, f'dec{l}_gate')(x, skip)
                x = getattr(self, f'dec{l}_block{i}')(torch.cat([x, skip], dim=1), emb)
            if l > 0:
                x = getattr(self, f'dec{l}_up')(F.interpolate(x, scale_factor=2, mode='nearest'))
            else:
                x = self.dec0_conv(x)
        x = self.final_block(torch.cat([x, r], dim=1), emb)
        return self.final_conv(x)


def randomise(net, gen):
    norm_weights = {id(m.weight) for m in net.modules() if isinstance(m, nn.GroupNorm)}
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
    parser.add_argument('--out', default=here / 'nets' / 'convnext_ref.npz', type=pathlib.Path)
    parser.add_argument('--seed', default=2026, type=int)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    arrays = {}

    rng = np.random.default_rng(args.seed)
    inputs = {res: rng.standard_normal((BATCH, res, res, 3)).astype(np.float32)
              for res in sorted({kw['img_resolution'] for kw in NETS.values()})}
    labels = np.zeros((BATCH, LABEL_DIM), np.float32)
    labels[np.arange(BATCH - 1), rng.integers(0, LABEL_DIM, BATCH - 1)] = 1  # last row: the null label
    noise = np.asarray(NOISE_LABELS, np.float32)
    for res, x in inputs.items():
        arrays[f'inputs/x{res}'] = x
    arrays['inputs/noise_labels'], arrays['inputs/class_labels'] = noise, labels

    state_dicts = {}
    for name, kwargs in NETS.items():
        net = Reference(**kwargs)
        randomise(net, gen)
        state_dicts[name] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        for key, value in state_dicts[name].items():
            arrays[f'params/{name}/{key}'] = value.numpy().astype(np.float32)

    calls = {}
    for call, spec in CALLS.items():
        kwargs = dict(NETS[spec['net']], **spec.get('overrides', {}))
        net = Reference(**kwargs).eval()
        # Only the weights the variant has (deep_plain: no label embedding, no gates); strict on those.
        own = net.state_dict()
        net.load_state_dict({k: state_dicts[spec['net']][k] for k in own}, strict=True)
        for precision, dtype in (('f32', torch.float32), ('f64', torch.float64)):
            if precision == 'f64' and not spec['f64']:
                continue
            net = net.to(dtype)
            x = torch.tensor(inputs[kwargs['img_resolution']]).permute(0, 3, 1, 2).to(dtype)
            y = torch.tensor(labels).to(dtype) if spec['labels'] else None
            with torch.no_grad():
                out = net(x, torch.tensor(noise).to(dtype), y)
            arrays[f'out/{call}/{precision}'] = out.permute(0, 2, 3, 1).numpy()
            print(f'{call} {precision}: out {tuple(out.shape)}, max |out| {out.abs().max():.3g}')
        calls[call] = dict(net=spec['net'], kwargs=kwargs, labels=spec['labels'])

    counts = {name: sum(p.numel() for p in Reference(**dict(TUTORIAL_DEFAULT, use_skip_attention=gated)).parameters())
              for name, gated in (('tutorial_default', False), ('tutorial_default_gated', True))}
    meta = dict(torch=torch.__version__, seed=args.seed, nets=NETS, calls=calls, param_counts=counts)
    arrays['meta/json'] = np.asarray(json.dumps(meta))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f'param counts {counts}; wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)')


if __name__ == '__main__':
    main()
