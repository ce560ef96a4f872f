"""Browsing a loaded dataset on the server: search, pages, and which split a record is in.

The UI sends a query and a page number and gets back plain rows, so a
browser never receives the whole dataset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .records import FIELDS, split_instructions

PAGE_SIZE = 25


@dataclass
class Page:
    rows: list[tuple[int, dict]]  # (index in the dataset, record)
    total: int  # records that match the query
    page: int  # 1-based, clamped to the pages that exist
    pages: int

    def summary(self) -> str:
        """``"N records, page x / y"``."""
        noun = "record" if self.total == 1 else "records"
        return f"{self.total:,} {noun}, page {self.page} / {self.pages}"


def matches(records: list[dict], query: str = "", fields=FIELDS) -> list[int]:
    """Indices of records whose ``fields`` (instruction, input or output) contain ``query`` (case-insensitive)."""
    needle = (query or "").strip().casefold()
    if not needle:
        return list(range(len(records)))
    return [i for i, r in enumerate(records) if any(needle in (r.get(f) or "").casefold() for f in fields)]


def page_of(records: list[dict], query: str = "", page: int = 1, page_size: int = PAGE_SIZE, fields=FIELDS) -> Page:
    """One page of the records whose ``fields`` match ``query``; an out-of-range page is clamped."""
    found = matches(records, query, fields)
    pages = max(1, math.ceil(len(found) / page_size))
    page = min(max(1, int(page or 1)), pages)
    start = (page - 1) * page_size
    return Page([(i, records[i]) for i in found[start : start + page_size]], len(found), page, pages)


def split_names(n: int) -> list[str]:
    """The split ("train", "val" or "test") of each of ``n`` records, as ``split_instructions`` cuts them."""
    split = split_instructions(list(range(n)))
    names = [""] * n
    for name, indices in (("train", split.train), ("val", split.val), ("test", split.test)):
        for i in indices:
            names[i] = name
    return names


def split_of(index: int, n: int) -> str:
    """The split of record ``index`` in a dataset of ``n`` records."""
    if not 0 <= index < n:
        raise IndexError(f"record {index} does not exist; the dataset has {n} records")
    return split_names(n)[index]
