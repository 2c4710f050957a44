"""ConvNeXtUNet (jaxdiff.nets.convnext_unet) against a PyTorch reference, and its properties.

tests/data/nets/convnext_ref.npz holds the weights, inputs and outputs of small random PyTorch
networks written from the same architecture description (tests/data/make_convnext_refs.py): two
16 px nets with two stages (plain; class labels + gated skips + out_channels != in_channels) and
one 32 px net with four stages (run with labels and gates, and with neither on the same weights).

Runtime: forward passes are jitted (one compilation each, a few seconds at most on CPU) and each
distinct program is compiled once (`jitted`); structure-only checks use jax.eval_shape, and only
one small layer's random initialisation is compiled (a whole net's takes ~8 s on CPU).
"""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets.convert import params_from_state_dict
from jaxdiff.nets.convnext_unet import ConvNeXtUNet, DepthwiseConv2d, check, DEPTHWISE

REF = pathlib.Path(__file__).parents[1] / 'data' / 'nets' / 'convnext_ref.npz'

# The tutorial's default network, TwoResUNet(dim=64, channels=3) (dim_mults (1, 2, 4, 8)), and its
# AttentionUNet twin: parameter counts summed by hand over the tutorial's layer list (the
# recording script's PyTorch module gives the same numbers, stored in the reference meta data).
TUTORIAL_PARAMS = 62_699_395
TUTORIAL_GATED_PARAMS = 63_226_567


@pytest.fixture(scope='module')
def ref():
    with np.load(REF) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads(str(arrays['meta/json']))


def state_dict(arrays, net, keep=None):
    prefix = f'params/{net}/'
    sd = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if keep is None or keep(k)}


def call_setup(ref, call, dtype=None):
    """(net, params, inputs) of one recorded call; a net without labels or gates (deep_plain) takes
    the weights of its recorded net less the label embedding and the gates."""
    arrays, meta = ref
    spec = meta['calls'][call]
    kwargs = spec['kwargs']
    net = ConvNeXtUNet(**kwargs, dtype=dtype)
    keep = lambda k: ((kwargs.get('label_dim') or not k.startswith('label_embed.'))
                      and (kwargs.get('use_skip_attention') or '_gate.' not in k))
    params = params_from_state_dict(state_dict(arrays, spec['net'], keep))
    return net, {'params': params}, inputs_of(arrays, kwargs, spec['labels'])


def inputs_of(arrays, kwargs, labels):
    res = kwargs['img_resolution']
    return (jnp.asarray(arrays[f'inputs/x{res}']), jnp.asarray(arrays['inputs/noise_labels']),
            jnp.asarray(arrays['inputs/class_labels']) if labels else None)


# XLA's backend optimisation level changes speed and the order of roundings, not the function;
# level 0 halves the CPU compile times here (3.7 s -> 1.8 s for a forward, 14 s -> 4 s for a gradient).
FAST_COMPILE = {'xla_backend_optimization_level': 0}


@functools.lru_cache(maxsize=None)
def jitted(net):
    """One jitted apply per module (modules are hashable), so repeated programs compile once."""
    return jax.jit(net.apply, compiler_options=FAST_COMPILE)


def rel_err(out, expected):
    """max |out - expected| / max |expected|."""
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(out - expected).max() / np.abs(expected).max())


def shapes(tree):
    return {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


CALLS = ('small', 'small_cond_gated', 'deep_cond_gated', 'deep_plain')


@pytest.mark.parametrize('call', CALLS)
def test_param_tree_matches_reference_state_dict(ref, call):
    net, params, inputs = call_setup(ref, call)
    arrays, meta = ref
    spec = meta['calls'][call]
    # All of the net's parameters come from the state dict, with the state dict's shapes.
    assert shapes(jax.eval_shape(net.init, jax.random.key(0), *inputs)['params']) == shapes(params['params'])
    if call != 'deep_plain':  # The full reference net: no state-dict entry is left over.
        assert len(jax.tree_util.tree_leaves(params)) == len(state_dict(arrays, spec['net']))


# The reference and this module compute the same float32 function in different orders (PyTorch's
# and XLA's convolution algorithms, GroupNorm reductions, sin/cos/erf implementations). Each layer
# adds a few roundings (2^-24 = 6e-8) relative to its activations' scale, which GroupNorm keeps
# near the output's in every block; over the 60-100 conv and dense layers of these nets the
# differences add up like a random walk, so 1e-5 of max |out| (~170 roundings) bounds them with
# room. Measured: 8e-7 to 1.4e-6 (far below the effect of one wrong input, e.g. a dropped label:
# 0.3, see test_null_label_is_zero_labels_and_labels_matter).
F32_TOL = 1e-5


@pytest.mark.parametrize('call', CALLS)
def test_matches_reference_output_float32(ref, call):
    net, params, inputs = call_setup(ref, call)
    out = jitted(net)(params, *inputs)
    expected = ref[0][f'out/{call}/f32']
    assert out.dtype == jnp.float32 and out.shape == expected.shape
    assert rel_err(out, expected) <= F32_TOL


def test_matches_reference_output_float64(ref):
    net, params, inputs = call_setup(ref, 'small_cond_gated')
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        inputs64 = [jnp.asarray(a, jnp.float64) for a in inputs]
        out = jax.jit(net.apply, compiler_options=FAST_COMPILE)(params64, *inputs64)
        assert out.dtype == jnp.float64
        # The same function up to the order of float64 roundings. Measured 2e-15.
        assert rel_err(out, ref[0]['out/small_cond_gated/f64']) <= 1e-12


def test_null_label_is_zero_labels_and_labels_matter(ref):
    net, params, (x, noise, labels) = call_setup(ref, 'small_cond_gated')
    apply = jitted(net)
    with_labels = np.asarray(apply(params, x, noise, labels))
    zeros = np.asarray(apply(params, x, noise, jnp.zeros_like(labels)))
    missing = np.asarray(apply(params, x, noise, None))
    # Missing labels are zeros: the same function, traced as two programs (rounding may differ).
    assert rel_err(missing, zeros) <= F32_TOL
    # The recorded batch's last row has the all-zero (null) label; the other rows' labels change them.
    assert not labels[-1].any() and rel_err(with_labels[-1], zeros[-1]) <= F32_TOL
    assert all(rel_err(with_labels[i], zeros[i]) > 100 * F32_TOL for i in range(len(labels) - 1))


def test_gradients_reach_every_parameter(ref):
    net, params, (x, noise, labels) = call_setup(ref, 'small_cond_gated')
    weights = jnp.asarray(np.random.default_rng(0).standard_normal((*x.shape[:3], net.out_channels)), jnp.float32)
    loss = lambda p: jnp.sum(net.apply(p, x, noise, labels) * weights)
    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)
    norms = {jax.tree_util.keystr(p): float(jnp.abs(g).max()) for p, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert any('gate' in p for p in norms) and any('label_embed' in p for p in norms)
    assert all(np.isfinite(v) and v > 0 for v in norms.values()), {p: v for p, v in norms.items() if not v > 0}


def test_bfloat16_compute_keeps_float32_params_and_output(ref):
    net, params, inputs = call_setup(ref, 'small_cond_gated', dtype=jnp.bfloat16)
    variables = jax.eval_shape(net.init, jax.random.key(0), *inputs)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jitted(net)(params, *inputs)
    assert out.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per op); through ~60 layers of
    # random weights the output moves by a few 1e-2 of its scale. Measured 1.4e-2.
    assert rel_err(out, ref[0]['out/small_cond_gated/f32']) <= 6e-2


def test_depthwise_conv_initialises_like_pytorch_groups_conv():
    # PyTorch's default init draws U(-b, b), b = 1/sqrt(fan_in), with fan_in = 7*7 for a depthwise
    # conv (one input channel per group), for the weights and the bias. (The other layers use
    # layers.Conv2d / Linear with the same rule; the parity tests load weights instead.)
    params = jax.jit(DepthwiseConv2d(7).init, compiler_options=FAST_COMPILE)(
        jax.random.key(0), jnp.zeros((1, 8, 8, 64)))['params']
    bound = 1 / 7
    assert params['kernel'].shape == (7, 7, 1, 64) and params['bias'].shape == (64,)
    for leaf in (params['kernel'], params['bias']):
        assert 0.9 * bound < float(jnp.abs(leaf).max()) <= bound


@pytest.mark.parametrize('res', [8, 4, 2, 1])
def test_shifted_depthwise_conv_equals_grouped_conv_with_gradients(res):
    # The CPU implementation (shifted slices, live taps only, hand-written VJP) against XLA's
    # grouped convolution and its autodiff, in float64 where both are sums of at most 49 products
    # per output: they agree to a few float64 roundings. At res 2 and 1 most taps see only padding.
    rng = np.random.default_rng(res)
    x, kernel, probe = (rng.standard_normal(shape) for shape in ((3, res, res, 5), (7, 7, 1, 5), (3, res, res, 5)))
    loss = lambda f: lambda x, k: jnp.sum(f(x, k) * probe)
    with jax.enable_x64(True):
        x, kernel = jnp.asarray(x), jnp.asarray(kernel)
        outputs = [DEPTHWISE[name](x, kernel) for name in ('shifted', 'grouped')]
        grads = [jax.grad(loss(DEPTHWISE[name]), argnums=(0, 1))(x, kernel) for name in ('shifted', 'grouped')]
    assert outputs[0].dtype == outputs[1].dtype == jnp.float64
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-12)
    for shifted, grouped in zip(*grads):
        assert shifted.dtype == jnp.float64
        np.testing.assert_allclose(shifted, grouped, rtol=0, atol=1e-11)


@pytest.mark.parametrize('res,gated', [(16, True), (32, False), (64, True), (128, False)])
def test_output_shape_and_dtype_at_each_resolution(res, gated):
    net = ConvNeXtUNet(img_resolution=res, in_channels=3, out_channels=5, label_dim=10, model_channels=8,
                       use_skip_attention=gated)
    x, noise = jnp.zeros((2, res, res, 3)), jnp.zeros(2)
    variables = jax.eval_shape(net.init, jax.random.key(0), x, noise)
    out = jax.eval_shape(net.apply, variables, x, noise, jnp.zeros((2, 10)))
    assert out.shape == (2, res, res, 5) and out.dtype == jnp.float32


def count(net, res):
    variables = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, res, res, 3)), jnp.zeros(1))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables))


def test_parameter_count_of_the_tutorial_default(ref):
    kwargs = dict(img_resolution=32, in_channels=3, out_channels=3)  # dim=64, dim_mults=(1, 2, 4, 8)
    assert count(ConvNeXtUNet(**kwargs), 32) == TUTORIAL_PARAMS == ref[1]['param_counts']['tutorial_default']
    assert (count(ConvNeXtUNet(**kwargs, use_skip_attention=True), 32) == TUTORIAL_GATED_PARAMS
            == ref[1]['param_counts']['tutorial_default_gated'])
    # The count does not depend on the resolution; a label embedding adds label_dim * 4C weights.
    small = dict(in_channels=3, out_channels=3, model_channels=8)
    assert count(ConvNeXtUNet(img_resolution=64, **small), 64) == count(ConvNeXtUNet(img_resolution=16, **small), 16)
    assert count(ConvNeXtUNet(img_resolution=16, label_dim=10, **small), 16) == count(
        ConvNeXtUNet(img_resolution=16, **small), 16) + 10 * 4 * 8


def test_list_kwargs_give_a_hashable_module_equal_to_tuples():
    kwargs = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=8)
    as_list, as_tuple = ConvNeXtUNet(**kwargs, channel_mult=[1, 2]), ConvNeXtUNet(**kwargs, channel_mult=(1, 2))
    assert as_list == as_tuple and hash(as_list) == hash(as_tuple)  # Usable as a static jit argument.


@pytest.mark.parametrize('field,kwargs', [
    ('img_resolution', dict(img_resolution=12)),  # 12 / 2**3
    ('channel_mult', dict(channel_mult=())),
    ('model_channels', dict(model_channels=6 + 1)),
    ('dropout', dict(dropout=0.1)),
    ('augment_dim', dict(augment_dim=2)),
    ('depthwise', dict(depthwise='fft')),
])
def test_check_raises_value_error_naming_field(field, kwargs):
    kwargs = dict(dict(img_resolution=16), **kwargs)
    with pytest.raises(ValueError, match=field):
        check(**kwargs)
    net = ConvNeXtUNet(in_channels=3, out_channels=3, **kwargs)
    res = kwargs['img_resolution']
    with pytest.raises(ValueError, match=field):  # The module checks the same at trace time.
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, res, res, 3)), jnp.zeros(1))
    check(img_resolution=16, channel_mult=[1, 2], unrelated_config_field=1)  # Other fields are ignored.


@pytest.mark.parametrize('field,x_shape,noise_shape,label_shape', [
    ('img_resolution', (1, 8, 8, 3), (1,), None),
    ('in_channels', (1, 16, 16, 4), (1,), None),
    ('noise_labels', (1, 16, 16, 3), (2,), None),
    ('class_labels', (1, 16, 16, 3), (1,), (1, 4)),
])
def test_inconsistent_inputs_raise_value_error(field, x_shape, noise_shape, label_shape):
    net = ConvNeXtUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=5, model_channels=8)
    labels = None if label_shape is None else jnp.zeros(label_shape)
    with pytest.raises(ValueError, match=field):
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros(x_shape), jnp.zeros(noise_shape), labels)
