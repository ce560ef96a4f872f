"""Shared test setup."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Gradio's copies of uploads and outputs (export zips) go to a folder of this session, removed at its end, instead of
# /tmp/gradio, where every run of the suite left its files (gigabytes over a day). Set before anything imports gradio.
GRADIO_TEMP = os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="gpt2-instruct-tests-gradio-"))

# The suite checks CPU behaviour, bit-exact resumes included, also on a machine with a GPU; tests/test_cuda.py names
# CUDA itself. Set before anything picks a device.
os.environ["GPT2_INSTRUCT_DEVICE"] = "cpu"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_sessionfinish(session, exitstatus):
    if Path(GRADIO_TEMP).name.startswith("gpt2-instruct-tests-gradio-"):  # not a folder the user chose
        shutil.rmtree(GRADIO_TEMP, ignore_errors=True)


def pytest_sessionstart(session):
    """Seed the app's dataset cache from ../shared so the book's files load offline."""
    from data import cache

    shared_canonical, shared_preference = SHARED_DATA / cache.CANONICAL_NAME, SHARED_DATA / cache.PREFERENCE_NAME
    if shared_canonical.exists() and not cache.is_cached():
        cache.store_canonical(shared_canonical.read_bytes())
    if shared_preference.exists() and not cache.is_preference_cached():
        cache.store_preference(shared_preference.read_bytes())


# The book's two files: from ../shared (seeded above), the cache, or one download try per session.

BOOK_FILE_PROBLEMS: dict[str, str | None] = {}  # per file, filled once: None when it is cached, else why it is not
SESSION_CACHE = os.environ.get("GPT2_INSTRUCT_CACHE")  # tests that move the app's cache do not move this one


@contextlib.contextmanager
def session_cache():
    """``data.cache`` pointed at the cache the session started with."""
    with pytest.MonkeyPatch.context() as env:
        if SESSION_CACHE is None:
            env.delenv("GPT2_INSTRUCT_CACHE", raising=False)
        else:
            env.setenv("GPT2_INSTRUCT_CACHE", SESSION_CACHE)
        yield


def book_file(kind: str) -> Path:
    """The session cache's copy of the book's ``"canonical"`` or ``"preference"`` file; the test skips, with the
    same reason for every test that needs that file, when there is none (no ../shared/data, not cached, offline).

    A missing file is downloaded once per session; offline, the one failed try is remembered, so the tests
    that need the file skip at once instead of each waiting for its own download to time out.
    """
    from data import cache
    from data.errors import DatasetError

    name, path = {"canonical": (cache.CANONICAL_NAME, cache.canonical_path),
                  "preference": (cache.PREFERENCE_NAME, cache.preference_path)}[kind]
    with session_cache():
        if kind not in BOOK_FILE_PROBLEMS:
            try:
                path()
                BOOK_FILE_PROBLEMS[kind] = None
            except DatasetError as e:
                BOOK_FILE_PROBLEMS[kind] = str(e)
        if BOOK_FILE_PROBLEMS[kind]:
            pytest.skip(f"needs the book's {name}: there is no {SHARED_DATA / name}, it is not in the dataset cache, "
                        "and it could not be downloaded")
        return cache.cache_dir() / name


@pytest.fixture(scope="session")
def needs_canonical() -> Path:
    """The cached canonical file, or a skip (``book_file``)."""
    return book_file("canonical")


@pytest.fixture(scope="session")
def needs_preference() -> Path:
    """The cached preference file, or a skip (``book_file``)."""
    return book_file("preference")
