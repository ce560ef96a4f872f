"""Another process holding a run's lock (``runstore.locks``), as one resuming or evaluating it would."""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
        "fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == 'shared' else fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)")


@contextmanager
def held_elsewhere(run_dir: Path, shared: bool = False):
    """Another process holding the run's lock, as one resuming it (exclusive) or evaluating it (shared) does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), "shared" if shared else "exclusive"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield
    finally:
        proc.kill()
        proc.wait()
