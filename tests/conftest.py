"""Shared test fixtures: the EDM reference arrays recorded with NVlabs/edm (see tests/data/)."""
import json
import pathlib

import numpy as np
import pytest

DATA = pathlib.Path(__file__).parent / 'data'
EDM_NETS = ('ddpmpp', 'ncsnpp', 'adm', 'adm_iddpm', 'ddpmpp_cond', 'adm_cond')


class EDMRef:
    """One reference file of tests/data/edm: arrays by key, NCHW arrays as NHWC on request."""

    def __init__(self, name: str):
        self.name = name
        self.npz = np.load(DATA / 'edm' / f'{name}.npz')
        self.meta = json.loads(str(self.npz['meta/json']))

    def __getitem__(self, key):
        return self.npz[key]

    def __contains__(self, key):
        return key in self.npz.files

    def keys(self, prefix=''):
        return [k for k in self.npz.files if k.startswith(prefix)]

    def nhwc(self, key):
        """The array under `key` with its trailing C,H,W axes moved to H,W,C."""
        a = self.npz[key]
        return np.moveaxis(a, -3, -1)

    @property
    def state_dict(self):
        """The inner model's parameters by EDM state-dict name (NCHW / [out, in] layouts)."""
        return {k[len('params/'):]: self.npz[k] for k in self.keys('params/')}


@pytest.fixture(scope='session')
def edm_refs():
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = EDMRef(name)
        return cache[name]

    return load
