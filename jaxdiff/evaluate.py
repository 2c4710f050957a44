"""The offline digits scores: FD, KID, precision/recall and density/coverage of generated 8x8
digits on the features of a small classifier, each next to its real-vs-real floor.

The formulas (float64, any feature network) are in `jaxdiff.metrics`; `frechet_distance`,
`feature_statistics` and `FeatureStatistics` are re-exported here. The feature network is the
classifier of `jaxdiff.nets.digits_classifier`, whose weights ship as
`jaxdiff/assets/digits_classifier.npz` (made by `scripts/train_digits_classifier.py`), so tests
and benchmarks on sklearn's digits can score samples with no download (DESIGN §9).

    features, logits = digits_features(images)
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

from jaxdiff import metrics
# The formulas live in jaxdiff.metrics; these names stay importable from here (runner, scripts).
from jaxdiff.metrics import FeatureStatistics, feature_statistics, frechet_distance  # noqa: F401
from jaxdiff.nets.digits_classifier import IMAGE_SHAPE, DigitsClassifier

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
    return float(np.mean([frechet_distance(*feature_statistics(features[a]), *feature_statistics(features[b]))
                          for a, b in _halves(len(features), num_splits, rng)]))


def _halves(m: int, num_splits: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Index pairs (first floor(m/2), last ceil(m/2)) of `num_splits` random permutations."""
    orders = [rng.permutation(m) for _ in range(num_splits)]
    return [(order[:m // 2], order[m // 2:]) for order in orders]


def fd_floor_at(fd_halves: float, num_real: int, num_samples: int) -> float:
    """Real-vs-real FD expected at sizes (num_samples, num_real), from the halves' FD.

    The estimated FD of two finite samples of one distribution is, to leading order, c (1/n1 + 1/n2)
    (exactly so for the mean term: E|mu1 - mu2|^2 = tr(sigma) (1/n1 + 1/n2); Chong & Forsyth 2020,
    "Effectively unbiased FID", find FID linear in 1/N). So

        floor = fd_halves (1/num_samples + 1/num_real) / (1/floor(M/2) + 1/ceil(M/2)),  M = num_real.
    """
    a, b = num_real // 2, num_real - num_real // 2
    return fd_halves * (1.0 / num_samples + 1.0 / num_real) / (1.0 / a + 1.0 / b)


MANIFOLD_METRICS = ('precision', 'recall', 'density', 'coverage')


def digits_report(samples, real_images, *, seed: int = 0, num_splits: int = 10, real_labels=None,
                  sample_labels=None) -> dict:
    """Score generated 8x8 digits [N, 8, 8, 1] in [-1, 1] against real ones [M, 8, 8, 1].

    The floors come from `num_splits` random splits of the real images into disjoint halves A, B
    (sizes floor(M/2), ceil(M/2)): what real digits score against real digits. Returns a
    JSON-serialisable dict:

    - `fd`: Fréchet distance of the classifier features of the N samples vs all M real images;
    - `fd_floor`: what two sets of real digits of the same sizes (N vs M) score, the noise floor of
      `fd`. No set of N real digits disjoint from all M exists, so it is `fd_halves` rescaled by
      the FD's leading-order sample-size bias (see `fd_floor_at`). A model that reproduces its
      training digits can score below the floor when `real_images` is its training set;
    - `fd_halves`: mean FD of A vs B over the splits (DESIGN §9);
    - `kid`, `kid_std`: `metrics.kernel_inception_distance` of the N samples vs all M real images
      (100 subsets of min(1000, N, M)); `kid_floor`, `kid_floor_std`: mean and std over the splits
      of `metrics.mmd2_unbiased` of all of A vs all of B. KID is unbiased, so its floor is 0 up to
      noise at any size, and `kid_floor_std` says how far from 0 real digits land: a `kid` within
      a few of it is as good as real at this resolution (`kid_std`, the spread over subsets that
      at these sizes hold nearly the same vectors, understates that noise). Samples that copy images of
      `real_images` score below 0 (see `metrics.kernel_inception_distance`);
    - `precision`, `recall` (`metrics.precision_recall`, k = 3) and `density`, `coverage`
      (`metrics.density_coverage`, k = 5), and each `<name>_floor`: these depend on both set sizes
      (coverage strongly, on N/M), so each is the mean over the splits of min(N, |A|) samples
      (`manifold_num_samples`, a random subset when N is larger) scored against B
      (`manifold_num_real` real digits), and its floor the same score of A against B;
    - `num_samples`, `num_real`;
    - `class_histogram`: counts of the classifier's argmax on the samples, classes 0..9;
    - `class_entropy`: entropy of that histogram in nats (ln 10 = 2.303 for uniform classes) and
      `class_balance` = class_entropy / ln 10 (1 for uniform, 0 for a single class);
    - `mean_confidence`: the mean over samples of the classifier's largest softmax probability
      (near 1 for clean digits, low for images no class explains);
    - `real_accuracy` (only with `real_labels`): the classifier's accuracy on the real images;
    - `per_class_fd` (only with `real_labels`): for each class c, the FD of the samples of class c
      against the real images labelled c, the samples' class being the requested one
      (`sample_labels`, a conditional model) or else the classifier's argmax (`per_class_fd_by`);
      nan for a class with fewer than 2 samples. Small sets (~N/10 per class) bias FD upwards, so
      compare it between runs of the same N, not with `fd`;
    - `label_agreement` (only with `sample_labels`): the fraction of samples the classifier puts
      in the class they were drawn for.
    """
    samples, real_images = np.asarray(samples, np.float32), np.asarray(real_images, np.float32)
    for name, images in (('samples', samples), ('real_images', real_images)):
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or len(images) < 2:
            raise ValueError(f'{name} must be [N, 8, 8, 1] with N >= 2, got shape {images.shape}')
        if not np.isfinite(images).all():
            raise ValueError(f'{name} has {np.size(images) - np.isfinite(images).sum()} non-finite values')
    if len(real_images) < 12:  # halves of >= 6: k-NN balls with k = 5 need 6 vectors
        raise ValueError(f'real_images must have at least 12 images for the floors, got {len(real_images)}')
    sample_features, sample_logits = digits_features(samples)
    real_features, real_logits = digits_features(real_images)
    num_samples, num_real = len(samples), len(real_images)
    rng = np.random.default_rng(seed)
    halves = _halves(num_real, num_splits, rng)

    fd = frechet_distance(*feature_statistics(sample_features), *feature_statistics(real_features))
    fd_halves = float(np.mean([frechet_distance(*feature_statistics(real_features[a]),
                                                *feature_statistics(real_features[b])) for a, b in halves]))
    kid, kid_std = metrics.kernel_inception_distance(sample_features, real_features, seed=seed)
    # The halves' KID on the whole halves (subsets of size |A| would all be A itself), from one
    # kernel matrix of all the real features.
    k_real = metrics.polynomial_kernel(real_features, real_features)
    kid_halves = [metrics.mmd2_unbiased(k_real[np.ix_(a, a)], k_real[np.ix_(b, b)], k_real[np.ix_(a, b)])
                  for a, b in halves]
    manifold = {name: [] for name in MANIFOLD_METRICS}
    floor = {name: [] for name in MANIFOLD_METRICS}
    num_manifold = min(num_samples, num_real // 2)
    for a, b in halves:
        fake = sample_features[np.sort(rng.choice(num_samples, num_manifold, replace=False))]
        reference = real_features[b]
        radii = dict(zip((3, 5), metrics.knn_radii(reference, (3, 5))))  # B's balls serve both sets
        for scores, features in ((manifold, fake), (floor, real_features[a])):
            for name, value in metrics.manifold_metrics(reference, features, real_radii=radii).items():
                scores[name].append(value)

    histogram = np.bincount(sample_logits.argmax(-1), minlength=sample_logits.shape[-1])
    p = histogram[histogram > 0] / histogram.sum()
    entropy = float(-(p * np.log(p)).sum())
    confidence = jax.nn.softmax(jnp.asarray(sample_logits), -1).max(-1)
    report = {
        'fd': fd,
        'fd_floor': fd_floor_at(fd_halves, num_real, num_samples),
        'fd_halves': fd_halves,
        'kid': kid,
        'kid_std': kid_std,
        'kid_floor': float(np.mean(kid_halves)),
        'kid_floor_std': float(np.std(kid_halves)),
    }
    for name in MANIFOLD_METRICS:
        report[name] = float(np.mean(manifold[name]))
        report[f'{name}_floor'] = float(np.mean(floor[name]))
    report.update({
        'manifold_num_samples': num_manifold,
        'manifold_num_real': num_real - num_real // 2,
        'num_samples': num_samples,
        'num_real': num_real,
        'class_histogram': [int(c) for c in histogram],
        'class_entropy': entropy,
        'class_balance': entropy / math.log(len(histogram)),
        'mean_confidence': float(confidence.mean()),
    })
    predicted = sample_logits.argmax(-1)
    if sample_labels is not None:
        report['label_agreement'] = float(np.mean(predicted == np.asarray(sample_labels)))
    if real_labels is not None:
        real_labels = np.asarray(real_labels)
        report['real_accuracy'] = float(np.mean(real_logits.argmax(-1) == real_labels))
        sample_class = predicted if sample_labels is None else np.asarray(sample_labels)
        per_class = []
        for c in range(sample_logits.shape[-1]):
            fake, real = sample_features[sample_class == c], real_features[real_labels == c]
            per_class.append(frechet_distance(*feature_statistics(fake), *feature_statistics(real))
                             if len(fake) >= 2 and len(real) >= 2 else float('nan'))
        report['per_class_fd'] = per_class
        report['per_class_fd_by'] = 'classifier' if sample_labels is None else 'requested label'
    return report
