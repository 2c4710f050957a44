"""jaxdiff launcher: train, sample or evaluate a diffusion model from a config file.

    python launch.py --config=configs/edm.py                       # digits: train, sample, score
    python launch.py --config=configs/edm.py:cifar10 --workdir=runs/cifar10
    python launch.py --config=configs/edm.py --mode=sample --workdir=runs/edm-digits
    python launch.py --config=configs/edm.py --config.train.batch_size=256   # override any field
    python launch.py --config=configs/edm.py:cifar10 --mode=ref --workdir=runs/cifar10   # FID reference
    python launch.py --config=configs/edm.py:cifar10 --mode=eval --workdir=runs/cifar10 \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

Modes: train (then sample and score), sample, eval (sample config.eval.num_samples per seed set
and score them: <workdir>/eval_<step>.json), ref (reference statistics of the data set for FID,
as EDM's `fid.py ref`: an .npz with mu and sigma, written to config.eval.ref or
<workdir>/ref_<data.name>.npz, where eval finds it when config.eval.ref is not set).

Runs resume from the latest checkpoint in --workdir. Multi-host: start the same command on every
host; `jax.distributed.initialize()` finds the others (TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set by hand).
"""
import pathlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import monitor, parallel, runner, scoring

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/edm.py', 'Config file, optionally with :preset.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory (default: runs/<method>-<preset>).')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'ref'], 'What to do.')


def reference_mode(config, workdir) -> dict:
    """Reference statistics of config.data for FID/KID/PRDC (scoring.compute_reference)."""
    workdir = pathlib.Path(workdir).absolute()
    monitor.setup_logging(workdir, jax.process_index() == 0)
    return scoring.compute_reference(config, config.eval.ref or scoring.default_ref_path(config, workdir))


MODES = {'train': runner.train_and_evaluate, 'sample': runner.sample_mode, 'eval': runner.eval_mode,
         'ref': reference_mode}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Library chatter (orbax, absl); jaxdiff logs on its own logger.
    config = FLAGS.config
    workdir = FLAGS.workdir or f'runs/{config.method}-{config.get("preset", "default")}'
    parallel.initialize_distributed()
    try:
        MODES[FLAGS.mode](config, workdir)
    except (ValueError, FileNotFoundError) as e:  # Bad config, missing data or checkpoint: no traceback.
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    app.run(main)
