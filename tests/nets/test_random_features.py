"""jaxdiff.nets.random_features: the fixed random-CNN feature network (scoring without Inception).

The network is fixed by numpy's default_rng(SEED), so its weights are checked against pinned
values; its usefulness is checked with the Fréchet distance (`jaxdiff.metrics`) on the embedded
photo patches at 32 px: real-vs-real against blurred and noisy patches, and the rank of the feature
covariance. The scoring side (eval.features='random', reference files) is in tests/test_scoring.py.
"""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from jaxdiff import data, metrics
from jaxdiff.nets import random_features as R


@pytest.fixture(scope='module')
def patches():
    return data.load_embedded('photos', 32)[0]  # 1,024 RGB patches, 32x32, in [-1, 1]


@pytest.fixture(scope='module')
def patch_features(patches):
    return np.asarray(R.random_features(patches)[0], np.float64)


def box_blur(x, times):
    """`times` passes of a 3x3 box filter (edge padding), per channel."""
    for _ in range(times):
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
        x = sum(p[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9
    return x.astype(np.float32)


def test_weights_are_drawn_from_numpy_with_the_fixed_seed():
    one, two = R.random_weights(), R.random_weights()
    assert [w.shape for w in one] == [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 64), (3, 3, 64, 64)]
    for a, b in zip(one, two):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    # numpy's PCG64 stream is the same on every platform: these values are the network.
    np.testing.assert_allclose(one[0][:, 0, 0, 0], [0.3458001, 0.4881855, -0.4328514], rtol=1e-6)
    np.testing.assert_allclose(one[1][0, 0, 0, :3], [-0.00374463, -0.28950006, -0.19339086], rtol=1e-6)
    # Stage 0: zero-mean taps (edges, not colour); He-normal scale sqrt(2 / (9 C_in)) at every stage.
    assert np.abs(one[0].sum(axis=(0, 1))).max() < 1e-6
    for w in one:
        assert w.std() == pytest.approx(np.sqrt(2 / (9 * w.shape[2])), rel=0.1)
    assert not np.array_equal(R.random_weights(seed=1)[0], one[0])


def test_features_of_a_fixed_input_are_identical_across_calls():
    x = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    first, second = (np.asarray(R.random_features(x)[0]) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    # The same images in another batch: the same features (per-image statistics), to rounding.
    np.testing.assert_allclose(np.asarray(R.random_features(x[:3])[0]), first[:3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('resolution', [16, 32, 64])
@pytest.mark.parametrize('channels', [1, 3])
def test_shapes_and_dtypes(resolution, channels):
    x = np.random.default_rng(resolution).uniform(-1, 1, (4, resolution, resolution, channels)).astype(np.float32)
    features, logits = R.random_features(x)
    assert features.shape == (4, R.feature_dim(channels)) and features.dtype == np.float32
    assert logits.shape == (4, 0) and logits.dtype == np.float32
    assert np.all(np.isfinite(features))
    assert R.feature_dim(3) == 358 and R.feature_dim(1) == 354
    if channels == 1:  # one channel goes through stage 0 as three equal ones
        rgb = np.asarray(R.random_features(np.repeat(x, 3, axis=-1))[0])
        np.testing.assert_allclose(np.asarray(features)[:, 2:], rgb[:, 6:], rtol=1e-5, atol=1e-6)


def test_too_small_or_wrong_images_are_refused():
    with pytest.raises(ValueError, match=r'data\.resolution=8.*at least 16x16'):
        R.random_features(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r'\[N, H, W, 1 or 3\]'):
        R.random_features(np.zeros((2, 16, 16, 4), np.float32))


def test_frechet_distance_sees_blur_and_noise(patches):
    """FD of half the patches (even indices) against the other half (odd), as they are, blurred
    (1, 2, 3 passes of a 3x3 box filter) or with Gaussian noise (std 0.05, 0.1, 0.2, clipped to
    [-1, 1]): the same number of images, disjoint, on both sides of every FD. Measured (numpy
    2.4, jax 0.10 CPU): real vs real 0.039; blur 1.28, 1.94, 2.35; noise 0.27, 1.93, 11.9."""
    a, b = patches[0::2], patches[1::2]
    noise = np.random.default_rng(1).standard_normal(b.shape).astype(np.float32)

    def stats(x):
        return metrics.feature_statistics(np.asarray(R.random_features(x)[0], np.float64))

    with threadpool_limits(1):  # a 358 x 358 eigh is 20x slower on two busy cores with 2 threads
        ref = stats(a)
        fd = lambda x: metrics.frechet_distance(*ref, *stats(x))
        real = fd(b)
        blurred = [fd(box_blur(b, k)) for k in (1, 2, 3)]
        noisy = [fd(np.clip(b + s * noise, -1, 1)) for s in (0.05, 0.1, 0.2)]
    assert 0 < real < 0.1
    assert 10 * real < blurred[0] < blurred[1] < blurred[2]
    assert real < noisy[0] < noisy[1] < noisy[2] and 100 * real < noisy[2]


def test_feature_covariance_of_the_patches_is_full_rank(patch_features):
    """No feature is (nearly) a linear combination of the others: the covariance of the 1,024
    patches' 358 features has its smallest eigenvalue far above float32 rounding. Measured:
    eigenvalues 2.7e-7 .. 2.8 (ratio 9e-8); of the correlation matrix, smallest 1.8e-5; smallest
    feature variance 5e-4."""
    cov = np.cov(patch_features, rowvar=False)
    with threadpool_limits(1):
        eig = np.linalg.eigvalsh(cov)
        sd = np.sqrt(np.diag(cov))
        corr_eig = np.linalg.eigvalsh(cov / np.outer(sd, sd))
    rounding = (np.finfo(np.float32).eps * np.abs(patch_features).max()) ** 2  # ~1e-13
    assert patch_features.shape == (1024, 358)
    assert eig[0] > 1e-8 * eig[-1] and eig[0] > 1e4 * rounding
    assert corr_eig[0] > 1e-6
    assert sd.min() ** 2 > 1e-5  # no dead feature
