"""EDM (Karras et al. 2022) training presets: `--config=configs/edm.py` or `configs/edm.py:<preset>`.

  (default)    DDPM++ (0.75M parameters) on the embedded sklearn digits, 8x8: trains on 200k
               images, samples and scores on 2 CPU cores in about 8 minutes.
  digits_cond  the digits class-conditional (label dropout 0.1), scored at guidance 1, 1.5, 2, 3.
  digits_convnext, digits_uvit, digits_dit  the digits on the other networks (`default.digits_network`).
  cifar10      the paper's unconditional CIFAR-10 setting (EDM preconditioning and loss, DDPM++).
  cifar10_cond the same, class-conditional.
  ffhq64       FFHQ 64x64, DDPM++ (paper: 40-step Heun sampling, 79 evaluations).
  afhqv2_64    AFHQv2 64x64, DDPM++.
  imagenet64   ImageNet 64x64, class-conditional ADM.

Evaluation of the non-digits presets follows EDM's FID protocol (NVlabs/edm README, "Calculating
FID": "In our paper, we calculated each FID three times and reported the minimum"): FID of 50,000
samples against reference statistics of the whole training set, with seeds 0-49999, 50000-99999
and 100000-149999, the minimum reported (`eval.num_samples = 50_000`, `eval.seed_sets = 3`;
eval_<step>.json keeps all three and their mean). Make the reference file once with `--mode=ref`
(or pass EDM's published .npz as `--config.eval.ref=PATH`) and give the Inception weights with
`--config.eval.inception_weights=PATH`.

The paper's runs use EDM's non-leaking augmentation pipeline (augment probability 0.12 for
CIFAR-10, 0.15 for FFHQ/AFHQv2); jaxdiff does not have it yet, so these presets train without
augmentation (`augment_p` records the paper's value; its conditioning input is off).
"""
import ml_collections

from configs import default



def digits(c):
    default.digits(c)
    # EDM's stochastic sampler (Algorithm 2) with churn between sigma 0.01 and 1: 40 steps, 79
    # network evaluations, about 12 s more than the deterministic 18 steps for 1,024 samples, and
    # a lower Frechet distance in all six training runs of section 7b (mean 2.82 vs 4.30 for
    # jaxdiff). Deterministic sampling: --config.sample.num_steps=18 --config.sample.S_churn=0.
    c.sample.num_steps = 40
    c.sample.S_churn = 40.0
    c.sample.S_min = 0.01
    c.sample.S_max = 1.0


def digits_convnext(c):
    """The ConvNeXt U-Net of the DDPM tutorials on the digits (0.83M; `default.digits_network`)."""
    digits(c)
    default.digits_network(c, 'convnext_unet')
    # 80k images, not 200k: about 310-360 img/s on 2 cores with the depthwise convs as shifted slices
    # (XLA:CPU's grouped convolution gave 136), against SongUNet's ~630 (benchmarks/RESULTS.md §11-12).
    c.train.total_images = 80_000


def digits_uvit(c):
    """Simple diffusion's U-ViT on the digits (0.83M; `default.digits_network`)."""
    digits(c)
    default.digits_network(c, 'uvit')


def digits_dit(c):
    """A small DiT (patch 2, hidden 128, depth 4) on the digits (1.27M; `default.digits_network`)."""
    digits(c)
    default.digits_network(c, 'dit')


def digits_cond(c):
    """Class-conditional digits, label dropout 0.1, scored at guidance 1, 1.5, 2 and 3; EDM's
    deterministic 18 Heun steps (35 evaluations, 70 when guided) to keep the sweep short."""
    digits(c)
    default.digits_cond(c)
    c.sample.num_steps, c.sample.S_churn = 18, 0.0


def cifar10(c):
    default.cifar10_data(c)
    c.model.kwargs = default.ddpmpp(128, (2, 2, 2), dropout=0.13)
    c.train.batch_size = 512
    c.train.total_images = 200_000_000
    c.optim.lr = 1e-3
    c.optim.warmup_images = 10_000_000
    c.ema.halflife_images = 500_000
    c.sample.num_steps = 18
    c.eval.num_samples, c.eval.seed_sets = 50_000, 3  # EDM's FID protocol (module docstring)
    c.augment_p = 0.12


def cifar10_cond(c):
    cifar10(c)
    c.data.use_labels = True


def ffhq64(c):
    c.data.name, c.data.resolution, c.data.channels, c.data.xflip = 'ffhq64', 64, 3, True
    c.model.kwargs = default.ddpmpp(128, (1, 2, 2, 2), dropout=0.05)
    c.train.batch_size = 256
    c.train.total_images = 200_000_000
    c.optim.lr = 2e-4
    c.optim.warmup_images = 10_000_000
    c.ema.halflife_images = 500_000
    c.sample.num_steps = 40
    c.eval.num_samples, c.eval.seed_sets = 50_000, 3  # EDM's FID protocol (module docstring)
    c.augment_p = 0.15


def afhqv2_64(c):
    ffhq64(c)
    c.data.name = 'afhqv2_64'
    c.model.kwargs.dropout = 0.25


def imagenet64(c):
    c.data.name, c.data.resolution, c.data.channels, c.data.use_labels = 'imagenet_resized/64x64', 64, 3, True
    c.model.type = 'DhariwalUNet'
    c.model.kwargs = ml_collections.ConfigDict(dict(
        model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.1))
    c.model.dtype = 'bfloat16'  # EDM trains ImageNet in fp16 with loss scaling; bf16 needs none.
    c.train.batch_size = 4096
    c.train.total_images = 2_500_000_000
    c.optim.lr = 2e-4
    c.optim.warmup_images = 10_000_000
    c.ema.halflife_images = 50_000_000
    c.sample.num_steps = 256
    c.sample.S_churn, c.sample.S_min, c.sample.S_max, c.sample.S_noise = 40.0, 0.05, 50.0, 1.003
    c.eval.num_samples, c.eval.seed_sets = 50_000, 3  # EDM's FID protocol (module docstring)
    c.augment_p = 0.0


PRESETS = {'digits': digits, 'digits_cond': digits_cond, 'digits_convnext': digits_convnext,
           'digits_uvit': digits_uvit, 'digits_dit': digits_dit, 'cifar10': cifar10,
           'cifar10_cond': cifar10_cond, 'ffhq64': ffhq64, 'afhqv2_64': afhqv2_64, 'imagenet64': imagenet64}


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
    c = default.from_preset(PRESETS, preset, 'configs/edm.py', before=_edm_fields)
    c.method = 'edm'
    return c


def _edm_fields(c):
    """EDM's preconditioning and loss (jaxdiff/precond.py, jaxdiff/losses.py)."""
    c.precond = ml_collections.ConfigDict(dict(type='edm', sigma_data=0.5))
    c.loss = ml_collections.ConfigDict(dict(type='edm', P_mean=-1.2, P_std=1.2))
