"""Which process uses a run now: an advisory lock (``flock``) on the run folder itself.

A process that writes a run (trains it, resumes it) holds the lock alone; one that reads a run for a while (an
evaluation, an export) holds it shared with other readers. So two processes that share a runs folder (two apps, the
app and a command line) never resume one run together, and the runs budget never deletes a run that another process
is using. The kernel drops a process's locks when it ends, a crash included: nothing is left to clean up. Where
``fcntl`` does not exist (Windows), nothing is locked and nothing is refused.
"""
from __future__ import annotations

import errno
import os
from contextlib import ExitStack
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunBusy(ValueError):
    """The run is being written, or read, by another process (or another job of this one)."""


class RunLock:
    """One hold of a run's lock: exclusive (``shared=False``) or shared; ``release()`` or use it as a context manager."""

    def __init__(self, run_dir: str | Path, shared: bool = False):
        self.run_dir = Path(run_dir)
        self.shared = shared
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another hold excludes it; ``OSError`` when the folder is gone."""
        if fcntl is None:
            return True
        self.fd = os.open(self.run_dir, os.O_RDONLY)  # a folder opened for reading: no file to leave behind
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            return False
        except OSError as e:  # a file system without locks (some network ones): as where fcntl is missing
            self.release()
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing it drops the lock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def busy_message(run_dir: str | Path, shared: bool = False, doing: str = "resume it") -> str:
    """Why a hold of the run's lock (``shared`` or not) cannot be taken now, for one who wants to do ``doing``."""
    name = Path(run_dir).name
    if shared:
        return f"{name} is trained or resumed by another process or job right now: wait until it ends to {doing}"
    return f"{name} is in use by another process or job right now (trained, resumed or evaluated): wait until it ends to {doing}"


def hold_run(run_dir: str | Path, shared: bool = False, doing: str = "resume it") -> RunLock:
    """The run's lock, held; ``RunBusy`` naming the run when another hold excludes it."""
    lock = RunLock(run_dir, shared)
    if not lock.acquire():
        raise RunBusy(busy_message(run_dir, shared, doing))
    return lock


def hold_runs(run_dirs, shared: bool = False, doing: str = "resume it") -> ExitStack:
    """``hold_run`` on each of ``run_dirs``, as one context manager; the ones taken are let go if a later one is busy."""
    stack = ExitStack()
    with stack:
        for run_dir in run_dirs:
            stack.enter_context(hold_run(run_dir, shared, doing))
        return stack.pop_all()


def in_use(run_dir: str | Path) -> bool:
    """Whether any process holds the run's lock (shared or not) now; a run folder that is gone is not in use."""
    lock = RunLock(run_dir)
    try:
        free = lock.acquire()
    except OSError:
        return False
    lock.release()
    return not free
