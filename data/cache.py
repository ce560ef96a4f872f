"""Local cache of the book's canonical ``instruction-data.json``.

The file is never shipped with the project: it is downloaded once from its
public URL, checked against its sha256 and kept in ``cache_dir()``.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from model.files import atomic_write

from .errors import DatasetError

CANONICAL_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
    "ch07/01_main-chapter-code/instruction-data.json"
)
CANONICAL_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
CANONICAL_NAME = "instruction-data.json"
DOWNLOAD_TIMEOUT_S = 10
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024


def cache_dir() -> Path:
    """``$GPT2_INSTRUCT_CACHE`` if set, else ``~/.cache/gpt2-instruct``."""
    env = os.environ.get("GPT2_INSTRUCT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2-instruct"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_cached() -> bool:
    """True when the cache holds the canonical file with the right sha256."""
    path = cache_dir() / CANONICAL_NAME
    try:
        return sha256_of(path.read_bytes()) == CANONICAL_SHA256
    except OSError:
        return False


def store_canonical(data: bytes) -> Path:
    """Write the canonical file's bytes into the cache atomically (temp file + ``os.replace``)."""
    digest = sha256_of(data)
    if digest != CANONICAL_SHA256:
        raise DatasetError(
            f"the canonical dataset has sha256 {digest}, expected {CANONICAL_SHA256}; not cached"
        )
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CANONICAL_NAME

    def write_synced(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(target, write_synced)
    return target


def canonical_path() -> Path:
    """Path of the cached canonical file, downloading it on first use.

    A cached copy with the wrong sha256 is deleted and fetched again.
    """
    path = cache_dir() / CANONICAL_NAME
    if is_cached():
        return path
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
    url = CANONICAL_URL
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DatasetError(
            f"could not download the canonical dataset from {url} ({reason}). "
            f"Without internet, place {CANONICAL_NAME} (sha256 {CANONICAL_SHA256}) "
            f"by hand at {path}, or use the bundled 'sample' dataset."
        ) from None
    try:
        return store_canonical(data)
    except DatasetError as exc:
        raise DatasetError(f"download from {url} failed the integrity check: {exc}") from None
    except OSError as exc:
        raise DatasetError(f"could not write the canonical dataset to {path}: {exc}") from None


def store_upload(path: str | os.PathLike) -> Path:
    """Copy a user's file to ``<cache>/uploads/<hash>-<name>``: a web upload's temp file may go before a run reads it."""
    path = Path(path)
    data = path.read_bytes()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name) or "data.json"
    target = cache_dir() / "uploads" / f"{sha256_of(data)[:16]}-{name}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    return target
