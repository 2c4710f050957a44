"""SongUNet (DDPM++ / NCSN++) against NVlabs/edm's SongUNet.

References: tests/data/edm/{ddpmpp,ncsnpp,ddpmpp_cond}.npz (EDM's own raw network outputs for
every recorded preconditioning call, in float32 and float64; see ../shared/refs/edm/README.md)
and tests/data/edm_extra/songunet_skip.npz (the skip encoder and decoder, which those files do
not cover, recorded by tests/data/make_songunet_skip_ref.py).

These small nets are compile-bound on CPU, so every forward pass is compiled once per
configuration with XLA's cheap settings, and all recorded calls of a file run as one batch.
"""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets.convert import params_from_state_dict
from jaxdiff.nets.ddpmpp import SongUNet

SONG_NETS = ('ddpmpp', 'ncsnpp', 'ddpmpp_cond')
EXTRA = pathlib.Path(__file__).parents[1] / 'data' / 'edm_extra' / 'songunet_skip.npz'
# XLA options that cut CPU compile times, most of all for the dropout-mask RNG code (~2 s instead
# of ~20 s). Backend optimisation level 0 is kept to float32: XLA:CPU runs float64 convolutions
# as generated loops, which become ~30x slower without optimisation.
FAST_COMPILE = {'xla_llvm_disable_expensive_passes': True}
FAST_COMPILE_F32 = dict(FAST_COMPILE, xla_backend_optimization_level=0)


def compiled_apply(net: SongUNet, params, *args, train=False, rngs=None):
    """net.apply({'params': params}, *args) compiled for exactly these argument shapes."""
    def apply(params, args, rngs):
        return net.apply({'params': params}, *args, train=train, rngs=rngs)
    f64 = any(jax.dtypes.canonicalize_dtype(leaf.dtype) == jnp.float64 for leaf in jax.tree.leaves(params))
    options = FAST_COMPILE if f64 else FAST_COMPILE_F32
    return jax.jit(apply).lower(params, args, rngs).compile(compiler_options=options)


def run(net: SongUNet, params, *args, train=False, rngs=None):
    return compiled_apply(net, params, *args, train=train, rngs=rngs)(params, args, rngs)


# Two programs that compute the same function (train vs eval mode, dropped vs zero vs missing
# labels, another batch row) may round differently: XLA vectorises, fuses and contracts
# multiply-adds per program and per CPU (seen: 8e-7 absolute between two rows of one batch on an
# AVX2 CPU). Each of the tiny net's ~40 layers adds a few float32 roundings (2^-24 = 6e-8) of
# its output's scale, so 1e-5 of the output's maximum (about 170 roundings) bounds that, while
# a label that leaks through changes the output by more than 1e-2 (checked in `tiny`).
SAME_FUNCTION_TOL = 1e-5


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def net_kwargs(ref) -> dict:
    """SongUNet constructor kwargs of a reference file (EDM's Precond adds the shape arguments)."""
    meta = ref.meta
    kwargs = {k: v for k, v in meta['model_kwargs'].items() if k != 'model_type'}
    return dict(img_resolution=meta['img_resolution'], in_channels=meta['img_channels'],
                out_channels=meta['img_channels'], label_dim=meta.get('label_dim', 0), **kwargs)


def recorded_calls(ref, prec: str):
    """{name: (network inputs, expected F)} of every denoiser call under `<prec>/den/`, NHWC."""
    dtype = np.float32 if prec == 'f32' else np.float64
    names = sorted({k.split('/')[2] for k in ref.keys(f'{prec}/den/') if k.endswith('/c_in_x')})
    assert names, f'no {prec} denoiser calls in {ref.name}'
    calls = {}
    for pc in names:
        base = f'{prec}/den/{pc}'
        labels = ref['inputs/class_labels'].astype(dtype) if 'inputs/class_labels' in ref else None
        # `<pc>_aug` is the plain call plus augmentation labels; the plain one passes none.
        augment = ref['inputs/augment_labels'].astype(dtype) if pc.endswith('_aug') else None
        args = (ref.nhwc(f'{base}/c_in_x'), ref[f'{base}/c_noise'], labels, augment)
        calls[pc] = args, ref.nhwc(f'{base}/F')
    return calls


def batched(calls: dict):
    """All calls' inputs concatenated along the batch axis, to run them through one compile.

    A call without augmentation labels gets zeros: map_augment has no bias, so that adds an
    exact 0 to the embedding, as skipping it does. (The None path is tested on the tiny nets.)
    """
    args = [a for a, _ in calls.values()]
    x, noise = (np.concatenate([a[i] for a in args]) for i in (0, 1))
    labels = None if args[0][2] is None else np.concatenate([a[2] for a in args])
    if all(a[3] is None for a in args):
        augment = None
    else:
        dim = next(a[3] for a in args if a[3] is not None).shape[1]
        augment = np.concatenate([a[3] if a[3] is not None else np.zeros((len(a[0]), dim), a[0].dtype)
                                  for a in args])
    return x, noise, labels, augment


def errors_against_edm(ref, prec: str, dtype=None) -> dict:
    """Relative error of SongUNet's output for each recorded call, with EDM's weights."""
    calls = recorded_calls(ref, prec)
    params = params_from_state_dict(ref.state_dict, dtype=np.float32 if prec == 'f32' else np.float64)
    out = run(SongUNet(**net_kwargs(ref), dtype=dtype), params, *batched(calls))
    assert out.dtype == (jnp.float32 if prec == 'f32' else jnp.float64)
    outs = np.split(np.asarray(out), len(calls))
    errors = {pc: rel_err(o, expected) for (pc, (_, expected)), o in zip(calls.items(), outs)}
    print(f'\n{ref.name} {prec} dtype={dtype}: max relative error',
          {k: f'{v:.1e}' for k, v in errors.items()})
    return errors


@pytest.mark.parametrize('name', SONG_NETS)
def test_float32_output_matches_edm_for_every_recorded_call(edm_refs, name):
    # Measured 0.8e-6 .. 1.7e-6: float32 rounding in a different order than PyTorch's.
    errors = errors_against_edm(edm_refs(name), 'f32')
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize('name', SONG_NETS)
def test_float64_output_matches_edm_to_roundoff(edm_refs, name):
    # Measured 2e-15 .. 4e-15: the port differs from EDM only in float64 rounding order.
    with jax.enable_x64(True):
        errors = errors_against_edm(edm_refs(name), 'f64')
    assert max(errors.values()) <= 1e-12, errors


def test_bfloat16_compute_is_close_to_float32_and_returns_float32(edm_refs):
    # Measured ~1e-2 (bfloat16 has an 8-bit mantissa).
    errors = errors_against_edm(edm_refs('ddpmpp_cond'), 'f32', dtype=jnp.bfloat16)
    assert max(errors.values()) <= 5e-2, errors


def init_shapes(net: SongUNet, *args) -> dict:
    """Shapes of `net.init`'s params, without computing them."""
    return jax.eval_shape(lambda: net.init(jax.random.key(0), *args))['params']


def tree_shapes(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('name', SONG_NETS)
def test_init_param_tree_equals_converted_edm_state_dict(edm_refs, name):
    ref = edm_refs(name)
    shapes = init_shapes(SongUNet(**net_kwargs(ref)), *batched(recorded_calls(ref, 'f32')))
    assert tree_shapes(shapes) == tree_shapes(params_from_state_dict(ref.state_dict))


# --- Options the shared refs do not cover: skip encoder / decoder -------------------------------

EXTRA_CONFIGS = ('skip_skip', 'residual_skip')


@functools.cache
def extra_refs():
    data = np.load(EXTRA)
    return data, json.loads(str(data['meta/json']))['configs']


def extra_case(cfg: str):
    """kwargs, state dict, NHWC inputs and expected NHWC output of one recorded skip config."""
    data, configs = extra_refs()
    prefix = f'{cfg}/params/'
    state_dict = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
    get = lambda key: data[f'{cfg}/{key}'] if f'{cfg}/{key}' in data.files else None
    args = (np.moveaxis(get('x'), 1, -1), get('noise_labels'), get('class_labels'), get('augment_labels'))
    return configs[cfg], state_dict, args, np.moveaxis(get('F'), 1, -1)


@pytest.mark.parametrize('cfg', EXTRA_CONFIGS)
def test_skip_encoder_and_decoder_match_edm(cfg):
    kwargs, state_dict, args, expected = extra_case(cfg)
    net, params = SongUNet(**kwargs), params_from_state_dict(state_dict)
    assert tree_shapes(init_shapes(net, *args)) == tree_shapes(params)
    err = rel_err(run(net, params, *args), expected)
    print(f'\n{cfg} f32: max relative error {err:.1e}')
    assert err <= 1e-5  # Measured ~8e-7.


def called_modules(net: SongUNet, *args) -> set:
    """Names of the top-level submodules a forward pass calls, weightless ones included."""
    def init():
        return net.init_with_output(jax.random.key(0), *args, capture_intermediates=True)[1]
    return set(jax.eval_shape(init)['intermediates']) - {'__call__'}


@pytest.mark.parametrize('cfg', EXTRA_CONFIGS)
def test_every_edm_module_including_weightless_resamplers_has_a_namesake(cfg):
    kwargs, state_dict, args, _ = extra_case(cfg)
    # EDM's modules by state-dict key: `enc.4x4_aux_down.resample_filter` -> enc_4x4_aux_down.
    edm_modules = {'_'.join(k.split('.')[:2]) if k.startswith(('enc.', 'dec.')) else k.split('.')[0]
                   for k in state_dict}
    assert edm_modules == called_modules(SongUNet(**kwargs), *args)


TINY = dict(img_resolution=8, in_channels=3, out_channels=2, model_channels=8, channel_mult=(1, 1, 2),
            channel_mult_emb=1, num_blocks=1, attn_resolutions=(4,))


@pytest.mark.parametrize('encoder_type', ['standard', 'skip', 'residual'])
@pytest.mark.parametrize('decoder_type', ['standard', 'skip'])
def test_every_encoder_decoder_combination_builds_with_edm_names(encoder_type, decoder_type):
    net = SongUNet(**TINY, encoder_type=encoder_type, decoder_type=decoder_type, resample_filter=(1, 3, 3, 1))
    x, noise = jnp.zeros((2, 8, 8, 3)), jnp.zeros((2,))
    out = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x, noise)[0])
    assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32
    expected = set()
    for res in (4, 2):  # The levels below full resolution.
        if encoder_type == 'skip':
            expected |= {f'enc_{res}x{res}_aux_down', f'enc_{res}x{res}_aux_skip'}
        if encoder_type == 'residual':
            expected.add(f'enc_{res}x{res}_aux_residual')
    for res in ((2, 4, 8) if decoder_type == 'skip' else (8,)):
        expected |= {f'dec_{res}x{res}_aux_norm', f'dec_{res}x{res}_aux_conv'}
        if decoder_type == 'skip' and res != 2:  # The running output sum is upsampled to res.
            expected.add(f'dec_{res}x{res}_aux_up')
    assert {n for n in called_modules(net, x, noise) if '_aux_' in n} == expected


# --- Labels and dropout, on a tiny net with random weights --------------------------------------

COND = dict(img_resolution=8, in_channels=3, out_channels=2, model_channels=8, channel_mult=(1, 2),
            channel_mult_emb=1, num_blocks=1, attn_resolutions=(4,), label_dim=5, augment_dim=2, dropout=0.0)


def random_params(net: SongUNet, *args, seed=0) -> dict:
    """Parameters randomised like the EDM refs', so that every path (labels too) matters.

    The default init scales the output convolutions by 1e-5, which would hide the label and
    dropout effects these tests look for.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        z = rng.standard_normal(leaf.shape)
        if len(leaf.shape) >= 2:
            z = z / np.sqrt(np.prod(leaf.shape[:-1]))  # N(0, 1/fan_in)
        else:
            z = 1 + 0.1 * z if jax.tree_util.keystr(path[-1:]) == "['scale']" else 0.1 * z
        return z.astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, init_shapes(net, *args))


@pytest.fixture(scope='module')
def tiny():
    """Inputs, random weights and eval-mode outputs (with the labels, with zero labels)."""
    n, rng = 16, np.random.default_rng(0)
    x = rng.standard_normal((n, 8, 8, 3)).astype(np.float32)
    noise = rng.standard_normal(n).astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[np.arange(n) % 5]
    net = SongUNet(**COND)
    params = random_params(net, x, noise, labels)
    both = run(net, params, np.concatenate([x, x]), np.concatenate([noise, noise]),
               np.concatenate([labels, 0 * labels]))
    labelled, zero = np.split(np.asarray(both), 2)
    assert rel_err(labelled, zero) > 1e-2  # Otherwise the label tests below prove nothing.
    return dict(x=x, noise=noise, labels=labels, params=params, labelled=labelled, zero=zero)


def test_label_dropout_one_in_train_mode_equals_zero_labels(tiny):
    x, noise, labels = tiny['x'], tiny['noise'], tiny['labels']
    net = SongUNet(**COND, label_dropout=1.0)
    out = run(net, tiny['params'], np.concatenate([x, x]), np.concatenate([noise, noise]),
              np.concatenate([labels, 0 * labels]), train=True, rngs={'dropout': jax.random.key(1)})
    dropped, zero = np.split(np.asarray(out), 2)
    assert rel_err(dropped, zero) <= SAME_FUNCTION_TOL
    assert rel_err(dropped, tiny['zero']) <= SAME_FUNCTION_TOL  # The eval-mode output with zero labels.


def test_label_dropout_drops_whole_label_vectors(tiny):
    net = SongUNet(**COND, label_dropout=0.5)
    out = np.asarray(run(net, tiny['params'], tiny['x'], tiny['noise'], tiny['labels'], train=True,
                         rngs={'dropout': jax.random.key(3)}))
    atol = SAME_FUNCTION_TOL * np.abs(tiny['zero']).max()
    is_kept = np.all(np.isclose(out, tiny['labelled'], rtol=0, atol=atol), axis=(1, 2, 3))
    is_zero = np.all(np.isclose(out, tiny['zero'], rtol=0, atol=atol), axis=(1, 2, 3))
    assert np.all(is_kept ^ is_zero) and is_kept.any() and is_zero.any(), (is_kept, is_zero)


def test_missing_class_labels_count_as_zero_labels(tiny):
    out = run(SongUNet(**COND), tiny['params'], tiny['x'], tiny['noise'], None)
    assert rel_err(out, tiny['zero']) <= SAME_FUNCTION_TOL


def test_dropout_is_active_only_in_train_mode(tiny):
    x, noise, labels, params = tiny['x'], tiny['noise'], tiny['labels'], tiny['params']
    net = SongUNet(**dict(COND, dropout=0.5))
    apply = compiled_apply(net, params, x, noise, labels, train=True, rngs={'dropout': jax.random.key(0)})
    a, b = (apply(params, (x, noise, labels), {'dropout': jax.random.key(k)}) for k in (1, 2))
    assert rel_err(a, b) > 1e-2 and rel_err(a, tiny['labelled']) > 1e-2
    # Eval mode draws no randomness at all; training cannot run without the 'dropout' rng.
    jax.eval_shape(lambda: net.apply({'params': params}, x, noise, labels))
    with pytest.raises(Exception, match='dropout'):
        jax.eval_shape(lambda: net.apply({'params': params}, x, noise, labels, train=True))


# --- Validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize('field, value', [
    ('embedding_type', 'sinusoidal'),
    ('encoder_type', 'progressive'),
    ('decoder_type', 'residual'),
    ('img_resolution', 10),  # Not divisible by 2**(len(channel_mult)-1) = 4.
])
def test_invalid_options_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SongUNet(**dict(TINY, **{field: value}))


def test_input_of_wrong_resolution_raises_value_error():
    net = SongUNet(**TINY)
    with pytest.raises(ValueError, match='img_resolution'):
        init_shapes(net, jnp.zeros((2, 16, 16, 3)), jnp.zeros((2,)))
