"""Preconditionings against NVlabs/edm: fed EDM's recorded raw-network output F, our denoiser must
pass the network exactly EDM's inputs (c_in x, c_noise) and return EDM's D(x; sigma)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import precond as pc

EDM_NETS = ('ddpmpp', 'ncsnpp', 'adm', 'adm_iddpm', 'ddpmpp_cond', 'adm_cond')


def make_precond(name, ref):
    if name == 'edm':
        return pc.EDMPrecond()
    if name == 'vp':
        return pc.VPPrecond()
    if name == 've':
        return pc.VEPrecond()
    # A converted EDM checkpoint carries its u table; so does the reference.
    return pc.IDDPMPrecond(u=ref['precond/iddpm/u'])


def recorded_calls(ref):
    """(precision, precond name, with augment labels) of every recorded denoiser call."""
    calls = []
    for key in ref.keys('f32/den/'):
        if key.endswith('/D'):
            run = key.split('/')[2]
            calls.append((run.removesuffix('_aug'), run.endswith('_aug'), run))
    return calls


def relative_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def check_call(ref, precision, name, aug, run):
    dtype = np.float32 if precision == 'f32' else np.float64
    seen = {}

    def recorded_net(params, x, noise_labels, class_labels, augment_labels):
        seen.update(c_in_x=x, c_noise=noise_labels, labels=class_labels, augment=augment_labels)
        return jnp.asarray(ref.nhwc(f'{precision}/den/{run}/F'), x.dtype)

    label_dim = ref['inputs/class_labels'].shape[1] if 'inputs/class_labels' in ref else 0
    denoise = pc.denoiser_from_fn(recorded_net, None, make_precond(name, ref), label_dim)
    labels = ref['inputs/class_labels'].astype(dtype) if label_dim else None
    augment = ref['inputs/augment_labels'].astype(dtype) if aug else None
    D = denoise(jnp.asarray(ref.nhwc('inputs/x'), dtype), jnp.asarray(ref['inputs/sigma'], dtype), labels, augment)
    assert D.dtype == dtype
    errors = {
        'c_in_x': relative_error(seen['c_in_x'], ref.nhwc(f'{precision}/den/{run}/c_in_x')),
        'c_noise': relative_error(seen['c_noise'], ref[f'{precision}/den/{run}/c_noise']),
        'D': relative_error(D, ref.nhwc(f'{precision}/den/{run}/D')),
    }
    if label_dim:
        np.testing.assert_array_equal(seen['labels'], ref['inputs/class_labels'])
    assert (seen['augment'] is None) == (not aug)
    return errors


@pytest.mark.parametrize('net', EDM_NETS)
def test_denoiser_matches_edm_float32(edm_refs, net):
    ref = edm_refs(net)
    for name, aug, run in recorded_calls(ref):
        errors = check_call(ref, 'f32', name, aug, run)
        assert max(errors.values()) <= 1e-6, (run, errors)


@pytest.mark.parametrize('net', EDM_NETS)
def test_denoiser_matches_edm_float64(edm_refs, net):
    ref = edm_refs(net)
    with jax.enable_x64(True):
        for name, aug, run in recorded_calls(ref):
            errors = check_call(ref, 'f64', name, aug, run)
            assert max(errors.values()) <= 1e-13, (run, errors)


def test_conditional_denoiser_gets_zero_labels_when_none_given():
    seen = {}

    def net(params, x, noise_labels, class_labels, augment_labels):
        seen['labels'] = class_labels
        return x

    denoise = pc.denoiser_from_fn(net, None, pc.EDMPrecond(), label_dim=10)
    denoise(jnp.ones((3, 4, 4, 1)), 1.0)
    np.testing.assert_array_equal(seen['labels'], np.zeros((3, 10)))


def test_scalar_sigma_applies_to_whole_batch():
    denoise = pc.denoiser_from_fn(lambda p, x, c, y, a: jnp.zeros_like(x), None, pc.EDMPrecond())
    x = jnp.ones((3, 2, 2, 1))
    np.testing.assert_allclose(denoise(x, 0.5), denoise(x, jnp.full((3,), 0.5)))


def test_edm_scalings_give_unit_variance_input_and_target():
    """EDM's derivation (App. B.6): Var[c_in (y + n)] = 1 and Var[(y - c_skip (y + n)) / c_out] = 1
    for Var[y] = sigma_data^2, n ~ N(0, sigma^2)."""
    sigma = jnp.array([1e-3, 0.5, 2.0, 80.0], jnp.float32)
    c_skip, c_out, c_in, c_noise = pc.EDMPrecond(sigma_data=0.5).scalings(sigma)
    np.testing.assert_allclose(c_in ** 2 * (0.25 + sigma ** 2), 1.0, rtol=1e-6)
    target_var = ((1 - c_skip) ** 2 * 0.25 + c_skip ** 2 * sigma ** 2) / c_out ** 2
    np.testing.assert_allclose(target_var, 1.0, rtol=1e-5)
    np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-6)


def test_vp_precond_sigma_range_matches_edm(edm_refs):
    attrs = edm_refs('ddpmpp').meta['precond_attrs']
    assert pc.VPPrecond().sigma_min == attrs['vp']['sigma_min']
    assert pc.VPPrecond().sigma_max == attrs['vp']['sigma_max']
    assert pc.VEPrecond().sigma_min == attrs['ve']['sigma_min']


def test_iddpm_precond_range_and_rounding(edm_refs):
    ref = edm_refs('adm_iddpm')
    p = pc.IDDPMPrecond(u=ref['precond/iddpm/u'])
    assert p.sigma_min == ref.meta['precond_attrs']['iddpm']['sigma_min']
    assert p.sigma_max == ref.meta['precond_attrs']['iddpm']['sigma_max']
    u = ref['precond/iddpm/u']
    np.testing.assert_array_equal(p.round_sigma(np.array([u[5] * 1.0001, u[900]])), [u[5], u[900]])
    with pytest.raises(ValueError, match='M\\+1'):
        pc.IDDPMPrecond(u=np.zeros(10))


def test_denoiser_is_a_pytree_that_jits():
    module_params = {'w': jnp.float32(2.0)}
    denoise = pc.denoiser_from_fn(lambda p, x, c, y, a: p['w'] * x, module_params, pc.EDMPrecond())
    out = jax.jit(lambda d, x: d(x, 1.0))(denoise, jnp.ones((2, 2, 2, 1)))
    # c_skip + c_out * c_in * w at sigma = 1, sigma_data = 0.5.
    expected = 0.25 / 1.25 + (0.5 / np.sqrt(1.25)) * (1 / np.sqrt(1.25)) * 2.0
    np.testing.assert_allclose(out, expected, rtol=1e-6)
