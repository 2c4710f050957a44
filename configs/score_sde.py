"""Score-based SDE presets (Song et al. 2021): `--config=configs/score_sde.py[:<preset>]`.

  (default)  the digits on the VE SDE, sigma 0.01..20 (score_sde sets sigma_max near the largest
             distance between training points; 8x8 digits in [-1, 1] are at most 16 apart), the
             0.75M DDPM++ predicting eps = -sigma score with input log sigma features (noise labels:
             the logSNR, -2 log sigma), denoising score matching; sampled with the PC sampler
             (reverse diffusion + one Langevin corrector step, snr 0.16) on 100 noise levels, 200
             evaluations. The probability-flow ODE: --config.sample.solver=heun (or any ODE solver).
  cifar10_ve score_sde's NCSN++ (continuous) CIFAR-10 setting: VE sigma 0.01..50, N = 1000 PC steps
             with snr 0.16, Adam 2e-4 (5k warm-up steps), batch 128, grad clip 1, EMA 0.999, 1.3M steps.
  cifar10_vp score_sde's DDPM++ (continuous) setting: VP beta 0.1..20, 1000 reverse-diffusion steps
             without corrector, EMA 0.9999, otherwise as cifar10_ve.
  cifar10_subvp  the same on the sub-VP SDE (processes.SubVP: alpha = exp(-B/2), sigma = 1 - exp(-B)).

Networks are EDM's SongUNet in the NCSN++ / DDPM++ configurations of score_sde's continuous CIFAR-10
configs (nf 128, ch_mult 1-2-2-2, 4 blocks, attention at 16; EDM's reimplementation of the
score_sde architectures, not verified layer for layer). score_sde samples VP and sub-VP with an
Euler-Maruyama predictor; here the reverse-diffusion predictor stands in (both first order).
"""
import ml_collections

from configs import default


def _ve(sigma_min=0.01, sigma_max=50.0):
    return ml_collections.ConfigDict(dict(schedule='ve', sigma_min=sigma_min, sigma_max=sigma_max, t_min=1e-5))


def _vp(schedule='vp'):
    return ml_collections.ConfigDict(dict(schedule=schedule, beta_min=0.1, beta_max=20.0, t_min=1e-3))


def digits(c):
    default.digits(c)
    c.process = _ve(0.01, 20.0)
    c.model.noise_labels = 'logsnr'
    c.sample.solver = 'pc'
    c.sample.num_steps = 100
    c.sample.discretization = 'uniform'
    c.sample.snr = 0.16


def _cifar10(c):
    default.cifar10_data(c)
    c.train.batch_size = 128
    c.train.total_images = 1_300_000 * 128
    c.optim.lr = 2e-4
    c.optim.warmup_images = 5_000 * 128
    c.optim.grad_clip = 1.0
    c.ema.rampup_ratio = 0.0
    c.sample.num_steps = 1000
    c.sample.discretization = 'uniform'
    c.eval.num_samples, c.eval.seed_sets = 50_000, 1


def cifar10_ve(c):
    _cifar10(c)
    c.process = _ve(0.01, 50.0)
    c.model.noise_labels = 'logsnr'
    c.model.kwargs = default.ddpmpp(128, (1, 2, 2, 2), dropout=0.1, num_blocks=4)
    c.model.kwargs.update(dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
                               resample_filter=(1, 3, 3, 1)))
    c.ema.halflife_images = 88_700  # a decay of 0.999 per step of 128 images
    c.sample.solver = 'pc'
    c.sample.snr = 0.16


def cifar10_vp(c, schedule='vp'):
    _cifar10(c)
    c.process = _vp(schedule)
    c.model.kwargs = default.ddpmpp(128, (1, 2, 2, 2), dropout=0.1, num_blocks=4)
    c.ema.halflife_images = 887_000  # 0.9999 per step of 128 images
    c.sample.solver = 'pc'
    c.sample.corrector_steps = 0


def cifar10_subvp(c):
    cifar10_vp(c, 'subvp')


PRESETS = {'digits': digits, 'cifar10_ve': cifar10_ve, 'cifar10_vp': cifar10_vp, 'cifar10_subvp': cifar10_subvp}


def get_config(preset: str = 'digits') -> ml_collections.ConfigDict:
    c = default.from_preset(PRESETS, preset, 'configs/score_sde.py', before=_score_sde_fields)
    c.method = 'score_sde'
    return c


def _score_sde_fields(c):
    c.loss.type = 'eps'  # denoising score matching with lambda = sigma^2
    default.gaussian_model(c, 'eps')
