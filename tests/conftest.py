"""Shared test setup."""
from pathlib import Path

SHARED_CANONICAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruction-data.json"


def pytest_sessionstart(session):
    """Seed the app's dataset cache from ../shared so the canonical file loads offline."""
    from data import cache

    if SHARED_CANONICAL.exists() and not cache.is_cached():
        cache.store_canonical(SHARED_CANONICAL.read_bytes())
