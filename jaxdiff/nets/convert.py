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
