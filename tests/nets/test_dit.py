"""DiT (jaxdiff.nets.dit) against facebookresearch/DiT's own `DiT`, and its properties.

The reference file tests/data/nets/dit_ref.npz holds outputs of DiT's code (recorded by
tests/data/make_dit_refs.py) for DiT-S/2 at 32x32x4 ('s2') and a tiny two-block net ('tiny'),
with weights drawn by a counter-based generator that this file repeats (`dit_state_dict`): a
33M-parameter state dict is too large to ship, so the file keeps each tensor's shape and
fingerprint instead. It also holds DiT's parameter counts of all twelve models.

Runtime: forward passes are jitted (one compile each); tests that need no numbers use
jax.eval_shape, and the rest use the tiny net.
"""
import functools
import math
import pathlib
import zlib

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets import dit
from jaxdiff.nets.dit import DIT_SIZES, DiT, params_from_dit_state_dict

REF_FILE = pathlib.Path(__file__).parents[1] / 'data' / 'nets' / 'dit_ref.npz'
CONFIGS = {  # The recorded nets, in this module's fields (learn_sigma: out_channels = 2 in_channels).
    's2': dict(img_resolution=32, in_channels=4, out_channels=8, label_dim=10, patch_size=2, **DIT_SIZES['S']),
    'tiny': dict(img_resolution=16, in_channels=3, out_channels=6, label_dim=5, patch_size=4, hidden_size=64,
                 depth=2, num_heads=2, mlp_ratio=2.0),
}
# The paper's parameter counts in millions (Table 4, "Params (M)"; DiT-S/B/L/XL as in Table 1),
# for 256x256 images = 32x32x4 latents, learned sigma (8 output channels), 1000 classes.
PAPER_PARAMS_M = {'S/2': 33, 'S/4': 33, 'S/8': 33, 'B/2': 130, 'B/4': 130, 'B/8': 131,
                  'L/2': 458, 'L/4': 458, 'L/8': 459, 'XL/2': 675, 'XL/4': 675, 'XL/8': 676}


@pytest.fixture(scope='module')
def ref():
    with np.load(REF_FILE) as npz:
        return dict(npz)


# ---------------------------------------------------------------------------------------------
# The recorded weights, regenerated (tests/data/make_dit_refs.py has the same three functions).

def hashed_uniform(seed_name, shape):
    """U(-1, 1) draws, float64: splitmix64 of (crc32(seed_name) * golden + index) mapped to 53 bits."""
    n = int(np.prod(shape))
    offset = (zlib.crc32(seed_name.encode()) * 0x9E3779B97F4A7C15) % 2**64
    z = np.arange(n, dtype=np.uint64) + np.uint64(offset)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0).reshape(shape)


def draw_weight(cfg, name, shape):
    if name.endswith('embedding_table.weight'):
        bound = 0.5
    elif name.endswith('.weight'):
        fan_out, fan_in = shape[0], int(np.prod(shape[1:]))
        bound = math.sqrt(6 / (fan_in + fan_out))
    else:
        bound = 0.2
    return (bound * hashed_uniform(f'{cfg}/{name}', shape)).astype(np.float32)


def fingerprint(w):
    w = np.asarray(w, np.float64).ravel()
    return np.concatenate([[w.sum(), np.abs(w).sum()], w[:4]])


@functools.cache
def _state_dict(cfg):
    with np.load(REF_FILE) as npz:
        prefix = f'{cfg}/shape/'
        state = {k[len(prefix):]: draw_weight(cfg, k[len(prefix):], tuple(npz[k])) for k in npz.files
                 if k.startswith(prefix)}
        for name, w in state.items():  # The generator here is the recording's.
            np.testing.assert_allclose(fingerprint(w), npz[f'{cfg}/fingerprint/{name}'], rtol=1e-10, err_msg=name)
    return state


def dit_state_dict(cfg):
    """The recorded net's weights by DiT's state-dict names (PyTorch layouts, float32)."""
    return dict(_state_dict(cfg))


def recorded_inputs(ref, cfg, dtype=jnp.float32):
    """(x NHWC, noise labels, one-hot class labels) of the recorded calls."""
    label_dim = CONFIGS[cfg]['label_dim']
    return (jnp.asarray(ref[f'{cfg}/x'], dtype), jnp.asarray(ref[f'{cfg}/t'], dtype),
            jnp.asarray(np.eye(label_dim)[ref[f'{cfg}/y']], dtype))


def rel_err(out, expected):
    """max |out - expected| / max |expected|."""
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(out, np.float64) - expected)) / np.max(np.abs(expected)))


def shapes(tree):
    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------------------------------------
# Same function as DiT's code.

# Float32 tolerance. Both implementations round every operation at 2^-24 = 6e-8 of its operands'
# scale, in different orders (fused kernels, matmul blocking); over DiT-S/2's 12 blocks (each a
# layer norm, attention with 256-term softmax sums and 384-term dot products, an MLP with
# 1536-term sums, and the adaLN modulations) these differences accumulate to a few 1e-6 of the
# output's scale: DiT's own float32 output differs from its float64 output by 3.1e-6 of its
# maximum (partly through its float32 timestep frequencies and position embedding). 1e-5 allows about three times that; a wrong layer moves the output by O(1), exact
# instead of tanh-approximate GELU by 1e-4. Subtler slips (layer-norm eps 1e-5 instead of 1e-6
# moves it by 9e-6) are left to the float64 comparison, which agrees to 1e-15.
FLOAT32_TOL = 1e-5


@pytest.mark.parametrize('cfg', CONFIGS)
def test_matches_dit_output_float32(ref, cfg):
    net = DiT(**CONFIGS[cfg])
    params = params_from_dit_state_dict(dit_state_dict(cfg))
    out = jax.jit(net.apply)({'params': params}, *recorded_inputs(ref, cfg))
    expected = ref[f'{cfg}/f32/out']
    assert out.dtype == jnp.float32 and out.shape == expected.shape
    assert rel_err(out, expected) <= FLOAT32_TOL  # Measured: s2 1.2e-6, tiny 7e-7.


@pytest.mark.parametrize('cfg', CONFIGS)
def test_matches_dit_output_float64(ref, cfg):
    net = DiT(**CONFIGS[cfg])
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params_from_dit_state_dict(dit_state_dict(cfg)))
        out = jax.jit(net.apply)({'params': params}, *recorded_inputs(ref, cfg, jnp.float64))
        assert out.dtype == jnp.float64
        # Measured 1.4e-15 (s2), 7e-16 (tiny): only the order of float64 roundings differs.
        assert rel_err(out, ref[f'{cfg}/f64/out']) <= 1e-12


@pytest.mark.parametrize('cfg', CONFIGS)
def test_param_tree_matches_converted_dit_state_dict(cfg):
    kwargs = CONFIGS[cfg]
    net = DiT(**kwargs)
    res, n = kwargs['img_resolution'], 1
    variables = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((n, res, res, kwargs['in_channels'])),
                               jnp.zeros(n))  # No labels given: the tree must not depend on it.
    assert set(variables) == {'params'}
    assert shapes(variables['params']) == shapes(params_from_dit_state_dict(dit_state_dict(cfg)))


def test_dit_null_label_is_the_one_hot_of_the_kept_null_row(ref):
    # Loading the table with its null row as an extra class reproduces DiT's unconditional output.
    kwargs = dict(CONFIGS['tiny'], label_dim=6)
    params = params_from_dit_state_dict(dit_state_dict('tiny'), num_classes=6)
    x, t, _ = recorded_inputs(ref, 'tiny')
    null = jnp.asarray(np.eye(6)[[5] * x.shape[0]], jnp.float32)
    out = jax.jit(DiT(**kwargs).apply)({'params': params}, x, t, null)
    assert rel_err(out, ref['tiny/null/out']) <= FLOAT32_TOL


def test_timestep_frequencies_are_dits_float32_values(ref):
    ours = dit.timestep_frequencies(128, np.float32)
    assert ours.dtype == np.float32
    # The same float32 exponents; exp rounds correctly here and to within 1 ulp in PyTorch.
    np.testing.assert_array_max_ulp(ours, ref['freqs'], maxulp=1)
    exact = np.exp(-math.log(10000) * np.arange(128) / 128)
    np.testing.assert_allclose(dit.timestep_frequencies(128, np.float64), exact, rtol=1e-15)


def test_position_embedding_is_dits(ref):
    np.testing.assert_allclose(dit.sincos_position_embedding(64, 4), ref['tiny/pos_embed'], rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# Parameter counts.

@pytest.mark.parametrize('model', PAPER_PARAMS_M)
def test_param_counts_match_paper_and_dit_code(ref, model):
    size, patch = model.split('/')
    kwargs = dict(img_resolution=32, in_channels=4, out_channels=8, label_dim=1000, patch_size=int(patch),
                  **DIT_SIZES[size])
    variables = jax.eval_shape(DiT(**kwargs).init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros(1))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
    # DiT's count (as its train.py prints it) also has the fixed pos_embed buffer (T x D, an
    # nn.Parameter with requires_grad=False) and the null label's embedding row (D).
    tokens, hidden = (32 // int(patch)) ** 2, kwargs['hidden_size']
    assert ours == int(ref[f'param_counts/DiT-{model}']) - tokens * hidden - hidden
    assert round(ours / 1e6) == PAPER_PARAMS_M[model]


# ---------------------------------------------------------------------------------------------
# Properties of the module.

# For the tiny net XLA's optimisation passes cost more compile time than they save at run time.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def tiny_net(**overrides):
    return DiT(**dict(CONFIGS['tiny'], **overrides))


def tiny_params():
    return params_from_dit_state_dict(dit_state_dict('tiny'))


def test_zero_labels_give_zero_label_embedding_and_equal_none(ref):
    x, t, labels = recorded_inputs(ref, 'tiny')
    params = tiny_params()
    apply = jax.jit(tiny_net().apply, compiler_options=FAST_COMPILE)
    zeroed = apply({'params': params}, x, t, jnp.zeros_like(labels))
    # Different programs for the same function may fuse, and so round, differently (a few float32
    # roundings, 2^-24 each, of the output's scale); labels move the output by 0.1 of its scale.
    assert rel_err(apply({'params': params}, x, t, None), zeroed) <= 1e-6
    # The same as a net without the label layer: zero labels add exactly nothing to c.
    unlabelled = {k: v for k, v in params.items() if k != 'y_embedder'}
    unlabelled_apply = jax.jit(tiny_net(label_dim=0).apply, compiler_options=FAST_COMPILE)
    assert rel_err(unlabelled_apply({'params': unlabelled}, x, t), zeroed) <= 1e-6
    assert rel_err(apply({'params': params}, x, t, labels), zeroed) > 0.1  # Labels do matter.


def test_bfloat16_compute_keeps_float32_params_and_is_close_to_float32(ref):
    net = tiny_net(dtype=jnp.bfloat16)
    inputs = recorded_inputs(ref, 'tiny')
    variables = jax.eval_shape(net.init, jax.random.key(0), *inputs)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    out = jax.jit(net.apply)({'params': tiny_params()}, *inputs)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    # bf16 keeps 8 significant bits (relative rounding 4e-3) in every matmul input; over two
    # blocks the output moves by about 1e-2 of its scale. Measured: 7e-3 (DiT-S/2: 9e-3).
    assert rel_err(out, ref['tiny/f32/out']) <= 3e-2


def test_gradients_reach_every_parameter(ref):
    # The recorded weights have non-zero adaLN and final layers (DiT starts them at zero, which
    # would block the gradient of everything before them); augment labels included.
    net = tiny_net(augment_dim=2)
    x, t, labels = recorded_inputs(ref, 'tiny')
    augment = jnp.asarray(np.random.default_rng(0).standard_normal((x.shape[0], 2)), jnp.float32)
    params = dict(tiny_params(), augment_embedder={'kernel': jnp.full((2, 64), 0.1, jnp.float32)})
    loss = lambda p: jnp.mean(jnp.square(net.apply({'params': p}, x, t, labels, augment)))
    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)
    assert shapes(grads) == shapes(jax.eval_shape(net.init, jax.random.key(0), x, t)['params'])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.isfinite(g).all()) and bool(jnp.any(g != 0)), jax.tree_util.keystr(path)


def test_fresh_init_is_dits_initialisation_and_outputs_zeros(ref):
    net = tiny_net()
    inputs = recorded_inputs(ref, 'tiny')
    init = jax.jit(net.init, compiler_options=FAST_COMPILE)  # Compiling random draws is slow on CPU.
    params = init(jax.random.key(1), *inputs)['params']
    leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    for path, w in leaves.items():
        if 'adaLN_modulation' in path or 'final_layer_linear' in path or path.endswith("['bias']"):
            assert not w.any(), path  # adaLN-Zero, zero output layer, zero biases.
        elif 'y_embedder' in path or 't_embedder' in path:
            assert 0.015 < w.std() < 0.025, path  # N(0, 0.02^2).
        else:  # Xavier-uniform, the patch conv as a linear map of the flattened patch.
            fan_in, fan_out = int(np.prod(w.shape[:-1])), w.shape[-1]
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, path
    np.testing.assert_array_equal(np.asarray(jax.jit(net.apply)({'params': params}, *inputs)), 0.0)


@pytest.mark.parametrize('res', [16, 32, 64])
def test_output_shape_and_dtype_at_each_resolution(res):
    net = DiT(img_resolution=res, in_channels=3, out_channels=6, label_dim=10, hidden_size=64, depth=1, num_heads=2)
    x, t, y = jnp.zeros((2, res, res, 3)), jnp.zeros(2), jnp.zeros((2, 10))
    variables = jax.eval_shape(net.init, jax.random.key(0), x, t, y)
    out = jax.eval_shape(net.apply, variables, x, t, y)
    assert out.shape == (2, res, res, 6) and out.dtype == jnp.float32


def test_dropout_draws_from_dropout_rng_only_in_training():
    net = tiny_net(dropout=0.1)
    inputs = (jnp.zeros((1, 16, 16, 3)), jnp.zeros(1))
    params = jax.eval_shape(net.init, jax.random.key(0), *inputs)
    jax.eval_shape(net.apply, params, *inputs)  # Eval mode needs no rng.
    with pytest.raises(flax.errors.InvalidRngError, match='dropout'):
        jax.eval_shape(lambda p: net.apply(p, *inputs, train=True), params)
    jax.eval_shape(lambda p: tiny_net().apply(p, *inputs, train=True), params)  # No dropout, no rng.


@pytest.mark.parametrize('field,kwargs', [
    ('img_resolution', dict(img_resolution=30, patch_size=4)),
    ('num_heads', dict(hidden_size=100, num_heads=6)),
    ('hidden_size', dict(hidden_size=6, num_heads=3)),  # Not divisible by 4 (sin-cos embedding).
    ('dropout', dict(dropout=1.0)),
])
def test_check_raises_value_error_naming_field(field, kwargs):
    dit.check(img_resolution=32, patch_size=2, hidden_size=64, num_heads=2, dropout=0.0, depth=3)  # Valid.
    kwargs = dict(dict(img_resolution=32, patch_size=2, hidden_size=64, num_heads=2), **kwargs)
    with pytest.raises(ValueError, match=field):
        dit.check(**kwargs)
    res = kwargs['img_resolution']
    net = DiT(in_channels=3, out_channels=3, **kwargs)
    with pytest.raises(ValueError, match=field):  # The module runs the same check.
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, res, res, 3)), jnp.zeros(1))


@pytest.mark.parametrize('field,shape', [('img_resolution', (1, 8, 8, 3)), ('in_channels', (1, 16, 16, 4))])
def test_input_shape_mismatch_raises_value_error_naming_field(field, shape):
    with pytest.raises(ValueError, match=field):
        jax.eval_shape(tiny_net().init, jax.random.key(0), jnp.zeros(shape), jnp.zeros(1))
