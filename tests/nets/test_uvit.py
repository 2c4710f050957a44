"""simple diffusion's U-ViT (jaxdiff.nets.uvit): shapes, gradients, where the parameters grow,
the paper-sized configuration, labels, bf16 compute, dropout placement and the config checks.

There is no reference implementation to compare with (the paper published no code), so these
tests check the properties the module promises. CPU cost: structure-only checks use
jax.eval_shape (tracing, no compilation); the few real forward passes use one tiny net (32 px,
one 16-channel conv level, a two-block transformer of width 32 at 16x16) with numpy-drawn
weights and XLA's cheap compile settings.
"""
import functools

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets.uvit import UVIT_CONFIGS, UViT, check

# XLA options that cut CPU compile times. Optimisation level 0 only for float32: XLA:CPU runs
# float64 convolutions as generated loops that become far slower without optimisation.
FAST_COMPILE_F64 = {'xla_llvm_disable_expensive_passes': True}
FAST_COMPILE = dict(FAST_COMPILE_F64, xla_backend_optimization_level=0)
TINY = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, model_channels=16, channel_mult=(1,),
            num_blocks=1, transformer_channels=32, num_transformer_blocks=2, num_heads=2)
# Two programs computing the same function may round differently (fusion, vectorisation); the tiny
# net has ~15 layers of float32 roundings (6e-8 each), so 1e-5 of the output scale bounds that.
SAME_FUNCTION_TOL = 1e-5


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def shapes(tree) -> dict:
    return {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def inputs(net: UViT, n=2, seed=1):
    rng = np.random.default_rng(seed)
    r = net.img_resolution
    labels = np.eye(net.label_dim, dtype=np.float32)[rng.integers(0, net.label_dim, n)] if net.label_dim else None
    return (jnp.asarray(rng.standard_normal((n, r, r, net.in_channels), np.float32)),
            jnp.asarray(rng.uniform(-10, 10, n).astype(np.float32)),  # logSNR-like noise labels
            None if labels is None else jnp.asarray(labels))


def abstract_params(net: UViT, n=1):
    r = net.img_resolution
    return jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((n, r, r, net.in_channels)), jnp.zeros(n))['params']


def random_params(net: UViT):
    """Nonzero weights for every leaf (zero-initialised layers included), drawn in numpy so no JAX
    initialiser is compiled."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if leaf.ndim >= 2:
            return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * 0.1 + ('scale' in jax.tree_util.keystr(path)))
    return jax.tree_util.tree_map_with_path(draw, abstract_params(net))


@functools.lru_cache(maxsize=None)
def jitted_apply(net: UViT, train: bool, f64: bool = False):
    """net.apply as one jitted function per (net, mode): calls with the same argument structure
    (another dropout key, other parameter values) reuse the compiled program."""
    def apply(params, x, noise, labels, rngs):
        return net.apply({'params': params}, x, noise, labels, train=train, rngs=rngs)
    return jax.jit(apply, compiler_options=FAST_COMPILE_F64 if f64 else FAST_COMPILE)


def run(net: UViT, params, x, noise, labels, *, train=False, rngs=None):
    f64 = x.dtype == jnp.float64
    return np.asarray(jitted_apply(net, train, f64)(params, x, noise, labels, rngs))


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope='module')
def tiny():
    """(net, params, inputs, float32 output) of the tiny net, computed once."""
    net = UViT(**TINY)
    params, args = random_params(net), inputs(net)
    return net, params, args, run(net, params, *args)


@pytest.mark.parametrize('res,patch,mult', [(32, 1, (1,)), (64, 1, (1, 2)), (128, 2, (1, 2)), (256, 4, (1, 2))])
def test_output_shape_and_16x16_transformer_at_each_resolution(res, patch, mult):
    net = UViT(img_resolution=res, in_channels=3, out_channels=6, model_channels=8, channel_mult=mult,
               num_blocks=1, transformer_channels=16, num_transformer_blocks=1, num_heads=2, patch_size=patch)
    x = jnp.zeros((2, res, res, 3))
    params = abstract_params(net)
    out = jax.eval_shape(lambda p: net.apply({'params': p}, x, jnp.zeros(2)), params)
    assert out.shape == (2, res, res, 6) and out.dtype == jnp.float32
    assert params['transformer']['pos_embedding'].shape == (16 * 16, 16)  # 256 tokens.
    assert f'enc_{res // patch}x{res // patch}_block0' in params


def test_forward_and_fresh_init(tiny):
    net, params, args, out = tiny
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all() and np.abs(out).max() > 0
    # A fresh network outputs exact zeros (zero-initialised output layer); params are float32.
    init = jax.jit(net.init, compiler_options=FAST_COMPILE)
    fresh = init(jax.random.key(1), *args)['params']
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(fresh))
    assert shapes(fresh) == shapes(params)
    np.testing.assert_array_equal(run(net, fresh, *args), 0.0)


def test_gradients_reach_every_parameter():
    # Patching (in and out), learned positions and labels; all weights nonzero (see random_params).
    net = UViT(**dict(TINY, patch_size=2, num_transformer_blocks=1))  # 16 px conv level, 8x8 tokens.
    params, args = random_params(net), inputs(net)
    loss = lambda p: jnp.mean(jnp.square(net.apply({'params': p}, *args)))
    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)
    dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads) if not np.any(np.asarray(g))]
    assert not dead, f'no gradient reaches {dead}'
    assert {'in_conv', 'out_conv', 'map_label'} <= set(params) and params['in_conv']['kernel'].shape == (2, 2, 3, 16)


@pytest.mark.parametrize('field', ['num_transformer_blocks', 'transformer_channels'])
def test_parameters_grow_only_in_the_transformer_stack(field):
    base = dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=10, model_channels=32,
                channel_mult=(1, 2), num_blocks=2, transformer_channels=128, num_transformer_blocks=4, num_heads=4)
    small = abstract_params(UViT(**base))
    large = abstract_params(UViT(**dict(base, **{field: 2 * base[field]})))
    outside = lambda p: {k: v for k, v in p.items() if k != 'transformer'}
    assert shapes(outside(large)) == shapes(outside(small))  # Nothing else changes, not even a shape.
    grown = count(large['transformer']) - count(small['transformer'])
    assert grown > 0 and count(large) - count(small) == grown
    # The stack's parameters, counted by hand (E = 4 * 32 embedding channels, 64 channels at the
    # lowest conv level, 16 x 16 tokens, mlp_ratio 4): per block the modulation (E -> 4D), qkv,
    # proj and the two MLP layers; then proj_in, the learned positions, the final norm, proj_out.
    def stack(d, blocks, e=128, c=64, tokens=256):
        return blocks * (4 * d * e + 12 * d * d + 13 * d) + (c * d + d) + tokens * d + 2 * d + (d * c + c)
    for params, cfg in ((small, base), (large, dict(base, **{field: 2 * base[field]}))):
        assert count(params['transformer']) == stack(cfg['transformer_channels'], cfg['num_transformer_blocks'])


def test_paper_configurations_have_about_2b_parameters():
    # The paper reports its ImageNet U-ViT as a 2B-parameter model (a rounded figure; see the note
    # on UVIT_CONFIGS for what could not be verified in this session).
    counts = {}
    for name in ('imagenet128', 'imagenet512'):  # imagenet256 differs from both only in its patch layers.
        cfg = UVIT_CONFIGS[name]
        net = UViT(in_channels=3, out_channels=3, **cfg)
        params = abstract_params(net)
        counts[name] = count(params)
        assert cfg['img_resolution'] // cfg['patch_size'] // 2 ** len(cfg['channel_mult']) == 16
        assert count(params['transformer']) > 0.95 * counts[name]  # Scaled at 16x16.
    assert 1.9e9 < counts['imagenet128'] < 2.1e9  # Measured: 2,031,245,827.
    assert max(counts.values()) - min(counts.values()) < 1e5  # Only the patch layers differ.


def test_zero_labels_equal_none_labels(tiny):
    net, params, (x, noise, labels), out = tiny
    zeroed = run(net, params, x, noise, jnp.zeros_like(labels))
    missing = run(net, params, x, noise, None)
    assert rel_err(missing, zeroed) <= SAME_FUNCTION_TOL
    assert rel_err(out, zeroed) > 100 * SAME_FUNCTION_TOL  # Labels matter, so the check above can fail.


def test_bfloat16_compute_keeps_float32_params_and_is_close(tiny):
    net, params, args, out = tiny
    net16 = UViT(**TINY, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract_params(net16)))
    out16 = run(net16, params, *args)
    assert out16.dtype == np.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per operation); ~20 layers of
    # those stay well below 5% of the output's scale. Measured 1.9e-2.
    assert rel_err(out16, out) <= 5e-2


def dropout_sites(net: UViT, train: bool) -> set:
    """Resolutions (side of the feature map or token grid) at which a dropout with nonzero rate
    is applied in training mode, recorded by intercepting every flax Dropout call while tracing."""
    sites = set()

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Dropout) and context.method_name == '__call__':
            if module.rate > 0 and not module.deterministic:
                shape = args[0].shape
                sites.add(shape[1] if len(shape) == 4 else int(round(np.sqrt(shape[1]))))
        return next_fun(*args, **kwargs)

    params = abstract_params(net)
    x, noise = jnp.zeros((1, net.img_resolution, net.img_resolution, 3)), jnp.zeros(1)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda p, k: net.apply({'params': p}, x, noise, train=train, rngs={'dropout': k}),
                       params, jax.random.key(0))
    return sites


@pytest.mark.parametrize('dropout_resolution,expected', [(16, {16}), (32, {16, 32}), (64, {16, 32, 64}), (8, set())])
def test_dropout_only_at_low_resolution(dropout_resolution, expected):
    # Levels at 64 and 32 px, transformer at 16x16.
    net = UViT(img_resolution=64, in_channels=3, out_channels=3, model_channels=8, channel_mult=(1, 1), num_blocks=1,
               transformer_channels=16, num_transformer_blocks=1, num_heads=2, dropout=0.3,
               dropout_resolution=dropout_resolution)
    assert dropout_sites(net, train=True) == expected
    assert dropout_sites(net, train=False) == set()


def test_dropout_changes_training_outputs_only_where_active(tiny):
    net, params, args, out = tiny
    active = UViT(**TINY, dropout=0.5)  # dropout_resolution 16: the transformer and the 32 -> 16 block.
    a, b = (run(active, params, *args, train=True, rngs={'dropout': jax.random.key(s)}) for s in (0, 1))
    assert rel_err(a, b) > 1e-2 and rel_err(a, out) > 1e-2
    # Below every feature map's resolution nothing is dropped: training then draws no random
    # numbers at all (no 'dropout' rng is needed), as in eval mode.
    inactive = UViT(**TINY, dropout=0.5, dropout_resolution=8)
    jax.eval_shape(lambda p: inactive.apply({'params': p}, *args, train=True), params)
    with pytest.raises(flax.errors.InvalidRngError, match='dropout'):
        jax.eval_shape(lambda p: active.apply({'params': p}, *args, train=True), params)


def test_float64_input_gives_float64_output(tiny):
    net, params, args, out = tiny
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x, noise, labels = (jnp.asarray(a, jnp.float64) for a in args)
        out64 = run(net, p64, x, noise, labels)
    assert out64.dtype == np.float64
    assert rel_err(out, out64) <= 1e-4  # float32 vs float64 rounding only.


def test_list_kwargs_give_a_hashable_module_equal_to_tuples():
    kwargs = dict(TINY, channel_mult=[1])
    assert UViT(**kwargs) == UViT(**TINY) and hash(UViT(**kwargs)) == hash(UViT(**TINY))


CHECK_BASE = dict(img_resolution=64, channel_mult=(1, 2), patch_size=1, num_heads=2, transformer_channels=32,
                  model_channels=16)


@pytest.mark.parametrize('kwargs', [
    dict(img_resolution=48),  # 48 / 2**2 = 12: the transformer may run below 16x16.
    dict(model_channels=36, channel_mult=(1,)),  # 36 channels in 9 groups of 4.
    dict(transformer_channels=36, num_heads=2, pos_embedding='sinusoidal'),
])
def test_check_accepts_valid_neighbours_of_the_failing_cases(kwargs):
    check(**dict(CHECK_BASE, **kwargs))


@pytest.mark.parametrize('field,kwargs', [
    ('img_resolution', dict(img_resolution=36, channel_mult=(1, 2, 2))),  # 36 / 8
    ('patch_size', dict(img_resolution=30, patch_size=4)),
    ('patch_size', dict(patch_size=0)),
    ('channel_mult', dict(channel_mult=())),
    ('transformer_channels', dict(transformer_channels=30, num_heads=4)),
    ('transformer_channels', dict(transformer_channels=18, num_heads=2, pos_embedding='sinusoidal')),
    ('pos_embedding', dict(pos_embedding='rope')),
    ('model_channels', dict(model_channels=36, channel_mult=(5,))),  # 180 channels into 32 groups.
    ('dropout', dict(dropout=1.0)),
    ('augment_dim', dict(augment_dim=9)),
])
def test_check_raises_value_error_naming_field(field, kwargs):
    cfg = dict(CHECK_BASE, **kwargs)
    with pytest.raises(ValueError, match=field):
        check(**cfg)
    # The module runs the same checks on its own fields when called.
    net = UViT(in_channels=3, out_channels=3, num_blocks=1, num_transformer_blocks=1, **cfg)
    with pytest.raises(ValueError, match=field):
        abstract_params(net)


@pytest.mark.parametrize('field,x_shape', [('img_resolution', (1, 32, 32, 3)), ('in_channels', (1, 64, 64, 4))])
def test_inputs_are_checked(field, x_shape):
    net = UViT(img_resolution=64, in_channels=3, out_channels=3, model_channels=8, channel_mult=(1, 1), num_blocks=1,
               transformer_channels=16, num_transformer_blocks=1, num_heads=2)
    with pytest.raises(ValueError, match=field):
        jax.eval_shape(net.init, jax.random.key(0), jnp.zeros(x_shape), jnp.zeros(1))
