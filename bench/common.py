"""Small helpers the benchmarks share."""
from __future__ import annotations

import json
import platform
import time

import torch


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_json(figures: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}))
