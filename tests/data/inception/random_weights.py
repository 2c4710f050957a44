"""Seeded random weights for the FID Inception-v3, drawn the same way by torch and JAX tests.

The reference outputs in inception_refs.npz were made by pytorch-fid's own module holding these
weights, so only the seed is stored, not 95 MB of arrays. numpy only (no torch, no jax): both
make_inception_refs.py (torch side) and tests/nets/test_inception.py import this file.

Procedure, per state-dict entry `name` of shape `shape`, independent of the entries' order:

    rng = numpy.random.default_rng([seed, zlib.crc32(name.encode())])   # PCG64, SeedSequence
    *.conv.weight  [O, I, kh, kw]:  rng.standard_normal(shape) * sqrt(2 / (I kh kw))   (He)
    *.bn.weight:                    rng.uniform(0.5, 1.5, shape)
    *.bn.bias:                      rng.uniform(-0.2, 0.2, shape)
    *.bn.running_mean:              rng.uniform(-0.3, 0.3, shape)
    *.bn.running_var:               rng.uniform(0.5, 1.5, shape)
    fc.weight      [1008, 2048]:    rng.standard_normal(shape) * sqrt(1 / 2048)
    fc.bias:                        rng.uniform(-0.1, 0.1, shape)
    *.bn.num_batches_tracked:       0 (int64)

each drawn in float64 and rounded to float32. The BatchNorm statistics are random (not 0/1), so
the normalisation is exercised; He-scaled convolutions keep activations of order one through
the 94 layers. `state_dict_digest` fingerprints the result: the tests compare it with the one
recorded beside the outputs, so a change of numpy's streams fails loudly instead of silently.
"""
from __future__ import annotations

import hashlib
import math
import zlib

import numpy as np

SEED = 20151205


def random_tensor(name: str, shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
    """The entry `name` of the random state dict (see the module docstring)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    leaf = name.rsplit('.', 1)[-1]
    if leaf == 'num_batches_tracked':
        return np.zeros(shape, np.int64)
    if name.endswith('.conv.weight'):
        value = rng.standard_normal(shape) * math.sqrt(2 / math.prod(shape[1:]))
    elif name == 'fc.weight':
        value = rng.standard_normal(shape) * math.sqrt(1 / shape[1])
    elif name == 'fc.bias':
        value = rng.uniform(-0.1, 0.1, shape)
    elif '.bn.' in name:
        low, high = {'weight': (0.5, 1.5), 'bias': (-0.2, 0.2), 'running_mean': (-0.3, 0.3),
                     'running_var': (0.5, 1.5)}[leaf]
        value = rng.uniform(low, high, shape)
    else:
        raise ValueError(f'no rule for state-dict entry {name!r}')
    return value.astype(np.float32)


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict:
    """{name: array} for every entry of `shapes` ({name: shape}), in the order given."""
    return {name: random_tensor(name, tuple(shape), seed) for name, shape in shapes.items()}


def state_dict_digest(state_dict: dict) -> str:
    """SHA-256 over the float entries (num_batches_tracked skipped) by sorted name: name, shape,
    little-endian float32 bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        if name.endswith('num_batches_tracked'):
            continue
        value = np.asarray(state_dict[name], dtype='<f4')
        digest.update(f'{name}:{value.shape};'.encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
