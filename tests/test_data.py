"""Tests of jaxdiff.data: embedded data sets, the training stream (epochs, flips, processes, state),
TFDS through mock data and through a real ArrayRecord data set prepared here, and config errors."""
import collections
import json
import socket
import time

import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxdiff import data


def data_config(**fields):
    """`c.data` of configs/default.py with some fields changed."""
    defaults = dict(name='digits', split='train', resolution=8, channels=1, use_labels=False,
                    xflip=False, data_dir=None)
    return ml_collections.ConfigDict({**defaults, **fields})


def take(iterator, num):
    return [next(iterator) for _ in range(num)]


def image_counts(images):
    return collections.Counter(x.tobytes() for x in images)


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to connect or resolve a name fails, and fails the test even if caught."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError('network access attempted in a test')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setattr(socket, 'getaddrinfo', refuse)
    yield
    assert not attempts, f'network access attempted: {attempts}'


# ------------------------------------------------------------------------------------------------
# Embedded data sets.

def test_digits_are_sklearn_digits_mapped_exactly_to_minus_one_one():
    images, labels = data.load_embedded('digits')
    raw = load_digits()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert labels.dtype == np.int32 and set(labels) == set(range(10))
    np.testing.assert_array_equal(labels, raw.target)
    np.testing.assert_array_equal(images[..., 0], raw.images / 8 - 1)
    assert np.all(images[..., 0][raw.images == 0] == -1) and np.all(images[..., 0][raw.images == 16] == 1)
    assert images.min() == -1 and images.max() == 1


def test_faces_and_photos_shapes_ranges_and_determinism():
    faces, no_labels = data.load_embedded('faces')
    assert faces.shape == (200, 25, 25, 1) and faces.dtype == np.float32 and no_labels is None
    assert -1 <= faces.min() < -0.9 and 0.9 < faces.max() <= 1
    photos, no_labels = data.load_embedded('photos')
    assert photos.shape == (1024, 32, 32, 3) and photos.dtype == np.float32 and no_labels is None
    assert photos.min() == -1 and photos.max() == 1
    assert len(image_counts(photos)) > 1000  # distinct patches (a few black ones repeat)
    np.testing.assert_array_equal(photos, data.EMBEDDED['photos'](32)[0])  # fixed cut, not cached luck
    big, _ = data.load_embedded('photos', 256)
    assert big.shape == (64, 256, 256, 3)


def test_embedded_resolution_resizes_with_antialiased_bilinear():
    digits, _ = data.load_embedded('digits')
    for resolution in (4, 16, 32):
        info = data.dataset_info(data_config(resolution=resolution))
        images, _ = data.load_embedded('digits', resolution)
        assert info.resolution == resolution and images.shape == (1797, resolution, resolution, 1)
        assert images.min() >= -1 and images.max() <= 1
        np.testing.assert_allclose(images.mean((1, 2, 3)), digits.mean((1, 2, 3)), atol=0.05)
    constant = np.full((2, 8, 8, 3), 0.25, np.float32)
    np.testing.assert_allclose(data.resize_images(constant, 13), 0.25, atol=1e-6)
    with pytest.raises(ValueError, match='data.resolution'):
        data.dataset_info(data_config(name='photos', channels=3, resolution=4096))


# ------------------------------------------------------------------------------------------------
# The training stream.

def test_batches_have_shapes_and_one_hot_labels_of_their_records():
    c = data_config(use_labels=True)
    iterator = data.train_iterator(c, global_batch_size=64, seed=3)
    images, labels = data.load_embedded('digits')
    assert iterator.num_classes == 10
    for step, batch in enumerate(take(iterator, 3)):
        assert set(batch) == {'image', 'label'}
        assert batch['image'].shape == (64, 8, 8, 1) and batch['image'].dtype == np.float32
        assert batch['label'].shape == (64, 10) and batch['label'].dtype == np.float32
        np.testing.assert_array_equal(batch['label'].sum(1), 1)
        records = data.stream_records(3, np.arange(64 * step, 64 * (step + 1)), 1797)
        np.testing.assert_array_equal(batch['image'], images[records])
        np.testing.assert_array_equal(batch['label'].argmax(1), labels[records])
    assert 'label' not in next(data.train_iterator(data_config(), global_batch_size=8, seed=0))


def test_every_epoch_holds_every_image_once_and_epochs_differ():
    # 1797 = 28 * 64 + 5: batches run on across epoch ends, nothing is dropped.
    batches = take(data.train_iterator(data_config(), global_batch_size=64, seed=0), 3 * 1797 // 64)
    stream = np.concatenate([b['image'] for b in batches])
    digits = image_counts(data.load_embedded('digits')[0])
    epochs = [stream[e * 1797:(e + 1) * 1797] for e in range(2)]
    assert image_counts(epochs[0]) == digits and image_counts(epochs[1]) == digits
    assert not np.array_equal(epochs[0], epochs[1])


def test_same_seed_same_stream_other_seed_other_stream():
    def stream(seed):
        return np.stack([b['image'] for b in take(data.train_iterator(
            data_config(xflip=True), global_batch_size=32, seed=seed), 4)])
    np.testing.assert_array_equal(stream(7), stream(7))
    assert not np.array_equal(stream(7), stream(8))


def test_xflip_mirrors_half_the_images_reproducibly():
    plain = take(data.train_iterator(data_config(), global_batch_size=128, seed=5), 16)
    flipped = take(data.train_iterator(data_config(xflip=True), global_batch_size=128, seed=5), 16)
    x = np.concatenate([b['image'] for b in plain])
    y = np.concatenate([b['image'] for b in flipped])
    mirrored = np.all(y == x[:, :, ::-1], axis=(1, 2, 3))
    assert np.all(mirrored | np.all(y == x, axis=(1, 2, 3)))
    assert 0.45 < mirrored.mean() < 0.55
    np.testing.assert_array_equal(mirrored, data.flip_mask(5, np.arange(len(x))))
    again = take(data.train_iterator(data_config(xflip=True), global_batch_size=128, seed=5), 16)
    np.testing.assert_array_equal(y, np.concatenate([b['image'] for b in again]))


def test_processes_read_disjoint_parts_that_make_up_the_global_batches():
    c = data_config(xflip=True, use_labels=True)
    whole = take(data.train_iterator(c, global_batch_size=64, seed=1), 29)
    parts = [take(data.train_iterator(c, global_batch_size=64, seed=1, process_index=p,
                                      process_count=2), 29) for p in range(2)]
    for step in range(29):
        for key in ('image', 'label'):
            assert parts[0][step][key].shape[0] == 32
            np.testing.assert_array_equal(
                np.concatenate([parts[0][step][key], parts[1][step][key]]), whole[step][key])
    # Each process's share of the first epoch (stream positions < 1797): disjoint, together all.
    shares = []
    for p, part in enumerate(parts):
        positions = (64 * np.arange(29)[:, None] + 32 * p + np.arange(32)).ravel()
        images = np.concatenate([b['image'] for b in part])
        images = np.where(data.flip_mask(1, positions)[:, None, None, None], images[:, :, ::-1], images)
        shares.append(image_counts(images[positions < 1797]))
    assert not set(shares[0]) & set(shares[1])
    assert shares[0] + shares[1] == image_counts(data.load_embedded('digits')[0])
    with pytest.raises(ValueError, match='multiple of the process count'):
        data.train_iterator(c, global_batch_size=63, seed=1, process_index=0, process_count=2)
    with pytest.raises(ValueError, match='process_index'):
        data.train_iterator(c, global_batch_size=64, seed=1, process_index=2, process_count=2)


def test_restored_iterator_state_continues_the_same_stream_bit_exactly():
    c = data_config(xflip=True, use_labels=True)
    iterator = data.train_iterator(c, global_batch_size=48, seed=11)
    take(iterator, 40)  # past an epoch end
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint would store it
    assert state['next_index'] == 40 and len(json.dumps(state)) < 200
    expected = take(iterator, 5)
    restored = data.train_iterator(c, global_batch_size=48, seed=11)
    restored.set_state(state)
    for a, b in zip(expected, take(restored, 5)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # The state is the same on every process: it restores a two-process run too.
    half = data.train_iterator(c, global_batch_size=48, seed=11, process_index=1, process_count=2)
    half.set_state(state)
    np.testing.assert_array_equal(next(half)['image'], expected[0]['image'][24:])
    with pytest.raises(ValueError, match='seed'):
        data.train_iterator(c, global_batch_size=48, seed=12).set_state(state)


def test_random_photo_crops_are_fresh_crops_of_the_records_photo_and_resume_exactly():
    """data.random_crop: each stream position gets its own crop, cut from the photo of its record (the
    fixed patch's photo); the stream is the same under another batching, on two processes and after
    a restore; crops lie inside their photo (found there pixel for pixel); flips apply on top."""
    c = data_config(name='photos', resolution=32, channels=3, random_crop=True, xflip=True)
    batches = take(data.train_iterator(c, global_batch_size=16, seed=3), 8)
    images = np.concatenate([b['image'] for b in batches])
    positions = np.arange(len(images))
    records = data.stream_records(3, positions, data.dataset_info(c).num_examples)
    flips = data.flip_mask(3, positions)
    unflipped = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    np.testing.assert_array_equal(unflipped, data.random_photo_crops(3, positions, records, 32))
    photos = data._usable_photos(32)
    for i in range(0, len(images), 17):  # each crop is a window of its record's photo
        photo = photos[records[i] % len(photos)].astype(np.float32) / 127.5 - 1.0
        windows = np.lib.stride_tricks.sliding_window_view(photo, (32, 32, 3))[:, :, 0]
        assert np.any(np.all(windows == unflipped[i], axis=(2, 3, 4)))
    fixed = data.load_embedded('photos', 32)[0][records]
    assert np.mean(np.all(unflipped == fixed, axis=(1, 2, 3))) < 0.05  # not the fixed patches
    # Another batch size, two processes and a restored state give the same examples.
    other = np.concatenate([b['image'] for b in take(data.train_iterator(c, global_batch_size=32, seed=3), 4)])
    np.testing.assert_array_equal(other, images)
    part = take(data.train_iterator(c, global_batch_size=16, seed=3, process_index=1, process_count=2), 2)
    np.testing.assert_array_equal(part[1]['image'], batches[1]['image'][8:])
    iterator = data.train_iterator(c, global_batch_size=16, seed=3)
    take(iterator, 5)
    restored = data.train_iterator(c, global_batch_size=16, seed=3)
    restored.set_state(json.loads(json.dumps(iterator.get_state())))
    np.testing.assert_array_equal(next(restored)['image'], batches[5]['image'])
    with pytest.raises(ValueError, match='random_crop'):
        data.train_iterator(data_config(name='photos', resolution=32, channels=3), global_batch_size=16,
                            seed=3).set_state(iterator.get_state())


def test_eval_images_are_a_deterministic_sample_of_distinct_real_images():
    c = data_config()
    images, labels = data.eval_images(c, 500, seed=2)
    digits, digit_labels = data.load_embedded('digits')
    assert images.shape == (500, 8, 8, 1) and labels.shape == (500,)
    assert len(image_counts(images)) == 500 and set(image_counts(images)) <= set(image_counts(digits))
    again, _ = data.eval_images(c, 500, seed=2)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(images, data.eval_images(c, 500, seed=3)[0])
    everything, all_labels = data.eval_images(c, 1797)
    np.testing.assert_array_equal(everything, digits)
    np.testing.assert_array_equal(all_labels, digit_labels)
    with pytest.raises(ValueError, match='1797'):
        data.eval_images(c, 1798)


# ------------------------------------------------------------------------------------------------
# TFDS.

def test_tfds_mock_cifar10_through_the_api(no_network):
    import tensorflow_datasets as tfds
    c = data_config(name='cifar10', resolution=32, channels=3, use_labels=True, xflip=True)
    with tfds.testing.mock_data(num_examples=40):
        info = data.dataset_info(c)
        assert info == data.DatasetInfo('cifar10', 32, 3, 10, 40)
        iterator = data.train_iterator(c, global_batch_size=16, seed=0)
        batch = next(iterator)
        assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
        assert -1 <= batch['image'].min() and batch['image'].max() <= 1
        assert batch['label'].shape == (16, 10)
        np.testing.assert_array_equal(batch['label'].sum(1), 1)
        images, labels = data.eval_images(c, 40)
        source = tfds.data_source('cifar10', split='train')
        for i in (0, 17, 39):
            np.testing.assert_array_equal(images[i], source[i]['image'] / np.float32(127.5) - 1)
            assert labels[i] == source[i]['label']
        with pytest.raises(ValueError, match='data.resolution=32 .*28x28'):
            data.dataset_info(data_config(name='mnist', resolution=32, channels=1))
        with pytest.raises(ValueError, match='data.channels'):
            data.dataset_info(data_config(name='cifar10', resolution=32, channels=1))


def test_unprepared_tfds_data_set_is_a_clear_error_without_download(tmp_path, no_network, monkeypatch):
    import tensorflow_datasets as tfds
    prepare_calls = []  # TFDS's download path (failing earlier here for a missing module) is never taken
    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                        lambda *args, **kwargs: prepare_calls.append(args))
    c = data_config(name='cifar10', resolution=32, channels=3, data_dir=str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotPreparedError, match=r"'cifar10' is not prepared.*tfds build "
                                                             r'cifar10 --file_format=array_record'):
        data.train_iterator(c, global_batch_size=8, seed=0)
    with pytest.raises(data.DatasetNotPreparedError):
        data.validate(c)
    assert time.perf_counter() - start < 10
    assert not any(tmp_path.rglob('*.*'))  # nothing downloaded or written
    assert not prepare_calls


def _toy_builder(data_dir):
    """A real TFDS data set prepared as ArrayRecord without TensorFlow (Tensor, not Image,
    features: no PNG encoding)."""
    import tensorflow_datasets as tfds

    class JaxdiffToyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
                'label': tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples()}

        def _generate_examples(self):
            for i in range(30):
                yield i, {'image': np.full((4, 4, 3), 8 * i + np.arange(3), np.uint8), 'label': i % 3}

    builder = JaxdiffToyImages(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare()
    return builder


def test_prepared_array_record_data_set_reads_exact_pixels(tmp_path, no_network):
    _toy_builder(tmp_path)
    c = data_config(name='jaxdiff_toy_images', resolution=4, channels=3, use_labels=True,
                    data_dir=str(tmp_path))
    assert data.dataset_info(c) == data.DatasetInfo('jaxdiff_toy_images', 4, 3, 3, 30)
    images, labels = data.eval_images(c, 30)  # all of it, in record order (TFDS shuffled it)
    example = np.rint((images[:, 2, 1, 0] + 1) * 127.5).astype(int) // 8
    np.testing.assert_array_equal(np.sort(example), np.arange(30))
    pixel = 8 * example[:, None, None, None] + np.arange(3)
    np.testing.assert_array_equal(images, np.broadcast_to(
        pixel.astype(np.float32) / np.float32(127.5) - 1, images.shape))
    np.testing.assert_array_equal(labels, example % 3)
    batches = take(data.train_iterator(c, global_batch_size=10, seed=0), 3)
    assert image_counts(np.concatenate([b['image'] for b in batches])) == image_counts(images)
    with pytest.raises(ValueError, match='data.resolution'):
        data.validate(data_config(name='jaxdiff_toy_images', resolution=8, channels=3,
                                  data_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------------------
# Config errors.

@pytest.mark.parametrize('fields, field', [
    (dict(channels=3), 'data.channels'),
    (dict(resolution=0), 'data.resolution'),
    (dict(resolution=8.0), 'data.resolution'),
    (dict(name='faces', resolution=25, use_labels=True), 'data.use_labels'),
    (dict(name='photos', resolution=32, channels=1), 'data.channels'),
    (dict(split='test'), 'data.split'),
    (dict(xflip='yes'), 'data.xflip'),
    (dict(random_crop=True), 'data.random_crop'),  # digits
    (dict(name='photos', resolution=32, channels=3, random_crop=1), 'data.random_crop'),
    (dict(name=''), 'data.name'),
])
def test_bad_config_fields_are_named(fields, field):
    with pytest.raises(ValueError, match=field.replace('.', r'\.')):
        data.validate(data_config(**fields))


def test_unknown_name_lists_embedded_sets_and_mentions_tfds(no_network):
    with pytest.raises(ValueError, match=r"data\.name='nosuchset'.*digits, faces, photos.*TFDS"):
        data.validate(data_config(name='nosuchset'))
    with pytest.raises(ValueError, match='seed'):
        data.train_iterator(data_config(), global_batch_size=8, seed=-1)
