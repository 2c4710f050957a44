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

Runs resume from the latest checkpoint in --workdir, with a config that matches the checkpoints'
in every field that changes the training trajectory (or --config.train.allow_config_change=True).
One process at a time uses a work directory (a lock on <workdir>/.lock). Multi-host: start the
same command on every host; `jax.distributed.initialize()` finds the others (TPU pods, SLURM, or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set by hand).

Compiled programs (the train step, the sampler) are kept in XLA's persistent compilation cache,
~/.cache/jaxdiff/xla unless config.train.compilation_cache names another directory or 'none' (or
JAX_COMPILATION_CACHE_DIR is set): a resume or a second run loads them instead of compiling.

Exit status: 0 done; 2 a one-line `error:` on stderr (a bad flag or config field, a missing or
unusable work directory, data set or checkpoint, a work directory in use, a config that differs
from the checkpoints', a failed checkpoint save, out of memory, non-finite samples); 75
(EX_TEMPFAIL) pre-empted: SIGTERM arrived, the run saved a checkpoint and stopped early -- run the
same command again to resume; anything else is a bug (with a traceback).
"""
import contextlib
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxdiff import checkpoint, monitor, parallel, runner, scoring, workdir as wd

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/edm.py', 'Config file, optionally with :preset.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Work directory (default: runs/<method>-<preset>).')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'ref'], 'What to do.')


def reference_mode(config, workdir) -> dict:
    """Reference statistics of config.data for FID/KID/PRDC (scoring.compute_reference)."""
    is_main = jax.process_index() == 0
    workdir = wd.make(workdir)
    with wd.lock(workdir) if is_main else contextlib.nullcontext():
        monitor.setup_logging(workdir, is_main)
        return scoring.compute_reference(config, config.eval.ref or scoring.default_ref_path(config, workdir))


MODES = {'train': runner.train_and_evaluate, 'sample': runner.sample_mode, 'eval': runner.eval_mode,
         'ref': reference_mode}

EXIT_ERROR = 2         # a one-line `error:` message
EXIT_PREEMPTED = 75    # EX_TEMPFAIL: saved and stopped on SIGTERM; run again to resume

# What a user's mistake or the machine's state raises: printed as one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, checkpoint.CheckpointError, wd.WorkdirBusy, runner.RunError)


def one_line(text: str) -> str:
    """An error text as one line: a Python traceback inside it (ml_collections puts the config
    file's in its flag errors) reduced to its last line, the exception's name dropped."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if any(line.startswith('Traceback (most recent call last)') for line in lines):
        head = lines[0].split('Error whilst parsing config file')[0].rstrip(': ')
        last = re.sub(r'^[\w.]*(Error|Exception): ', '', lines[-1])
        return f'{head}: {last}' if head else last
    return ' '.join(lines)


def _innermost(error: BaseException) -> str:
    """The text of the innermost exception wrapped as the first argument (ml_collections raises
    AttributeError(KeyError(text)) for a field the config lacks)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if error.args else str(error)


def flag_error(error: Exception, argv: list[str]) -> str:
    """The one-line message of a flag-parsing error (absl's, or ml_collections' for --config)."""
    if isinstance(error, (AttributeError, KeyError)):  # --config.a.b=... names no field of the config
        text = _innermost(error)
        missing = re.search(r"'([^']+)'", text)
        name = missing.group(1) if missing else text
        flag = next((a.split('=')[0] for a in argv[1:] if a.startswith('--config.')
                     and name in a.split('=')[0].split('.')), f'--config.{name}')
        message = f'{flag}: the config has no field {flag[len("--config."):]}'
        suggestion = re.search(r'Did you mean "([^"]+)"', text)
        if suggestion:
            parts = flag.split('.')
            parts[parts.index(name)] = suggestion.group(1)
            message += f'; did you mean {".".join(parts)}?'
        return message
    if isinstance(error, OSError) and 'Failed loading config file' in str(error):
        missing = re.search(r"No such file or directory: '([^']*)'", str(error))
        return (f'--config: no config file {missing.group(1)}' if missing else
                f'--config: cannot load the config file: {one_line(error)}')
    return one_line(error)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (for `app.run`), with every mistake in the flags or the config file
    (unknown preset, misspelt field, missing file) a one-line `error:` and exit status 2."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.get('method')  # ml_collections loads a missing config file lazily: fail here
    except Exception as e:  # pylint: disable=broad-except
        print(f'error: {flag_error(e, argv)}', file=sys.stderr)
        sys.exit(EXIT_ERROR)
    return remaining


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Library chatter (orbax, absl); jaxdiff logs on its own logger.
    config = FLAGS.config
    workdir = FLAGS.workdir or f'runs/{config.method}-{config.get("preset", "default")}'
    parallel.initialize_distributed()
    runner.enable_compilation_cache(config.train.get('compilation_cache', ''))
    try:
        result = MODES[FLAGS.mode](config, workdir)
    except USER_ERRORS as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        sys.exit(EXIT_ERROR)
    if isinstance(result, dict) and result.get('preempted'):
        print(f'Pre-empted at step {result["step"]}: checkpoint saved; run the same command again to resume '
              f'(exit status {EXIT_PREEMPTED})', file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
