"""The launcher's other methods: blurring diffusion and IHDM train, sample and score through the same
runner, checkpoints and evaluation as EDM; their configs are validated at start-up.

Runs use a tiny SongUNet (8 channels, one resolution, one block) on the digits and a persistent
compilation cache for this module (see tests/test_runner.py)."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import builders, losses, parameterize, processes, runner
from jaxdiff.methods import ihdm as ihdm_method

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from configs import blurring, ddpm, dit as dit_config, edm as edm_config, ihdm as ihdm_config, score_sde  # noqa: E402
from configs import simple_diffusion  # noqa: E402

BATCH = 16
pytestmark = [pytest.mark.filterwarnings('ignore::DeprecationWarning'),
              pytest.mark.usefixtures('persistent_compilation_cache')]



def tiny(config, total_steps=4):
    k = config.model.kwargs
    k.model_channels, k.channel_mult, k.num_blocks, k.attn_resolutions = 8, (1,), 1, ()
    config.train.batch_size = BATCH
    config.train.total_images = BATCH * total_steps
    config.train.log_every_steps = 2
    config.train.checkpoint_every_steps = 2
    config.sample.num_samples = 16
    config.sample.batch_size = 16
    config.eval.num_samples = 32
    return config


def tiny_blurring():
    c = tiny(blurring.get_config())
    c.sample.num_steps = 4
    return c


def tiny_ihdm():
    c = tiny(ihdm_config.get_config())
    c.process.K = c.sample.num_steps = 4
    return c


@pytest.mark.slow  # End to end (about 20 s each on 2 cores); the pieces are checked below by default.
@pytest.mark.parametrize('make_config', [tiny_blurring, tiny_ihdm], ids=['blurring', 'ihdm'])
def test_method_trains_samples_and_scores_through_the_runner(make_config, tmp_path):
    config = make_config()
    result = runner.train_and_evaluate(config, tmp_path)
    report = json.loads((tmp_path / 'eval_00000004.json').read_text())
    assert report['num_samples'] == 32 and sum(report['class_histogram']) == 32
    assert np.isfinite(report['fd']) and report['fd'] > 0 and result['fd'] == report['fd']
    with np.load(tmp_path / 'samples' / 'samples_00000004.npz') as f:
        images = f['images']
    assert images.shape == (32, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == ['2', '4']
    # Sample mode restores the EMA parameters and draws the same first samples (seed i -> sample i).
    # It never overwrites: training's samples_00000004.npz (what the eval JSON scored) stays.
    out = runner.sample_mode(config, tmp_path)
    assert out == {'step': 4, 'num_samples': 16, 'samples_file': str(tmp_path / 'samples' / 'samples_00000004.1.npz')}
    with np.load(out['samples_file']) as f:
        again = f['images']
    assert np.abs(again.astype(int) - images[:16].astype(int)).max() <= 1


def test_blurring_loss_is_the_eps_loss_on_the_configured_process():
    config = tiny_blurring()
    loss_fn = builders.build_loss(config)
    process = processes.BlurringProcess(processes.Cosine(-10.0, 10.0), sigma_blur_max=5.0)
    assert loss_fn.keywords['process'] == process and loss_fn.keywords['target'] == 'eps'
    fn = lambda params, z, c_noise, labels, aug: z * params + 0.01 * c_noise[:, None, None, None]
    model = parameterize.model_from_fn(fn, process, 'eps', jnp.float32(0.5))
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), minval=-1, maxval=1)
    got = loss_fn(model, x, jax.random.key(1), None)
    want = losses.diffusion_loss(model, x, jax.random.key(1), process=process)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_ihdm_sampler_starts_from_the_prior_of_blurred_training_images():
    config = tiny_ihdm()
    images = np.random.default_rng(0).uniform(-1, 1, (10, 8, 8, 1)).astype(np.float32)
    sampling = builders.build_sampling(config, images)
    process = ihdm_method.build_process(config)
    # A model that returns its input unchanged leaves u_K + the per-step noise: its mean over many
    # samples is the mean of the blurred training images (the KDE prior's mean).
    module_params = None

    class Identity:
        label_dim = 0

        def apply(self, variables, x, noise_labels, class_labels=None, augment_labels=None, train=False, rngs=None):
            return jnp.zeros_like(x)

    keys = jax.vmap(jax.random.key)(jnp.arange(4000))
    out = np.asarray(sampling.draw(Identity(), module_params, keys, None, (8, 8, 1)))
    blurred_mean = np.asarray(process.blur(jnp.asarray(images), process.K)).mean(0)
    # std of the mean: (between-centre spread + K * delta^2 noise) / sqrt(4000)
    spread = np.asarray(process.blur(jnp.asarray(images), process.K)).std(0).max()
    tol = 5 * np.sqrt(spread ** 2 + process.K * process.sampling_delta ** 2) / np.sqrt(4000)
    np.testing.assert_allclose(out.mean(0), blurred_mean, atol=tol)
    assert sampling.num_evals == process.K == 4


@pytest.mark.parametrize('field, value, message', [
    ('method', 'ddim', r"method must be one of \('edm', 'ddpm', 'score_sde', 'blurring', 'ihdm', 'simple_diffusion'\)"),
    ('loss.type', 'edm', r"loss\.type must be one of \('eps', 'x0', 'v'\)"),
    ('sample.solver', 'rk4', r'sample\.solver must be one of'),
    ('sample.spacing', 'log', r'sample\.spacing must be one of'),
    ('process.sigma_blur_max', -1.0, r'process\.sigma_blur_max must be >= 0'),
    ('model.output', 'score', r'model\.output must be one of'),
])
def test_blurring_config_errors_name_the_field(field, value, message, tmp_path):
    config = tiny_blurring()
    section, _, leaf = field.rpartition('.')
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=message):
        runner.prepare(config, tmp_path)


def test_unknown_process_field_and_ihdm_step_count_are_config_errors(tmp_path):
    config = tiny_blurring()
    config.process.blur = 1.0
    with pytest.raises(ValueError, match=r"process: .*unexpected keyword argument 'blur'"):
        runner.prepare(config, tmp_path)
    config = tiny_ihdm()
    config.sample.num_steps = 7
    with pytest.raises(ValueError, match=r'sample\.num_steps must equal process\.K = 4'):
        runner.prepare(config, tmp_path)


@pytest.mark.parametrize('module, method', [(blurring, 'blurring'), (ihdm_config, 'ihdm'), (ddpm, 'ddpm'),
                                            (score_sde, 'score_sde')])
def test_the_empty_preset_is_digits_and_an_unknown_one_names_the_file(module, method):
    config = module.get_config('')
    assert (config.preset, config.method, config.data.name) == ('digits', method, 'digits')
    with pytest.raises(ValueError, match=rf"Unknown preset 'cifar100' for configs/{module.__name__.split('.')[-1]}\.py"):
        module.get_config('cifar100')


@pytest.mark.parametrize('module, preset', [(m, p) for m in (blurring, ihdm_config, ddpm, score_sde, dit_config,
                                                             simple_diffusion) for p in m.PRESETS]
                         + [(edm_config, p) for p in ('digits_convnext', 'digits_uvit', 'digits_dit', 'digits_cond')])
def test_every_preset_builds_its_network_loss_and_sampler(module, preset):
    config = module.get_config(preset)
    network = builders.build_module(config)
    builders.build_loss(config)
    res, ch = config.data.resolution, config.data.channels
    prior = np.random.default_rng(0).uniform(-1, 1, (4, res, res, ch)).astype(np.float32)
    sampling = builders.build_sampling(config, prior)
    assert sampling.num_steps == config.sample.num_steps
    shape = jax.eval_shape(lambda: network.init(jax.random.key(0), jnp.zeros((1, res, res, ch)), jnp.zeros((1,))))
    assert jax.tree.leaves(shape)
    builders.check(config)


def test_ddpm_hybrid_loss_config_errors_name_the_field(tmp_path):
    config = tiny(ddpm.get_config())
    config.loss.vlb_weight = 0.001
    with pytest.raises(ValueError, match=r'loss\.vlb_weight > 0 trains the variance: it needs model\.learned_variance=True'):
        runner.prepare(config, tmp_path)
    config.loss.vlb_weight = -1.0
    with pytest.raises(ValueError, match=r'loss\.vlb_weight must be >= 0'):
        runner.prepare(config, tmp_path)
    config = tiny(score_sde.get_config())
    config.model.learned_variance, config.loss.vlb_weight = True, 0.001
    with pytest.raises(ValueError, match=r"needs process\.schedule='discrete'"):
        builders.build_loss(config)


def test_ddpm_hybrid_loss_trains_the_variance_channels_of_the_network():
    """The launcher's loss for learned variance + vlb_weight: finite, larger than L_simple alone, and
    the network's variance half gets a gradient only from L_vlb."""
    from jaxdiff import train
    config = tiny(ddpm.get_config())
    config.model.learned_variance, config.sample.variance = True, 'learned_range'
    module = builders.build_module(config)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (BATCH, 8, 8, 1)), jnp.float32)
    params = module.init(jax.random.key(0), images, jnp.zeros((BATCH,)))['params']
    make_model = builders.model_factory(config)
    objectives, variance_grads = {}, {}
    for weight in (0.0, 0.001):
        config.loss.vlb_weight = weight
        setup = train.make_setup(config, module, make_model, builders.build_loss(config))
        objective, _, grads = train.loss_and_grads(setup, params, {'image': images}, jax.random.key(1))
        objectives[weight] = float(objective)
        variance_grads[weight] = np.asarray(grads['dec_8x8_aux_conv']['kernel'][..., 1])  # the output conv's variance channel
    assert np.isfinite(objectives[0.001]) and objectives[0.001] > objectives[0.0]
    assert np.all(variance_grads[0.0] == 0) and np.abs(variance_grads[0.001]).max() > 0


@pytest.mark.slow  # 128x128 on a CPU: about a minute, most of it compiling.
def test_photos128_preset_trains_and_samples_on_128px_photo_patches(tmp_path):
    """configs/ddpm.py:photos128 end to end with the network narrowed to 8 channels (the preset's
    63M-parameter U-Net is a GPU job): one training step of 16 patches, then two samples."""
    config = ddpm.get_config('photos128')
    config.model.kwargs.model_channels = 8
    config.train.total_images, config.train.checkpoint_every_steps = 16, 1
    config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 2, 2, 2
    runner.train_and_evaluate(config, tmp_path)
    out = runner.sample_mode(config, tmp_path)
    with np.load(out['samples_file']) as f:
        images = f['images']
    assert images.shape == (2, 128, 128, 3) and images.dtype == np.uint8


def test_simple_diffusion_config_follows_the_image_size_and_uses_the_multiscale_v_model():
    """configs/simple_diffusion.py: the shifted cosine takes image_d from data.resolution (so a
    --config.data.resolution override shifts it), v output with the eps loss, multiscale from 8; the
    imagenet512 preset interpolates 32 -> 256 (eq. 6)."""
    from jaxdiff.methods import common
    config = simple_diffusion.get_config()
    assert (config.preset, config.method, config.data.name) == ('photos32', 'simple_diffusion', 'photos')
    assert config.data.random_crop and config.model.output == 'v' and config.loss.type == 'eps'
    process = common.build_process(config)
    assert process.schedule == processes.ShiftedCosine(32, 32)
    config.data.resolution = 64
    assert common.build_process(config).schedule == processes.ShiftedCosine(64, 32)
    assert common.build_process(simple_diffusion.get_config('imagenet512')).schedule == processes.InterpolatedCosine(512)
    loss = builders.build_loss(simple_diffusion.get_config())
    assert loss.keywords['multiscale_lowest'] == 8 and loss.keywords['target'] == 'eps'
    config = simple_diffusion.get_config()
    config.loss.multiscale_lowest = 12
    with pytest.raises(ValueError, match=r'loss\.multiscale_lowest=12'):
        builders.build_loss(config)
    config.loss.multiscale_lowest, config.loss.min_snr_gamma = 8, -1.0
    with pytest.raises(ValueError, match=r'loss\.min_snr_gamma'):
        builders.build_loss(config)
    with pytest.raises(ValueError, match=r"Unknown preset 'cifar100' for configs/simple_diffusion\.py"):
        simple_diffusion.get_config('cifar100')


@pytest.mark.slow  # about a minute on 2 cores, most of it compiling
def test_simple_diffusion_default_trains_samples_and_scores_on_photo_crops(tmp_path):
    """The default preset end to end, narrowed: random 32 px photo crops, the U-ViT, the multiscale
    loss, DDIM sampling, scored against the fixed patches with the default features."""
    config = simple_diffusion.get_config()
    k = config.model.kwargs
    k.model_channels, k.transformer_channels, k.num_transformer_blocks = 16, 32, 1
    config.train.batch_size, config.train.total_images, config.train.checkpoint_every_steps = 16, 32, 1
    config.sample.num_steps, config.sample.num_samples, config.sample.batch_size = 4, 16, 16
    config.eval.num_samples, config.eval.batch_size = 64, 64
    runner.train_and_evaluate(config, tmp_path)
    report = json.loads((tmp_path / 'eval_00000002.json').read_text())
    assert report['num_samples'] == 64 and np.isfinite(report['fd']) and report['fd'] > 0


@pytest.mark.parametrize('solver', ['ddim', 'ancestral'])
def test_clip_denoised_keeps_samples_of_a_wild_network_in_the_data_range(solver):
    """sample.clip_denoised wraps the sampled model in parameterize.ClipDenoised: a network whose eps
    output is -10 z (x0_hat far outside [-1, 1] at every step) gives samples in [-1, 1] up to the
    last step's noise (sigma of the schedule's first step, < 0.01), and far outside without it."""
    config = tiny(ddpm.get_config())
    config.sample.solver, config.sample.num_steps = solver, 10

    class Wild:
        label_dim = 0

        def apply(self, variables, x, noise_labels, class_labels=None, augment_labels=None, train=False, rngs=None):
            return -10 * x

    keys = jax.vmap(jax.random.key)(jnp.arange(16))
    shape = (config.data.resolution,) * 2 + (config.data.channels,)
    plain = np.asarray(builders.build_sampling(config).draw(Wild(), None, keys, None, shape))
    config.sample.clip_denoised = True
    sampling = builders.build_sampling(config)
    clipped = np.asarray(sampling.draw(Wild(), None, keys, None, shape))
    assert 'x0 clipped' in sampling.description
    assert np.abs(plain).max() > 2
    assert np.abs(clipped).max() <= 1.01
