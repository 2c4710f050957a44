"""Shared layers: the slice-based FIR resampling equals EDM's grouped (transposed) convolutions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets import layers


def sum_tolerance(num_terms: int, x) -> float:
    """Absolute bound on the float32 rounding of two weighted sums of `num_terms` values of x
    (filter weights sum to 1) computed in different orders: each has at most num_terms roundings
    of at most 2^-24 max|x|."""
    return 2 * num_terms * 2.0 ** -24 * float(np.abs(np.asarray(x)).max())


def depthwise(x, f2d, *, stride=1, padding=0, lhs_dilation=1):
    """The grouped-convolution definition (what EDM runs in PyTorch), via lax."""
    c = x.shape[-1]
    k = jnp.asarray(f2d, x.dtype)[:, :, None, None] * jnp.ones((1, 1, 1, c), x.dtype)
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((padding, padding),) * 2,
                                        lhs_dilation=(lhs_dilation,) * 2,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)


@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1), (1, 2, 1), (1, 4, 6, 4, 1)])
@pytest.mark.parametrize('padding', [0, 1])
def test_downsample_matches_strided_grouped_conv(taps, padding):
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
    f2d = layers.resample_filter_2d(taps)
    np.testing.assert_allclose(layers.downsample_2x(x, taps, padding), depthwise(x, f2d, stride=2, padding=padding),
                               rtol=0, atol=sum_tolerance(f2d.size, x))


@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1), (1, 2, 1)])
@pytest.mark.parametrize('padding', [0, 1])
def test_upsample_matches_grouped_transposed_conv(taps, padding):
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
    f2d = layers.resample_filter_2d(taps)
    k = len(taps)
    expected = depthwise(x, 4 * f2d[::-1, ::-1], padding=k - 1 - padding, lhs_dilation=2)
    np.testing.assert_allclose(layers.upsample_2x(x, taps, padding), expected, rtol=0, atol=sum_tolerance(f2d.size, 4 * x))


def test_box_filter_resampling_is_average_pooling_and_nearest_neighbour():
    x = jax.random.normal(jax.random.key(2), (1, 4, 4, 2))
    pooled = x.reshape(1, 2, 2, 2, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(layers.downsample_2x(x, (1, 1), 0), pooled, rtol=0, atol=sum_tolerance(4, x))
    np.testing.assert_allclose(layers.upsample_2x(pooled, (1, 1), 0), pooled.repeat(2, 1).repeat(2, 2),
                               rtol=0, atol=sum_tolerance(1, pooled))


def _standardize_by_autodiff(x, axes, eps):
    """The plain formula, differentiated by JAX through both reductions."""
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(axis=axes, keepdims=True) + eps)


def test_standardize_closed_form_derivatives_equal_autodiff_in_float64():
    """`layers.standardize`'s hand-written JVP, and the gradient JAX transposes from it, equal
    autodiff of the plain formula. Float64 on O(1) values: both are a few dozen operations whose
    rounding is near 1e-15 relative, so 1e-10 can only fail on a wrong formula (a dropped term is O(1))."""
    with jax.enable_x64():
        k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
        x = 3.0 * jax.random.normal(k1, (2, 4, 4, 3, 5), jnp.float64) + 1.0
        dx = jax.random.normal(k2, x.shape, jnp.float64)
        g = jax.random.normal(k3, x.shape, jnp.float64)
        axes, eps = (1, 2, 4), 1e-5
        ours = lambda x: layers.standardize(x, axes, eps)
        plain = lambda x: _standardize_by_autodiff(x, axes, eps)
        np.testing.assert_allclose(ours(x), plain(x), rtol=0, atol=1e-12)
        np.testing.assert_allclose(jax.jvp(ours, (x,), (dx,))[1], jax.jvp(plain, (x,), (dx,))[1], rtol=0, atol=1e-10)
        np.testing.assert_allclose(jax.vjp(ours, x)[1](g)[0], jax.vjp(plain, x)[1](g)[0], rtol=0, atol=1e-10)
        small = x[:1, :2, :2, :1, :2]  # forward mode over every input (likelihood.py's exact divergence)
        np.testing.assert_allclose(jax.jacfwd(ours)(small), jax.jacfwd(plain)(small), rtol=0, atol=1e-10)
        np.testing.assert_allclose(jax.hessian(lambda x: jnp.sum(ours(x) ** 3))(small),
                                   jax.hessian(lambda x: jnp.sum(plain(x) ** 3))(small), rtol=0, atol=1e-8)
