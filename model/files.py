"""Files that appear whole or not at all: written to a temporary name beside the target, then renamed."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


UMASK = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
os.umask(UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path``; on any failure the temporary file goes.

    The file gets the mode a plain ``open`` would give it (``mkstemp`` makes it owner-only).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
