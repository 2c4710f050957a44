"""Tests of jaxdiff.metrics against closed forms and independent float64 references: FD (closed
forms, scipy.linalg.sqrtm, a nuclear-norm form for singular covariances), KID (unbiasedness over
shuffles, a direct O(n^2) loop), precision/recall and density/coverage (brute force over all pairs),
the Inception score (known values, scipy's KL), streaming and merged statistics, statistics files,
and the gather across two processes (jax.distributed over gloo)."""
import math
import os
import pathlib
import sys
import textwrap

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import scipy.stats

from jaxdiff import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def random_features(rng, n, d, shift=0.0):
    return shift + rng.normal(size=(n, d)) @ rng.normal(size=(d, d))


def moments(x):
    return x.mean(0), np.cov(x, rowvar=False)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_of_diagonal_and_commuting_covariances_is_the_closed_form():
    # Common eigenvectors Q: FD = |mu1 - mu2|^2 + sum_k (sqrt(a_k) - sqrt(b_k))^2.
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    q = random_orthogonal(rng, d)
    fd = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_random_covariances():
    # The pytorch-fid / EDM computation: tr(sqrtm(sigma1 sigma2)) with scipy, full-rank case.
    rng = np.random.default_rng(1)
    for n1, n2, d in [(500, 300, 32), (200, 400, 16)]:
        (mu1, s1), (mu2, s2) = moments(random_features(rng, n1, d)), moments(random_features(rng, n2, d, 0.5))
        reference = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                     - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-10)


def test_frechet_distance_with_singular_covariances():
    # n < d samples: rank n - 1 covariances s = A^T A / (n - 1), A the centred features. The
    # nonzero eigenvalues of s1 s2 are those of M M^T with M = A1 A2^T / (n - 1), so
    # tr((s1 s2)^(1/2)) is M's nuclear norm: a well-conditioned reference with no square roots of
    # zero eigenvalues. scipy's sqrtm also agrees, to the accuracy such square roots allow.
    rng = np.random.default_rng(2)
    d = 32
    for n in (10, 20):
        f1, f2 = random_features(rng, n, d), random_features(rng, n, d, 0.3)
        (mu1, s1), (mu2, s2) = moments(f1), moments(f2)
        a1, a2 = f1 - mu1, f2 - mu2
        nuclear = np.linalg.svd(a1 @ a2.T / (n - 1), compute_uv=False).sum()
        reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
        fd = metrics.frechet_distance(mu1, s1, mu2, s2)
        assert fd == pytest.approx(reference, rel=1e-7)
        scipy_fd = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                    - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
        assert fd == pytest.approx(scipy_fd, rel=1e-6)
        assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-7)
    # Singular in closed form: zero eigenvalues in different directions.
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    a[:8], b[4:12] = 0.0, 0.0
    q = random_orthogonal(rng, d)
    fd = metrics.frechet_distance(np.zeros(d), q @ np.diag(a) @ q.T, np.zeros(d), q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-6)


def test_frechet_distance_is_symmetric_and_zero_on_itself():
    rng = np.random.default_rng(3)
    (mu1, s1), (mu2, s2) = moments(random_features(rng, 100, 16)), moments(random_features(rng, 50, 16, 1.0))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        metrics.frechet_distance(mu2, s2, mu1, s1), rel=1e-12)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match='shape'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match='shape'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)[:2])


# ---------------------------------------------------------------------------------------------
# Feature statistics: one shot, streaming, merged


def test_feature_statistics_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(4).normal(size=(100, 7)).astype(np.float32)
    mu, sigma = metrics.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


# A mean far from the spread checks the shifted sums: raw sums of x x^T would lose 8 digits here.
FAR = 1e4 + np.random.default_rng(5).normal(size=(1000, 9)) @ np.diag(np.linspace(0.5, 2, 9))
UNEVEN = [(0, 1), (1, 257), (257, 257), (257, 700), (700, 999), (999, 1000)]


def assert_statistics_equal(mu, sigma, x):
    """(mu, sigma) against numpy's float64 mean and np.cov of x, to ~1e-12."""
    mu_ref, sigma_ref = x.mean(0), np.cov(x, rowvar=False)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-14)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=0, atol=1e-12 * np.abs(sigma_ref).max())
    np.testing.assert_array_equal(sigma, sigma.T)


def test_streaming_statistics_over_uneven_batches_equal_one_shot():
    stats = metrics.FeatureStatistics()
    for start, stop in UNEVEN:
        stats.update(FAR[start:stop])
    assert stats.count == len(FAR)
    assert_statistics_equal(*stats.finalize(), FAR)


def test_merged_partial_statistics_equal_one_shot():
    parts = []
    for start, stop in UNEVEN:  # each part its own shift (its first batch's mean)
        part = metrics.FeatureStatistics()
        for a in range(start, stop, 100):
            part.update(FAR[a:min(a + 100, stop)])
        parts.append(part)
    # Merged in a tree, as partial sums from devices then processes would be.
    left = metrics.FeatureStatistics().merge(parts[0]).merge(parts[1]).merge(parts[2])
    right = parts[3].merge(parts[4]).merge(parts[5])
    assert_statistics_equal(*left.merge(right).finalize(), FAR)
    # With one agreed shift, merging is adding the sums.
    shift = FAR[0]
    a = metrics.FeatureStatistics(shift=shift).update(FAR[:300])
    b = metrics.FeatureStatistics(shift=shift).update(FAR[300:])
    sum_outer = a.sum_outer + b.sum_outer
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.sum_outer, sum_outer)
    assert_statistics_equal(*merged.finalize(), FAR)


def test_streaming_statistics_errors():
    stats = metrics.FeatureStatistics()
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match='at least 2'):
        stats.finalize()
    with pytest.raises(ValueError, match='dimension'):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match='dimension'):
        stats.merge(metrics.FeatureStatistics().update(np.zeros((2, 4))))


# ---------------------------------------------------------------------------------------------
# Kernel Inception distance


def direct_mmd2(x, y, biased=False):
    """Squared MMD with k(a, b) = (a.b/d + 1)^3 by explicit loops over pairs, math.fsum sums."""
    d = x.shape[1]

    def k(a, b):
        return (math.fsum(a * b) / d + 1.0) ** 3

    def mean_within(z):
        pairs = [k(z[i], z[j]) for i in range(len(z)) for j in range(len(z)) if biased or i != j]
        return math.fsum(pairs) / len(pairs)

    cross = math.fsum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return mean_within(x) + mean_within(y) - 2 * cross


def test_kid_on_whole_small_sets_is_the_direct_formula():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(15, 6)), 0.3 + rng.normal(size=(15, 6))
    # subset_size >= the sizes: every subset is the whole set (permuted).
    kid, std = metrics.kernel_inception_distance(x, y, num_subsets=5, subset_size=1000)
    assert kid == pytest.approx(direct_mmd2(x, y), rel=1e-12)
    assert std < 1e-12
    k = metrics.polynomial_kernel  # unequal sizes
    unequal = metrics.mmd2_unbiased(k(x[:9], x[:9]), k(y, y), k(x[:9], y))
    assert unequal == pytest.approx(direct_mmd2(x[:9], y), rel=1e-12)


def test_kid_subset_mean_estimates_the_whole_set_statistic():
    # Each subset estimate is unbiased for the whole-set U-statistic (every pair is equally likely
    # in a subset), so the mean over many subsets converges to it.
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(60, 5)), 0.2 + 1.1 * rng.normal(size=(80, 5))
    whole = direct_mmd2(x, y)
    kid, std = metrics.kernel_inception_distance(x, y, num_subsets=4000, subset_size=20, seed=1)
    assert abs(kid - whole) < 4 * std / math.sqrt(4000)
    assert std > 0


def test_kid_whole_kernels_and_per_subset_kernels_agree(monkeypatch):
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(70, 12)), rng.normal(size=(50, 12)) + 0.1
    fast = metrics.kernel_inception_distance(x, y, num_subsets=30, subset_size=40, seed=3)
    monkeypatch.setattr(metrics, '_KID_MAX_GRAM_ENTRIES', 0)
    slow = metrics.kernel_inception_distance(x, y, num_subsets=30, subset_size=40, seed=3)
    np.testing.assert_allclose(fast, slow, rtol=1e-11)
    assert fast != metrics.kernel_inception_distance(x, y, num_subsets=30, subset_size=40, seed=4)


def test_kid_of_identical_sets_is_zero_within_its_std():
    # Not exactly 0: one vector in both subsets adds its k(x, x) > k(x, y) to the cross mean only,
    # which gives E[KID(x, x)] = 2 (mean_{i != j} k_ij - mean_i k_ii) / n, whatever the subset size
    # (an index is in both subsets with probability m/n, paired with itself with 1/m). With
    # subsets of the whole set it is that exactly; with subsets m << n it is inside the subsets' std.
    x = np.random.default_rng(9).normal(size=(2000, 16))
    k = metrics.polynomial_kernel(x[:300], x[:300])
    off_diagonal = (k.sum() - np.trace(k)) / (300 * 299)
    expected = 2 * (off_diagonal - np.trace(k) / 300) / 300
    assert metrics.kernel_inception_distance(x[:300], x[:300], num_subsets=3)[0] == pytest.approx(expected, rel=1e-10)
    kid, std = metrics.kernel_inception_distance(x, x, num_subsets=100, subset_size=100)
    assert abs(kid) < std


def test_kid_is_unbiased_over_shuffles_where_the_biased_estimate_is_not():
    # Split one fixed pool of 2n vectors into random halves: averaged over the splits, the
    # unbiased within-set and cross means all equal the pool's mean over distinct pairs, so
    # E[KID] = 0 exactly; the biased (V-statistic) estimate keeps the diagonal k(x, x) > 0 terms.
    rng = np.random.default_rng(10)
    pool, n, shuffles = rng.normal(size=(100, 8)), 50, 400
    k = metrics.polynomial_kernel(pool, pool)
    unbiased, biased = [], []
    for _ in range(shuffles):
        order = rng.permutation(2 * n)
        a, b = pool[order[:n]], pool[order[n:]]
        unbiased.append(metrics.kernel_inception_distance(a, b, num_subsets=1, subset_size=n)[0])
        ka, kb, kab = k[np.ix_(order[:n], order[:n])], k[np.ix_(order[n:], order[n:])], k[np.ix_(order[:n], order[n:])]
        biased.append(ka.mean() + kb.mean() - 2 * kab.mean())
    error = np.std(unbiased) / math.sqrt(shuffles)  # Monte Carlo standard error of the mean
    assert abs(np.mean(unbiased)) < 4 * error
    assert np.mean(biased) > 50 * error
    assert biased[-1] == pytest.approx(direct_mmd2(a, b, biased=True), rel=1e-12)
    assert unbiased[-1] == pytest.approx(direct_mmd2(a, b), rel=1e-12)


def test_kid_grows_with_the_distribution_gap_and_rejects_bad_shapes():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(300, 8))
    kids = [metrics.kernel_inception_distance(x, rng.normal(size=(300, 8)) + s, subset_size=100)[0]
            for s in (0.0, 0.3, 1.0)]
    assert kids[0] < kids[1] < kids[2]
    with pytest.raises(ValueError, match='shapes'):
        metrics.kernel_inception_distance(x, x[:, :4])
    with pytest.raises(ValueError, match='at least 2'):
        metrics.kernel_inception_distance(x, x[:1])


# ---------------------------------------------------------------------------------------------
# Precision / recall, density / coverage


def brute_force_manifold(real, fake, k_pr, k_dc):
    """All four metrics from the full distance matrices, computed by differences (not the
    |x|^2 + |y|^2 - 2 x.y expansion) and sorted rows, with the papers' sums written as loops."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(z, k):  # sorted row: [0] is the point itself
        return np.sort(dist(z, z), axis=1)[:, k]

    d_fr = dist(fake, real)
    r_real_pr, r_fake, r_real_dc = radii(real, k_pr), radii(fake, k_pr), radii(real, k_dc)
    precision = np.mean([any(d_fr[j, i] <= r_real_pr[i] for i in range(len(real))) for j in range(len(fake))])
    recall = np.mean([any(d_fr[j, i] <= r_fake[j] for j in range(len(fake))) for i in range(len(real))])
    density = sum(d_fr[j, i] <= r_real_dc[i] for i in range(len(real)) for j in range(len(fake))) / (k_dc * len(fake))
    coverage = np.mean([d_fr[:, i].min() <= r_real_dc[i] for i in range(len(real))])
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


@pytest.mark.parametrize('shift', [0.0, 0.7])
def test_manifold_metrics_match_brute_force(shift):
    rng = np.random.default_rng(12)
    real = rng.normal(size=(70, 5))
    fake = shift + 1.3 * rng.normal(size=(55, 5))
    expected = brute_force_manifold(real, fake, 3, 5)
    for batch_size in (7, 512):
        assert metrics.manifold_metrics(real, fake, batch_size=batch_size) == pytest.approx(expected, abs=1e-12)
        assert metrics.precision_recall(real, fake, batch_size=batch_size) == pytest.approx(
            (expected['precision'], expected['recall']), abs=1e-12)
        assert metrics.density_coverage(real, fake, batch_size=batch_size) == pytest.approx(
            (expected['density'], expected['coverage']), abs=1e-12)
    assert 0 < expected['precision'] < 1 and 0 < expected['coverage'] < 1  # a case that discriminates


def test_knn_radii_match_brute_force_and_can_be_reused():
    rng = np.random.default_rng(13)
    real, fake = rng.normal(size=(40, 4)), rng.normal(size=(30, 4))
    sorted_d = np.sort(np.sqrt(((real[:, None] - real[None]) ** 2).sum(-1)), axis=1)
    np.testing.assert_allclose(metrics.knn_radii(real, 3, batch_size=6), sorted_d[:, 3], rtol=1e-12)
    np.testing.assert_allclose(metrics.knn_radii(real, (3, 5)), sorted_d[:, [3, 5]].T, rtol=1e-12)
    radii = dict(zip((3, 5), metrics.knn_radii(real, (3, 5))))
    assert metrics.manifold_metrics(real, fake, real_radii=radii) == metrics.manifold_metrics(real, fake)
    assert metrics.precision_recall(real, fake, real_radii=radii[3]) == metrics.precision_recall(real, fake)
    with pytest.raises(ValueError, match='1 <= k < N'):
        metrics.knn_radii(real[:3], 3)
    with pytest.raises(ValueError, match='real_radii'):
        metrics.precision_recall(real, fake, real_radii=radii[3][:5])


def test_manifold_metrics_known_values():
    rng = np.random.default_rng(14)
    real = rng.normal(size=(200, 8))
    same = metrics.manifold_metrics(real, real.copy())
    assert same['precision'] == same['recall'] == same['coverage'] == 1.0
    # Each real ball holds its centre and its k nearest: density (k + 1)/k, up to boundary ties.
    assert same['density'] == pytest.approx(6 / 5, abs=0.02)
    far = metrics.manifold_metrics(real, rng.normal(size=(150, 8)) + 100.0)
    assert far == dict(precision=0.0, recall=0.0, density=0.0, coverage=0.0)
    # Mode dropping: real has two far-apart clusters, fake is one of them. Precision stays 1,
    # recall and coverage see exactly half of the real set.
    two_modes = np.concatenate([real[:100], real[100:] + 100.0])
    dropped = metrics.manifold_metrics(two_modes, two_modes[:100])
    assert dropped['precision'] == 1.0 and dropped['recall'] == dropped['coverage'] == 0.5


# ---------------------------------------------------------------------------------------------
# Inception score


def test_inception_score_known_values():
    c, splits = 7, 10
    assert metrics.inception_score(np.zeros((100, c))) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert metrics.inception_score(probabilities=np.full((100, c), 1 / c)) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = np.tile(np.eye(c), (3 * splits, 1))  # every split holds each class 3 times
    assert metrics.inception_score(probabilities=one_hot, splits=splits) == pytest.approx((c, 0.0), abs=1e-9)
    assert metrics.inception_score(60.0 * one_hot, splits=splits)[0] == pytest.approx(c, rel=1e-9)
    # All samples one class: confident but no diversity.
    assert metrics.inception_score(probabilities=np.tile(np.eye(c)[2], (50, 1)))[0] == pytest.approx(1.0)


def test_inception_score_matches_scipy_kl_per_split():
    rng = np.random.default_rng(15)
    logits = 3 * rng.normal(size=(103, 10))
    p = scipy.special.softmax(logits, axis=1)
    scores = []
    for s in range(10):
        part = p[s * 103 // 10:(s + 1) * 103 // 10]
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, part.mean(0)) for row in part])))
    assert metrics.inception_score(logits) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    assert metrics.inception_score(probabilities=p) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)
    with pytest.raises(ValueError, match='exactly one'):
        metrics.inception_score(logits, probabilities=p)
    with pytest.raises(ValueError, match='sum to 1'):
        metrics.inception_score(probabilities=2 * p)


# ---------------------------------------------------------------------------------------------
# Statistics files


def test_statistics_file_round_trip_in_edms_format(tmp_path):
    rng = np.random.default_rng(16)
    mu, sigma = moments(random_features(rng, 50, 6))
    path = metrics.save_statistics(tmp_path / 'ref.npz', mu, sigma, dataset='digits', num_samples=50)
    assert path == tmp_path / 'ref.npz' and sorted(os.listdir(tmp_path)) == ['ref.npz']
    loaded_mu, loaded_sigma, meta = metrics.load_statistics(path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    assert meta == {'dataset': 'digits', 'num_samples': 50}
    # What EDM's fid.py reads: dict(np.load(path)) with 'mu' and 'sigma'.
    with np.load(path) as ref:
        np.testing.assert_array_equal(ref['mu'], mu)
    # And a file EDM's `fid.py ref` writes (no metadata) loads here.
    np.savez(tmp_path / 'edm.npz', mu=mu.astype(np.float32), sigma=sigma)
    assert metrics.load_statistics(tmp_path / 'edm.npz')[2] == {}


def test_statistics_file_errors_name_the_problem(tmp_path):
    mu, sigma = np.zeros(4), np.eye(4)
    np.savez(tmp_path / 'no_sigma.npz', mu=mu)
    with pytest.raises(ValueError, match="no_sigma.npz: missing key 'sigma'"):
        metrics.load_statistics(tmp_path / 'no_sigma.npz')
    np.savez(tmp_path / 'shape.npz', mu=mu, sigma=np.eye(3))
    with pytest.raises(ValueError, match=r'shape.npz: wrong shape: mu \(4,\), sigma \(3, 3\)'):
        metrics.load_statistics(tmp_path / 'shape.npz')
    (tmp_path / 'garbage.npz').write_bytes(b'PK\x03\x04 not really a zip')
    with pytest.raises(ValueError, match='garbage.npz'):
        metrics.load_statistics(tmp_path / 'garbage.npz')
    np.save(tmp_path / 'single.npy', mu)
    with pytest.raises(ValueError, match='single array'):
        metrics.load_statistics(tmp_path / 'single.npy')
    with pytest.raises(FileNotFoundError):
        metrics.load_statistics(tmp_path / 'absent.npz')
    with pytest.raises(ValueError, match='wrong shape'):
        metrics.save_statistics(tmp_path / 'bad.npz', mu, sigma[:2])
    with pytest.raises(TypeError):
        metrics.save_statistics(tmp_path / 'bad.npz', mu, sigma, when=object())
    assert sorted(os.listdir(tmp_path)) == ['garbage.npz', 'no_sigma.npz', 'shape.npz', 'single.npy']


# ---------------------------------------------------------------------------------------------
# Several processes


def test_float64_travels_as_three_exact_float32_pieces():
    rng = np.random.default_rng(17)
    x = np.concatenate([rng.normal(size=1000) * 10.0 ** rng.integers(-20, 30, 1000), [0.0, -0.0, 1e-300 * 0]])
    pieces = metrics._float32_pieces(x)
    assert pieces.dtype == np.float32
    np.testing.assert_array_equal(pieces[0].astype(np.float64) + pieces[1] + pieces[2], x)
    with pytest.raises(ValueError, match='three float32 pieces'):
        metrics._float32_pieces(np.array([1e300]))


def test_gather_features_in_one_process_is_the_identity():
    x = np.random.default_rng(18).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(metrics.gather_features(x), x)


TWO_PROCESS_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    process = int(sys.argv[1])
    jax.distributed.initialize(coordinator_address={address!r}, num_processes=2, process_id=process)
    from jaxdiff import metrics
    full = np.load({data!r})
    cut = {cut}
    local = full[:cut] if process == 0 else full[cut:]
    out = {{}}
    out['features32'] = metrics.gather_features(local.astype(np.float32))
    out['features64'] = metrics.gather_features(local)
    out['mu'], out['sigma'] = metrics.gathered_feature_statistics(local.astype(np.float32))
    try:  # a process with another feature dimension: every process raises, none hangs
        metrics.gather_features(local if process == 0 else local[:, :3])
    except ValueError as error:
        out['dim_error'] = np.array(str(error))
    np.savez({out!r} + f'/process_{{process}}.npz', **out)
''')


def test_two_processes_gather_exactly_the_single_process_features(tmp_path, coordinator_address, process_runner):
    full = 1e3 + np.random.default_rng(19).normal(size=(1001, 8)) / 3  # float64, low bits set
    np.save(tmp_path / 'full.npy', full)
    script = TWO_PROCESS_SCRIPT.format(repo=str(REPO), address=coordinator_address,
                                       data=str(tmp_path / 'full.npy'), cut=600, out=str(tmp_path))
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    process_runner([([sys.executable, '-c', script, str(i)], env) for i in range(2)], cwd=REPO, timeout=240)
    mu, sigma = metrics.feature_statistics(full.astype(np.float32))
    for i in range(2):
        result = np.load(tmp_path / f'process_{i}.npz')
        np.testing.assert_array_equal(result['features32'], full.astype(np.float32))
        assert result['features64'].dtype == np.float64
        np.testing.assert_array_equal(result['features64'], full)
        # Same float32 vectors in the same order: the single-process statistics, bit for bit.
        np.testing.assert_array_equal(result['mu'], mu)
        np.testing.assert_array_equal(result['sigma'], sigma)
        assert 'feature dimensions differ' in str(result['dim_error'])
