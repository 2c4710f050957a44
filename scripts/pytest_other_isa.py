"""Run pytest with XLA, numpy and OpenBLAS held to a lower x86 instruction set than this CPU has.

A test that asserts bit-identity between two computations passes on the CPU it was written on
and fails on another (different SIMD widths, FMA contraction and per-CPU exp/log kernels change
the last bits). Running the suite a second time on another code path of the same machine makes
such a test fail here, not only on some CI machine:

    python scripts/pytest_other_isa.py            # the numerics-sensitive tests (NUMERICS_TESTS)
    python scripts/pytest_other_isa.py -q tests/  # any pytest arguments

On a CPU with AVX-512 everything is capped at AVX2 (no AVX-512); on a CPU without it, at
SSE4.2 (no AVX, AVX2 or FMA). The caps are environment variables read when the libraries start:
XLA_FLAGS=--xla_cpu_max_isa=..., NPY_DISABLE_CPU_FEATURES (numpy's dispatch targets above the
cap that this CPU has) and OPENBLAS_CORETYPE. They are printed before pytest starts.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
# The test files that compare floating-point results with references, closed forms or each
# other; the launcher, data and file-handling tests have no CPU-dependent arithmetic to check.
NUMERICS_TESTS = ['tests/nets', 'tests/test_dct.py', 'tests/test_ihdm.py', 'tests/test_likelihood.py',
                  'tests/test_losses.py', 'tests/test_metrics.py', 'tests/test_precond.py',
                  'tests/test_parameterize.py', 'tests/test_processes.py', 'tests/test_samplers.py',
                  'tests/test_samplers_core.py', 'tests/test_samplers_reference.py',
                  'tests/test_samplers_edm.py', 'tests/test_schedules.py', 'tests/test_train.py']
# numpy dispatch targets that need more than each cap (numpy 2.0-2.3 and >= 2.4 names).
ABOVE_AVX2 = ('AVX512', 'X86_V4')
ABOVE_SSE42 = ABOVE_AVX2 + ('AVX', 'F16C', 'FMA3', 'X86_V3')


def cpu_flags() -> set[str]:
    try:
        text = pathlib.Path('/proc/cpuinfo').read_text()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith('flags')), '')
    return set(line.partition(':')[2].split())


def numpy_targets_to_disable(prefixes: tuple[str, ...]) -> list[str]:
    """numpy's dispatch targets that this CPU has and that start with one of `prefixes` (asked
    of a fresh interpreter, so this process's numpy is not started with the wrong features)."""
    code = ('from numpy._core._multiarray_umath import __cpu_dispatch__ as d, __cpu_features__ as f\n'
            'print(" ".join(n for n in d if f.get(n)))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    return [name for name in out.split() if name.startswith(prefixes)]


def other_isa_env(flags: set[str]) -> dict[str, str]:
    """Environment variables that hold XLA, numpy and OpenBLAS below this CPU's best ISA."""
    if 'avx512f' in flags:
        isa, prefixes, openblas = 'AVX2', ABOVE_AVX2, 'Haswell'
    else:
        isa, prefixes, openblas = 'SSE4_2', ABOVE_SSE42, 'Nehalem'
    xla = (os.environ.get('XLA_FLAGS', '') + f' --xla_cpu_max_isa={isa}').strip()
    return {'XLA_FLAGS': xla, 'NPY_DISABLE_CPU_FEATURES': ' '.join(numpy_targets_to_disable(prefixes)),
            'OPENBLAS_CORETYPE': openblas}


def main(argv: list[str]) -> int:
    env = other_isa_env(cpu_flags())
    print('pytest_other_isa: ' + ' '.join(f'{k}="{v}"' for k, v in env.items()), flush=True)
    args = argv or ['-q', '-n', '2'] + NUMERICS_TESTS
    return subprocess.run([sys.executable, '-m', 'pytest', *args], cwd=REPO, env=dict(os.environ, **env)).returncode


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
