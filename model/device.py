"""Where the model runs and in which precision: CUDA, then Apple MPS, then CPU; bf16 where it is fast."""
from __future__ import annotations

import functools

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pick_device(preferred: str | None = None) -> torch.device:
    if preferred and preferred != "auto":
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 beats fp32 ~2x."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def pick_dtype(device: torch.device, preferred: str | None = None) -> torch.dtype:
    """``preferred`` is "fp32", "bf16" or "auto"/None (bf16 where the device runs it faster)."""
    if preferred and preferred != "auto":
        if preferred not in DTYPES:
            raise ValueError(f"unknown precision {preferred!r}; choose auto, {', '.join(DTYPES)}")
        return DTYPES[preferred]
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def describe(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return f"{name}, {str(dtype).removeprefix('torch.')}"
