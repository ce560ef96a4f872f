"""Small helpers the benchmarks share."""
from __future__ import annotations

import json
import platform
import time

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it ignores a forked parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_json(figures: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}))
