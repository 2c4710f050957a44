"""scripts/pytest_other_isa.py: the environment that holds XLA, numpy and OpenBLAS below the CPU's best ISA."""
import importlib.util
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'pytest_other_isa.py'
spec = importlib.util.spec_from_file_location('pytest_other_isa', SCRIPT)
other_isa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(other_isa)


def test_avx512_cpus_are_capped_at_avx2_and_others_at_sse42(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
    env = other_isa.other_isa_env({'avx2', 'avx512f', 'fma'})
    assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2 --xla_cpu_max_isa=AVX2'
    assert env['OPENBLAS_CORETYPE'] == 'Haswell'
    assert all(n.startswith(('AVX512', 'X86_V4')) for n in env['NPY_DISABLE_CPU_FEATURES'].split())
    env = other_isa.other_isa_env({'avx2', 'fma'})
    assert env['XLA_FLAGS'].endswith('--xla_cpu_max_isa=SSE4_2') and env['OPENBLAS_CORETYPE'] == 'Nehalem'
    assert 'AVX2' not in other_isa.ABOVE_AVX2 and 'FMA3' in other_isa.ABOVE_SSE42


def test_numpy_starts_without_the_disabled_targets():
    """numpy accepts the names (an unknown or baseline one would stop it at import) and turns them off."""
    env = other_isa.other_isa_env(other_isa.cpu_flags())
    disabled = env['NPY_DISABLE_CPU_FEATURES'].split()
    assert disabled or not other_isa.cpu_flags() & {'avx', 'avx2', 'avx512f'}  # Else nothing to check.
    code = ('from numpy._core._multiarray_umath import __cpu_features__ as f; import sys; '
            'print(" ".join(n for n in sys.argv[1:] if f.get(n)))')
    out = subprocess.run([sys.executable, '-c', code, *disabled], capture_output=True, text=True, check=True,
                         env={'NPY_DISABLE_CPU_FEATURES': env['NPY_DISABLE_CPU_FEATURES'], 'PATH': ''})
    assert out.stdout.split() == []
