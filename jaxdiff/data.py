"""Input pipelines: grain over embedded data sets (no network) and over prepared TFDS data sets.

Data sets (`c.data.name`):

- embedded, built from files that sklearn and scikit-image ship, so they work with no network:
  `digits` (sklearn `load_digits`: 1,797 handwritten digits, 8x8, 1 channel, 10 classes; the
  project's default), `faces` (scikit-image `lfw_subset`: 200 faces, 25x25, 1 channel, no labels)
  and `photos` (square RGB patches cut at deterministic random places from the 9 photos listed in
  `_PHOTOS`, no labels; with `c.data.random_crop` the training stream cuts a fresh crop at each
  stream position instead, `random_photo_crops`). One plain dict, `EMBEDDED`, maps each name to its loader function
  `loader(resolution) -> (images, labels)`; a new embedded set is one more function and entry.
- any TFDS data set prepared as ArrayRecord (`cifar10`, `mnist`, `imagenet_resized/64x64`, ...),
  read with `tfds.data_source` (random access, no TensorFlow needed). Nothing is downloaded at run
  time: a data set that is not prepared is a `DatasetNotPreparedError` saying how to prepare it.

Every image comes out NHWC float32 in [-1, 1]: uint8 pixels as x / 127.5 - 1, digits as
x / 8 - 1 (values 0..16), faces as 2x - 1 (values in [0, 1]).

Resolution: `digits` and `faces` are resized from their native size to `c.data.resolution` with
`resize_images` (antialiased bilinear: a triangle filter widened by the scale factor when
shrinking, plain bilinear when enlarging; `jax.image.resize(..., 'linear', antialias=True)`).
`photos` patches are cut at `c.data.resolution` directly (no resampling) from the photos whose
shorter side is at least that long. TFDS images are never resized: their size must equal
`c.data.resolution`.

The training stream (`train_iterator`) is one endless sequence of examples: epoch e is a fresh
permutation of the data set (`epoch_order(seed, e)`), the epochs follow one another, and global
batch k is stream positions [k B, (k + 1) B). A batch may straddle two epochs and nothing is
dropped, so each block of N consecutive stream positions holds every example exactly once (EDM's
`InfiniteSampler` is likewise one endless stream with no epoch ends). Process p of P gets rows
[p B / P, (p + 1) B / P) of each global batch and reads only those records, so the global stream
does not depend on the number of processes. Horizontal flips (`c.data.xflip`) are a hash of
(seed, stream position): the same after a restore and on any number of processes.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Callable

import grain
import numpy as np

# Photos that ship with sklearn (china, flower) and scikit-image (the rest), as (module, name).
_PHOTOS = (('sklearn', 'china.jpg'), ('sklearn', 'flower.jpg'), ('skimage', 'astronaut'),
           ('skimage', 'coffee'), ('skimage', 'chelsea'), ('skimage', 'rocket'),
           ('skimage', 'immunohistochemistry'), ('skimage', 'hubble_deep_field'),
           ('skimage', 'stereo_motorcycle'))
_READ_OPTIONS = dict(num_threads=8, prefetch_buffer_size=8)  # in batches


class DatasetNotPreparedError(FileNotFoundError):
    """A TFDS data set that is not prepared (as ArrayRecord) in the data directory."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a pipeline yields: images [resolution, resolution, channels]; one-hot labels of
    `num_classes` (0: the data set has no labels); `num_examples` in the split."""
    name: str
    resolution: int
    channels: int
    num_classes: int
    num_examples: int


# ------------------------------------------------------------------------------------------------
# Embedded data sets.

def resize_images(images: np.ndarray, resolution: int) -> np.ndarray:
    """Square NHWC float images resized to `resolution` x `resolution`: antialiased bilinear
    (triangle filter, widened by the scale factor when shrinking), computed on the CPU and
    clipped to [-1, 1] against rounding."""
    import jax
    n, h, w, c = images.shape
    if (h, w) == (resolution, resolution):
        return images
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
        out = jax.image.resize(images, (n, resolution, resolution, c), 'linear', antialias=True)
    return np.clip(np.asarray(out, np.float32), -1.0, 1.0)


def _digits(resolution: int | None) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 digits (8x8, values 0..16) as x / 8 - 1, with labels 0..9."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    return resize_images(images, resolution or 8), digits.target.astype(np.int32)


def _skimage_data():
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError("the embedded 'faces' and 'photos' sets need scikit-image: "
                          'pip install scikit-image') from error
    return skimage.data


def _faces(resolution: int | None) -> tuple[np.ndarray, None]:
    """scikit-image's `lfw_subset`: 200 grayscale faces, 25x25, values in [0, 1], as 2x - 1."""
    images = (_skimage_data().lfw_subset().astype(np.float32) * 2.0 - 1.0)[..., None]
    return resize_images(images, resolution or 25), None


def _load_photo(module: str, name: str) -> np.ndarray:
    if module == 'sklearn':
        from sklearn.datasets import load_sample_image
        return load_sample_image(name)
    photo = getattr(_skimage_data(), name)()
    return photo[0] if isinstance(photo, tuple) else photo  # stereo_motorcycle: (left, right, disp)


@functools.lru_cache(maxsize=4)
def _usable_photos(resolution: int) -> tuple[np.ndarray, ...]:
    """The photos of `_PHOTOS` (uint8 HWC) whose shorter side is at least `resolution`, in order."""
    photos = [_load_photo(*spec) for spec in _PHOTOS]
    usable = tuple(p for p in photos if min(p.shape[:2]) >= resolution)
    if not usable:
        largest = max(min(p.shape[:2]) for p in photos)
        raise ValueError(f"data.resolution={resolution}: patches of the embedded 'photos' set can "
                         f'be at most {largest} pixels a side (the shorter side of its largest photo)')
    return usable


def _photos(resolution: int | None) -> tuple[np.ndarray, None]:
    """RGB patches of `resolution` pixels a side (default 32), cut at random places (fixed seed)
    from the photos in `_PHOTOS` whose shorter side is at least `resolution`, taken in turn.
    Count: 2**22 / resolution**2 patches, at least 64 and at most 1,024 (1,024 up to 64x64)."""
    resolution = resolution or 32
    photos = _usable_photos(resolution)
    rng = np.random.default_rng(0)
    num = min(1024, max(64, 2**22 // resolution**2))
    patches = np.empty((num, resolution, resolution, 3), np.uint8)
    for k in range(num):
        photo = photos[k % len(photos)]
        top = rng.integers(photo.shape[0] - resolution + 1)
        left = rng.integers(photo.shape[1] - resolution + 1)
        patches[k] = photo[top:top + resolution, left:left + resolution]
    return patches.astype(np.float32) / 127.5 - 1.0, None


def random_photo_crops(seed: int, positions: np.ndarray, records: np.ndarray, resolution: int) -> np.ndarray:
    """`data.random_crop` for the photos: the example at stream position s (record r) is a fresh
    resolution-sized crop of record r's photo (photo r mod P, as the fixed patch r is), its corner
    (top, left) = (h mod (H - res + 1), (h >> 32) mod (W - res + 1)) for h a keyed hash of (seed, s).
    So every pass over the data sees new crops, the same under any batching, restart or process
    count. float32 NHWC in [-1, 1]."""
    photos = _usable_photos(resolution)
    hashes = _mix64(np.asarray(positions, np.uint64) ^ _seed_key(seed, 2))
    out = np.empty((len(records), resolution, resolution, 3), np.float32)
    for i, (record, h) in enumerate(zip(np.asarray(records), hashes)):
        photo = photos[int(record) % len(photos)]
        top = int(h % np.uint64(photo.shape[0] - resolution + 1))
        left = int((h >> np.uint64(32)) % np.uint64(photo.shape[1] - resolution + 1))
        out[i] = photo[top:top + resolution, left:left + resolution]
    return out / 127.5 - 1.0


EMBEDDED: dict[str, Callable[[int | None], tuple[np.ndarray, np.ndarray | None]]] = {
    'digits': _digits,
    'faces': _faces,
    'photos': _photos,
}


@functools.lru_cache(maxsize=8)
def _load_embedded_cached(name: str, resolution: int | None):
    images, labels = EMBEDDED[name](resolution)
    images.flags.writeable = False
    if labels is not None:
        labels.flags.writeable = False
    return images, labels


def load_embedded(name: str, resolution: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """An embedded data set as (images float32 NHWC in [-1, 1], labels int32 [N] or None), at its
    native resolution or at `resolution` (see the module docstring). The arrays are cached and
    read-only."""
    if name not in EMBEDDED:
        raise ValueError(f'unknown embedded data set {name!r}; embedded: {", ".join(EMBEDDED)}')
    if resolution is not None and (not isinstance(resolution, (int, np.integer)) or resolution < 1):
        raise ValueError(f'resolution must be a positive integer or None, got {resolution!r}')
    return _load_embedded_cached(name, resolution)


# ------------------------------------------------------------------------------------------------
# TFDS data sets.

def _prepare_hint(name: str, data_dir) -> str:
    where = f' --data_dir={data_dir}' if data_dir else ''
    return (f'prepare it once with `tfds build {name} --file_format=array_record{where}` (this needs '
            f'TensorFlow, e.g. `pip install tensorflow`, and downloads the data), or copy a prepared '
            f'ArrayRecord copy there, and set data.data_dir to its directory')


def _open_tfds(name: str, split: str, data_dir):
    """(`tfds.data_source` for the split, builder info), with `download=False`: nothing is ever
    downloaded here. An unknown name is a ValueError; a data set not prepared as ArrayRecord a
    DatasetNotPreparedError."""
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f'data.name={name!r} is neither an embedded data set '
                         f'({", ".join(EMBEDDED)}) nor a known TFDS data set (TFDS names such as '
                         f"'cifar10' or 'mnist' are accepted once prepared as ArrayRecord)") from None
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # TFDS's own messages here are misleading (a KeyError on splits, ...)
        if not builder.is_prepared():
            raise DatasetNotPreparedError(
                f'TFDS data set {name!r} is not prepared in {builder.data_dir}: '
                f'{_prepare_hint(name, data_dir)}. (jaxdiff never downloads data at run time.)') from None
        if builder.info.file_format is not None and 'array_record' not in str(builder.info.file_format):
            raise DatasetNotPreparedError(
                f'TFDS data set {name!r} is prepared in {builder.data_dir} as '
                f'{builder.info.file_format}, which has no random access: '
                f'{_prepare_hint(name, data_dir)}') from error
        raise ValueError(f'data.split={split!r}: cannot open split of TFDS data set {name!r}: '
                         f'{type(error).__name__}: {error}') from error
    return source, builder.info


def _tfds_reader(source, use_labels: bool) -> Callable[[np.ndarray], tuple[np.ndarray, Any]]:
    def read(records: np.ndarray):
        examples = [source[int(i)] for i in records]
        images = np.stack([e['image'] for e in examples]).astype(np.float32) / 127.5 - 1.0
        labels = np.array([e['label'] for e in examples], np.int32) if use_labels else None
        return images, labels
    return read


# ------------------------------------------------------------------------------------------------
# Validation and opening.

def _field(data_config, name: str, default=None):
    return getattr(data_config, name, default)


def _check_fields(data_config) -> None:
    name = _field(data_config, 'name')
    if not isinstance(name, str) or not name:
        raise ValueError(f'data.name must be a data set name, got {name!r}')
    for field in ('resolution', 'channels'):
        value = _field(data_config, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f'data.{field} must be a positive integer, got {value!r}')
    for field in ('use_labels', 'xflip', 'random_crop'):
        if not isinstance(_field(data_config, field, False), (bool, np.bool_)):
            raise ValueError(f'data.{field} must be True or False, got {_field(data_config, field)!r}')
    if _field(data_config, 'random_crop', False) and name != 'photos':
        raise ValueError(f"data.random_crop=True crops the embedded 'photos' afresh; data.name is {name!r}")


def _check_against(data_config, *, resolution: int, channels: int, num_classes: int) -> None:
    name = data_config.name
    if data_config.resolution != resolution:
        raise ValueError(f'data.resolution={data_config.resolution} but {name!r} images are '
                         f'{resolution}x{resolution} and TFDS images are not resized: set '
                         f'data.resolution={resolution}')
    if data_config.channels != channels:
        raise ValueError(f'data.channels={data_config.channels} but {name!r} images have {channels} '
                         f'channel(s): set data.channels={channels}')
    if _field(data_config, 'use_labels', False) and not num_classes:
        raise ValueError(f'data.use_labels=True but {name!r} has no class labels: set '
                         f'data.use_labels=False')


def _open(data_config) -> tuple[DatasetInfo, Callable[[np.ndarray], tuple[np.ndarray, Any]]]:
    """Validated (DatasetInfo, read) where read(records) -> (images float32 [-1, 1], labels int32
    or None): the labels are returned when the data set has them (whatever `use_labels` says)."""
    _check_fields(data_config)
    name, split = data_config.name, _field(data_config, 'split', 'train')
    if name in EMBEDDED:
        if split != 'train':
            raise ValueError(f"data.split={split!r}: embedded data sets have only split 'train'")
        images, labels = load_embedded(name, data_config.resolution)
        num_classes = 0 if labels is None else int(labels.max()) + 1
        _check_against(data_config, resolution=images.shape[1], channels=images.shape[3],
                       num_classes=num_classes)
        info = DatasetInfo(name, images.shape[1], images.shape[3], num_classes, len(images))
        return info, lambda records: (images[records], None if labels is None else labels[records])

    source, tfds_info = _open_tfds(name, split, _field(data_config, 'data_dir'))
    features = tfds_info.features
    if 'image' not in features:
        raise ValueError(f'data.name={name!r}: TFDS data set has no "image" feature '
                         f'(features: {", ".join(features)})')
    shape, dtype = tuple(features['image'].shape), np.dtype(features['image'].np_dtype)
    if len(shape) != 3 or shape[0] is None or shape[0] != shape[1] or dtype != np.uint8:
        raise ValueError(f'data.name={name!r}: images are {shape} {dtype}; only square uint8 images '
                         f'of one fixed size are supported (e.g. imagenet_resized/64x64)')
    label = features['label'] if 'label' in features else None
    num_classes = int(getattr(label, 'num_classes', 0) or 0)
    _check_against(data_config, resolution=shape[0], channels=shape[2], num_classes=num_classes)
    info = DatasetInfo(name, shape[0], shape[2], num_classes, len(source))
    if info.num_examples == 0:
        raise ValueError(f'data.split={split!r} of {name!r} is empty')
    return info, _tfds_reader(source, num_classes > 0)


def validate(data_config) -> None:
    """Raise ValueError naming the bad `data.*` field (unknown name, wrong resolution or channels,
    use_labels on a data set without labels, ...); DatasetNotPreparedError for an unprepared TFDS
    data set."""
    _open(data_config)


def dataset_info(data_config) -> DatasetInfo:
    """The validated shape of what the pipelines yield (see `DatasetInfo`)."""
    return _open(data_config)[0]


# ------------------------------------------------------------------------------------------------
# Pipelines.

def _seed_key(seed: int, *words: int) -> np.uint64:
    """A 64-bit key drawn from (seed, *words) by numpy's SeedSequence (a fixed hash)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
    return np.random.SeedSequence([int(seed), *words]).generate_state(1, np.uint64)[0]


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose every output bit depends on every input
    bit (wrap-around arithmetic on uint64 arrays)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The record order of one epoch: indices sorted by a keyed hash, a permutation fixed by
    (seed, epoch) alone (no numpy random stream, so it survives numpy upgrades)."""
    keys = _mix64(np.arange(num_examples, dtype=np.uint64) ^ _seed_key(seed, 0, epoch))
    order = np.argsort(keys, kind='stable')
    order.flags.writeable = False
    return order


def flip_mask(seed: int, positions: np.ndarray) -> np.ndarray:
    """Whether the examples at these stream positions are mirrored: the top bit of a keyed hash of
    (seed, position), so one half of them, the same under any batching, restart or process count."""
    return (_mix64(np.asarray(positions, np.uint64) ^ _seed_key(seed, 1)) >> np.uint64(63)).astype(bool)


def stream_records(seed: int, positions: np.ndarray, num_examples: int) -> np.ndarray:
    """The records at these stream positions: position s is record epoch_order(seed, e)[i] with
    (e, i) = divmod(s, num_examples)."""
    epochs, within = np.divmod(np.asarray(positions, np.int64), num_examples)
    records = np.empty_like(within)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        records[here] = epoch_order(seed, int(epoch), num_examples)[within[here]]
    return records


class TrainIterator:
    """Endless iterator of local batches {'image': [B_local, H, W, C] float32, 'label':
    [B_local, num_classes] one-hot float32 (only with `use_labels`)}.

    `get_state()` is grain's iterator state {'next_index': k} (k = batches taken, the same on every
    process) plus the settings that fix the stream (data set, split, size, global batch, seed): a
    small JSON-able dict. `set_state` checks those settings and continues the exact stream; as the
    state does not depend on the process, any process's state restores every process."""

    def __init__(self, dataset: grain.MapDataset, info: DatasetInfo, fingerprint: dict):
        self._iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS)))
        self.info, self.num_classes = info, info.num_classes
        self._fingerprint = fingerprint

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        return {**self._iterator.get_state(), **self._fingerprint}

    def set_state(self, state: dict) -> None:
        changed = {k: (state[k], v) for k, v in self._fingerprint.items() if k in state and state[k] != v}
        if changed:
            raise ValueError('iterator state is for another stream (saved, now): '
                             + ', '.join(f'{k}: {a!r}, {b!r}' for k, (a, b) in changed.items()))
        self._iterator.set_state({'next_index': int(state['next_index'])})


def train_iterator(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> TrainIterator:
    """The training stream of this process (see the module docstring): shuffled epochs back to
    back, optional flips, local batches of `global_batch_size // process_count`, forever.

    A grain `MapDataset` over batch numbers k maps k to its stream positions
    k B + process_index B_local + [0, B_local), then to records, images, flips and labels, all
    vectorised per batch (grain's per-example index shuffle costs ~60 us an example, more than
    the rest of a digits batch together); grain gives the threaded prefetch and the state."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f'global batch size {global_batch_size} must be a positive multiple of the '
                         f'process count {process_count}')
    _seed_key(seed)  # validates the seed
    info, read = _open(data_config)
    local_batch = global_batch_size // process_count
    xflip, use_labels = bool(data_config.xflip), bool(data_config.use_labels)
    random_crop = bool(_field(data_config, 'random_crop', False))
    eye = np.eye(info.num_classes, dtype=np.float32)

    def load_batch(step: int) -> dict[str, np.ndarray]:
        positions = step * global_batch_size + process_index * local_batch + np.arange(local_batch)
        records = stream_records(seed, positions, info.num_examples)
        images, labels = read(records)
        if random_crop:
            images = random_photo_crops(seed, positions, records, info.resolution)
        if xflip:
            images = np.where(flip_mask(seed, positions)[:, None, None, None], images[:, :, ::-1], images)
        batch = {'image': np.ascontiguousarray(images, np.float32)}
        if use_labels:
            batch['label'] = eye[labels]
        return batch

    steps = grain.MapDataset.range(sys.maxsize // global_batch_size)
    fingerprint = dict(dataset=info.name, split=_field(data_config, 'split', 'train'),
                       num_examples=info.num_examples, global_batch_size=int(global_batch_size),
                       seed=int(seed), random_crop=random_crop)
    return TrainIterator(steps.map(load_batch), info, fingerprint)


def eval_images(data_config, num: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """`num` distinct real images (in data set order) drawn with `seed`, without flips, as
    (images float32 NHWC in [-1, 1], labels int32 [num] or None if the data set has none): e.g.
    for Frechet-distance reference statistics; `num` = the data set size gives all of it."""
    info, read = _open(data_config)
    if not 0 < num <= info.num_examples:
        raise ValueError(f'asked for {num} evaluation images but {info.name!r} has '
                         f'{info.num_examples}')
    records = np.sort(np.random.default_rng(seed).choice(info.num_examples, num, replace=False))
    images, labels = read(records)
    return np.ascontiguousarray(images, np.float32), labels
