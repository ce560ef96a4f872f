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

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_CANONICAL = SHARED_DATA / "instruction-data.json"
SHARED_PREFERENCE = SHARED_DATA / "instruction-data-with-preference.json"


def pytest_sessionfinish(session, exitstatus):
    if Path(GRADIO_TEMP).name.startswith("gpt2-instruct-tests-gradio-"):  # not a folder the user chose
        shutil.rmtree(GRADIO_TEMP, ignore_errors=True)


def pytest_sessionstart(session):
    """Seed the app's dataset cache from ../shared so the book's files load offline."""
    from data import cache

    if SHARED_CANONICAL.exists() and not cache.is_cached():
        cache.store_canonical(SHARED_CANONICAL.read_bytes())
    if SHARED_PREFERENCE.exists() and not cache.is_preference_cached():
        cache.store_preference(SHARED_PREFERENCE.read_bytes())


# The book's dataset: from ../shared (seeded above), the cache, or one download try per session.

CANONICAL_PROBLEM: list[str | None] = []  # filled once: None when the file is cached, else why it is not
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


def canonical_problem() -> str | None:
    """None when the cache holds the book's file, else why not; a missing file is downloaded once per session.

    Offline, the one failed try is remembered: the tests that need the file skip at once
    instead of each waiting for its own download to time out.
    """
    from data import cache
    from data.errors import DatasetError

    if not CANONICAL_PROBLEM:
        with session_cache():
            try:
                cache.canonical_path()
                CANONICAL_PROBLEM.append(None)
            except DatasetError as e:
                CANONICAL_PROBLEM.append(str(e))
    return CANONICAL_PROBLEM[0]


@pytest.fixture(scope="session")
def needs_canonical() -> Path:
    """The cached canonical file; the test skips when there is none (no ../shared/data, not cached, offline)."""
    from data import cache

    if canonical_problem():
        pytest.skip(f"needs the book's {cache.CANONICAL_NAME}: there is no {SHARED_CANONICAL.parent}, "
                    "it is not in the dataset cache, and it could not be downloaded")
    with session_cache():
        return cache.cache_dir() / cache.CANONICAL_NAME
