"""jaxdiff.nets.convert: EDM state dicts and pickles to Flax modules, params and preconditioning.

End to end: a network pickle written in NVlabs/edm's format (tests/nets/edm_pickle_writer.py)
holding the reference weights loads into a denoiser that reproduces EDM's recorded D(x; sigma).
"""
import jax.numpy as jnp
import numpy as np
import pytest

import edm_pickle_writer as W
from jaxdiff import precond as pc
from jaxdiff.nets import convert


def write_reference_pickle(ref, tmp_path, precond, attrs, out_channels, buffers=None):
    meta = ref.meta
    state_dict = dict(buffers or {})
    state_dict.update({f'model.{k}': v for k, v in ref.state_dict.items()})
    model_kwargs = {k: v for k, v in meta['model_kwargs'].items() if k != 'model_type'}
    net = W.edm_network(
        precond, dict(img_resolution=meta['img_resolution'], img_channels=meta['img_channels'],
                      label_dim=meta['label_dim'], use_fp16=False, **attrs),
        dict(meta['model_kwargs'], img_resolution=meta['img_resolution'], img_channels=meta['img_channels'],
             label_dim=meta['label_dim']),
        meta['model_kwargs']['model_type'],
        dict(img_resolution=meta['img_resolution'], in_channels=meta['img_channels'], out_channels=out_channels,
             label_dim=meta['label_dim'], **model_kwargs),
        state_dict)
    path = tmp_path / 'network-snapshot-000000.pkl'
    with open(path, 'wb') as f:
        W.dump(W.snapshot(net), f)
    return path


def relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def test_edm_pickle_to_denoiser_reproduces_edm(edm_refs, tmp_path):
    ref = edm_refs('ddpmpp')
    path = write_reference_pickle(ref, tmp_path, 'EDMPrecond',
                                  dict(sigma_min=0, sigma_max=float('inf'), sigma_data=0.5), 3)
    module, params, precond = convert.from_edm_pickle(path)
    assert precond == pc.EDMPrecond()
    denoise = pc.make_denoiser(module, params, precond)
    D = denoise(jnp.asarray(ref.nhwc('inputs/x')), jnp.asarray(ref['inputs/sigma']))
    assert relative_error(D, ref.nhwc('f32/den/edm/D')) <= 1e-5


def test_iddpm_pickle_uses_its_stored_noise_table(edm_refs, tmp_path):
    ref = edm_refs('adm_iddpm')
    u = ref['precond/iddpm/u']
    path = write_reference_pickle(ref, tmp_path, 'iDDPMPrecond',
                                  dict(C_1=0.001, C_2=0.008, M=1000, sigma_min=float(u[999]), sigma_max=float(u[0])),
                                  6, buffers={'u': u})
    module, params, precond = convert.from_edm_pickle(path)
    assert isinstance(precond, pc.IDDPMPrecond) and np.array_equal(precond.u, u)
    assert module.out_channels == 6
    denoise = pc.make_denoiser(module, params, precond)
    D = denoise(jnp.asarray(ref.nhwc('inputs/x')), jnp.asarray(ref['inputs/sigma']))
    assert relative_error(D, ref.nhwc('f32/den/iddpm/D')) <= 1e-5


def state_dict_kwargs(ref):
    kwargs = dict(ref.meta['model_kwargs'])
    return kwargs.pop('model_type'), kwargs


def test_missing_extra_and_misshapen_weights_are_named(edm_refs):
    ref = edm_refs('ddpmpp')
    model_type, kwargs = state_dict_kwargs(ref)
    sd = dict(ref.state_dict)
    del sd['enc.16x16_block0.conv0.weight']
    sd['enc.16x16_block0.extra.bias'] = np.zeros(3, np.float32)
    sd['map_layer0.bias'] = np.zeros(7, np.float32)
    with pytest.raises(ValueError) as info:
        convert.from_edm_state_dict(sd, model_type, img_resolution=16, img_channels=3, **kwargs)
    message = str(info.value)
    assert "missing ['enc_16x16_block0']['conv0']['kernel']" in message
    assert "unexpected ['enc_16x16_block0']['extra']['bias']" in message
    assert "shape of ['map_layer0']['bias']: (7,)" in message


def test_state_dict_with_precond_prefix_converts_the_same(edm_refs):
    ref = edm_refs('ncsnpp')
    plain = convert.params_from_state_dict(ref.state_dict)
    prefixed = convert.params_from_state_dict({f'model.{k}': v for k, v in ref.state_dict.items()})
    assert plain.keys() == prefixed.keys()
    np.testing.assert_array_equal(plain['map_noise']['freqs'], ref['params/map_noise.freqs'])


def test_leaf_layouts():
    conv = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)  # [out, in, kh, kw]
    path, kernel = convert.flax_leaf('enc.8x8_block0.conv0.weight', conv)
    assert path == ('enc_8x8_block0', 'conv0', 'kernel') and kernel.shape == (5, 5, 3, 2)
    assert kernel[1, 4, 2, 0] == conv[0, 2, 1, 4]
    path, dense = convert.flax_leaf('map_layer0.weight', np.ones((4, 7)))
    assert path == ('map_layer0', 'kernel') and dense.shape == (7, 4)
    path, scale = convert.flax_leaf('dec.16x16_aux_norm.weight', np.ones(8))
    assert path == ('dec_16x16_aux_norm', 'scale')


def test_bad_resample_filter_is_refused():
    with pytest.raises(ValueError, match='resampling filter'):
        convert.params_from_state_dict({'enc.8x8_down.conv0.resample_filter': np.array([[[[1.0, 0.0], [0.0, 1.0]]]])})


def test_unknown_model_or_precond_is_named():
    with pytest.raises(ValueError, match='SongUNet'):
        convert.edm_module('UNet2DModel', img_resolution=8, img_channels=1)
    with pytest.raises(ValueError, match='EDMPrecond'):
        convert.edm_precond('RectifiedFlow', {})
