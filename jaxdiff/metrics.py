"""Sample-quality metric formulas on network features: FD, KID, precision/recall, density/coverage, IS.

Every function takes features (arrays [N, D], whatever network made them: Inception-v3 pool
features for FID, the digits classifier for the offline digits scores) or class predictions,
and returns plain Python floats. The arithmetic is numpy float64 on the host (DESIGN §9): the
estimators subtract nearly equal sums (FD's trace term, KID's kernel means), where float32's
seven digits are not enough, and JAX has no float64 without the global x64 flag.

    mu, sigma = feature_statistics(features)                 # one shot, or streaming:
    stats = FeatureStatistics(); stats.update(batch) ...; mu, sigma = stats.finalize()
    fd = frechet_distance(mu1, sigma1, mu2, sigma2)
    kid, kid_std = kernel_inception_distance(fake, real)
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)         # or all four: manifold_metrics(real, fake)
    score, score_std = inception_score(logits)
    save_statistics('ref.npz', mu, sigma, dataset='cifar10'); mu, sigma, meta = load_statistics('ref.npz')
    features = gather_features(local_features)               # all processes' features, in order
"""
from __future__ import annotations

import json
import os
import pathlib
import tempfile

import numpy as np

# ---------------------------------------------------------------------------------------------
# Feature statistics


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features [N, D], in float64:

        mu = (1/N) sum_i x_i,   sigma = 1/(N-1) sum_i (x_i - mu)(x_i - mu)^T

    (the unbiased covariance, as `numpy.cov(features, rowvar=False)`).
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f'features must be [N, D] with N >= 2, got shape {x.shape}')
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


class FeatureStatistics:
    """Streaming `feature_statistics`: feed batches with `update`, combine partial statistics
    (per device, per process, per file) with `merge`, read (mu, sigma) with `finalize`.

    Holds in float64 the count n and the sums S1 = sum (x - c), S2 = sum (x - c)(x - c)^T around
    a shift c (by default the first batch's mean), and

        mu = c + S1/n,   sigma = (S2 - S1 S1^T / n) / (n - 1).

    The shift keeps the subtraction in sigma from cancelling catastrophically when the features'
    mean is far from zero (unshifted sums of x x^T lose every digit the mean has over the spread).
    Partial statistics with the same shift (pass `shift=` to each) merge by adding their sums;
    with different shifts `merge` first re-centres the other's sums on this shift, which is exact
    algebra and costs float64 rounding only (the shifts differ by about one standard deviation, so
    nothing cancels). Either way the result equals the one-shot statistics to ~1e-15 relative.
    """

    def __init__(self, shift=None):
        self.count = 0
        self.shift = self.sum = self.sum_outer = None
        if shift is not None:
            self._start(shift)

    def _start(self, shift) -> None:
        self.shift = np.array(shift, np.float64).reshape(-1)
        self.sum = np.zeros_like(self.shift)
        self.sum_outer = np.zeros((self.shift.size, self.shift.size))

    @property
    def dim(self) -> int | None:
        return None if self.shift is None else self.shift.size

    def update(self, features) -> 'FeatureStatistics':
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f'features must be [N, D], got shape {x.shape}')
        if x.shape[0] == 0:
            return self
        if self.shift is None:
            self._start(x.mean(0))
        elif x.shape[1] != self.dim:
            raise ValueError(f'feature dimension changed from {self.dim} to {x.shape[1]}')
        d = x - self.shift
        self.count += x.shape[0]
        self.sum += d.sum(0)
        self.sum_outer += d.T @ d
        return self

    def merge(self, other: 'FeatureStatistics') -> 'FeatureStatistics':
        """Add `other`'s vectors to these statistics (in place; returns self)."""
        if other.count == 0:
            return self
        if self.shift is None:
            self._start(other.shift)
        elif other.dim != self.dim:
            raise ValueError(f'cannot merge statistics of dimension {other.dim} into {self.dim}')
        # sum (x - c)(x - c)^T with x - c = (x - c') + delta, delta = c' - c.
        delta = other.shift - self.shift
        self.count += other.count
        self.sum += other.sum + other.count * delta
        self.sum_outer += (other.sum_outer + np.outer(other.sum, delta) + np.outer(delta, other.sum)
                           + other.count * np.outer(delta, delta))
        return self

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f'need at least 2 feature vectors, got {self.count}')
        mean_d = self.sum / self.count
        sigma = (self.sum_outer - self.count * np.outer(mean_d, mean_d)) / (self.count - 1)
        return self.shift + mean_d, _symmetric(sigma)


# ---------------------------------------------------------------------------------------------
# Fréchet distance (Heusel et al. 2017)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2):

        FD = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The trace term is computed as tr((A sigma2 A)^(1/2)) = sum_k sqrt(lambda_k) with A = sigma1^(1/2)
    and lambda_k the eigenvalues of the symmetric PSD matrix A sigma2 A (similar to sigma1 sigma2,
    so same eigenvalues). Both steps are symmetric eigendecompositions (`eigh`): no complex
    arithmetic, and rounding shows up as tiny negative eigenvalues that are clipped to zero,
    where `scipy.linalg.sqrtm(sigma1 @ sigma2)` (pytorch-fid, EDM) works on a non-symmetric
    product, can return imaginary parts and needs an eps*I retry when a covariance is singular
    (fewer samples than feature dimensions). A result within rounding below zero returns 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}')
    sqrt_sigma1 = _psd_sqrt(sigma1)
    product_eigvals = np.linalg.eigvalsh(_symmetric(sqrt_sigma1 @ sigma2 @ sqrt_sigma1))
    trace_sqrt = np.sqrt(np.clip(product_eigvals, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(fd, 0.0))


def _symmetric(a: np.ndarray) -> np.ndarray:
    return 0.5 * (a + a.T)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root U diag(sqrt(max(l, 0))) U^T of a symmetric PSD matrix."""
    eigvals, eigvecs = np.linalg.eigh(_symmetric(sigma))
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


# ---------------------------------------------------------------------------------------------
# Kernel Inception distance (Bińkowski et al. 2018)


def polynomial_kernel(x, y) -> np.ndarray:
    """The KID kernel k(x, y) = (x^T y / d + 1)^3 between the rows of x [N, d] and y [M, d]."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = x @ y.T
    k *= 1.0 / x.shape[1]
    k += 1.0
    return k * k * k  # in place and by products: numpy's ** 3 is a slow generic pow


def mmd2_unbiased(k_xx, k_yy, k_xy) -> float:
    """The unbiased estimate of the squared MMD from kernel matrices of x [m] and y [n]:

        MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                  - 2/(mn) sum_{i, j} k(x_i, y_j).

    Leaving out the diagonal k(x_i, x_i) makes each term an unbiased mean over pairs of distinct
    samples, so E[MMD^2_u] = 0 when x and y come from one distribution (it can be negative).
    """
    k_xx, k_yy, k_xy = (np.asarray(k, np.float64) for k in (k_xx, k_yy, k_xy))
    m, n = k_xy.shape if k_xy.ndim == 2 else (-1, -1)
    if k_xx.shape != (m, m) or k_yy.shape != (n, n) or min(m, n) < 2:
        raise ValueError(f'kernel matrices must be [m, m], [n, n], [m, n] with m, n >= 2, got '
                         f'{k_xx.shape}, {k_yy.shape}, {k_xy.shape}')
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.sum() / (m * n))


# Above this many kernel entries KID works subset by subset instead of on whole kernel matrices.
_KID_MAX_GRAM_ENTRIES = 2 ** 25


def kernel_inception_distance(features1, features2, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: the mean and standard deviation over `num_subsets` random subsets of `mmd2_unbiased`
    with the cubic polynomial kernel, each subset m = min(subset_size, N1, N2) vectors drawn
    without replacement from each set (independently for the two sets and for each subset; the
    defaults are those of the reference implementations). The std is the spread of the subset
    estimates (numpy's default ddof=0), not a standard error of the mean.

    Sets that share vectors (samples copying the training images, scored against them) come out
    below 0: a shared vector pairs with itself in the cross term only, so E[KID(x, x)] =
    2 (mean_{i != j} k(x_i, x_j) - mean_i k(x_i, x_i)) / N.

    When the whole kernel matrices are small (N1, N2 of a few thousand) they are computed once and
    a subset's kernel sums are read off as w^T K w with its 0/1 indicator w: the same estimate for
    far less arithmetic than kernels per subset, which large sets (50k x 2048) use instead.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f'features must be [N, D] with one D, got shapes {x.shape} and {y.shape}')
    m = min(subset_size, len(x), len(y))
    if num_subsets < 1:
        raise ValueError(f'num_subsets must be >= 1, got {num_subsets}')
    if m < 2:
        raise ValueError(f'KID needs subsets of at least 2 vectors, got {m} (sizes {len(x)}, {len(y)})')
    rng = np.random.default_rng(seed)
    subsets = [(rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False))
               for _ in range(num_subsets)]
    # Whole kernels cost (entries) x (D + num_subsets) multiply-adds, kernels per subset
    # num_subsets x 3 m^2 x D: take the cheaper, if the whole kernels fit in memory.
    gram_entries = len(x) ** 2 + len(y) ** 2 + len(x) * len(y)
    d = x.shape[1]
    if gram_entries <= _KID_MAX_GRAM_ENTRIES and gram_entries * (d + num_subsets) <= 3 * num_subsets * m * m * d:
        mmds = _mmd2_subsets_from_gram(x, y, subsets)
    else:
        mmds = [mmd2_unbiased(polynomial_kernel(x[i], x[i]), polynomial_kernel(y[j], y[j]),
                              polynomial_kernel(x[i], y[j])) for i, j in subsets]
    return float(np.mean(mmds)), float(np.std(mmds))


def _mmd2_subsets_from_gram(x, y, subsets) -> np.ndarray:
    """`mmd2_unbiased` of every subset pair (i, j), from the kernels of the whole sets."""
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    m = len(subsets[0][0])
    w_x, w_y = np.zeros((len(subsets), len(x))), np.zeros((len(subsets), len(y)))
    for s, (i, j) in enumerate(subsets):
        w_x[s, i], w_y[s, j] = 1.0, 1.0
    sum_xx = ((w_x @ k_xx) * w_x).sum(1) - w_x @ np.diag(k_xx)
    sum_yy = ((w_y @ k_yy) * w_y).sum(1) - w_y @ np.diag(k_yy)
    sum_xy = ((w_x @ k_xy) * w_y).sum(1)
    return (sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * sum_xy / (m * m)


# ---------------------------------------------------------------------------------------------
# k-NN manifolds: precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020)
#
# A set's manifold is the union of the balls B(x, NND_k(x)) around its vectors, NND_k(x) the
# distance from x to its k-th nearest neighbour in the same set (itself not counted). Balls are
# closed (distance <= radius), as in Kynkäänniemi et al.; a vector exactly on a boundary (a fake
# equal to a real vector's k-th neighbour) is in or out as float64 rounding falls. Distances come
# in blocks of `batch_size` rows, |x|^2 + |y|^2 - 2 x^T y in float64, so memory is batch_size x N
# per block (512 x 50k: 200 MB) rather than N x N.

_BATCH_SIZE = 512


def knn_radii(features, k, *, batch_size: int = _BATCH_SIZE) -> np.ndarray:
    """NND_k: the Euclidean distance from each vector of features [N, D] to its k-th nearest
    neighbour among the others, float64 [N]; for a sequence of k, [len(k), N] from one pass."""
    ks = (k,) if np.ndim(k) == 0 else tuple(k)
    radii = np.sqrt(_knn_squared_radii(_as_features(features, 'features'), ks, batch_size))
    return radii[0] if np.ndim(k) == 0 else radii


def precision_recall(real, fake, *, k: int = 3, batch_size: int = _BATCH_SIZE,
                     real_radii=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake [N, D] against real [M, D]:

        precision = (1/N) sum_j 1[fake_j in manifold(real)],
        recall    = (1/M) sum_i 1[real_i in manifold(fake)],

    manifolds with k-NN balls (k = 3 as in the paper). `real_radii` = `knn_radii(real, k)` may be
    passed to reuse it across calls against the same reference set.
    """
    scores = manifold_metrics(real, fake, k_precision_recall=k, k_density_coverage=None, batch_size=batch_size,
                              real_radii=None if real_radii is None else {k: real_radii})
    return scores['precision'], scores['recall']


def density_coverage(real, fake, *, k: int = 5, batch_size: int = _BATCH_SIZE,
                     real_radii=None) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020) of fake [N, D] against real [M, D], k = 5 as in
    the paper:

        density  = 1/(kN) sum_j sum_i 1[fake_j in B(real_i, NND_k(real_i))],
        coverage = (1/M) sum_i 1[some fake_j in B(real_i, NND_k(real_i))].

    Density is about 1 (unbounded above) and coverage about 1 - (1 - k/M)^N for fakes from the
    real distribution. Both use the real balls only, and density counts how many balls hold each
    fake, so the large balls of a few outlying real vectors move them little (the paper's reason
    for them over precision/recall).
    `real_radii` as in `precision_recall`.
    """
    scores = manifold_metrics(real, fake, k_precision_recall=None, k_density_coverage=k, batch_size=batch_size,
                              real_radii=None if real_radii is None else {k: real_radii})
    return scores['density'], scores['coverage']


def manifold_metrics(real, fake, *, k_precision_recall: int | None = 3, k_density_coverage: int | None = 5,
                     batch_size: int = _BATCH_SIZE, real_radii: dict | None = None) -> dict[str, float]:
    """`precision_recall` and `density_coverage` together (either k None leaves its pair out),
    sharing the distance computations: one pass over real x real (both k at once), one over
    fake x fake, one over fake x real. `real_radii` maps k to `knn_radii(real, k)` for reuse."""
    real, fake = _as_features(real, 'real'), _as_features(fake, 'fake', real.shape[1])
    ks = tuple(k for k in (k_precision_recall, k_density_coverage) if k is not None)
    real_radii = dict(real_radii or {})
    missing = tuple(k for k in ks if k not in real_radii)
    r2_real = dict(zip(missing, _knn_squared_radii(real, missing, batch_size))) if missing else {}
    for k in ks:
        if k not in r2_real:
            radii = np.asarray(real_radii[k], np.float64)
            if radii.shape != (len(real),):
                raise ValueError(f'real_radii[{k}] must have shape ({len(real)},), got {radii.shape}')
            r2_real[k] = radii ** 2
    fake_in_real = real_in_fake = inside = nearest_fake = None
    if k_precision_recall is not None:
        r2_pr, r2_fake = r2_real[k_precision_recall], _knn_squared_radii(fake, (k_precision_recall,), batch_size)[0]
        fake_in_real, real_in_fake = 0, np.zeros(len(real), bool)
    if k_density_coverage is not None:
        r2_dc, inside, nearest_fake = r2_real[k_density_coverage], 0, np.full(len(real), np.inf)
    for start, d2 in _blocks(fake, real, batch_size):
        if k_precision_recall is not None:
            fake_in_real += (d2 <= r2_pr[None, :]).any(1).sum()
            real_in_fake |= (d2 <= r2_fake[start:start + len(d2), None]).any(0)
        if k_density_coverage is not None:
            inside += (d2 <= r2_dc[None, :]).sum()
            np.minimum(nearest_fake, d2.min(0), out=nearest_fake)
    scores = {}
    if k_precision_recall is not None:
        scores.update(precision=float(fake_in_real / len(fake)), recall=float(real_in_fake.mean()))
    if k_density_coverage is not None:
        scores.update(density=float(inside / (k_density_coverage * len(fake))),
                      coverage=float((nearest_fake <= r2_dc).mean()))
    return scores


def _knn_squared_radii(x, ks: tuple[int, ...], batch_size) -> np.ndarray:
    """Squared NND_k of the rows of x for each k in ks: [len(ks), N], from one pass."""
    if not all(1 <= k < len(x) for k in ks):
        raise ValueError(f'need 1 <= k < N for k-th nearest neighbours, got k={ks}, N={len(x)}')
    sq_norms = np.einsum('nd,nd->n', x, x)
    radii = np.empty((len(ks), len(x)))
    for start in range(0, len(x), batch_size):
        d2 = _squared_distances(x[start:start + batch_size], x, sq_norms[start:start + batch_size], sq_norms)
        rows = np.arange(len(d2))
        d2[rows, start + rows] = 0.0  # itself: the smallest, so the k-th other is the (k+1)-th smallest
        radii[:, start:start + len(d2)] = np.partition(d2, ks, axis=1)[:, list(ks)].T
    return radii


def _as_features(features, name, dim=None) -> np.ndarray:
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f'{name} must be [N, {dim or "D"}] with N >= 2, got shape {x.shape}')
    return x


def _squared_distances(x, y, x_sq, y_sq) -> np.ndarray:
    # In place on the one [len(x), len(y)] array: a block is the memory peak.
    d2 = x @ y.T
    d2 *= -2.0
    d2 += x_sq[:, None]
    d2 += y_sq[None, :]
    return np.maximum(d2, 0.0, out=d2)


def _blocks(x, y, batch_size):
    """(start, squared distances [b, len(y)]) for the row blocks x[start:start + b]."""
    x_sq, y_sq = np.einsum('nd,nd->n', x, x), np.einsum('nd,nd->n', y, y)
    for start in range(0, len(x), batch_size):
        yield start, _squared_distances(x[start:start + batch_size], y, x_sq[start:start + batch_size], y_sq)


# ---------------------------------------------------------------------------------------------
# Inception score (Salimans et al. 2016)


def inception_score(logits=None, *, probabilities=None, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction, computed on each of `splits`
    consecutive parts of the predictions [N, C] (part s: rows sN/splits to (s+1)N/splits, as in
    the original code) and returned as the mean and std over the parts.

    Give `logits` (softmax applied here, in log space) or `probabilities` (rows summing to 1).
    IS is 1 for predictions equal to their mean and C for one-hot predictions spread evenly over
    C classes.
    """
    if (logits is None) == (probabilities is None):
        raise ValueError('give exactly one of logits and probabilities')
    if logits is not None:
        z = np.asarray(logits, np.float64)
        z = z - z.max(-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    else:
        p = np.asarray(probabilities, np.float64)
        if p.ndim == 2 and not np.allclose(p.sum(-1), 1.0, atol=1e-4):
            raise ValueError('probabilities must sum to 1 over the last axis')
        with np.errstate(divide='ignore'):
            log_p = np.log(p)
    if log_p.ndim != 2 or not 1 <= splits <= len(log_p):
        raise ValueError(f'predictions must be [N, C] with N >= splits = {splits}, got shape {log_p.shape}')
    scores = []
    for s in range(splits):
        part = log_p[s * len(log_p) // splits:(s + 1) * len(log_p) // splits]
        p = np.exp(part)
        with np.errstate(divide='ignore', invalid='ignore'):
            log_marginal = np.log(p.mean(0))
            # 0 log 0 = 0: classes a prediction gives no mass contribute nothing to its KL.
            kl = np.where(p > 0, p * (part - log_marginal), 0.0).sum(-1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Statistics files: EDM's `fid.py ref` format (an .npz with `mu` [D] and `sigma` [D, D])


def save_statistics(path, mu, sigma, **meta) -> pathlib.Path:
    """Write `mu` [D] and `sigma` [D, D] (float64) to the .npz `path`, readable by EDM's fid.py
    (`np.load(path)['mu']`), with `meta` (JSON-serialisable: dataset, network, num_samples, ...)
    as a JSON string under the key `meta`. Written to a temporary file and renamed into place, so
    a reader never sees half a file."""
    mu, sigma = _checked_statistics(np.asarray(mu), np.asarray(sigma), 'save_statistics')
    path = pathlib.Path(path)
    text = json.dumps(meta, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), meta=np.array(text))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_statistics(path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta) from a statistics .npz (ours or EDM's; meta is {} when absent)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as error:  # not numpy's format at all: say so with the path
        raise ValueError(f'{path}: not a readable statistics .npz file ({error})') from error
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f'{path}: a single array, not a statistics .npz with keys mu and sigma')
    try:
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as error:  # a damaged member
        raise ValueError(f'{path}: corrupt statistics .npz file ({error})') from error
    for key in ('mu', 'sigma'):
        if key not in arrays:
            raise ValueError(f'{path}: missing key {key!r} (found {sorted(arrays)}); expected mu [D], sigma [D, D]')
    mu, sigma = _checked_statistics(arrays['mu'], arrays['sigma'], str(path))
    meta = json.loads(str(arrays['meta'])) if 'meta' in arrays else {}
    return mu.astype(np.float64), sigma.astype(np.float64), meta


def _checked_statistics(mu, sigma, where):
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise ValueError(f'{where}: wrong shape: mu {mu.shape}, sigma {sigma.shape}; expected mu [D], sigma [D, D]')
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise ValueError(f'{where}: mu and sigma must be floating point, got {mu.dtype} and {sigma.dtype}')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'{where}: mu or sigma has non-finite values')
    return mu, sigma


# ---------------------------------------------------------------------------------------------
# Several processes
#
# Each process scores its share of the samples; the metrics need everyone's features. We gather
# the features themselves, not float64 partial sums: `process_allgather` moves JAX arrays, which
# are float32 unless x64 is on globally, and float32 is the network's own output type, so the
# gather is bit-exact and every process then holds the same full set in the same order (FD from
# it equals the single-process FD exactly, and KID / precision-recall need the vectors anyway).
# float64 features are sent as three float32 pieces hi + mid + lo (24 + 24 + at most 5 of the 53
# mantissa bits), checked to reassemble exactly before anything is sent.


def gather_features(features) -> np.ndarray:
    """Concatenate every process's features [n_p, D] (counts may differ) in process order; each
    process gets the whole [sum n_p, D] array, in the input's dtype. Call it on every process.
    One process: returns the input."""
    import jax
    from jax.experimental import multihost_utils

    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f'features must be [N, D], got shape {x.shape}')
    if jax.process_count() == 1:
        return x
    dims = multihost_utils.process_allgather(np.array(x.shape, np.int32))  # [P, 2]
    if (dims[:, 1] != x.shape[1]).any():
        raise ValueError(f'feature dimensions differ between processes: {dims[:, 1].tolist()}')
    counts = dims[:, 0]
    pieces = _float32_pieces(x) if x.dtype == np.float64 else x[None]
    padded = np.zeros((len(pieces), counts.max(), x.shape[1]), pieces.dtype)
    padded[:, :len(x)] = pieces  # process_allgather wants one shape everywhere
    gathered = multihost_utils.process_allgather(padded)  # [P, pieces, max n, D]
    if x.dtype == np.float64:
        whole = gathered.astype(np.float64)
        parts = whole[:, 0] + whole[:, 1] + whole[:, 2]
    else:
        parts = gathered[:, 0]
    return np.concatenate([parts[p, :n] for p, n in enumerate(counts)]).astype(x.dtype)


def gathered_feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """`feature_statistics` of all processes' features (see `gather_features`), identical in
    every process and equal to the single-process statistics of the concatenated features."""
    return feature_statistics(gather_features(features))


def _float32_pieces(x: np.ndarray) -> np.ndarray:
    """[3, ...] float32 pieces with hi + mid + lo == x exactly in float64 (checked)."""
    with np.errstate(over='ignore', invalid='ignore'):  # out-of-range values fail the check below
        hi = x.astype(np.float32)
        r = x - hi
        mid = r.astype(np.float32)
        lo = (r - mid).astype(np.float32)
        exact = np.array_equal(hi.astype(np.float64) + mid + lo, x, equal_nan=True)
    pieces = np.stack([hi, mid, lo])
    # Fails only outside float32's range (|x| > 3e38) or for bits below 2^-149 (|x| < ~1e-29).
    if not exact:
        raise ValueError('float64 features are outside the range three float32 pieces represent exactly; '
                         'gather float32 features, or enable jax_enable_x64')
    return pieces
