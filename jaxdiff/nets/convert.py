"""Load NVlabs/edm PyTorch weights into jaxdiff's Flax networks.

The Flax modules are named after EDM's PyTorch modules, so a state-dict key maps to a Flax
parameter path by one rule: the two levels of EDM's `enc`/`dec` ModuleDicts join into one
module name (`enc.16x16_block0.conv0.weight` -> `enc_16x16_block0/conv0/kernel`), and the leaf is
renamed and re-laid out by its kind:

  conv weight   [out, in, kh, kw] -> kernel [kh, kw, in, out]
  linear weight [out, in]         -> kernel [in, out]
  norm weight   [C]               -> scale  [C]
  bias, freqs                     -> unchanged

`resample_filter` buffers are constants of the architecture (rebuilt from `resample_filter`),
so they are checked against the module's filter rather than loaded.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxdiff.nets.layers import resample_filter_2d

CONTAINERS = ('enc', 'dec')


def flax_path(key: str) -> tuple[str, ...]:
    """Flax parameter path of an EDM state-dict key (without any `model.` prefix)."""
    parts = key.split('.')
    if parts[0] in CONTAINERS and len(parts) > 2:
        parts = [f'{parts[0]}_{parts[1]}'] + parts[2:]
    leaf = parts[-1]
    if leaf == 'weight':
        parts[-1] = 'kernel'  # Renamed to 'scale' below for 1-D (normalisation) weights.
    return tuple(parts)


def flax_leaf(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """(path, array) of one EDM parameter in jaxdiff's naming and layout."""
    path = flax_path(key)
    value = np.asarray(value)
    if key.endswith('.weight'):
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        elif value.ndim == 1:
            path = path[:-1] + ('scale',)
        else:
            raise ValueError(f'Unexpected weight {key!r} with shape {value.shape}')
    return path, value


def params_from_state_dict(state_dict: Mapping[str, Any], *, strip_prefix: str = 'model.',
                           dtype=np.float32) -> dict:
    """Nested Flax `params` dict from an EDM state dict of numpy arrays.

    Keys may carry the Precond's `model.` prefix (EDM pickles and Precond state dicts) or not
    (the inner model's own state dict). `resample_filter` buffers are verified to be one of
    EDM's normalised separable filters and then dropped; iDDPMPrecond's `u` table is dropped
    (it is recomputed by `jaxdiff.schedules.iddpm_u`).
    """
    params: dict = {}
    for key, value in state_dict.items():
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix):]
        if key == 'u':  # iDDPMPrecond buffer, not a network parameter.
            continue
        if key.endswith('.resample_filter'):
            _check_resample_filter(key, np.asarray(value))
            continue
        path, array = flax_leaf(key, value)
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        if path[-1] in node:
            raise ValueError(f'Two state-dict entries map to the same parameter {"/".join(path)}')
        node[path[-1]] = np.asarray(array, dtype=dtype)
    return params


def _check_resample_filter(key: str, value: np.ndarray) -> None:
    f = value.reshape(value.shape[-2:])
    # A separable filter f f^T / (sum f)^2 is rebuilt exactly from its column sums.
    if not np.allclose(resample_filter_2d(f.sum(axis=0)), f, atol=1e-6):
        raise ValueError(f'{key} is not a normalised separable resampling filter: {f.tolist()}')


# ---------------------------------------------------------------------------------------------
# Whole networks.

MODEL_TYPES = ('SongUNet', 'DhariwalUNet')
PRECOND_TYPES = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond')


def edm_module(model_type: str, *, img_resolution: int, img_channels: int, label_dim: int = 0,
               out_channels: int | None = None, dtype=None, **model_kwargs):
    """The jaxdiff Flax module for EDM's `model_type` and keyword arguments, as EDM's Precond
    builds it (in_channels = img_channels; out_channels = img_channels, or twice that for iDDPM)."""
    from jaxdiff import nets
    if model_type not in MODEL_TYPES:
        raise ValueError(f'Unsupported EDM model_type {model_type!r}; expected one of {MODEL_TYPES}')
    return nets.build(model_type, img_resolution=img_resolution, in_channels=img_channels,
                      out_channels=out_channels or img_channels, label_dim=label_dim, dtype=dtype, **model_kwargs)


def edm_precond(precond_type: str, precond_kwargs: Mapping[str, Any], state_dict: Mapping[str, Any] = None):
    """jaxdiff's preconditioning for EDM's Precond class name and its keyword arguments.

    iDDPMPrecond takes its noise-level table from the state dict's `u` buffer when present.
    """
    from jaxdiff import precond
    kw = dict(precond_kwargs)
    if precond_type == 'EDMPrecond':
        return precond.EDMPrecond(sigma_data=kw.get('sigma_data', 0.5), sigma_min=kw.get('sigma_min', 0.0),
                                  sigma_max=kw.get('sigma_max', float('inf')))
    if precond_type == 'VPPrecond':
        return precond.VPPrecond(beta_d=kw.get('beta_d', 19.9), beta_min=kw.get('beta_min', 0.1),
                                 M=kw.get('M', 1000), epsilon_t=kw.get('epsilon_t', 1e-5))
    if precond_type == 'VEPrecond':
        return precond.VEPrecond(sigma_min=kw.get('sigma_min', 0.02), sigma_max=kw.get('sigma_max', 100.0))
    if precond_type == 'iDDPMPrecond':
        u = None
        if state_dict is not None:
            u = state_dict.get('u', state_dict.get('model.u'))
        return precond.IDDPMPrecond(C_1=kw.get('C_1', 0.001), C_2=kw.get('C_2', 0.008), M=kw.get('M', 1000),
                                    u=None if u is None else np.asarray(u))
    raise ValueError(f'Unsupported EDM precond {precond_type!r}; expected one of {PRECOND_TYPES}')


def from_edm_state_dict(state_dict: Mapping[str, Any], model_type: str, *, img_resolution: int,
                        img_channels: int, label_dim: int = 0, precond_type: str = 'EDMPrecond',
                        precond_kwargs: Mapping[str, Any] | None = None, dtype=None, **model_kwargs):
    """(module, params, precond) from an EDM state dict (numpy arrays, with or without the
    Precond's `model.` prefix) and EDM's network keyword arguments.

    The converted parameter tree is checked against the module's own: a missing, extra or
    misshapen parameter is an error naming it.
    """
    import jax
    out_channels = img_channels * 2 if precond_type == 'iDDPMPrecond' else img_channels
    module = edm_module(model_type, img_resolution=img_resolution, img_channels=img_channels,
                        label_dim=label_dim, out_channels=out_channels, dtype=dtype, **model_kwargs)
    params = params_from_state_dict(state_dict)
    x = jax.ShapeDtypeStruct((1, img_resolution, img_resolution, img_channels), np.float32)
    sigma = jax.ShapeDtypeStruct((1,), np.float32)
    labels = jax.ShapeDtypeStruct((1, label_dim), np.float32) if label_dim else None
    augment_dim = model_kwargs.get('augment_dim', 0)
    augment = jax.ShapeDtypeStruct((1, augment_dim), np.float32) if augment_dim else None
    expected = jax.eval_shape(lambda *args: module.init(jax.random.key(0), *args), x, sigma, labels, augment)['params']
    check_params_match(params, expected)
    precond = edm_precond(precond_type, precond_kwargs or {}, state_dict)
    return module, params, precond


def check_params_match(params, expected) -> None:
    """Raise ValueError naming every parameter that is missing, unexpected or misshapen."""
    import jax
    flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    problems = [f'missing {k} {want[k]}' for k in sorted(want.keys() - flat.keys())]
    problems += [f'unexpected {k} {flat[k]}' for k in sorted(flat.keys() - want.keys())]
    problems += [f'shape of {k}: {flat[k]}, expected {want[k]}' for k in sorted(want.keys() & flat.keys())
                 if tuple(flat[k]) != tuple(want[k])]
    if problems:
        raise ValueError('EDM weights do not match the network: ' + '; '.join(problems[:20])
                         + (f' (and {len(problems) - 20} more)' if len(problems) > 20 else ''))


def from_edm_pickle(path_or_file, key: str = 'ema', dtype=None):
    """(module, params, precond) from an NVlabs/edm network pickle (`network-snapshot-*.pkl`),
    read without executing the code embedded in it (see `jaxdiff.nets.edm_pickle`)."""
    from jaxdiff.nets.edm_pickle import load_edm_pickle
    pkl = load_edm_pickle(path_or_file, key=key)
    kw = dict(pkl.precond_kwargs)
    # The Precond sets these for its inner network; EDM records them in the network's kwargs too.
    model_kwargs = {k: v for k, v in pkl.model_kwargs.items()
                    if k not in ('img_resolution', 'in_channels', 'out_channels', 'label_dim')}
    return from_edm_state_dict(
        pkl.state_dict, pkl.model_type, img_resolution=kw['img_resolution'], img_channels=kw['img_channels'],
        label_dim=kw.get('label_dim', 0), precond_type=pkl.precond, precond_kwargs=kw, dtype=dtype,
        **model_kwargs)
