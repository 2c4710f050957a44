"""Sample-quality metrics: Fréchet distance on network features, and the offline "digits FD".

The metric functions take features (arrays [N, D]) and return plain numbers, whatever network
made the features; the statistics and the distance are computed in float64 with numpy (DESIGN
§9). The digits FD uses the small classifier of `jaxdiff.nets.digits_classifier`, whose weights
ship as `jaxdiff/assets/digits_classifier.npz` (made by `scripts/train_digits_classifier.py`),
so tests and benchmarks on sklearn's 8x8 digits can score samples with no download.

    mu, sigma = feature_statistics(features)            # one shot
    stats = FeatureStatistics(); stats.update(batch)...; mu, sigma = stats.finalize()
    fd = frechet_distance(mu1, sigma1, mu2, sigma2)
    report = digits_report(samples, real_images)         # JSON-serialisable dict
"""
from __future__ import annotations

import functools
import importlib.resources
import json
import math

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.nets.digits_classifier import IMAGE_SHAPE, DigitsClassifier

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
    """Streaming `feature_statistics`: feed batches with `update`, read (mu, sigma) with `finalize`.

    Accumulates in float64 the count n and the sums S1 = sum (x - c), S2 = sum (x - c)(x - c)^T
    around a shift c (the first batch's mean), then

        mu = c + S1/n,   sigma = (S2 - S1 S1^T / n) / (n - 1).

    The shift keeps the subtraction in sigma from cancelling catastrophically when the features
    have a mean far from zero; with it the result equals the one-shot function to rounding.
    """

    def __init__(self):
        self.count = 0
        self.shift = None
        self.sum = None
        self.sum_outer = None

    def update(self, features) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f'features must be [N, D], got shape {x.shape}')
        if x.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = np.zeros_like(self.shift)
            self.sum_outer = np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(f'feature dimension changed from {self.shift.shape[0]} to {x.shape[1]}')
        d = x - self.shift
        self.count += x.shape[0]
        self.sum += d.sum(0)
        self.sum_outer += d.T @ d

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f'need at least 2 feature vectors, got {self.count}')
        mean_d = self.sum / self.count
        sigma = (self.sum_outer - self.count * np.outer(mean_d, mean_d)) / (self.count - 1)
        return self.shift + mean_d, sigma


# ---------------------------------------------------------------------------------------------
# Fréchet distance


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
    d = mu1.shape[0]
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
# The digits classifier (feature network of the digits FD)

CLASSIFIER_FILE = 'digits_classifier.npz'
CLASSIFIER_SCRIPT = 'scripts/train_digits_classifier.py'


def load_digits_classifier() -> tuple[DigitsClassifier, dict]:
    """The shipped digits classifier: `(module, params)` with `module.apply(params, x)` giving
    `(features, logits)`. Reads `jaxdiff/assets/digits_classifier.npz` (cached after the first
    call); a missing or malformed file raises an error naming the file and the script that
    makes it."""
    module, params, _ = _classifier()
    return module, params


def classifier_metadata() -> dict:
    """The training metadata stored in the shipped classifier file (accuracy, seed, ...)."""
    return dict(_classifier()[2])


@functools.lru_cache(maxsize=1)
def _classifier():
    resource = importlib.resources.files('jaxdiff') / 'assets' / CLASSIFIER_FILE
    remedy = f'run `python {CLASSIFIER_SCRIPT}` to make it, or reinstall jaxdiff'
    if not resource.is_file():
        raise FileNotFoundError(f'digits classifier weights not found: jaxdiff/assets/{CLASSIFIER_FILE} ({remedy})')
    try:
        with importlib.resources.as_file(resource) as path, np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop('meta/json')))
        module = DigitsClassifier(widths=tuple(meta['module']['widths']), feature_dim=meta['module']['feature_dim'],
                                  num_classes=meta['module']['num_classes'])
        flat = {k[len('params/'):]: v for k, v in arrays.items() if k.startswith('params/')}
        params = {'params': flax.traverse_util.unflatten_dict(flat, sep='/')}
        expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE), jnp.float32))
        if jax.tree.map(lambda a: (a.shape, a.dtype), params) != jax.tree.map(lambda a: (a.shape, a.dtype), expected):
            raise ValueError('parameter names, shapes or dtypes differ from DigitsClassifier')
    except Exception as error:  # any unreadable file gets the same remedy
        raise ValueError(f'corrupt digits classifier file jaxdiff/assets/{CLASSIFIER_FILE}: {error} ({remedy})') from error
    return module, jax.tree.map(jnp.asarray, params), meta


@functools.lru_cache(maxsize=1)
def _jitted_classifier():
    module, params = load_digits_classifier()
    # jit compiles once per input shape; digits_features pads every batch to one size.
    return functools.partial(jax.jit(module.apply), params), module


def digits_features(images, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Classifier features [N, 64] and logits [N, 10] (float32 numpy) of digits [N, 8, 8, 1] in
    [-1, 1], computed in jit-compiled batches of `batch_size`."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f'images must be [N, 8, 8, 1] in [-1, 1], got shape {images.shape}')
    apply, module = _jitted_classifier()
    features = [np.zeros((0, module.feature_dim), np.float32)]
    logits = [np.zeros((0, module.num_classes), np.float32)]
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        n = len(batch)
        batch = np.pad(batch, ((0, batch_size - n), (0, 0), (0, 0), (0, 0)))
        f, l = apply(batch)
        features.append(np.asarray(f)[:n])
        logits.append(np.asarray(l)[:n])
    return np.concatenate(features), np.concatenate(logits)


# ---------------------------------------------------------------------------------------------
# The digits report


def split_half_fd(features, *, num_splits: int, rng: np.random.Generator) -> float:
    """Mean FD between the two halves of `num_splits` random splits of one feature set: the FD
    that sampling noise alone gives at sizes (floor(M/2), ceil(M/2))."""
    features = np.asarray(features)
    m = len(features)
    fds = []
    for _ in range(num_splits):
        order = rng.permutation(m)
        a, b = features[order[:m // 2]], features[order[m // 2:]]
        fds.append(frechet_distance(*feature_statistics(a), *feature_statistics(b)))
    return float(np.mean(fds))


def fd_floor_at(fd_halves: float, num_real: int, num_samples: int) -> float:
    """Real-vs-real FD expected at sizes (num_samples, num_real), from the halves' FD.

    The estimated FD of two finite samples of one distribution is, to leading order, c (1/n1 + 1/n2)
    (exactly so for the mean term: E|mu1 - mu2|^2 = tr(sigma) (1/n1 + 1/n2); Chong & Forsyth 2020,
    "Effectively unbiased FID", find FID linear in 1/N). So

        floor = fd_halves (1/num_samples + 1/num_real) / (1/floor(M/2) + 1/ceil(M/2)),  M = num_real.
    """
    a, b = num_real // 2, num_real - num_real // 2
    return fd_halves * (1.0 / num_samples + 1.0 / num_real) / (1.0 / a + 1.0 / b)


def digits_report(samples, real_images, *, seed: int = 0, num_splits: int = 10, real_labels=None) -> dict:
    """Score generated 8x8 digits [N, 8, 8, 1] in [-1, 1] against real ones [M, 8, 8, 1].

    Returns a JSON-serialisable dict:

    - `fd`: Fréchet distance of the classifier features of the N samples vs all M real images;
    - `fd_floor`: what two sets of real digits of the same sizes (N vs M) score, the noise floor of
      `fd`. No set of N real digits disjoint from all M exists, so it is `fd_halves` rescaled by
      the FD's leading-order sample-size bias (see `fd_floor_at`). A model that reproduces its
      training digits can score below the floor when `real_images` is its training set;
    - `fd_halves`: mean FD of `num_splits` random disjoint halves of the real images (DESIGN §9);
    - `num_samples`, `num_real`;
    - `class_histogram`: counts of the classifier's argmax on the samples, classes 0..9;
    - `class_entropy`: entropy of that histogram in nats (ln 10 = 2.303 for uniform classes) and
      `class_balance` = class_entropy / ln 10 (1 for uniform, 0 for a single class);
    - `mean_confidence`: the mean over samples of the classifier's largest softmax probability
      (near 1 for clean digits, low for images no class explains);
    - `real_accuracy` (only with `real_labels`): the classifier's accuracy on the real images.
    """
    samples, real_images = np.asarray(samples, np.float32), np.asarray(real_images, np.float32)
    for name, images in (('samples', samples), ('real_images', real_images)):
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or len(images) < 2:
            raise ValueError(f'{name} must be [N, 8, 8, 1] with N >= 2, got shape {images.shape}')
        if not np.isfinite(images).all():
            raise ValueError(f'{name} has {np.size(images) - np.isfinite(images).sum()} non-finite values')
    sample_features, sample_logits = digits_features(samples)
    real_features, real_logits = digits_features(real_images)

    fd = frechet_distance(*feature_statistics(sample_features), *feature_statistics(real_features))
    fd_halves = split_half_fd(real_features, num_splits=num_splits, rng=np.random.default_rng(seed))
    histogram = np.bincount(sample_logits.argmax(-1), minlength=sample_logits.shape[-1])
    p = histogram[histogram > 0] / histogram.sum()
    entropy = float(-(p * np.log(p)).sum())
    confidence = jax.nn.softmax(jnp.asarray(sample_logits), -1).max(-1)
    report = {
        'fd': fd,
        'fd_floor': fd_floor_at(fd_halves, len(real_images), len(samples)),
        'fd_halves': fd_halves,
        'num_samples': len(samples),
        'num_real': len(real_images),
        'class_histogram': [int(c) for c in histogram],
        'class_entropy': entropy,
        'class_balance': entropy / math.log(len(histogram)),
        'mean_confidence': float(confidence.mean()),
    }
    if real_labels is not None:
        report['real_accuracy'] = float(np.mean(real_logits.argmax(-1) == np.asarray(real_labels)))
    return report
