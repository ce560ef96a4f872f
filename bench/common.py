"""Small helpers the benchmarks share."""
from __future__ import annotations

import json
import math
import platform
import statistics
import time

import torch

from model.device import cpu_class, precision_reason


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def precision_line(device: torch.device, preferred: str | None = None) -> str:
    """The CPU class and the precision path with its reason, for the first lines of a benchmark."""
    where = f"CPU class: {cpu_class()}" if device.type == "cpu" else f"device: {device.type}"
    return f"{where}; precision {precision_reason(device, preferred)}"


def spread(values) -> dict:
    """min / median / max of a list of figures."""
    values = list(values)
    return {"min": min(values), "median": statistics.median(values), "max": max(values)} if values else {}


def jsonable(value):
    """Floats rounded, NaN and infinities as null (JSON has no NaN)."""
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def print_json(figures: dict) -> None:
    """The last line of every benchmark: one valid JSON object."""
    print(json.dumps(jsonable(figures), allow_nan=False))
