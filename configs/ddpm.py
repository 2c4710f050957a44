"""DDPM (Ho et al. 2020) presets: `--config=configs/ddpm.py` or `configs/ddpm.py:<preset>`.

  (default)  the digits: the 0.75M DDPM++ of the EDM digits preset predicting eps on DDPM's linear
             beta table (T = 1000), L_simple, 200k images; sampled with the ancestral step on 100
             'trailing' respaced steps (the full 1000 cost 10x the time). Any solver samples the same
             checkpoint: --config.sample.solver=ddim --config.sample.num_steps=50 --config.sample.eta=0,
             or --config.sample.solver=dpmpp_2m --config.sample.num_steps=10 --config.sample.discretization=logsnr.
  digits_cond  the digits class-conditional (label dropout 0.1), scored at guidance 1, 1.5, 2, 3.
  digits_convnext, digits_uvit, digits_dit  the digits on the other networks (`default.digits_network`).
  photos128  the DDPM tutorial's setting: ConvNeXt U-Net, 128x128 photo patches, batch 16 (GPU).
  cifar10    Ho et al.'s CIFAR-10 run: linear betas, T 1000, Adam 2e-4 with 5k warm-up steps, batch 128,
             dropout 0.1, gradient clipping 1, EMA 0.9999, 800k steps; 1000 ancestral steps with
             sigma_t^2 = beta_t ('fixed_large', their CIFAR-10 choice). Network: EDM's SongUNet in the
             DDPM configuration (128 channels, mults 1-2-2-2, 2 blocks, attention at 16x16) standing in
             for Ho et al.'s U-Net of the same shape (not verified layer for layer).

  cifar10_cosine  iDDPM's CIFAR-10 run: cosine betas, T 4000, learned-range variance, hybrid loss
             L_simple + 0.001 L_vlb (loss.vlb_weight), ADM network; details in `cifar10_cosine`.

`--config.model.output=v` (or x0) trains another parameterisation, `--config.loss.type=v` another
target; `--config.model.learned_variance=True --config.loss.vlb_weight=0.001
--config.sample.variance=learned_range` adds iDDPM's learned variance to any Discrete preset.
"""
import ml_collections

from configs import default


def _discrete(betas='linear', T=1000):
    return ml_collections.ConfigDict(dict(schedule='discrete', betas=betas, T=T))


def digits(c):
    default.digits(c)
    c.process = _discrete()
    c.sample.solver = 'ancestral'
    c.sample.num_steps = 100
    c.sample.discretization = 'ddpm'
    c.sample.spacing = 'trailing'


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
    """Class-conditional digits, label dropout 0.1, scored at guidance 1, 1.5, 2 and 3 with DDIM
    (eta 0) on 25 steps (25 evaluations, 50 when guided) to keep the sweep short."""
    digits(c)
    default.digits_cond(c)
    c.sample.solver, c.sample.num_steps = 'ddim', 25


def photos128(c):
    """The DDPM tutorial's own setting (GPU): its ConvNeXt U-Net at the tutorial's default size
    (C 64, mults 1-2-4-8, 63M parameters) on 128x128 crops of the embedded photos (a fresh crop at
    every stream position, `data.random_crop`; the 256 fixed patches are the scoring reference), linear betas with T = 1000, batch 16, EMA, 100 ancestral steps. The
    tutorial's Adam lr and run length are taken as 2e-4 and 100k steps (not verified)."""
    c.data.name, c.data.resolution, c.data.channels, c.data.xflip = 'photos', 128, 3, True
    c.data.random_crop = True
    c.process = _discrete()
    default.digits_network(c, 'convnext_unet')
    c.model.kwargs = ml_collections.ConfigDict(dict(model_channels=64, channel_mult=(1, 2, 4, 8)))
    c.train.batch_size = 16
    c.train.total_images = 100_000 * 16
    c.train.log_every_steps, c.train.checkpoint_every_steps = 100, 5_000
    c.optim.lr, c.optim.warmup_images = 2e-4, 1_000 * 16
    c.ema.halflife_images = 110_000  # a decay of 0.9999 per step of 16 images
    c.ema.rampup_ratio = 0.0
    c.sample.solver, c.sample.num_steps = 'ancestral', 100
    c.sample.discretization, c.sample.spacing = 'ddpm', 'trailing'
    c.sample.num_samples, c.sample.batch_size = 16, 16
    c.eval.after_training = False  # FID needs the Inception weights and reference statistics


def cifar10(c):
    default.cifar10_data(c)
    c.process = _discrete()
    c.model.kwargs = default.ddpmpp(128, (1, 2, 2, 2), dropout=0.1, attn_resolutions=(16,), num_blocks=2)
    c.train.batch_size = 128
    c.train.total_images = 800_000 * 128
    c.optim.lr = 2e-4
    c.optim.warmup_images = 5_000 * 128
    c.optim.grad_clip = 1.0
    c.ema.halflife_images = 887_000  # a decay of 0.9999 per step of 128 images
    c.ema.rampup_ratio = 0.0
    c.sample.solver = 'ancestral'
    c.sample.num_steps = 1000
    c.sample.discretization = 'ddpm'
    c.sample.variance = 'fixed_large'
    c.eval.num_samples, c.eval.seed_sets = 50_000, 1


def cifar10_cosine(c):
    """iDDPM's unconditional CIFAR-10 run (Nichol & Dhariwal 2021; improved-diffusion's README
    flags and its cifar10_uncond_50M_500K checkpoint): cosine betas, T = 4000, learned-range
    variance with L_hybrid = L_simple + 0.001 L_vlb, Adam 1e-4, batch 128, 500k steps, EMA 0.9999,
    dropout 0.3, 128 channels, 3 blocks per level, attention at 16 and 8 with 64 channels per head.
    Network: EDM's DhariwalUNet (ADM, iDDPM's U-Net grown up) in that shape; not verified layer for
    layer against improved-diffusion's UNetModel. Sampled with the learned-range ancestral step on
    100 respaced steps (iDDPM's Fig. 8 shows learned variance keeps its FID at 100 steps)."""
    default.cifar10_data(c)
    c.process = _discrete('cosine', 4000)
    c.model.type = 'DhariwalUNet'
    c.model.kwargs = ml_collections.ConfigDict(dict(
        model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=3, attn_resolutions=(16, 8), dropout=0.3))
    c.model.learned_variance = True
    c.loss.vlb_weight = 0.001
    c.train.batch_size = 128
    c.train.total_images = 500_000 * 128
    c.optim.lr = 1e-4
    c.optim.warmup_images = 0
    c.ema.halflife_images = 887_000  # a decay of 0.9999 per step of 128 images
    c.ema.rampup_ratio = 0.0
    c.sample.solver = 'ancestral'
    c.sample.num_steps = 100
    c.sample.discretization = 'ddpm'
    c.sample.spacing = 'linspace'
    c.sample.variance = 'learned_range'
    c.eval.num_samples, c.eval.seed_sets = 50_000, 1


PRESETS = {'digits': digits, 'digits_cond': digits_cond, 'digits_convnext': digits_convnext,
           'digits_uvit': digits_uvit, 'digits_dit': digits_dit, 'cifar10': cifar10,
           'cifar10_cosine': cifar10_cosine, 'photos128': photos128}


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
    c = default.from_preset(PRESETS, preset, 'configs/ddpm.py', before=_ddpm_fields)
    c.method = 'ddpm'
    return c


def _ddpm_fields(c):
    c.loss.type = 'eps'  # the target: eps (L_simple), x0 or v
    c.loss.vlb_weight = 0.0  # iDDPM's hybrid loss: + vlb_weight * L_vlb (0.001); needs model.learned_variance
    c.loss.multiscale_lowest = 0  # simple diffusion's multiscale loss from this size up (e.g. 32); 0 = off
    c.loss.min_snr_gamma = 0.0  # Min-SNR-gamma loss weighting (e.g. 5); 0 = off
    # VDM++/SiD2 sigmoid weighting sigmoid(b - logSNR) (-dlogSNR/dt) of the eps loss; None = off
    c.loss.sigmoid_bias = ml_collections.config_dict.placeholder(float)
    default.gaussian_model(c, 'eps')
