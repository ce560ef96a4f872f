"""Datasets shared by every visitor: each visitor holds a small reference, the parsed records live here once.

A reference is ``{"source", "name", "sha256", "count"}`` (plus ``"key"`` for an
upload). Parsed datasets sit in a bounded LRU keyed by content; uploads are
copied into the cache and dropped by age and total size.
"""
from __future__ import annotations

import hashlib
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from data import FILE_KINDS, DatasetError, load_instructions, token_stats
from data import cache
from data.records import source_path

BUILT_IN = {"canonical": "canonical (book, ch. 7)", "sample": "bundled sample"}


_PRUNING = threading.Lock()


def prune_folder(folder: Path, max_bytes: float, max_age_s: float, keep: Iterable[str | Path] = ()) -> list[Path]:
    """Delete files older than ``max_age_s``, then the oldest until the folder holds at most ``max_bytes``; never
    those in ``keep``.

    Each file is looked at once: another visitor's upload may be renamed into place (its ``.tmp`` is left alone)
    or pruned meanwhile.
    """
    keep = {Path(path).resolve() for path in keep}
    with _PRUNING:
        files = []
        for p in folder.iterdir() if folder.is_dir() else ():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and not p.name.endswith(".tmp"):
                files.append((st.st_mtime, st.st_size, p))
        files.sort(key=lambda f: f[0])
        now, gone, total = time.time(), [], sum(size for _, size, _ in files)
        for mtime, size, p in files:
            if (now - mtime > max_age_s or total > max_bytes) and p.resolve() not in keep:
                total -= size
                p.unlink(missing_ok=True)
                gone.append(p)
        return gone


class Datasets:
    def __init__(self, capacity: int = 8, uploads_mb: float = 200, max_age_hours: float = 24,
                 in_use: Callable[[], Iterable[str]] = tuple):
        """``in_use()``: the data files of the jobs going on, which pruning the uploads leaves in place."""
        self.capacity, self.uploads_bytes, self.max_age_s = capacity, uploads_mb * 2**20, max_age_hours * 3600
        self.in_use = in_use
        self._parsed: OrderedDict[str, list[dict]] = OrderedDict()
        self._stats: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def uploads_dir(self) -> Path:
        return cache.cache_dir() / "uploads"

    def open(self, source: str, upload: str | None = None) -> tuple[dict, list[dict]]:
        """A visitor's reference to a dataset and its records; ``DatasetError`` says why it cannot be loaded."""
        if source == "upload":
            if not upload:
                raise DatasetError(f"choose a {FILE_KINDS} file to upload")
            records = load_instructions(Path(upload))
            stored = cache.store_upload(upload)
            stored.touch()
            self.prune(keep=stored)
            ref = {"source": "upload", "key": stored.name, "name": Path(upload).name}
        elif source in BUILT_IN:
            records = load_instructions(source)
            ref = {"source": source, "name": BUILT_IN[source]}
            stored = source_path(source)
        else:
            raise DatasetError(f"unknown source {source!r}; choose canonical, sample or upload")
        return self._referenced(ref, stored, records)

    def _referenced(self, ref: dict, stored: Path, records: list[dict]) -> tuple[dict, list[dict]]:
        """``ref`` completed with the stored file's hash and its record count; the records kept under that hash."""
        digest = hashlib.sha256(stored.read_bytes()).hexdigest()
        ref.update(sha256=digest, count=len(records))
        self._keep(self._parsed, digest, records)
        return ref, records

    def reopen(self, ref: dict) -> tuple[dict, list[dict]]:
        """A reference a browser kept (its last choice, before a reload) opened again: a built-in source as it is now,
        an upload only while the server still keeps it; checked as ``open`` checks, never taken on trust."""
        source = ref.get("source") if isinstance(ref, dict) else None
        if source in BUILT_IN:
            return self.open(source)
        if source != "upload" or not isinstance(ref.get("key"), str):
            raise DatasetError("not a dataset reference")
        path = self.uploads_dir / Path(ref["key"]).name
        if not path.is_file():
            raise DatasetError(f"{ref.get('name', 'the upload')} is no longer on the server")
        records = load_instructions(path)
        path.touch()
        return self._referenced({"source": "upload", "key": path.name, "name": str(ref.get("name") or path.name)}, path,
                                records)

    def records(self, ref: dict) -> list[dict]:
        """The records behind a reference, parsed again if they left the shared cache."""
        return self._kept(self._parsed, ref["sha256"], lambda: load_instructions(self.training_source(ref)))

    def training_source(self, ref: dict) -> str:
        """What ``TrainConfig.data`` gets: "canonical", "sample" or the stored upload's path (server side only)."""
        if ref["source"] != "upload":
            return ref["source"]
        path = self.uploads_dir / Path(ref["key"]).name
        if not path.is_file():
            hours = self.max_age_s / 3600
            raise DatasetError(f"{ref['name']} is no longer on the server (uploads are kept {hours:g} hours at most "
                               "and dropped first when space runs short): upload it again")
        return str(path)

    def shared(self, key: str, load) -> list[dict]:
        """Records parsed once by ``load()`` and kept under ``key`` with the other parsed datasets."""
        return self._kept(self._parsed, key, load)

    def token_stats(self, ref: dict, records: list[dict], style: str) -> dict:
        """The records' token counts in a prompt format (``data.token_stats``), counted once per file and format: a
        reload, another visitor or a format chosen again finds them (a second of every 50,000 records)."""
        return self._kept(self._stats, (ref["sha256"], style), lambda: token_stats(records, style=style))

    def prune(self, keep: Path | None = None) -> list[Path]:
        """The uploads over budget or too old deleted, but ``keep`` (a visitor's new upload) and those in use."""
        return prune_folder(self.uploads_dir, self.uploads_bytes, self.max_age_s, [*([keep] if keep else []), *self.in_use()])

    def cached(self) -> int:
        with self._lock:
            return len(self._parsed)

    def _kept(self, store: OrderedDict, key, make):
        """``store[key]``, made by ``make()`` (outside the lock) and kept when missing."""
        with self._lock:
            if key in store:
                store.move_to_end(key)
                return store[key]
        value = make()
        self._keep(store, key, value)
        return value

    def _keep(self, store: OrderedDict, key, value) -> None:
        """Keep ``value`` under ``key``; beyond ``capacity`` the least recently used entries go."""
        with self._lock:
            store[key] = value
            store.move_to_end(key)
            while len(store) > self.capacity:
                store.popitem(last=False)
