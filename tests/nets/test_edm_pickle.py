"""jaxdiff.nets.edm_pickle: reading NVlabs/edm network pickles without torch and without running.

The pickles are written by tests/nets/edm_pickle_writer.py in pure Python, with the structure and
global names of a real `network-snapshot-*.pkl` (checked outside the project against pickles
written by torch 2.13 and EDM's code) but with a placeholder instead of EDM's source code. The
weights are those of the EDM reference networks in tests/data/edm.
"""
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import edm_pickle_writer as W
from jaxdiff.nets.edm_pickle import EDMPickle, EDMPickleError, load_edm_pickle

NOT_EDM = 'not a plain NVlabs/edm network pickle'

EDM_ATTRS = dict(sigma_min=0, sigma_max=float('inf'), sigma_data=0.5)
IDDPM_ATTRS = dict(C_1=0.001, C_2=0.008, M=1000, sigma_min=0.006422337144613266,
                   sigma_max=20291.169921875)


def model_init_kwargs(ref, out_channels: int) -> dict:
    """The inner network's kwargs as EDM's Precond passes them (and persistence records them)."""
    meta = ref.meta
    kwargs = {k: v for k, v in meta['model_kwargs'].items() if k != 'model_type'}
    return dict(img_resolution=meta['img_resolution'], in_channels=meta['img_channels'],
                out_channels=out_channels, label_dim=meta['label_dim'], **kwargs)


def precond_init_kwargs(ref) -> dict:
    """The Precond's recorded kwargs: the training script's network kwargs + interface kwargs."""
    meta = ref.meta
    return dict(meta['model_kwargs'], img_resolution=meta['img_resolution'],
                img_channels=meta['img_channels'], label_dim=meta['label_dim'])


def reference_net(ref, precond: str, extra_attrs: dict, fmt: str = 'legacy', out_channels=3,
                  buffers: dict | None = None):
    """(writer Module, expected state dict) of an EDM Precond holding `ref`'s weights."""
    state_dict = dict(buffers or {})  # The Precond's own buffers come first in torch's order.
    state_dict.update({f'model.{k}': v for k, v in ref.state_dict.items()})
    meta = ref.meta
    attrs = dict(img_resolution=meta['img_resolution'], img_channels=meta['img_channels'],
                 label_dim=meta['label_dim'], use_fp16=False, **extra_attrs)
    net = W.edm_network(precond, attrs, precond_init_kwargs(ref),
                        meta['model_kwargs']['model_type'], model_init_kwargs(ref, out_channels),
                        state_dict, fmt)
    return net, state_dict


def write(tmp_path, obj, name='network-snapshot-000000.pkl'):
    path = tmp_path / name
    with open(path, 'wb') as f:
        W.dump(obj, f)
    return path


def assert_state_dict_equal(got: dict, want: dict):
    assert list(got) == list(want)
    for key, value in want.items():
        value = np.asarray(value)
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert got[key].tobytes() == np.ascontiguousarray(value).tobytes(), key


@pytest.mark.parametrize('fmt', ['legacy', 'zip'])
def test_songunet_edmprecond_roundtrip(edm_refs, tmp_path, fmt):
    ref = edm_refs('ddpmpp')
    net, state_dict = reference_net(ref, 'EDMPrecond', EDM_ATTRS, fmt)
    # EDM records numpy scalars in some kwargs (UNetBlock's skip_scale=np.sqrt(0.5)).
    net.children['model'].children['enc'].children['16x16_block0'].attrs['skip_scale'] = \
        np.sqrt(np.float64(0.5))
    torch_loaded = 'torch' in sys.modules
    out = load_edm_pickle(write(tmp_path, W.snapshot(net)))

    assert isinstance(out, EDMPickle)
    assert out.precond == 'EDMPrecond' and out.model_type == 'SongUNet'
    assert out.precond_kwargs == dict(img_resolution=16, img_channels=3, label_dim=0,
                                      use_fp16=False, **EDM_ATTRS)
    assert out.model_kwargs == model_init_kwargs(ref, 3)
    assert out.model_kwargs['resample_filter'] == [1, 1]
    assert_state_dict_equal(out.state_dict, state_dict)
    assert any(k.endswith('resample_filter') for k in out.state_dict)
    assert ('torch' in sys.modules) == torch_loaded  # The loader never imports torch.


def test_dhariwal_iddpmprecond_u_buffer_and_defaults(edm_refs, tmp_path):
    ref = edm_refs('adm_iddpm')
    u = ref['precond/iddpm/u']
    net, state_dict = reference_net(ref, 'iDDPMPrecond', IDDPM_ATTRS, out_channels=6,
                                    buffers={'u': u})
    with open(tmp_path / 'net.pkl', 'wb') as f:
        W.dump(W.snapshot(net), f)
    with open(tmp_path / 'net.pkl', 'rb') as f:  # A file object works as well as a path.
        out = load_edm_pickle(f)

    assert out.precond == 'iDDPMPrecond' and out.model_type == 'DhariwalUNet'
    # C_1, C_2 and M were left at their defaults, so only the attributes hold them; the derived
    # sigma_min / sigma_max attributes are not constructor arguments of iDDPMPrecond.
    assert out.precond_kwargs == dict(img_resolution=16, img_channels=3, label_dim=0,
                                      use_fp16=False, C_1=0.001, C_2=0.008, M=1000)
    assert out.model_kwargs['out_channels'] == 6
    assert list(out.state_dict)[0] == 'u'  # Precond's own buffer first, as in net.state_dict().
    assert_state_dict_equal(out.state_dict, state_dict)


def test_vpprecond_kwargs_exclude_derived_sigmas(edm_refs, tmp_path):
    ref = edm_refs('ddpmpp')
    attrs = dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
                 sigma_min=0.0009765625, sigma_max=152.16697692871094)
    net, _ = reference_net(ref, 'VPPrecond', attrs)
    net.init_kwargs['beta_d'] = 10.0  # Recorded arguments win over the attributes.
    out = load_edm_pickle(write(tmp_path, W.snapshot(net)))
    assert out.precond_kwargs == dict(img_resolution=16, img_channels=3, label_dim=0,
                                      use_fp16=False, beta_d=10.0, beta_min=0.1, M=1000,
                                      epsilon_t=1e-5)


def strided_net(fmt: str):
    """A minimal Precond whose tensors are views: transposed, offset, sharing one storage."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(40).astype(np.float32)
    shared = W.Storage(base, fmt)
    mat = rng.standard_normal((3, 5)).astype(np.float64)
    views = {
        # weight = mat.T: storage in mat's layout, strides swapped.
        'weight': (W.Tensor(W.Storage(mat.reshape(-1), fmt), 0, (5, 3), (1, 5)), mat.T),
        # Two tensors on the same storage object (pickled once, then memo-referenced).
        'bias': (W.Tensor(shared, 7, (4,), (1,)), base[7:11]),
        'gain': (W.Tensor(shared, 3, (2, 3), (10, 2)), base[3 + np.add.outer([0, 10], [0, 2, 4])]),
        'bcast': (W.Tensor(shared, 39, (3, 2), (0, 0)), np.full((3, 2), base[39])),
        'scalar': (W.Tensor(shared, 5, (), ()), base[5]),
        'empty': (W.Tensor(shared, 40, (0, 4), (4, 1)), np.zeros((0, 4), np.float32)),
    }
    half = rng.standard_normal((4, 4)).astype(np.float16)
    leaf = W.Module('Conv2d', params={k: t for k, (t, _) in views.items()} | {'unused': None},
                    buffers={'resample_filter': W.Tensor(W.Storage(half.reshape(-1), fmt), 1,
                                                         (2, 2), (8, 2), parameter=False),
                             'scratch': W.tensor(np.ones(2, np.float32), parameter=False),
                             'absent': None},
                    non_persistent_buffers=frozenset({'scratch'}))
    model = W.Module('DhariwalUNet', children={
        'enc': W.Module('ModuleDict', persistent=False, children={'8x8_conv': leaf, 'gone': None})})
    net = W.Module('EDMPrecond', attrs=dict(img_resolution=8, img_channels=3, label_dim=0,
                                            use_fp16=False, **EDM_ATTRS),
                   children={'model': model}, init_kwargs=dict(img_resolution=8, img_channels=3))
    want = {f'model.enc.8x8_conv.{k}': v for k, (_, v) in views.items()}
    want['model.enc.8x8_conv.resample_filter'] = half.reshape(-1)[[[1, 3], [9, 11]]]
    return net, want


@pytest.mark.parametrize('fmt', ['legacy', 'zip', 'zip-big'])
def test_strided_offset_and_shared_storages(tmp_path, fmt):
    net, want = strided_net(fmt)
    data = W.dumps(W.snapshot(net))
    assert data.count(b'_load_from_bytes') == 1
    out = load_edm_pickle(io.BytesIO(data))
    assert_state_dict_equal(out.state_dict, want)
    for value in out.state_dict.values():  # Copies, not views into the pickle's bytes.
        assert value.flags.c_contiguous and value.flags.owndata and value.flags.writeable
    assert out.model_kwargs == {}  # The inner model recorded no arguments here.


@pytest.mark.parametrize('protocol', [2, 3, 5])
def test_other_pickle_protocols(protocol):
    """Protocol 2 pickles bytes via _codecs.encode and sets via builtins.set; 5 is Python 3.14's."""
    net, want = strided_net('legacy')
    net.children['model'].attrs['skip_scale'] = np.float64(0.5) ** 0.5
    net.children['model'].init_kwargs = W.EasyDict(model_channels=8, channel_mult=[1, 2],
                                                   resample_filter=(1, 3, 3, 1))
    snapshot = W.snapshot(net)
    snapshot['dataset_kwargs'] = W.EasyDict(snapshot['dataset_kwargs'])
    out = load_edm_pickle(io.BytesIO(W.dumps(snapshot, protocol)))
    assert_state_dict_equal(out.state_dict, want)
    assert out.model_kwargs == dict(model_channels=8, channel_mult=[1, 2],
                                    resample_filter=(1, 3, 3, 1))
    assert type(out.model_kwargs) is dict


class Payload:
    """Pickles as a call of `func(*args)`: the classic pickle exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def exploit_payloads(marker):
    """Payloads that would create `marker`, by the global name pickle gives them."""
    return {
        os.system.__module__ + '.system': Payload(os.system, f'touch {marker}'),  # posix.system
        'builtins.exec': Payload(exec, f'open({str(marker)!r}, "w").close()'),
        'subprocess.Popen': Payload(subprocess.Popen, ['touch', str(marker)]),
        'builtins.eval': Payload(eval, f'open({str(marker)!r}, "w")'),
    }


@pytest.mark.parametrize('index', range(4))
def test_forbidden_global_is_refused_without_running(tmp_path, index):
    marker = tmp_path / 'pwned'
    name, payload = list(exploit_payloads(marker).items())[index]
    net, _ = strided_net('legacy')
    snapshot = W.snapshot(net)
    snapshot['augment_pipe'] = payload
    path = write(tmp_path, snapshot)
    with pytest.raises(EDMPickleError, match=NOT_EDM) as info:
        load_edm_pickle(path)
    assert f'global {name}:' in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_exploit_payload_is_live(tmp_path):
    """The payloads above would run under plain pickle.load; only the loader stops them."""
    marker = tmp_path / 'pwned'
    pickle.loads(W.dumps({'x': exploit_payloads(marker)['builtins.exec']}))
    assert marker.exists()


def test_embedded_source_is_never_executed(tmp_path):
    marker = tmp_path / 'pwned'
    net, want = strided_net('legacy')
    net.module_src = f'open({str(marker)!r}, "w").close()\nclass EDMPrecond: pass\n'
    out = load_edm_pickle(write(tmp_path, W.snapshot(net)))
    assert_state_dict_equal(out.state_dict, want)
    assert not marker.exists()


def test_forbidden_global_inside_storage_blob(tmp_path):
    marker = tmp_path / 'pwned'
    blob = io.BytesIO()
    for header in (W.LEGACY_MAGIC, W.LEGACY_PROTOCOL, {}):
        pickle.dump(header, blob, protocol=2)
    pickle.dump(exploit_payloads(marker)['builtins.exec'], blob, protocol=2)
    data = W.dumps({'ema': W.Module('EDMPrecond', buffers={
        'u': Payload(W.Ref('torch.storage', '_load_from_bytes'), blob.getvalue())})})
    with pytest.raises(EDMPickleError, match=r'builtins\.exec'):
        load_edm_pickle(io.BytesIO(data))
    assert not marker.exists()


@pytest.mark.parametrize('global_name', [('training.networks', 'EDMPrecond'),
                                         ('torch', 'load'), ('numpy', 'load')])
def test_unknown_global_is_refused(tmp_path, global_name):
    data = W.dumps({'ema': Payload(W.Ref(*global_name))})
    with pytest.raises(EDMPickleError, match='.'.join(global_name)):
        load_edm_pickle(io.BytesIO(data))


def test_truncated_and_garbage_files(tmp_path):
    net, _ = strided_net('legacy')
    data = W.dumps(W.snapshot(net))
    for cut in (0, 1, 40, len(data) // 2, len(data) - 300, len(data) - 1):
        path = tmp_path / f'cut{cut}.pkl'
        path.write_bytes(data[:cut])
        with pytest.raises(EDMPickleError, match='truncated') as info:
            load_edm_pickle(path)
        assert str(path) in str(info.value)
    path = tmp_path / 'garbage.pkl'
    path.write_bytes(b'GIF89a' + bytes(range(256)) * 4)
    with pytest.raises(EDMPickleError, match=str(path)):
        load_edm_pickle(path)


def test_truncated_storage_blob_is_reported():
    blob = W._legacy_blob(W.Storage(np.arange(10, dtype=np.float32)))
    data = W.dumps({'ema': W.Module('EDMPrecond', buffers={
        'u': Payload(W.Ref('torch.storage', '_load_from_bytes'), blob[:-4])})})
    with pytest.raises(EDMPickleError, match='truncated'):
        load_edm_pickle(io.BytesIO(data))


def test_view_past_end_of_storage_is_refused():
    storage = W.Storage(np.arange(6, dtype=np.float32))
    net = W.Module('EDMPrecond', buffers={'u': W.Tensor(storage, 2, (2, 3), (3, 1), False)})
    with pytest.raises(EDMPickleError, match='past the end'):
        load_edm_pickle(io.BytesIO(W.dumps({'ema': net})))


def test_key_selection_and_wrong_contents(tmp_path):
    net, want = strided_net('legacy')
    with pytest.raises(EDMPickleError, match=r"no 'net' in the pickle .*'ema'"):
        load_edm_pickle(io.BytesIO(W.dumps(W.snapshot(net))), key='net')
    out = load_edm_pickle(io.BytesIO(W.dumps(net)), key=None)  # The network pickled by itself.
    assert_state_dict_equal(out.state_dict, want)
    with pytest.raises(EDMPickleError, match='EDMLoss, not one of EDMPrecond'):
        load_edm_pickle(io.BytesIO(W.dumps(W.snapshot(net))), key='loss_fn')
    net.children['model'].class_name = 'MyUNet'
    with pytest.raises(EDMPickleError, match='model is MyUNet'):
        load_edm_pickle(io.BytesIO(W.dumps(W.snapshot(net))))
