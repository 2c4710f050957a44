"""DhariwalUNet (jaxdiff.nets.adm) against arrays recorded with NVlabs/edm's own DhariwalUNet.

The reference files (tests/data/edm/adm*.npz) hold the weights of small random networks and the
raw network output F of each recorded preconditioning call; see ../shared/refs/edm/README.md.

Runtime: on CPU, one jitted forward pass compiles in a few seconds, while op-by-op dispatch
compiles every op shape separately, so forward passes are jitted. Compiling JAX's random draws
is slow on CPU (about a second per distinct shape), so the tests that need initialised or
random weights use a tiny one-level net.
"""
import pathlib

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets.adm import DhariwalUNet
from jaxdiff.nets.convert import params_from_state_dict

ADM_NETS = ('adm', 'adm_iddpm', 'adm_cond')
DATA = pathlib.Path(__file__).parents[1] / 'data' / 'edm'


def recorded_calls(precision):
    """(net, call) for every recorded call, read from the files rather than hand-picked."""
    cases = []
    for name in ADM_NETS:
        with np.load(DATA / f'{name}.npz') as npz:
            prefix = f'{precision}/den/'
            calls = sorted({k[len(prefix):].split('/')[0] for k in npz.files if k.startswith(prefix)})
        cases += [pytest.param(name, pc, id=f'{name}-{pc}') for pc in calls]
    return cases


def net_kwargs(ref):
    """EDM's constructor kwargs of the recorded net; the Precond supplies the shape arguments."""
    kwargs = {k: v for k, v in ref.meta['model_kwargs'].items() if k != 'model_type'}
    out_channels = ref.state_dict['out_conv.weight'].shape[0]  # 2x image channels for iDDPM
    return dict(img_resolution=ref.meta['img_resolution'], in_channels=ref.meta['img_channels'],
                out_channels=out_channels, label_dim=ref.meta['label_dim'], **kwargs)


def call_inputs(ref, precision, pc, dtype):
    """(x, noise_labels, class_labels, augment_labels) as EDM's Precond passed them to the net."""
    base = f'{precision}/den/{pc}'
    labels = jnp.asarray(ref['inputs/class_labels'], dtype) if ref.meta['label_dim'] else None
    augment = jnp.asarray(ref['inputs/augment_labels'], dtype) if pc.endswith('_aug') else None
    return (jnp.asarray(ref.nhwc(f'{base}/c_in_x'), dtype), jnp.asarray(ref[f'{base}/c_noise'], dtype),
            labels, augment)


# Two programs that compute the same function (train vs eval mode, dropped vs zero vs missing
# labels) may round differently: XLA vectorises, fuses and contracts multiply-adds per program
# and per CPU. Each layer of the tiny net adds a few float32 roundings (2^-24 = 6e-8) of its
# output's scale, so 1e-5 of the output's maximum (about 170 roundings) bounds that; a label that
# leaks through changes a sample's output by far more (checked below against 100x this).
SAME_FUNCTION_TOL = 1e-5


def rows_match(out, ref, tol=SAME_FUNCTION_TOL):
    """Per sample: max |out - ref| <= tol * max |ref| (over the whole batch)."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.abs(out - ref).max(axis=(1, 2, 3)) <= tol * np.abs(ref).max()


def rel_err(out, ref):
    """max |out - ref| / max |ref|."""
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


def shapes(tree):
    return {jax.tree_util.keystr(path): tuple(np.shape(v)) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('name,pc', recorded_calls('f32'))
def test_matches_edm_output_float32(edm_refs, name, pc):
    ref = edm_refs(name)
    net = DhariwalUNet(**net_kwargs(ref))
    params = params_from_state_dict(ref.state_dict)
    out = jax.jit(net.apply)({'params': params}, *call_inputs(ref, 'f32', pc, jnp.float32))
    expected = ref.nhwc(f'f32/den/{pc}/F')
    assert out.dtype == jnp.float32 and out.shape == expected.shape
    assert rel_err(out, expected) <= 1e-5  # Measured ~1e-6.


@pytest.mark.parametrize('name,pc', recorded_calls('f64'))
def test_matches_edm_output_float64(edm_refs, name, pc):
    ref = edm_refs(name)
    net = DhariwalUNet(**net_kwargs(ref))
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params_from_state_dict(ref.state_dict))
        out = jax.jit(net.apply)({'params': params}, *call_inputs(ref, 'f64', pc, jnp.float64))
        assert out.dtype == jnp.float64
        # Measured ~2e-15: the implementations differ only in the order of float64 roundings.
        assert rel_err(out, ref.nhwc(f'f64/den/{pc}/F')) <= 1e-12


@pytest.mark.parametrize('name', ADM_NETS)
def test_param_tree_matches_converted_edm_state_dict(edm_refs, name):
    ref = edm_refs(name)
    kwargs = net_kwargs(ref)
    net = DhariwalUNet(**kwargs)
    n, res = 2, kwargs['img_resolution']
    x = jnp.zeros((n, res, res, kwargs['in_channels']))
    # Without class or augment labels: the tree must not depend on which inputs init saw.
    variables = jax.eval_shape(net.init, jax.random.key(0), x, jnp.zeros(n))  # Structure only.
    assert set(variables) == {'params'}
    assert shapes(variables['params']) == shapes(params_from_state_dict(ref.state_dict))


def test_edm_list_kwargs_give_a_hashable_module_equal_to_tuples(edm_refs):
    kwargs = net_kwargs(edm_refs('adm_cond'))  # channel_mult, attn_resolutions are JSON lists
    as_tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    assert isinstance(kwargs['channel_mult'], list)
    assert DhariwalUNet(**kwargs) == DhariwalUNet(**as_tuples)
    assert hash(DhariwalUNet(**kwargs)) == hash(DhariwalUNet(**as_tuples))  # Usable as a static jit arg.


def test_bfloat16_compute_is_close_to_float32_and_returns_float32(edm_refs):
    ref = edm_refs('adm_cond')
    params = {'params': params_from_state_dict(ref.state_dict)}
    net = DhariwalUNet(**net_kwargs(ref), dtype=jnp.bfloat16)
    out = jax.jit(net.apply)(params, *call_inputs(ref, 'f32', 'edm_aug', jnp.float32))
    assert out.dtype == jnp.float32
    assert rel_err(out, ref.nhwc('f32/den/edm_aug/F')) <= 5e-2  # bf16 has 8 mantissa bits.


def tiny_net(**overrides):
    """A one-level net: cheap to compile, with class and augment labels and one attention block
    (the bottleneck block attends with one 64-channel head)."""
    kwargs = dict(img_resolution=4, in_channels=3, out_channels=3, label_dim=10, augment_dim=2,
                  model_channels=64, channel_mult=[1], channel_mult_emb=1, num_blocks=0,
                  attn_resolutions=[], dropout=0.0)
    return DhariwalUNet(**dict(kwargs, **overrides))


def tiny_inputs(n):
    """(x, noise_labels, one-hot class_labels, augment_labels) for tiny_net, drawn in numpy."""
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.standard_normal((n, 4, 4, 3), np.float32)),
            jnp.asarray(rng.standard_normal(n, np.float32)),
            jnp.asarray(np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]),
            jnp.asarray(rng.standard_normal((n, 2), np.float32)))


def random_params(net, inputs):
    """EDM-style randomised weights (all nonzero) for `net`, drawn in numpy so no JAX random
    initialiser has to be compiled."""
    rng = np.random.default_rng(0)
    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            return rng.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
        return rng.standard_normal(leaf.shape, np.float32) * 0.1 + ('scale' in name)
    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(net.init, jax.random.key(0), *inputs))


def test_fresh_init_outputs_exact_zeros():
    # The tiny net has every zero-initialised layer kind: map_augment, conv1, proj, out_conv.
    net = tiny_net()
    inputs = tiny_inputs(2)
    # Compiling the initialisers' random draws is slow on CPU; optimising them is not needed.
    init = jax.jit(net.init, compiler_options={'xla_backend_optimization_level': 0})
    params = init(jax.random.key(1), *inputs)['params']
    leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    zero_init = {p: v for p, v in leaves.items()
                 if any(f"'{name}'" in p for name in ('out_conv', 'map_augment', 'conv1', 'proj'))}
    assert any("'proj'" in p for p in zero_init)
    assert all(not v.any() for v in zero_init.values())
    # All other weights are random: the zero output is due to the zero-initialised layers.
    assert all(v.all() for p, v in leaves.items() if p not in zero_init and p.endswith("['kernel']"))
    out = jax.jit(net.apply)({'params': params}, *inputs)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_label_dropout_one_in_training_equals_zero_labels():
    net = tiny_net(label_dropout=1.0)
    x, noise, labels, augment = inputs = tiny_inputs(4)
    params = random_params(net, inputs)
    apply = jax.jit(net.apply, static_argnames='train')
    dropped = apply(params, x, noise, labels, augment, train=True, rngs={'dropout': jax.random.key(3)})
    zeroed = apply(params, x, noise, jnp.zeros_like(labels), augment)
    assert rows_match(dropped, zeroed).all()
    # Missing class labels mean zero labels.
    assert rows_match(apply(params, x, noise, None, augment), zeroed).all()
    # Outside training labels are kept, and they change every sample's output far beyond rounding.
    labelled = apply(params, x, noise, labels, augment)
    assert not rows_match(labelled, zeroed, tol=100 * SAME_FUNCTION_TOL).any()


def test_label_dropout_drops_whole_label_vectors_per_sample():
    net = tiny_net(label_dropout=0.5)
    x, noise, labels, augment = inputs = tiny_inputs(8)
    params = random_params(net, inputs)
    apply = jax.jit(net.apply, static_argnames='train')
    kept = np.asarray(apply(params, x, noise, labels, augment))
    zeroed = np.asarray(apply(params, x, noise, jnp.zeros_like(labels), augment))
    assert not rows_match(kept, zeroed, tol=100 * SAME_FUNCTION_TOL).any()  # Else "kept" proves nothing.
    seen_kept = seen_dropped = False
    for seed in range(4):  # Until both outcomes occurred; each sample is a fair coin.
        out = np.asarray(apply(params, x, noise, labels, augment, train=True, rngs={'dropout': jax.random.key(seed)}))
        is_kept, is_dropped = rows_match(out, kept), rows_match(out, zeroed)
        assert np.all(is_kept ^ is_dropped)  # Each sample keeps or loses its whole label vector.
        seen_kept, seen_dropped = seen_kept or is_kept.any(), seen_dropped or is_dropped.any()
        if seen_kept and seen_dropped:
            break
    assert seen_kept and seen_dropped


def test_dropout_draws_from_dropout_rng_only_in_training():
    # Traced with eval_shape only: whether the 'dropout' rng is requested is decided at trace time.
    net = tiny_net(dropout=0.5)
    inputs = tiny_inputs(2)
    params = jax.eval_shape(net.init, jax.random.key(0), *inputs)
    jax.eval_shape(net.apply, params, *inputs)  # Eval mode: deterministic, needs no rng.
    with pytest.raises(flax.errors.InvalidRngError, match='dropout'):
        jax.eval_shape(lambda p: net.apply(p, *inputs, train=True), params)
    jax.eval_shape(lambda p, key: net.apply(p, *inputs, train=True, rngs={'dropout': key}), params, jax.random.key(0))
    # Training without any dropout draws nothing.
    net = tiny_net(dropout=0.0, label_dropout=0.0)
    jax.eval_shape(lambda p: net.apply(p, *inputs, train=True), params)


@pytest.mark.parametrize('field,kwargs,x_res', [
    ('img_resolution', dict(img_resolution=12, channel_mult=[1, 2, 2, 2]), 12),  # 12 / 2**3
    ('img_resolution', dict(img_resolution=8), 16),  # Input size differs.
    ('in_channels', dict(img_resolution=8, in_channels=4), 8),  # Input channels differ.
    ('label_dropout', dict(img_resolution=8, label_dropout=1.5), 8),
])
def test_invalid_options_raise_value_error_naming_field(field, kwargs, x_res):
    kwargs = dict(dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=32,
                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]), **kwargs)
    net = DhariwalUNet(**kwargs)
    with pytest.raises(ValueError, match=field):
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, x_res, x_res, 3)), jnp.zeros(1))
