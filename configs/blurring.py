"""Blurring diffusion (Hoogeboom & Salimans 2023): `--config=configs/blurring.py[:preset]`.

A Gaussian diffusion in the DCT basis whose per-frequency scale blurs the image as it adds noise
(`jaxdiff.processes.BlurringProcess`), trained with the unweighted eps loss and sampled with the
paper's ancestral sampler or, new in jaxdiff, the probability-flow ODE in scaled coordinates per
frequency (`sample.solver`: ancestral | euler (DDIM) | heun | exp_heun; see
`jaxdiff/samplers`). `process.sigma_blur_max = 0` is the plain cosine-logSNR diffusion.

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

from configs import default, edm


def _process(sigma_blur_max):
    return ml_collections.ConfigDict(dict(sigma_blur_max=sigma_blur_max, min_scale=0.001,
                                          logsnr_min=-10.0, logsnr_max=10.0))


def digits(c):
    edm.digits(c)  # data, network, optimiser, EMA and budget of the EDM digits preset
    c.process = _process(5.0)
    c.ema.halflife_images, c.ema.rampup_ratio = 20_000, 0.05  # the EMA its digits figures were measured with
    # The paper's ancestral sampler by default: digits FD 6.4 at 1,024 samples (100 evaluations).
    # The deterministic ODE samplers need the low-SNR cutoff with a trained eps network
    # (parameterize.LowSNRCutoff): without it they gave checkerboard high frequencies (FD
    # 78-99); with it exp_heun gives FD 8.1 at 20 steps (39 evaluations) and 11.5 at 10 (19).
    # Try --config.sample.solver=exp_heun --config.sample.num_steps=20 (benchmarks/RESULTS.md §4).
    c.sample.solver = 'ancestral'
    c.sample.num_steps = 100
    c.sample.spacing = 'uniform'
    c.sample.low_snr_cutoff = -8.0  # ODE solvers only (parameterize.LowSNRCutoff)


def cifar10(c):
    edm.cifar10(c)
    c.process = _process(20.0)
    c.model.kwargs.dropout = 0.1
    c.train.batch_size = 128
    c.optim.lr = 2e-4
    c.optim.warmup_images = 640_000       # 5k steps of 128
    c.optim.grad_clip = 1.0
    c.ema.halflife_images = 887_000       # a decay of 0.9999 per step of 128 images
    c.ema.rampup_ratio = 0.0
    c.sample.solver = 'ancestral'
    c.sample.num_steps = 1000
    c.sample.spacing = 'uniform'
    c.sample.low_snr_cutoff = -8.0  # ODE solvers only; tuned on the digits, not on CIFAR-10
    c.augment_p = 0.0


PRESETS = {'digits': digits, 'cifar10': cifar10}


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
    c = default.from_preset(PRESETS, preset, 'configs/blurring.py')
    c.method = 'blurring'
    c.loss.type = 'eps'
    return c
