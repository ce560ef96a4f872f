"""Shared test setup."""
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_CANONICAL = SHARED_DATA / "instruction-data.json"
SHARED_PREFERENCE = SHARED_DATA / "instruction-data-with-preference.json"


def pytest_sessionstart(session):
    """Seed the app's dataset cache from ../shared so the book's files load offline."""
    from data import cache

    if SHARED_CANONICAL.exists() and not cache.is_cached():
        cache.store_canonical(SHARED_CANONICAL.read_bytes())
    if SHARED_PREFERENCE.exists() and not cache.is_preference_cached():
        cache.store_preference(SHARED_PREFERENCE.read_bytes())
