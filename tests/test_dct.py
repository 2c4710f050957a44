import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

from jaxdiff import dct


@pytest.mark.parametrize('n', [1, 2, 7, 8, 32])
def test_dct_matrix_is_orthonormal(n):
    c = dct.dct_matrix(n, np.float64)
    np.testing.assert_allclose(c @ c.T, np.eye(n), atol=1e-13)


@pytest.mark.parametrize('shape', [(3, 8, 8, 1), (2, 16, 12, 3), (5, 4, 4, 2)])
def test_dct2_matches_scipy_ortho_dctn_float32(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ref = scipy.fft.dctn(x.astype(np.float64), type=2, axes=(1, 2), norm='ortho')
    out = np.asarray(dct.dct2(jnp.asarray(x)))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-6 * np.abs(ref).max())
    back = np.asarray(dct.idct2(jnp.asarray(ref.astype(np.float32))))
    np.testing.assert_allclose(back, x, atol=2e-6 * np.abs(x).max())


def test_dct2_matches_scipy_and_inverts_exactly_in_float64():
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3))
    with jax.enable_x64(True):
        u = dct.dct2(jnp.asarray(x))
        assert u.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(u), scipy.fft.dctn(x, type=2, axes=(1, 2), norm='ortho'), atol=1e-12)
        np.testing.assert_allclose(np.asarray(dct.idct2(u)), x, atol=1e-12)


def test_dct2_preserves_the_norm_per_image_and_channel():
    x = np.random.default_rng(2).normal(size=(4, 16, 16, 3)).astype(np.float32)
    u = np.asarray(dct.dct2(jnp.asarray(x)))
    np.testing.assert_allclose(np.linalg.norm(u, axis=(1, 2)), np.linalg.norm(x, axis=(1, 2)), rtol=1e-5)


def test_constant_image_has_only_a_dc_coefficient():
    x = np.full((1, 8, 8, 1), 0.5, np.float32)
    u = np.array(dct.dct2(jnp.asarray(x)))  # a writable copy
    # sum / sqrt(H W), as two 8-term float32 inner products with fl(1/sqrt 8): at most
    # 7 + 7 + 3 roundings of 2^-24 relative (1.0e-6); 2e-6 leaves room for another order.
    np.testing.assert_allclose(u[0, 0, 0, 0], 0.5 * 8, rtol=2e-6)
    u[0, 0, 0, 0] = 0
    np.testing.assert_allclose(u, 0, atol=1e-6)


def test_dct2_rejects_arrays_without_spatial_axes():
    with pytest.raises(ValueError, match=r'\[\.\.\., H, W, C\]'):
        dct.dct2(jnp.zeros((8, 8)))
