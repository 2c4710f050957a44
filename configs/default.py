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
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir; None = TFDS default.

    # Network: EDM's model type and keyword arguments (jaxdiff/nets).
    c.model = ml_collections.ConfigDict()
    c.model.type = 'SongUNet'
    c.model.kwargs = ml_collections.ConfigDict()
    c.model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16'

    # Preconditioning and loss (jaxdiff/precond.py, jaxdiff/losses.py).
    c.precond = ml_collections.ConfigDict()
    c.precond.type = 'edm'
    c.precond.sigma_data = 0.5
    c.loss = ml_collections.ConfigDict()
    c.loss.type = 'edm'
    c.loss.P_mean = -1.2
    c.loss.P_std = 1.2

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

    # Sampling (jaxdiff/samplers.py) and evaluation.
    c.sample = ml_collections.ConfigDict()
    c.sample.num_samples = 64
    c.sample.batch_size = 256
    c.sample.num_steps = 18
    c.sample.solver = 'heun'
    c.sample.discretization = 'edm'
    c.sample.schedule = 'linear'
    c.sample.scaling = 'none'
    c.sample.S_churn = 0.0
    c.sample.S_min = 0.0
    c.sample.S_max = float('inf')
    c.sample.S_noise = 1.0
    c.sample.seed = 0
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

    # Device mesh ('data', 'fsdp'): -1 = all remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c


def from_preset(presets: dict, preset: str, config_file: str) -> ml_collections.ConfigDict:
    """The shared defaults with `presets[preset]` applied (the empty name is 'digits'), or a
    ValueError naming `config_file`'s presets; `augment_p` 0 unless the preset sets it."""
    preset = preset or 'digits'
    if preset not in presets:
        raise ValueError(f'Unknown preset {preset!r} for {config_file}; choose one of {sorted(presets)}')
    c = get_config()
    c.preset = preset
    c.augment_p = 0.0
    presets[preset](c)
    return c
