"""Shared test fixtures: the EDM reference arrays recorded with NVlabs/edm (see tests/data/), a
persistent compilation cache for modules that jit the same programs repeatedly, and a runner of
local multi-process (jax.distributed over gloo) jobs."""
import json
import pathlib
import socket
import subprocess

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


@pytest.fixture(scope='module')
def persistent_compilation_cache(tmp_path_factory):
    """A persistent JAX compilation cache in a temporary directory, for one module: repeats of one
    program (every `run_training` jits afresh) become cache hits. A hit runs the very executable a
    fresh compilation gives, so no result depends on it. Use with
    `pytestmark = pytest.mark.usefixtures('persistent_compilation_cache')`."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
             'jax_persistent_cache_min_entry_size_bytes')
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update('jax_compilation_cache_dir', str(tmp_path_factory.mktemp('jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
    cc.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    cc.reset_cache()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def coordinator_address():
    return f'127.0.0.1:{free_port()}'


def run_processes(jobs, *, cwd, timeout: float) -> list[str]:
    """Start every (argv, env) job at once, wait for all (killing all on a timeout), assert each
    exited 0 (with the tail of its output), and return their outputs."""
    procs = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv, env in jobs]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.fixture
def process_runner():
    """`run_processes` as a fixture (test modules cannot import conftest by name reliably)."""
    return run_processes
