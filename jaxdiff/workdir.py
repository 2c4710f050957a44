"""The work directory as the launcher uses it: created with a clear error, locked for one process,
and written into atomically, under fresh names, with the permissions the umask gives.

`lock` holds `fcntl.flock` on `<workdir>/.lock` for as long as its context lasts (the launcher: the
whole process). The kernel drops the lock when the process ends, however it ends, so a killed run
leaves no stale lock behind; the file itself stays and holds the last holder's PID.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import secrets
from typing import Callable, Iterator

LOCK_NAME = '.lock'


class WorkdirBusy(RuntimeError):
    """Another process holds the work directory's lock."""


def make(path) -> pathlib.Path:
    """Creates the work directory `path` (and its parents) and returns its absolute path; a
    ValueError naming --workdir when it is a file or cannot be created."""
    path = pathlib.Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f'--workdir {path} is an existing file, not a directory: pass another --workdir')
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f'--workdir {path} cannot be created ({e.strerror or e}): pass a --workdir '
                         'in a writable location') from None
    return path


@contextlib.contextmanager
def lock(path) -> Iterator[None]:
    """Holds `<path>/.lock` exclusively for the context; `WorkdirBusy` (naming the holder's PID)
    when another process holds it. A file system without flock support runs unlocked."""
    lock_path = pathlib.Path(path) / LOCK_NAME
    with open(lock_path, 'a+') as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or 'unknown'
            raise WorkdirBusy(f'{path} is in use by another jaxdiff process (PID {holder}, holding '
                              f'{lock_path}): wait for it to end, or pass another --workdir') from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            yield  # e.g. an NFS mount without lock support: go on unlocked
            return
        f.seek(0)
        f.truncate()
        f.write(f'{os.getpid()}\n')
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_atomically(path, write: Callable) -> pathlib.Path:
    """Calls `write(binary_file)` on a temporary file beside `path`, then renames it to `path`: a
    reader (or a crash) never sees a half-written file. The file's mode follows the umask, like
    any file `open` creates (tempfile.mkstemp would make it 0600)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f'.{path.name}.{secrets.token_hex(4)}.tmp')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def fresh_names(directory, names: list[str]) -> list[pathlib.Path]:
    """The paths `directory/name` for every name in `names` (each `stem.suffix`), or, if any of
    them exists, `stem.1.suffix` for all of them, `stem.2.suffix`, ...: the first k for which
    none exists. Files written together share the number, and nothing is overwritten."""
    directory = pathlib.Path(directory)
    k = 0
    while True:
        paths = [directory / (name if k == 0 else _numbered(name, k)) for name in names]
        if not any(p.exists() for p in paths):
            return paths
        k += 1


def _numbered(name: str, k: int) -> str:
    stem, dot, suffix = name.rpartition('.')
    return f'{stem}.{k}.{suffix}' if dot else f'{name}.{k}'
