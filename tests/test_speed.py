"""Tests of benchmarks/speed.py's plumbing: XLA's FLOP and memory figures on a program of known
cost (XLA counts 2 m n k FLOPs for an [m, k] x [k, n] matmul), the fraction-of-peak arithmetic,
one row per case with an error row that does not stop the next case, the time budget, and (slow)
the --quick run end to end. No assertion depends on timings."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))
import speed  # noqa: E402
import speed_edm  # noqa: E402

M, K, N = 64, 32, 16


@pytest.fixture(scope='module')
def matmul_stages():
    a, b = jnp.ones((M, K), jnp.float32), jnp.ones((K, N), jnp.float32)
    lowered = jax.jit(jnp.matmul).lower(a, b)
    return lowered, lowered.compile()


class FakeStage:
    def __init__(self, cost):
        self.cost = cost

    def cost_analysis(self):
        if isinstance(self.cost, Exception):
            raise self.cost
        return self.cost


def test_matmul_flops_are_two_m_n_k(matmul_stages):
    lowered, compiled = matmul_stages
    assert speed.cost_flops(lowered) == 2 * M * N * K
    # The compiled count may be absent on some backends; where present it is the same.
    assert speed.cost_flops(compiled) in (None, 2 * M * N * K)
    figures = speed.program_flops(lowered, compiled, num_devices=1)
    assert figures['flops'] == 2 * M * N * K
    assert figures['flops_source'] in ('compiled', 'lowered')


def test_cost_flops_reads_dict_list_and_missing_counts():
    assert speed.cost_flops(FakeStage({'flops': 10.0})) == 10.0
    assert speed.cost_flops(FakeStage([{'flops': 12.0}])) == 12.0  # older jax: one dict per program
    assert speed.cost_flops(FakeStage([])) is None
    assert speed.cost_flops(FakeStage(None)) is None
    assert speed.cost_flops(FakeStage({'bytes accessed': 5.0})) is None
    assert speed.cost_flops(FakeStage({'flops': 0.0})) is None
    assert speed.cost_flops(FakeStage(NotImplementedError())) is None


def test_cpu_lowered_flops_of_a_matmul():
    assert speed.cpu_lowered_flops(jnp.matmul, jnp.ones((M, K)), jax.ShapeDtypeStruct((K, N), jnp.float32)) == 2 * M * N * K


def test_program_flops_prefers_the_cpu_then_the_lowered_count():
    assert speed.program_flops(FakeStage({'flops': 100.0}), FakeStage({'flops': 30.0}), 4, cpu_flops=90.0)['flops'] == 90.0


def test_program_flops_prefers_the_lowered_count_and_scales_the_per_device_one():
    both = speed.program_flops(FakeStage({'flops': 100.0}), FakeStage({'flops': 30.0}), num_devices=4)
    assert both['flops'] == 100.0 and both['flops_source'] == 'lowered'
    assert both['flops_lowered'] == 100.0 and both['flops_compiled_per_device'] == 30.0
    fallback = speed.program_flops(FakeStage(None), FakeStage({'flops': 30.0}), num_devices=4)
    assert fallback['flops'] == 120.0 and fallback['flops_source'] == 'compiled'
    assert speed.program_flops(FakeStage(None), FakeStage(None), 1)['flops'] is None


def test_memory_figures_of_a_compiled_matmul(matmul_stages):
    _, compiled = matmul_stages
    memory = speed.memory_figures(compiled)
    if memory['argument'] is None:
        pytest.skip('this backend reports no memory analysis')
    assert memory['argument'] == 4 * (M * K + K * N)
    assert memory['output'] == 4 * M * N
    assert memory['total'] == memory['temp'] + memory['argument'] + memory['output'] - (memory['alias'] or 0)


def test_memory_figures_without_an_analysis():
    class NoAnalysis:
        def memory_analysis(self):
            return None
    assert speed.memory_figures(NoAnalysis()) == dict(temp=None, argument=None, output=None, alias=None,
                                                      peak=None, total=None)


def test_device_peak_bytes_is_none_or_an_int_on_cpu():
    peak = speed.device_peak_bytes(jax.local_devices())
    assert peak is None or peak >= 0


def test_fraction_of_peak_arithmetic():
    achieved = speed.achieved_flops(2e12, 3.0)  # 2 TFLOP a step, 3 steps/s
    assert achieved == 6e12
    assert speed.fraction_of_peak(achieved, 1.5e12, num_devices=4) == pytest.approx(1.0)
    assert speed.fraction_of_peak(achieved, 12e12, num_devices=1) == pytest.approx(0.5)
    assert speed.fraction_of_peak(None, 1e12, 1) is None
    assert speed.fraction_of_peak(achieved, None, 1) is None
    assert speed.achieved_flops(None, 3.0) is None


def test_measured_peak_is_a_positive_rate():
    assert speed.measured_peak_flops('float32', 64, windows=1, reps=2) > 0


def test_rate_is_the_median_over_windows():
    windows = [{'seconds': 1.0}, {'seconds': 2.0}, {'seconds': 4.0}]
    assert speed.rate(windows, 8) == 4.0


def test_one_row_per_case_and_an_error_row_does_not_stop_the_next(tmp_path):
    calls = []

    def ok(value):
        def fn():
            calls.append(value)
            return {'train_img_s': value}
        return fn

    def fails():
        raise RuntimeError('out of memory, say')

    jobs = [({'kind': 'jaxdiff', 'case': 'a', 'dtype': 'float32'}, ok(1.0)),
            ({'kind': 'jaxdiff', 'case': 'b', 'dtype': 'float32'}, fails),
            ({'kind': 'jaxdiff', 'case': 'c', 'dtype': 'bfloat16'}, ok(3.0))]
    out, md = tmp_path / 'rows.jsonl', tmp_path / 'table.md'
    rows = speed.run_jobs(jobs, base_row={'device_kind': 'cpu'}, out_path=out, md_path=md, log=lambda *a: None)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r['status'] for r in written] == ['ok', 'error', 'ok'] == [r['status'] for r in rows]
    assert calls == [1.0, 3.0]
    assert 'out of memory, say' in written[1]['error'] and 'RuntimeError' in written[1]['traceback']
    assert written[2]['train_img_s'] == 3.0 and written[2]['device_kind'] == 'cpu'
    assert all('load_average' in r and 'case_seconds' in r for r in written)
    table = md.read_text()
    assert '| a |' in table and '| c |' in table and 'error: RuntimeError: out of memory, say' in table


def test_rows_are_appended_as_each_case_finishes(tmp_path):
    out = tmp_path / 'rows.jsonl'

    def second():  # When the second case runs, the first one's row is already on disk.
        return {'rows_before': len(out.read_text().splitlines())}
    jobs = [({'kind': 'jaxdiff', 'case': 'a', 'dtype': 'float32'}, dict),
            ({'kind': 'jaxdiff', 'case': 'b', 'dtype': 'float32'}, second)]
    rows = speed.run_jobs(jobs, base_row={}, out_path=out, log=lambda *a: None)
    assert rows[1]['rows_before'] == 1


def test_a_spent_time_budget_skips_the_remaining_cases(tmp_path):
    called = []
    jobs = [({'kind': 'jaxdiff', 'case': name, 'dtype': 'float32'}, lambda: called.append(1) or {})
            for name in ('a', 'b')]
    rows = speed.run_jobs(jobs, base_row={}, out_path=tmp_path / 'rows.jsonl', time_budget=0, log=lambda *a: None)
    assert [r['status'] for r in rows] == ['skipped', 'skipped'] and not called
    assert 'time budget' in rows[0]['reason']


def test_markdown_joins_edm_figures_by_case_and_dtype():
    rows = [dict(kind='jaxdiff', case='cifar10', dtype='bfloat16', status='ok', batch=512, params=55.7e6,
                 train_img_s=3000.0, sample_img_s=1000.0, devices=1, peak_tflops_per_device=800.0),
            dict(kind='edm', case='cifar10', dtype='bfloat16', status='ok', torch='2.11',
                 results={'bfloat16': {'precision': 'float16 (use_fp16)', 'train_img_s': 1500.0,
                                       'sample_img_s': 500.0}})]
    table = speed.markdown_table(rows)
    line = next(l for l in table.splitlines() if l.startswith('| cifar10 |'))
    assert '1500 / 500 (float16 (use_fp16))' in line and '2.00, 2.00' in line and '| 800 |' in line


def test_parse_cases_and_per_case_batches():
    assert speed.parse_cases('cifar10:bfloat16,digits', ['float32', 'bfloat16']) == [
        ('cifar10', 'bfloat16'), ('digits', 'float32'), ('digits', 'bfloat16')]
    with pytest.raises(SystemExit):
        speed.parse_cases('nope', ['float32'])
    assert speed.per_case_ints('imagenet64=128,cifar10=64') == {'imagenet64': 128, 'cifar10': 64}
    assert set(speed.per_case_ints('32').values()) == {32}


def test_edm_runs_after_the_last_case_of_its_network():
    args = speed.parse_args(['--cases', 'cifar10:bfloat16,cifar10:float32,imagenet64:bfloat16', '--vs-edm', '/x'])
    plan = [(f['kind'], f['case'], f['dtype']) for f, _ in speed.plan_jobs(args)]
    assert plan == [('jaxdiff', 'cifar10', 'bfloat16'), ('jaxdiff', 'cifar10', 'float32'),
                    ('edm', 'cifar10', 'bfloat16,float32'), ('jaxdiff', 'imagenet64', 'bfloat16'),
                    ('edm', 'imagenet64', 'bfloat16')]


def test_case_configs_sample_with_edms_deterministic_18_steps():
    for name, case in speed.CASES.items():
        config = speed.case_config(case, 'bfloat16', 8)
        assert (config.sample.num_steps, config.sample.S_churn, config.sample.solver) == (18, 0.0, 'heun')
        assert config.model.dtype == 'bfloat16' and config.train.batch_size == 8
    assert speed.case_config(speed.CASES['imagenet64'], 'float32', 8).model.type == 'DhariwalUNet'


def test_edm_case_without_a_checkout_is_unavailable(tmp_path):
    args = speed.parse_args(['--vs-edm', str(tmp_path / 'missing')])
    row = speed.run_edm_case('digits', ['float32'], args)
    assert row['status'] == 'unavailable' and 'checkout' in row['reason']


def test_stand_in_modules_pass_decorated_functions_through_and_go_away():
    name = 'speed_test_absent_module_xyz'
    with speed_edm.stand_ins_for_missing(('json', name)) as stood_in:
        assert stood_in == [name]  # json imports, so it is left alone
        module = __import__(name)

        @module.command()
        @module.option('--x', type=module.Choice(['a']), default='a')
        def f():
            return 7
        assert f() == 7
    assert name not in sys.modules


@pytest.mark.slow
def test_quick_run_writes_rows_and_a_table(tmp_path):
    out, md = tmp_path / 'speed.jsonl', tmp_path / 'speed.md'
    proc = subprocess.run([sys.executable, str(BENCHMARKS / 'speed.py'), '--quick', '--out', str(out), '--md', str(md)],
                          capture_output=True, text=True, timeout=900, cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r['case'], r['status']) for r in rows] == [('digits', 'ok'), ('cifar10-small', 'ok')]
    for r in rows:
        assert r['train_img_s'] > 0 and r['sample_img_s'] > 0 and r['forward_img_s'] > 0
        assert r['train_flops_per_step'] > 0 and r['train_loss_finite'] and r['sample_finite']
        assert r['params'] > 0 and r['cpu'] and r['jax'] == jax.__version__ and r['sample_evals'] == 35
    table = md.read_text()
    assert table in proc.stdout and '| digits |' in table and '| cifar10-small |' in table


def test_a_stopped_case_keeps_the_figures_it_printed():
    script = 'import json, time; print(json.dumps({"train_img_s": 5.0}), flush=True); time.sleep(30)'
    row = speed.json_subprocess([sys.executable, '-c', script], timeout=3, log=lambda *a: None)
    assert row['status'] == 'partial' and row['train_img_s'] == 5.0 and 'stopped after 3 s' in row['reason']
    with pytest.raises(TimeoutError):
        speed.json_subprocess([sys.executable, '-c', 'import time; time.sleep(30)'], timeout=1, log=lambda *a: None)


def test_a_crashed_case_raises_with_its_stderr():
    with pytest.raises(RuntimeError, match='exited with 3: boom'):
        speed.json_subprocess([sys.executable, '-c', 'import sys; sys.stderr.write("boom"); sys.exit(3)'],
                              timeout=None, log=lambda *a: None)


def test_edm_case_without_torch_is_unavailable(tmp_path):
    (tmp_path / 'training').mkdir()
    (tmp_path / 'training' / 'networks.py').write_text('')
    args = speed.parse_args(['--vs-edm', str(tmp_path), '--torch-python', 'no-such-python-here'])
    assert speed.run_edm_case('digits', ['float32'], args)['status'] == 'unavailable'
    if importlib.util.find_spec('torch') is None:  # the worker itself, without torch
        assert speed_edm.edm_worker(str(tmp_path), {})['status'] == 'unavailable'


def test_markdown_keeps_a_partial_rows_figures_and_says_why():
    rows = [dict(kind='jaxdiff', case='imagenet64', dtype='bfloat16', status='partial', batch=128,
                 train_img_s=900.0, reason='stopped after 40 s (--time-budget + 120 s)'),
            dict(kind='jaxdiff', case='digits', dtype='float32', status='skipped', reason='time budget of 1 s spent')]
    table = speed.markdown_table(rows)
    assert '| imagenet64 |' in table and '| 900 |' in table and '| skipped |' in table
    assert '- jaxdiff imagenet64 bfloat16: partial: stopped after 40 s' in table


def test_slow_rates_keep_three_significant_digits():
    """A CPU's CIFAR-10 sampler draws about 0.1 img/s: the table must not print it as 0."""
    assert [speed.fmt_rate(v) for v in (0.11607, 4.104, 874.3, None)] == ['0.116', '4.1', '874', '']
