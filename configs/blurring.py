"""Blurring diffusion (Hoogeboom & Salimans 2023): `--config=configs/blurring.py[:preset]`.

A Gaussian diffusion in the DCT basis whose per-frequency scale blurs the image as it adds noise
(`jaxdiff.processes.BlurringProcess`), trained with the unweighted eps loss and sampled with the
paper's ancestral sampler or, new in jaxdiff, the probability-flow ODE in scaled coordinates per
frequency (`sample.solver`: any solver of `jaxdiff.samplers`, e.g. ancestral | ddim | euler | heun |
exp_heun | dpmpp_2m). `process.sigma_blur_max = 0` is the plain cosine-logSNR diffusion.

  (default)  the embedded sklearn digits, 8x8, the EDM digits preset's DDPM++ (0.75M parameters)
             and budget (200k images), ancestral sampling with T = 100: trains, samples and scores on 2 CPU cores.
             sigma_blur_max = 5: the paper's 20 at 32 px scaled with the image side, so that
             frequency (i, j) sees the same dissipation exp(-(pi i / N)^2 sigma^2 / 2) relative to
             the image (the blur width is in pixels).
  cifar10    the paper's CIFAR-10 setting: sigma_blur_max = 20, d_min = 0.001, logSNR in [-10, 10],
             ancestral sampling with T = 1000. The network is jaxdiff's DDPM++ of EDM's CIFAR-10
             preset, not the paper's U-Net; optimiser values (Adam lr 2e-4, batch 128, EMA 0.9999)
             are the common DDPM-family settings, not checked against the paper's appendix.
"""
import ml_collections

from configs import default


def _process(sigma_blur_max):
    return ml_collections.ConfigDict(dict(schedule='cosine', logsnr_min=-10.0, logsnr_max=10.0,
                                          sigma_blur_max=sigma_blur_max, min_scale=0.001))


def digits(c):
    default.digits(c)  # data, network, optimiser, EMA and budget shared with the EDM digits preset
    c.process = _process(5.0)
    c.ema.halflife_images, c.ema.rampup_ratio = 20_000, 0.05  # the EMA its digits figures were measured with
    # The paper's ancestral sampler by default: digits FD 6.4 at 1,024 samples (100 evaluations).
    # The deterministic ODE samplers need the low-SNR cutoff with a trained eps network
    # (parameterize.LowSNRCutoff): without it they gave checkerboard high frequencies (FD
    # 78-99); with it exp_heun gives FD 8.1 at 20 steps (39 evaluations) and 11.5 at 10 (19).
    # Try --config.sample.solver=exp_heun --config.sample.num_steps=20 (benchmarks/RESULTS.md §4).
    c.sample.solver = 'ancestral'
    c.sample.num_steps = 100
    c.sample.discretization = 'uniform'
    c.sample.low_snr_cutoff = -8.0  # ODE solvers only (parameterize.LowSNRCutoff)


def cifar10(c):
    default.cifar10_data(c)
    c.model.kwargs = default.ddpmpp(128, (2, 2, 2), dropout=0.1)
    c.process = _process(20.0)
    c.train.batch_size = 128
    c.train.total_images = 200_000_000
    c.eval.num_samples, c.eval.seed_sets = 50_000, 3  # EDM's FID protocol
    c.optim.lr = 2e-4
    c.optim.warmup_images = 640_000       # 5k steps of 128
    c.optim.grad_clip = 1.0
    c.ema.halflife_images = 887_000       # a decay of 0.9999 per step of 128 images
    c.ema.rampup_ratio = 0.0
    c.sample.solver = 'ancestral'
    c.sample.num_steps = 1000
    c.sample.discretization = 'uniform'
    c.sample.low_snr_cutoff = -8.0  # ODE solvers only; tuned on the digits, not on CIFAR-10
    c.augment_p = 0.0


PRESETS = {'digits': digits, 'cifar10': cifar10}


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
    c = default.from_preset(PRESETS, preset, 'configs/blurring.py', before=_blurring_fields)
    c.method = 'blurring'
    return c


def _blurring_fields(c):
    c.loss.type = 'eps'
    default.gaussian_model(c, 'eps')
    c.sample.low_snr_cutoff = ml_collections.config_dict.placeholder(float)
