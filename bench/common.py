"""Small helpers the benchmarks share."""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from model.device import cpu_class, precision_reason


def at_least(low: int):
    """An argparse type: a whole number of at least ``low`` (``--steps 0`` is one line of usage, not a traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def preset(name: str) -> str:
    """An argparse type: one of the model presets."""
    from model import PRESETS

    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name


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
