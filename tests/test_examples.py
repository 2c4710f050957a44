"""The README's notebook section and examples/sampling.ipynb, run as a user would run them.

The ```python blocks of README.md's "Using it from a notebook" section run in order in one
namespace; examples/sampling.ipynb runs in a Jupyter kernel (nbclient) from the repository root,
with a run directory holding one checkpoint so that its loading cell runs too. Both take minutes
on 2 CPU cores, so they are slow tests (`pytest -m slow tests/test_examples.py`); the fast tests
only check that the blocks parse and that the notebook is stored without outputs.
"""
import json
import pathlib
import re
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
NOTEBOOK = ROOT / 'examples' / 'sampling.ipynb'
SECTION = '## Using it from a notebook'


def readme_blocks() -> list[str]:
    """The ```python blocks of the README's notebook section, in order."""
    text = README.read_text()
    section = text[text.index(SECTION):]
    end = section.find('\n## ', len(SECTION))
    section = section if end < 0 else section[:end]
    return re.findall(r'^```python\n(.*?)^```', section, flags=re.S | re.M)


def test_readme_blocks_parse():
    blocks = readme_blocks()
    assert len(blocks) >= 4
    for i, block in enumerate(blocks, 1):
        compile(block, f'README.md notebook block {i}', 'exec')


def test_notebook_is_stored_clean():
    """No outputs or execution counts in the repository: small, reviewable diffs."""
    assert NOTEBOOK.stat().st_size < 200_000
    notebook = json.loads(NOTEBOOK.read_text())
    for cell in notebook['cells']:
        if cell['cell_type'] == 'code':
            assert cell['outputs'] == [] and cell['execution_count'] is None, cell['source']


@pytest.mark.slow
def test_readme_notebook_section_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {}
    seconds = []
    for i, block in enumerate(readme_blocks(), 1):
        start = time.perf_counter()
        exec(compile(block, f'README.md notebook block {i}', 'exec'), namespace)
        seconds.append(time.perf_counter() - start)
    print('README notebook blocks, seconds each:', ', '.join(f'{s:.1f}' for s in seconds))

    latents = namespace['latents']
    assert np.isfinite(float(namespace['loss']))
    for name in ('images', 'images_vp', 'out', 'x'):
        value = np.asarray(namespace[name])
        assert value.shape == latents.shape, name
        assert np.isfinite(value).all(), name
    assert namespace['trajectory'].shape == (18,) + latents.shape
    bpd = np.asarray(namespace['bpd'])
    assert bpd.shape == (2,) and np.isfinite(bpd).all() and (bpd > 0).all()


def _checkpointed_run(directory: pathlib.Path) -> None:
    """A digits run directory whose only checkpoint is the freshly initialised state (step 0):
    what the notebook's loading cell reads, without the minutes of training."""
    import sys

    import jax
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from configs import edm
    from jaxdiff import builders, checkpoint, runner, train

    config = edm.get_config()
    run = runner.prepare(config, directory)
    setup = train.make_setup(config, run.module, run.make_model, builders.build_loss(config))
    state = jax.jit(lambda key: train.init_state(setup, key, run.image_shape, run.label_dim))(jax.random.key(0))
    ckpt = checkpoint.Checkpointer(directory / 'checkpoints', async_save=False)
    try:
        assert ckpt.save(0, state, data_state={}, config=config.to_dict())
        ckpt.wait()
    finally:
        ckpt.close()


@pytest.mark.slow
def test_sampling_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    pytest.importorskip('ipykernel')
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / 'edm-digits'
    _checkpointed_run(run_dir)
    monkeypatch.setenv('JAXDIFF_RUN', str(run_dir))  # the kernel inherits the environment

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name='python3',
                                     resources={'metadata': {'path': str(ROOT)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    print(f'examples/sampling.ipynb ran in {time.perf_counter() - start:.1f} s')

    outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == 'error']
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    assert 'loaded the EMA parameters of step 0' in text, text
    assert 'samples: shape (64, 8, 8, 1), finite: True' in text, text
    # The data grid, the first samples, five sampler variants and the trained network's samples.
    pngs = [o for o in outputs if 'image/png' in o.get('data', {})]
    assert len(pngs) >= 8, len(pngs)
    variants = re.findall(r'(\d+) distinct digits, largest distance (\S+)', text)
    assert len(variants) == 5, text
    # The ideal denoiser's samples are training digits, and different seeds reach different ones.
    assert all(int(distinct) >= 48 for distinct, _ in variants), text
    assert min(float(distance) for _, distance in variants) < 0.01, text
