"""Simple diffusion (Hoogeboom, Heek & Salimans, ICML 2023): `--config=configs/simple_diffusion.py[:<preset>]`.

Pixel-space diffusion at high resolution from four ingredients, each an option of the one Gaussian
core (method 'simple_diffusion' is `jaxdiff/methods/gaussian.py`):

  schedule    the cosine logSNR shifted to the image size, lambda(t) = lambda_cos(t) + 2 log(noise_d / d)
              (`process.schedule='cosine_shifted'`, eq. 5), or interpolated between two shifts
              (`'cosine_interpolated'`, eq. 6); `process.image_d` follows `data.resolution` unless set
  output      v-prediction (`model.output='v'`); trained with the eps loss, which is what the
              paper's multiscale loss is written in (and equals denoising-diffusion-pytorch's v loss
              weighted by SNR / (SNR + 1))
  loss        the multiscale loss from `loss.multiscale_lowest` up (sum over s of (d / s) L^s)
  network     the U-ViT (`jaxdiff/nets/uvit.py`): conv levels, a transformer stack at low resolution

Presets:
  (default)  photos32: random 32x32 crops (with flips) of the nine photos that ship with scikit-learn
             and scikit-image (`data.random_crop`; the fixed 1,024 patches are the reference set for
             scoring). Photos rather than the faces: RGB, natural-image statistics at every scale
             (which is what the schedule shift and the multiscale loss are about), and crops at
             32..256 px, where the 25x25 faces would have to be upsampled. A 1.25M U-ViT (patch 2,
             one conv level of 32 channels at 16x16, 4 transformer blocks of width 128 on the 8x8
             tokens), the shifted cosine with noise_d 32 (no shift at 32 px: the base resolution),
             the multiscale loss over 8, 16, 32, 30k training images at batch 8 (3,750 steps: at this budget
             the step count, not the image count, decides; benchmarks/RESULTS.md §13) and 50 DDIM steps
             (random-feature FD 4.2, precision 0.72). Trains,
             samples and scores in under 10 minutes on 2 CPU cores; scored with the 'auto'
             features (Inception with the user's weights, else the random-feature network,
             `eval.features='random'`; `jaxdiff/scoring.py`).
  photos64   64x64 crops, noise_d 32 (shift 2 log(32/64)), U-ViT with conv levels at 64 and 32 px and
             8 transformer blocks of width 512 at 16x16, multiscale from 16; sized for a GPU.
  photos128  128x128 crops, the same at one more conv level (noise_d 32, multiscale from 16); GPU.
  imagenet128, imagenet256, imagenet512   the paper's class-conditional ImageNet settings (TPU pods):
             `nets.uvit.UVIT_CONFIGS`, noise_d 64 (128 and 256 px; eq. 5) and the 32 -> 256
             interpolation at 512 px (eq. 6), multiscale loss from 32, v-prediction, dropout 0.1,
             ancestral sampling. NOT VERIFIED against the paper's appendix (this project could not
             re-read it): batch size 2048, Adam lr 1e-4 with 10k warm-up steps, EMA 0.9999, 1M
             training steps, 512 ancestral sampling steps, the multiscale loss at 128 px, and the
             network widths and depths listed in nets/uvit.py. Data: fixed-size square uint8 images
             of the resolution, prepared as a TFDS ArrayRecord set named by `data.name`
             (jaxdiff reads no variable-size ImageNet; make centre crops first).

The measured effect of the schedule shift and of the multiscale loss on the photos at 64 px is in
benchmarks/RESULTS.md (`benchmarks/simple_diffusion_effect.py`).
"""
import ml_collections

from configs import default
from jaxdiff.nets.uvit import UVIT_CONFIGS


def _simple(c, noise_d, multiscale_lowest):
    c.process = ml_collections.ConfigDict(dict(schedule='cosine_shifted', noise_d=noise_d, logsnr_min=-15.0,
                                               logsnr_max=15.0, image_d=ml_collections.config_dict.placeholder(int)))
    default.gaussian_model(c, 'v')
    c.model.noise_labels = 'logsnr'
    c.model.type = 'uvit'
    c.loss.type = 'eps'  # the paper's loss (and its multiscale form) is in eps; the network predicts v
    c.loss.vlb_weight = 0.0
    c.loss.multiscale_lowest = multiscale_lowest
    c.loss.min_snr_gamma = 0.0
    c.loss.sigmoid_bias = ml_collections.config_dict.placeholder(float)  # SiD2's sigmoid weighting; None = off
    c.sample.solver, c.sample.discretization, c.sample.eta = 'ddim', 'uniform', 0.0


def _photos(c, resolution):
    c.data.name, c.data.resolution, c.data.channels = 'photos', resolution, 3
    c.data.xflip, c.data.random_crop = True, True


def photos32(c):
    _photos(c, 32)
    _simple(c, noise_d=32, multiscale_lowest=8)
    c.model.kwargs = ml_collections.ConfigDict(dict(
        model_channels=32, channel_mult=(1,), num_blocks=1, patch_size=2, transformer_channels=128,
        num_transformer_blocks=4, num_heads=4, pos_embedding='learned', dropout=0.0))
    c.train.batch_size = 8  # steps, not images, limit this budget: batch 8 FD 82 vs batch 64 FD 262 at 16k images
    c.train.total_images = 30_000
    c.train.log_every_steps, c.train.checkpoint_every_steps = 100, 500
    c.optim.lr, c.optim.warmup_images = 1e-3, 5_000
    c.ema.halflife_images, c.ema.rampup_ratio = 500_000, 0.2
    c.sample.num_steps = 50
    c.sample.num_samples = 64
    c.eval.num_samples = 1024
    c.eval.metrics = ('fd', 'kid', 'prdc')


def _photos_gpu(c, resolution, channel_mult):
    _photos(c, resolution)
    _simple(c, noise_d=32, multiscale_lowest=16)
    c.model.kwargs = ml_collections.ConfigDict(dict(
        model_channels=128, channel_mult=channel_mult, num_blocks=2, patch_size=1, transformer_channels=512,
        num_transformer_blocks=8, num_heads=8, pos_embedding='learned', dropout=0.1, dropout_resolution=16))
    c.train.batch_size = 128
    c.train.total_images = 200_000 * 128
    c.optim.lr, c.optim.warmup_images = 1e-4, 5_000 * 128
    c.ema.halflife_images, c.ema.rampup_ratio = 887_000, 0.0  # a decay of 0.9999 per step of 128 images
    c.sample.solver, c.sample.num_steps = 'ancestral', 256
    c.eval.num_samples = 1024
    c.eval.metrics = ('fd', 'kid', 'prdc')


def photos64(c):
    _photos_gpu(c, 64, (1, 2))


def photos128(c):
    _photos_gpu(c, 128, (1, 2, 4))


def _imagenet(c, resolution):
    c.data.name, c.data.resolution, c.data.channels = f'imagenet_{resolution}x{resolution}', resolution, 3
    c.data.use_labels, c.data.xflip = True, True
    _simple(c, noise_d=64, multiscale_lowest=32)
    kwargs = dict(UVIT_CONFIGS[f'imagenet{resolution}'])
    del kwargs['img_resolution'], kwargs['label_dim']  # from data.resolution and the data set's classes
    c.model.kwargs = ml_collections.ConfigDict(kwargs)
    c.train.batch_size = 2048  # not verified
    c.train.total_images = 1_000_000 * 2048  # 1M steps: not verified
    c.optim.lr, c.optim.warmup_images = 1e-4, 10_000 * 2048  # not verified
    c.ema.halflife_images, c.ema.rampup_ratio = 14_190_000, 0.0  # a decay of 0.9999 per step of 2048 (not verified)
    c.sample.solver, c.sample.num_steps = 'ancestral', 512  # not verified
    c.eval.num_samples, c.eval.seed_sets = 50_000, 1
    c.model.dtype = 'bfloat16'


def imagenet128(c):
    _imagenet(c, 128)


def imagenet256(c):
    _imagenet(c, 256)


def imagenet512(c):
    _imagenet(c, 512)
    c.process = ml_collections.ConfigDict(dict(schedule='cosine_interpolated', low_d=32, high_d=256, logsnr_min=-15.0,
                                               logsnr_max=15.0, image_d=ml_collections.config_dict.placeholder(int)))


PRESETS = {'photos32': photos32, 'photos64': photos64, 'photos128': photos128,
           'imagenet128': imagenet128, 'imagenet256': imagenet256, 'imagenet512': imagenet512}


def get_config(preset: str = 'photos32') -> ml_collections.ConfigDict:
    c = default.from_preset(PRESETS, preset or 'photos32', 'configs/simple_diffusion.py')
    c.method = 'simple_diffusion'
    return c
