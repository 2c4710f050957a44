"""Tests of jaxdiff.workdir: creating the work directory, its lock, atomic writes under fresh names,
and that output files follow the umask (scoring's reference .npz included)."""
import os
import pathlib
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxdiff import scoring, workdir

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_make_creates_and_names_bad_workdirs(tmp_path):
    assert workdir.make(tmp_path / 'a' / 'b') == (tmp_path / 'a' / 'b').absolute()
    assert (tmp_path / 'a' / 'b').is_dir()
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match=r'--workdir \S*file is an existing file, not a directory'):
        workdir.make(tmp_path / 'file')
    with pytest.raises(ValueError, match=r'--workdir /proc/foo cannot be created \(No such file or directory\)'):
        workdir.make('/proc/foo')
    with pytest.raises(ValueError, match=r'--workdir \S*file/sub cannot be created \(Not a directory\)'):
        workdir.make(tmp_path / 'file' / 'sub')


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    with workdir.lock(tmp_path):
        assert (tmp_path / '.lock').read_text() == f'{os.getpid()}\n'
        # flock locks belong to open files: a second open in this very process conflicts too.
        with pytest.raises(workdir.WorkdirBusy, match=rf'{tmp_path} is in use by another jaxdiff process '
                                                      rf'\(PID {os.getpid()}, holding \S*\.lock\)'):
            with workdir.lock(tmp_path):
                pass
    with workdir.lock(tmp_path):  # released at the end of the context
        pass


HOLD = textwrap.dedent('''
    import sys, time
    from jaxdiff import workdir
    with workdir.lock(sys.argv[1]):
        print('locked', flush=True)
        time.sleep(600)
''')


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """Another process holds the lock; SIGKILL it and the lock is free (the kernel drops it)."""
    proc = subprocess.Popen([sys.executable, '-c', HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'locked'
        with pytest.raises(workdir.WorkdirBusy, match=rf'PID {proc.pid}'):
            with workdir.lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with workdir.lock(tmp_path):
        assert (tmp_path / '.lock').read_text() == f'{os.getpid()}\n'


def test_write_atomically_leaves_nothing_half_written(tmp_path):
    path = tmp_path / 'out.bin'
    workdir.write_atomically(path, lambda f: f.write(b'first'))

    def fails(f):
        f.write(b'half')
        raise OSError(28, 'No space left on device')

    with pytest.raises(OSError, match='No space left'):
        workdir.write_atomically(path, fails)
    assert path.read_bytes() == b'first' and os.listdir(tmp_path) == ['out.bin']


def test_fresh_names_never_overwrite_and_share_the_number(tmp_path):
    names = ['samples_00000004.npz', 'grid_00000004.png']
    assert workdir.fresh_names(tmp_path, names) == [tmp_path / n for n in names]
    (tmp_path / 'grid_00000004.png').write_text('x')  # one of the pair taken: both get .1
    assert workdir.fresh_names(tmp_path, names) == [tmp_path / 'samples_00000004.1.npz',
                                                     tmp_path / 'grid_00000004.1.png']
    (tmp_path / 'samples_00000004.1.npz').write_text('x')
    assert workdir.fresh_names(tmp_path, names)[0].name == 'samples_00000004.2.npz'


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_outputs_follow_the_umask(tmp_path, umask_022):
    """scoring.save_reference wrote its .npz with tempfile.mkstemp (mode 0600) and renamed it into
    place, so reference files were private while every other output followed the umask."""
    ref = scoring.save_reference(tmp_path / 'ref.npz', np.zeros(3), np.eye(3), features=np.zeros((6, 3)))
    written = workdir.write_atomically(tmp_path / 'other.npz', lambda f: np.savez(f, a=np.zeros(2)))
    for path in (ref, written):
        assert stat.S_IMODE(path.stat().st_mode) == umask_022, path
    with np.load(ref) as f:
        assert f['sigma'].shape == (3, 3)
