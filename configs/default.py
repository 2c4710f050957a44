"""Defaults shared by every method's config. A method file (configs/edm.py, ...) starts from
`get_config()` here and overrides what it needs; `--config.x.y=value` overrides on the command line."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = 'edm'
    c.seed = 0

    # Data (jaxdiff/data.py). name: an embedded data set ('digits') or a TFDS name ('cifar10', ...).
    c.data = ml_collections.ConfigDict()
    c.data.name = 'digits'
    c.data.split = 'train'
    c.data.resolution = 8
    c.data.channels = 1
    c.data.use_labels = False
    c.data.xflip = False
    c.data.random_crop = False  # 'photos' only: a fresh crop at every stream position (data.random_photo_crops)
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None = TFDS default.

    # Network: EDM's model type and keyword arguments (jaxdiff/nets).
    c.model = ml_collections.ConfigDict()
    c.model.type = 'SongUNet'
    c.model.kwargs = ml_collections.ConfigDict()
    c.model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16'
    c.model.label_dropout = 0.0  # training: P(label -> null label) per image, for classifier-free guidance

    # Loss (jaxdiff/losses.py): each method sets its type and fields.
    c.loss = ml_collections.ConfigDict()
    c.loss.type = 'edm'

    # Optimiser and EMA (jaxdiff/train.py), in EDM's units of images.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_images = 10_000_000
    c.optim.cooldown_images = 0  # linear decay to 0 over the last this many of train.total_images; 0 = off (EDM)
    c.optim.beta1 = 0.9
    c.optim.beta2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 0.0  # global-norm clipping; 0 = off
    c.ema = ml_collections.ConfigDict()
    c.ema.halflife_images = 500_000
    c.ema.rampup_ratio = 0.05  # EDM: half-life <= rampup_ratio * images seen; 0 = off

    # Training loop.
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 512  # global batch
    c.train.total_images = 200_000_000
    c.train.log_every_steps = 100
    c.train.checkpoint_every_steps = 5000
    c.train.keep_checkpoints = 3
    c.train.sample_every_steps = 0  # TensorBoard sample grids; 0 = only at the end
    # Resume (or sample) a workdir whose checkpoints were trained with a config that differs in a
    # field that changes the trajectory (method, model, data, batch, seed, optim, ema, loss, ...);
    # off: such a run stops with an error naming the fields (jaxdiff/runner.py, TRAJECTORY_FREE).
    c.train.allow_config_change = False
    # XLA's persistent compilation cache (runner.enable_compilation_cache, turned on by launch.py):
    # '' = $XDG_CACHE_HOME/jaxdiff/xla (~/.cache/jaxdiff/xla), one per user and machine, so a
    # resume or another run of the same programs loads them instead of compiling; a directory;
    # 'none' = off. JAX_COMPILATION_CACHE_DIR in the environment wins over this field.
    c.train.compilation_cache = ''

    # Sampling (jaxdiff/samplers: every field of samplers.Sampler, the same names for every method).
    c.sample = ml_collections.ConfigDict()
    c.sample.num_samples = 64
    c.sample.batch_size = 256
    c.sample.seed = 0
    c.sample.solver = 'heun'  # euler heun ddim ancestral exp_heun dpmpp_2m pc
    c.sample.num_steps = 18
    c.sample.discretization = 'edm'  # edm vp ve iddpm (noise levels); uniform logsnr ddpm (times)
    c.sample.sigma_min = ml_collections.config_dict.placeholder(float)  # None: the discretisation's own
    c.sample.sigma_max = ml_collections.config_dict.placeholder(float)
    c.sample.rho = 7.0
    c.sample.spacing = 'leading'  # discretization 'ddpm': leading trailing linspace quad
    c.sample.steps_offset = 0
    c.sample.schedule = 'linear'  # euler/heun: EDM's time variable sigma(t): linear vp ve
    c.sample.scaling = 'none'     # ... and s(t): none vp
    c.sample.heun_point = 1.0
    c.sample.S_churn = 0.0
    c.sample.S_min = 0.0
    c.sample.S_max = float('inf')
    c.sample.S_noise = 1.0
    c.sample.eta = 0.0  # ddim
    c.sample.variance = 'fixed_small'  # ancestral: fixed_small fixed_large learned_range
    c.sample.snr = 0.16  # pc
    c.sample.corrector_steps = 1  # pc
    # Class-conditional models (data.use_labels): classifier-free guidance eps_u + s (eps_c - eps_u),
    # s = 1 none (Ho & Salimans' w = s - 1), optionally only for noise levels sigma/alpha in
    # guidance_interval = (lo, hi) (Kynkaenniemi et al. 2024); sample with seed k gets class
    # labels[k % len(labels)] (empty: every class in turn).
    c.sample.guidance = 1.0
    # clip_denoised: every step's x0_hat clipped to the data range [-1, 1], eps_hat recomputed from it
    # (DDPM's and iDDPM's clip_denoised; parameterize.ClipDenoised).
    c.sample.clip_denoised = False
    c.sample.guidance_interval = ml_collections.config_dict.placeholder(tuple)
    c.sample.labels = ()
    # Evaluation (jaxdiff/scoring.py): --mode=eval, after training (after_training), --mode=ref.
    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 1024  # samples per seed set
    c.eval.seed = 0  # set j: seeds seed + j * num_samples ... seed + (j + 1) * num_samples - 1
    c.eval.seed_sets = 1  # EDM's protocol: 3 sets of 50k, the minimum FID reported
    # 'fd' (Frechet distance: FID on Inception features), 'kid', 'prdc' (precision, recall, density,
    # coverage), 'is' (Inception Score), 'bpd' (bits/dim of data images through the PF-ODE; edm/vp/ve).
    c.eval.metrics = ('fd', 'kid', 'prdc', 'is')
    c.eval.features = 'auto'  # 'digits' (classifier, 8x8 digits only), 'inception', 'auto' (digits if possible)
    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or its .npz): never downloaded, give its path.
    c.eval.inception_weights = ml_collections.config_dict.placeholder(str)
    c.eval.ref = ml_collections.config_dict.placeholder(str)  # statistics .npz; None: <workdir>/ref_<data.name>.npz
    c.eval.ref_num_features = 10_000  # features kept in a --mode=ref file for KID and PRDC
    c.eval.batch_size = 256  # per process, for sampling and features
    c.eval.bpd_num_images = 1024
    c.eval.after_training = True
    c.eval.guidance_sweep = ()  # e.g. (1, 1.5, 2, 3): a conditional digits model scored at each guidance scale

    # Device mesh ('data', 'fsdp'): -1 = all remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c


# ---------------------------------------------------------------------------------------------
# Blocks that several methods' presets share.

def ddpmpp(model_channels, channel_mult, dropout, attn_resolutions=(16,), num_blocks=4):
    """SongUNet (DDPM++) keyword arguments as EDM's CIFAR-10 network uses them."""
    return ml_collections.ConfigDict(dict(
        model_channels=model_channels, channel_mult=tuple(channel_mult), num_blocks=num_blocks,
        attn_resolutions=tuple(attn_resolutions), dropout=dropout, embedding_type='positional',
        encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=(1, 1)))


def digits(c):
    """The embedded 8x8 digits with the 0.75M-parameter DDPM++ and a CPU budget of 200k images.

    One block per resolution and no dropout: 0.75M parameters at about 510 images/s on 2 CPU
    cores, against 1.03M at about 330 with two blocks and EDM's dropout 0.1; per second of
    training this reaches a better Frechet distance (benchmarks/RESULTS.md, section 7). EMA
    half-life 0.2 x the images seen: it scored better than EDM's 0.05 there (section 7b).
    """
    c.data.name, c.data.resolution, c.data.channels = 'digits', 8, 1
    c.model.kwargs = ddpmpp(32, (1, 2), dropout=0.0, attn_resolutions=(4,), num_blocks=1)
    c.train.batch_size = 128
    c.train.total_images = 200_000
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 500
    c.optim.lr = 2e-3
    c.optim.warmup_images = 20_000
    c.ema.halflife_images = 500_000
    c.ema.rampup_ratio = 0.2
    c.sample.num_samples = 100  # the PNG grid (10 x 10); eval draws eval.num_samples
    c.eval.num_samples = 1024


def digits_network(c, name):
    """The other networks on the 8x8 digits at about the SongUNet default's size (0.75M):
    'convnext_unet' 0.83M (C 20, mults 1-2-2), 'uvit' 0.83M (one conv level of 32 channels, then
    4 transformer blocks of 96 channels on the 4x4 tokens), 'dit' 1.27M (patch 2, 16 tokens,
    hidden 128, depth 4, 4 heads)."""
    kwargs = {'convnext_unet': dict(model_channels=20, channel_mult=(1, 2, 2)),
              'uvit': dict(model_channels=32, channel_mult=(1,), num_blocks=1, transformer_channels=96,
                           num_transformer_blocks=4, num_heads=4),
              'dit': dict(patch_size=2, hidden_size=128, depth=4, num_heads=4)}[name]
    c.model.type = name
    c.model.kwargs = ml_collections.ConfigDict(kwargs)


def digits_cond(c):
    """Class-conditional digits with classifier-free guidance: labels dropped with probability 0.1
    in training (Ho & Salimans 2022), and the evaluation swept over guidance scales."""
    c.data.use_labels = True
    c.model.label_dropout = 0.1
    c.eval.guidance_sweep = (1.0, 1.5, 2.0, 3.0)


def cifar10_data(c):
    c.data.name, c.data.resolution, c.data.channels, c.data.xflip = 'cifar10', 32, 3, True


def gaussian_model(c, output='eps', learned_variance=False):
    """The parameterisation fields of the process methods (jaxdiff/parameterize.py)."""
    c.model.output = output  # eps x0 v
    c.model.noise_labels = 'schedule'  # schedule (DDPM step index / 1000 t) or logsnr
    c.model.learned_variance = learned_variance  # iDDPM: 2C outputs, sample.variance='learned_range'


def from_preset(presets: dict, preset: str, config_file: str, before=lambda c: None) -> ml_collections.ConfigDict:
    """The shared defaults, then `before(c)` (the method's own blocks), with `presets[preset]` applied (the empty name is 'digits'), or a
    ValueError naming `config_file`'s presets; `augment_p` 0 unless the preset sets it."""
    preset = preset or 'digits'
    if preset not in presets:
        raise ValueError(f'Unknown preset {preset!r} for {config_file}; choose one of {sorted(presets)}')
    c = get_config()
    before(c)
    c.preset = preset
    c.augment_p = 0.0
    presets[preset](c)
    return c
