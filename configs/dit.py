"""Diffusion transformers (Peebles & Xie 2023) in pixel space: `--config=configs/dit.py[:<preset>]`.

DiT's diffusion is iDDPM's: linear betas with T = 1000, learned-range variance trained with
L_simple + 0.001 L_vlb, class labels dropped with probability 0.1 for classifier-free guidance,
Adam(W without weight decay) at 1e-4, EMA 0.9999, no warm-up. These presets run it on pixels
(method 'ddpm', `jaxdiff/nets/dit.py`), not on Stable Diffusion's VAE latents.

  (default)  digits16: DiT-S/2 (32M) on the digits upsampled to 16x16, class-conditional, 64 tokens.
             Sized for a GPU (about 1.4 GFLOP per forward pass; a 2-core CPU trains it at a few
             images/s); sampled with the learned-range ancestral step on 50 respaced steps and
             scored at guidance 1, 1.5, 2, 3. `configs/ddpm.py:digits_dit` is the CPU-sized DiT.
  imagenet64 ImageNet 64x64 in pixels, DiT-XL/4: 256 tokens, the token count (and so about the
             compute) of the paper's DiT-XL/2 on 256-px latents; batch 256, 400k steps (the paper's
             Table 4 runs), bf16 compute, guidance 1.5 (the paper's FID setting) with 250 ancestral
             steps. `--config.model.kwargs.hidden_size=768 --config.model.kwargs.depth=12
             --config.model.kwargs.num_heads=12` is DiT-B/4. Not run here (needs a GPU and the data).
"""
import ml_collections

from configs import ddpm, default
from jaxdiff.nets.dit import DIT_SIZES


def _dit(c, size: str, patch_size: int):
    c.process = ddpm._discrete('linear', 1000)
    c.model.type = 'dit'
    c.model.kwargs = ml_collections.ConfigDict(dict(patch_size=patch_size, **DIT_SIZES[size]))
    c.model.learned_variance = True
    c.loss.vlb_weight = 0.001
    c.model.label_dropout = 0.1
    c.data.use_labels = True
    c.sample.solver = 'ancestral'
    c.sample.discretization = 'ddpm'
    c.sample.spacing = 'linspace'
    c.sample.variance = 'learned_range'


def digits16(c):
    ddpm.digits(c)
    c.data.resolution = 16
    _dit(c, 'S', 2)
    c.optim.lr = 5e-4  # the digits preset's 2e-3 is high for a transformer; 5e-4 is a guess, not tuned
    c.sample.num_steps = 50
    c.eval.guidance_sweep = (1.0, 1.5, 2.0, 3.0)


def imagenet64(c):
    c.data.name, c.data.resolution, c.data.channels = 'imagenet_resized/64x64', 64, 3
    _dit(c, 'XL', 4)
    c.model.dtype = 'bfloat16'
    c.optim.lr, c.optim.warmup_images, c.ema.rampup_ratio = 1e-4, 0, 0.0
    c.train.batch_size = 256
    c.train.total_images = 400_000 * 256
    c.ema.halflife_images = 1_774_000  # a decay of 0.9999 per step of 256 images
    c.sample.num_steps = 250
    c.sample.guidance = 1.5
    c.eval.num_samples, c.eval.seed_sets = 50_000, 1


PRESETS = {'digits16': digits16, 'imagenet64': imagenet64}


def get_config(preset: str = 'digits16') -> ml_collections.ConfigDict:
    c = default.from_preset(PRESETS, preset or 'digits16', 'configs/dit.py', before=ddpm._ddpm_fields)
    c.method = 'ddpm'
    return c
