"""jaxdiff.nets.inception: the FID Inception-v3 against pytorch-fid's own module.

The reference outputs (tests/data/inception/inception_refs.npz, made by make_inception_refs.py
beside it) come from pytorch-fid 0.3.0's `InceptionV3` holding seeded random weights, which
random_weights.py regenerates here, so no weights file is stored. Weight files for the loader
tests are written in torch's zip and legacy formats by a small pure-Python writer.
"""
import collections
import hashlib
import importlib.util
import io
import json
import pathlib
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import edm_pickle_writer as W
from jaxdiff.nets import inception as I

DATA = pathlib.Path(__file__).parents[1] / 'data' / 'inception'
GROUPS = ('s32', 's64', 's40x56', 's299')


def _import_random_weights():
    spec = importlib.util.spec_from_file_location('inception_random_weights',
                                                  DATA / 'random_weights.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RW = _import_random_weights()


@pytest.fixture(scope='module')
def refs():
    npz = np.load(DATA / 'inception_refs.npz')
    return {k: npz[k] for k in npz.files}


@pytest.fixture(scope='module')
def meta(refs):
    return json.loads(str(refs['meta/json']))


@pytest.fixture(scope='module')
def random_state_dict(meta):
    return RW.random_state_dict(meta['state_dict_shapes'])


def relative_error(ours, ref):
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


# ---------------------------------------------------------------------------------------------
# Architecture and reference outputs.

def test_state_dict_names_and_shapes_are_pytorch_fids(meta):
    recorded = {k: tuple(v) for k, v in meta['state_dict_shapes'].items()}
    counters = {k for k in recorded if k.endswith('.bn.num_batches_tracked')}
    assert I.state_dict_shapes() == {k: v for k, v in recorded.items() if k not in counters}
    assert {k.replace('num_batches_tracked', 'weight') for k in counters} \
        == {k for k in recorded if k.endswith('.bn.weight')}
    assert recorded['fc.weight'] == (I.NUM_LOGITS, I.NUM_FEATURES)


def test_random_weights_are_the_recorded_ones(meta, random_state_dict):
    # Guards against a numpy whose random streams changed: the outputs would no longer match.
    assert RW.state_dict_digest(random_state_dict) == meta['weights_sha256']


def test_features_and_logits_match_pytorch_fid(refs, random_state_dict):
    params = jax.tree.map(jnp.asarray, I.params_from_state_dict(random_state_dict))
    # Each size group resized to 299 (as pytorch-fid does), then one batch through the public
    # function, whose own resize is then the identity: one compilation of the network.
    batch = jnp.concatenate([
        I.resize_bilinear(jnp.asarray(refs[f'images/{g}'], jnp.float32) / 255, (299, 299))
        for g in GROUPS])
    pool, logits = I.inception_features(params, batch)
    assert pool.shape == (8, 2048) and logits.shape == (8, 1008)
    assert pool.dtype == logits.dtype == jnp.float32
    errors = {}
    for precision in ('f32', 'f64'):
        for name, ours in (('pool', pool), ('logits', logits)):
            ref = np.concatenate([refs[f'{precision}/{name}/{g}'] for g in GROUPS])
            errors[precision, name] = relative_error(ours, ref)
    print('max |ours - pytorch-fid| / max |pytorch-fid|:', errors)  # 3.6e-7 .. 5.7e-7 measured
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize('case', ['32x32_to_299x299', '5x7_to_11x13', '37x41_to_12x9',
                                  '8x8_to_3x5', '1x1_to_4x3', '3x300_to_7x299', '6x6_to_6x6',
                                  '6x7_to_6x12', '64x48_to_20x96'])
def test_resize_is_torch_bilinear_align_corners_false(refs, case):
    x, want = refs[f'resize/{case}/in'], refs[f'resize/{case}/out']
    got = np.asarray(I.resize_bilinear(jnp.asarray(x), want.shape[1:3]))
    # torch's weights are reproduced exactly; the two-term sums may round differently where
    # one compiler fuses a multiply-add (1 ulp of 1.0 measured). Values are in [0, 1].
    assert np.max(np.abs(got - want)) <= 2.5e-7


def test_resize_taps_are_half_pixel_without_antialias():
    i0, i1, w0, w1 = I._linear_taps(4, 2)  # Downsampling by 2: centres 0.5 and 2.5.
    assert i0.tolist() == [0, 2] and i1.tolist() == [1, 3]
    assert w0.tolist() == w1.tolist() == [.5, .5]
    i0, i1, w0, w1 = I._linear_taps(2, 4)  # Upsampling: -0.25 clamps to 0; 1.25 reads 1, 1.
    assert i0.tolist() == [0, 0, 0, 1] and i1.tolist() == [1, 1, 1, 1]
    assert w1.tolist() == [0, .25, .75, .25] and (w0 + w1).tolist() == [1, 1, 1, 1]
    # jax.image.resize antialiases when downsampling: a different function.
    x = jnp.asarray(np.random.default_rng(0).random((1, 37, 41, 1), np.float32))
    ours = I.resize_bilinear(x, (12, 9))
    assert float(jnp.max(jnp.abs(ours - jax.image.resize(x, (1, 12, 9, 1), 'bilinear')))) > 0.05


def test_uint8_images_are_read_as_x_over_255(monkeypatch):
    seen = {}
    monkeypatch.setattr(I, '_network', lambda params, x: seen.setdefault('x', x))
    images = np.arange(2 * 5 * 6 * 3, dtype=np.uint8).reshape(2, 5, 6, 3) * 2
    I.inception_features_uint8(None, images)
    want = I._preprocess(jnp.asarray(images.astype(np.float32) / np.float32(255)))  # Exact /.
    assert seen['x'].shape == (2, 299, 299, 3)
    assert np.array_equal(np.asarray(seen['x']), np.asarray(want))
    every = np.arange(256, dtype=np.uint8)
    assert np.array_equal(np.asarray(I._uint8_to_unit(every)), every / np.float32(255))
    with pytest.raises(TypeError, match='uint8'):
        I.inception_features_uint8(None, images.astype(np.float32))
    with pytest.raises(TypeError, match='float images'):
        I.inception_features(None, images)
    with pytest.raises(ValueError, match=r'\[N, H, W, 3\]'):
        I.inception_features(None, np.zeros((2, 3, 8, 8), np.float32))


# ---------------------------------------------------------------------------------------------
# State dicts and files.

def patterned_state_dict(counters: bool = True) -> dict:
    """Every entry distinct and position-dependent (a wrong transpose shows), cheap to make."""
    out = {}
    for i, (name, shape) in enumerate(I.state_dict_shapes().items()):
        size = int(np.prod(shape))
        out[name] = ((np.arange(size) % 1009) * 1e-3 + i).astype(np.float32).reshape(shape)
        if counters and name.endswith('.bn.weight'):
            out[name.replace('weight', 'num_batches_tracked')] = np.array(0, np.int64)
    return out


class _StateDictPickler(W._Pickler):
    """Pickles storages as persistent ids, as `torch.save` does for a whole file."""

    def __init__(self, file, legacy: bool):
        super().__init__(file, 2)
        self._legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, W.Storage):
            return W._storage_pid(obj) + ((None,) if self._legacy else ())
        return None


def little_endian(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder('<')).tobytes()


def write_state_dict(path, state_dict: dict, fmt: str) -> None:
    """`torch.save(state_dict, path)` in torch's zip (default) or legacy format, torch-free."""
    tensors = collections.OrderedDict()
    for i, (name, value) in enumerate(state_dict.items()):
        value = np.ascontiguousarray(value)
        strides = tuple(s // value.itemsize for s in value.strides)
        storage = W.Storage(value.reshape(-1), key=str(i))
        tensors[name] = W.Tensor(storage, 0, value.shape, strides, parameter=False)
    storages = [t.storage for t in tensors.values()]
    pkl = io.BytesIO()
    _StateDictPickler(pkl, fmt == 'legacy').dump(tensors)
    with open(path, 'wb') as f:
        if fmt == 'zip':
            with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as zf:
                zf.writestr('archive/data.pkl', pkl.getvalue())
                zf.writestr('archive/byteorder', 'little')
                for s in storages:
                    zf.writestr(f'archive/data/{s.key}', little_endian(s.array))
                zf.writestr('archive/version', '3\n')
        else:
            sys_info = dict(protocol_version=W.LEGACY_PROTOCOL, little_endian=True,
                            type_sizes=dict(short=2, int=4, long=4))
            for header in (W.LEGACY_MAGIC, W.LEGACY_PROTOCOL, sys_info):
                pickle.dump(header, f, protocol=2)
            f.write(pkl.getvalue())
            pickle.dump([s.key for s in storages], f, protocol=2)
            for s in storages:
                f.write(int(s.array.size).to_bytes(8, 'little', signed=True))
                f.write(little_endian(s.array))


def assert_params_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), path


def test_params_layout_from_state_dict():
    sd = patterned_state_dict()
    params = I.params_from_state_dict(sd)
    conv = params['Mixed_6b']['branch7x7_2']['conv']['kernel']  # torch [O, I, 1, 7] -> HWIO.
    assert conv.shape == (1, 7, 128, 128)
    assert np.array_equal(conv, sd['Mixed_6b.branch7x7_2.conv.weight'].transpose(2, 3, 1, 0))
    assert np.array_equal(params['fc']['kernel'], sd['fc.weight'].T)
    bn = params['Conv2d_1a_3x3']['bn']
    for ours, theirs in (('scale', 'weight'), ('bias', 'bias'), ('mean', 'running_mean'),
                         ('var', 'running_var')):
        assert np.array_equal(bn[ours], sd[f'Conv2d_1a_3x3.bn.{theirs}'])
    # The training counters may be absent.
    assert_params_equal(I.params_from_state_dict(patterned_state_dict(counters=False)), params)


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.pop('Mixed_6c.branch7x7_2.conv.weight'),
     r'missing Mixed_6c\.branch7x7_2\.conv\.weight'),
    (lambda sd: sd.update({'AuxLogits.fc.weight': np.zeros((1008, 768), np.float32)}),
     r'unexpected AuxLogits\.fc\.weight'),
    (lambda sd: sd.update({'Mixed_9z.bn.num_batches_tracked': np.array(0)}),
     r'unexpected Mixed_9z\.bn\.num_batches_tracked'),
    (lambda sd: sd.update({'fc.weight': np.zeros((1000, 2048), np.float32)}),
     r'fc\.weight has shape \(1000, 2048\), expected \(1008, 2048\)'),
    (lambda sd: sd.update({'Mixed_7c.branch_pool.bn.running_var': np.zeros(192, np.int64)}),
     r'Mixed_7c\.branch_pool\.bn\.running_var has dtype int64'),
])
def test_state_dict_mismatch_is_named(change, message):
    sd = patterned_state_dict()
    change(sd)
    with pytest.raises(I.InceptionWeightsError, match=message):
        I.params_from_state_dict(sd)


@pytest.mark.parametrize('fmt', ['zip', 'legacy'])
def test_pth_files_load_and_are_checked_by_sha256(tmp_path, fmt):
    sd = patterned_state_dict()
    path = tmp_path / 'weights.pth'
    write_state_dict(path, sd, fmt)
    want = I.params_from_state_dict(sd)
    assert_params_equal(I.load_inception_params(path, sha256=None), want)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert_params_equal(I.load_inception_params(path, sha256=digest.upper()), want)
    # By default only pytorch-fid's official file is accepted.
    with pytest.raises(I.InceptionWeightsError, match=f'{digest}, not {I.FID_WEIGHTS_SHA256}'):
        I.load_inception_params(path)


def test_wrong_files_are_rejected(tmp_path):
    path = tmp_path / I.FID_WEIGHTS_NAME
    path.write_bytes(b'<!doctype html><html>Not Found</html>')
    with pytest.raises(I.InceptionWeightsError, match='a different or damaged file'):
        I.load_inception_params(path)
    with pytest.raises(I.InceptionWeightsError, match='not a readable torch state dict'):
        I.load_inception_params(path, sha256=None)
    sd = patterned_state_dict()
    del sd['fc.bias']
    write_state_dict(path, sd, 'zip')
    with pytest.raises(I.InceptionWeightsError, match=r'missing fc\.bias'):
        I.load_inception_params(path, sha256=None)


def test_missing_file_says_where_weights_come_from(tmp_path):
    path = tmp_path / 'nowhere' / I.FID_WEIGHTS_NAME
    with pytest.raises(FileNotFoundError) as info:
        I.load_inception_params(path)
    text = str(info.value)
    assert str(path) in text and I.FID_WEIGHTS_URL in text and '--convert' in text


def test_npz_conversion_and_cli(tmp_path, capsys):
    sd = patterned_state_dict()
    pth, npz = tmp_path / 'w.pth', tmp_path / 'w.npz'
    write_state_dict(pth, sd, 'legacy')
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    # The CLI refuses unofficial weights unless told otherwise.
    assert I.main(['--convert', str(pth), str(npz)]) == 1
    assert 'a different or damaged file' in capsys.readouterr().err and not npz.exists()
    assert I.main(['--convert', str(pth), str(npz), '--no-check-sha256']) == 0
    assert digest in capsys.readouterr().out
    want = I.params_from_state_dict(sd)
    assert_params_equal(I.load_inception_params(npz, sha256=digest), want)
    assert_params_equal(I.load_inception_params(npz, sha256=None), want)
    converted_elsewhere = f'converted from a file with SHA-256 {digest}'
    with pytest.raises(I.InceptionWeightsError, match=converted_elsewhere):
        I.load_inception_params(npz)
    # An .npz that does not record its source is only loaded unchecked.
    bare = tmp_path / 'bare.npz'
    np.savez(bare, **sd)
    with pytest.raises(I.InceptionWeightsError, match='does not record the SHA-256'):
        I.load_inception_params(bare)
    assert_params_equal(I.load_inception_params(bare, sha256=None), want)


def test_official_digest_matches_the_hub_file_name():
    # torch hub names a file with the first 8 hex digits of its SHA-256.
    assert I.FID_WEIGHTS_NAME.endswith(f'-{I.FID_WEIGHTS_SHA256[:8]}.pth')
    assert len(I.FID_WEIGHTS_SHA256) == 64 and int(I.FID_WEIGHTS_SHA256, 16) >= 0
