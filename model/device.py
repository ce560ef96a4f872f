"""Where the model runs and in which precision: CUDA, then Apple MPS, then CPU; bf16 where it is fast."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def configure_runtime() -> None:
    """Allocator and kernel-cache settings, set before the first large allocation; every entry point calls it first.

    Large CPU buffers go on 2 MB pages (fewer page faults per step), and the oneDNN
    kernel cache is bounded (each new batch length adds ~2 MB of kernels).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")


def on_zero_gpu() -> bool:
    """True on a Hugging Face Space with ZeroGPU hardware, which sets ``SPACES_ZERO_GPU`` (as the ``spaces`` package reads it).

    ZeroGPU lends a GPU only for the length of a call to a ``@spaces.GPU`` function, in a
    forked process; a background training thread never has one.
    """
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true", "yes")


def pick_device(preferred: str | None = None) -> torch.device:
    if preferred and preferred != "auto":
        return torch.device(preferred)
    if on_zero_gpu():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 beats fp32 ~2x.

    ``GPT2_INSTRUCT_NATIVE_BF16=0`` or ``1`` overrides /proc/cpuinfo, e.g. to act as an fp32-only CPU.
    """
    override = os.environ.get("GPT2_INSTRUCT_NATIVE_BF16")
    if override in ("0", "1"):
        return override == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":  # native bf16 (Ampere and newer); emulated bf16 on older cards is slow
        return torch.cuda.is_bf16_supported(including_emulation=False)
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


def hardware_note() -> str:
    """One sentence on where fine-tuning runs on this machine, for the app to show before training."""
    device = pick_device()
    precision = str(pick_dtype(device)).removeprefix("torch.")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    where = f"the CPU ({cores} cores, {precision})" if device.type == "cpu" else describe(device, pick_dtype(device))
    if on_zero_gpu():
        return f"This Space's ZeroGPU lends a GPU only inside @spaces.GPU calls, never to a background job: training runs on {where}."
    return f"Training runs on {where}."


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (VmHWM: unlike ru_maxrss it ignores a forked parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> None:
    """Hand memory that the C allocator holds free back to the OS (glibc only).

    Each batch has its own length, so each step's activations have new sizes;
    the freed blocks of earlier steps fit them badly and resident memory creeps
    up by hundreds of MB over an epoch. Trimming after each step keeps the peak
    at what one step needs, for a few percent of speed.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
