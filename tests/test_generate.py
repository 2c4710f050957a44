"""Tests of jaxdiff.generate.sample_many: the overlapped loop gives the plain loop's samples and
dispatches a batch before fetching the previous one; out_dir batches resume a killed run at the
last finished batch, drawing only the missing ones; the manifest and the batch files are checked."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import generate, samplers

SHAPE = (4, 4, 1)


@jax.jit
def _program(keys, labels):
    x = samplers.latents_from_keys(keys, SHAPE) * 1.5  # some values past [-1, 1]: clipping matters
    if labels is not None:
        x = x + labels.argmax(1)[:, None, None, None].astype(x.dtype) * 0.1
    return x


class CountingDraw:
    """A sample_many `draw` (sample n from keys[n] alone) that counts its calls, records the seeds'
    batches it was asked for, and raises on call number `fail_at` (a kill mid-run)."""

    def __init__(self, fail_at=None, events=None):
        self.calls, self.fail_at, self.events = 0, fail_at, events

    def __call__(self, module, params, keys, labels, image_shape):
        assert tuple(image_shape) == SHAPE
        if self.calls == self.fail_at:
            raise KeyboardInterrupt('killed')
        self.calls += 1
        if self.events is not None:
            self.events.append('draw')
        return _program(keys, labels)


def plain_loop(draw, num, *, seed, batch_size, labels=None):
    """sample_many as it was: fetch each batch before drawing the next."""
    out = []
    for lo in range(0, num, batch_size):
        n = min(batch_size, num - lo)
        keys = samplers.keys_from_seeds(np.arange(seed + lo, seed + lo + batch_size))
        batch_labels = None
        if labels is not None:
            batch_labels = np.zeros((batch_size, labels.shape[1]), np.float32)
            batch_labels[:n] = labels[lo:lo + n]
            batch_labels = jnp.asarray(batch_labels)
        out.append(np.asarray(jax.device_get(draw(None, None, keys, batch_labels, SHAPE)))[:n])
    return np.clip(np.concatenate(out), -1, 1)


def sample(draw, num=22, **kwargs):
    kwargs.setdefault('seed', 5)
    kwargs.setdefault('batch_size', 4)
    return generate.sample_many(draw, None, None, num, image_shape=SHAPE, **kwargs)


@pytest.mark.parametrize('labelled', [False, True])
def test_overlapped_loop_equals_the_plain_loop_exactly(labelled):
    labels = generate.labels_for_seeds(np.arange(5, 27), 10) if labelled else None
    expected = plain_loop(CountingDraw(), 22, seed=5, batch_size=4, labels=labels)
    got = sample(CountingDraw(), labels=labels)
    assert got.dtype == np.float32 and got.shape == (22, *SHAPE)
    assert np.abs(got).max() == 1.0  # clipped
    np.testing.assert_array_equal(got, expected)


def test_next_batch_is_dispatched_before_the_previous_is_fetched(monkeypatch):
    events = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, 'device_get', lambda x: events.append('fetch') or device_get(x))
    seen = []
    sample(CountingDraw(events=events), num=10, progress=lambda done, total, s: seen.append((done, total)))
    assert events == ['draw', 'draw', 'fetch', 'draw', 'fetch', 'fetch']
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10)]


def test_killed_run_resumes_at_the_last_finished_batch(tmp_path):
    uninterrupted = sample(CountingDraw())
    out = tmp_path / 'batches'
    with pytest.raises(KeyboardInterrupt):
        sample(CountingDraw(fail_at=4), out_dir=out, fingerprint={'step': 3})
    # Batches 0-2 were fetched (batch 3 was dispatched, never fetched, when draw 4 was killed).
    assert sorted(p.name for p in out.glob('batch_*.npy')) == [f'batch_{i:06d}.npy' for i in range(3)]
    assert not list(out.glob('.*.tmp'))
    draw, seen = CountingDraw(), []
    resumed = sample(draw, out_dir=out, fingerprint={'step': 3},
                     progress=lambda done, total, s: seen.append(done))
    assert draw.calls == 3  # batches 3, 4, 5 of 6 (the last one holds 2 samples)
    assert seen == [12, 16, 20, 22]
    np.testing.assert_array_equal(resumed, uninterrupted)
    assert np.load(out / 'batch_000005.npy').shape == (2, *SHAPE)
    # Everything there: nothing drawn, the same array.
    draw = CountingDraw()
    np.testing.assert_array_equal(sample(draw, out_dir=out, fingerprint={'step': 3}), uninterrupted)
    assert draw.calls == 0


@pytest.mark.parametrize('change, field', [
    (dict(num=23), 'num'), (dict(seed=6), 'seed'), (dict(batch_size=2), 'batch_size'),
    (dict(fingerprint={'step': 4, 'sampler': 'heun'}), 'fingerprint.step'),
    (dict(fingerprint={'step': 3}), 'fingerprint.sampler'),
    (dict(labels=generate.labels_for_seeds(np.arange(22), 10)), 'labels_sha256'),
])
def test_resuming_with_other_settings_names_the_field(tmp_path, change, field):
    sample(CountingDraw(), num=22, out_dir=tmp_path, fingerprint={'step': 3, 'sampler': 'heun'})
    kwargs = dict(num=22, out_dir=tmp_path, fingerprint={'step': 3, 'sampler': 'heun'})
    kwargs.update(change)
    draw = CountingDraw()
    with pytest.raises(ValueError, match=rf'manifest\.json was written with {field}=.*, this call has {field}=') as e:
        sample(draw, **kwargs)
    assert '\n' not in str(e.value) and draw.calls == 0


def test_image_shape_change_is_refused(tmp_path):
    sample(CountingDraw(), num=8, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r'written with image_shape=\[4, 4, 1\], this call has image_shape=\[4, 4, 3\]'):
        generate.sample_many(CountingDraw(), None, None, 8, image_shape=(4, 4, 3), seed=5, batch_size=4,
                             out_dir=tmp_path)


@pytest.mark.parametrize('damage, message', [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), r'batch_000001\.npy is not a readable \.npy file'),
    (lambda p: np.save(p, np.zeros((4, *SHAPE), np.float64)), r'batch_000001\.npy holds float64 \[4, 4, 4, 1\], expected float32 \[4, 4, 4, 1\]'),
    (lambda p: np.save(p, np.zeros((3, *SHAPE), np.float32)), r'batch_000001\.npy holds float32 \[3, 4, 4, 1\], expected float32 \[4, 4, 4, 1\]'),
])
def test_a_damaged_batch_file_is_named(tmp_path, damage, message):
    sample(CountingDraw(), num=12, out_dir=tmp_path)
    damage(tmp_path / 'batch_000001.npy')
    draw = CountingDraw()
    with pytest.raises(ValueError, match=message + r'.*delete it to draw that batch again') as e:
        sample(draw, num=12, out_dir=tmp_path)
    assert '\n' not in str(e.value) and draw.calls == 0
    (tmp_path / 'batch_000001.npy').unlink()  # as the message says: then only that batch is drawn
    np.testing.assert_array_equal(sample(draw, num=12, out_dir=tmp_path), sample(CountingDraw(), num=12))
    assert draw.calls == 1


def test_batches_without_a_manifest_are_refused(tmp_path):
    sample(CountingDraw(), num=8, out_dir=tmp_path)
    (tmp_path / 'manifest.json').unlink()
    with pytest.raises(ValueError, match=r'holds batch files but no manifest\.json'):
        sample(CountingDraw(), num=8, out_dir=tmp_path)


def test_manifest_records_the_settings(tmp_path):
    sample(CountingDraw(), num=8, out_dir=tmp_path, fingerprint={'step': 7})
    assert json.loads((tmp_path / 'manifest.json').read_text()) == {
        'num': 8, 'seed': 5, 'batch_size': 4, 'image_shape': [4, 4, 1], 'labels_sha256': None,
        'fingerprint': {'step': 7}}
