"""Local cache of the book's data files: ``instruction-data.json`` and its preference twin.

Neither file ships with the project: each is downloaded once from its public
URL, checked against its sha256 and kept in ``cache_dir()``. One mechanism
(``is_cached_file``, ``store_file``, ``cached_file``) serves both; the
canonical file's functions keep their names.
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
PREFERENCE_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/"
    "ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json"
)
PREFERENCE_SHA256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
PREFERENCE_NAME = "instruction-data-with-preference.json"
DOWNLOAD_TIMEOUT_S = 10
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024


def cache_dir() -> Path:
    """``$GPT2_INSTRUCT_CACHE`` if set, else ``~/.cache/gpt2-instruct``."""
    env = os.environ.get("GPT2_INSTRUCT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpt2-instruct"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_cached_file(name: str, sha256: str) -> bool:
    """True when the cache holds ``name`` with the right sha256."""
    try:
        return sha256_of((cache_dir() / name).read_bytes()) == sha256
    except OSError:
        return False


def store_file(name: str, sha256: str, data: bytes, what: str) -> Path:
    """Write a file's bytes into the cache atomically (temp file + ``os.replace``), after checking the sha256."""
    digest = sha256_of(data)
    if digest != sha256:
        raise DatasetError(f"{what} has sha256 {digest}, expected {sha256}; not cached")
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name

    def write_synced(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(target, write_synced)
    return target


def cached_file(name: str, url: str, sha256: str, what: str, alternative: str) -> Path:
    """Path of a cached file, downloading it on first use; a cached copy with the wrong sha256 is fetched again, and
    replaced only by a download that has the right one (it may be a copy someone placed by hand: it is never deleted).

    ``what`` names the file in messages ("the canonical dataset"); ``alternative`` ends the offline hint.
    """
    path = cache_dir() / name
    if is_cached_file(name, sha256):
        return path
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        try:
            found = f" The {name} there has sha256 {sha256_of(path.read_bytes())}: another version, or edited."
        except OSError:
            found = ""
        raise DatasetError(
            f"could not download {what} from {url} ({reason}). "
            f"Without internet, place {name} (sha256 {sha256}) by hand in the dataset cache folder {path.parent} "
            f"(GPT2_INSTRUCT_CACHE sets it), {alternative}.{found}"
        ) from None
    try:
        return store_file(name, sha256, data, what)
    except DatasetError as exc:
        raise DatasetError(f"download from {url} failed the integrity check: {exc}") from None
    except OSError as exc:
        raise DatasetError(f"could not write {what} to {path}: {exc}") from None


def is_cached() -> bool:
    """True when the cache holds the canonical file with the right sha256."""
    return is_cached_file(CANONICAL_NAME, CANONICAL_SHA256)


def store_canonical(data: bytes) -> Path:
    """Write the canonical file's bytes into the cache atomically."""
    return store_file(CANONICAL_NAME, CANONICAL_SHA256, data, "the canonical dataset")


def canonical_path() -> Path:
    """Path of the cached canonical file, downloading it on first use."""
    return cached_file(CANONICAL_NAME, CANONICAL_URL, CANONICAL_SHA256, "the canonical dataset",
                       "or use the bundled 'sample' dataset")


def is_preference_cached() -> bool:
    """True when the cache holds the book's preference file with the right sha256."""
    return is_cached_file(PREFERENCE_NAME, PREFERENCE_SHA256)


def store_preference(data: bytes) -> Path:
    """Write the preference file's bytes into the cache atomically."""
    return store_file(PREFERENCE_NAME, PREFERENCE_SHA256, data, "the preference dataset")


def preference_path() -> Path:
    """Path of the cached preference file (the book's 1,100 records with chosen and rejected), downloading it on first use."""
    return cached_file(PREFERENCE_NAME, PREFERENCE_URL, PREFERENCE_SHA256, "the preference dataset",
                       "or pass your own preference file")


def file_label(path: str | os.PathLike) -> str:
    """A data file by the name its owner knows: an upload's stored copy without the hash ``store_upload`` put before it."""
    path = Path(path)
    stored = re.fullmatch(r"[0-9a-f]{16}-(.+)", path.name)
    return stored.group(1) if stored and path.parent.name == "uploads" else path.name


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
