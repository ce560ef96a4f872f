"""Where the model runs and in which precision: CUDA, then Apple MPS, then CPU; bf16 where it is fast."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NATIVE_BF16_ENV = "GPT2_INSTRUCT_NATIVE_BF16"  # 0 or 1: overrides /proc/cpuinfo (to test the other CPU class)
DEVICE_ENV = "GPT2_INSTRUCT_DEVICE"  # cpu, cuda, cuda:1, mps: what "auto" picks (the tests keep to the CPU)

# Read by oneDNN and ideep at their first kernel, not at import. Torch's huge pages
# (THP_MEM_ALLOC_ENABLE=1) stay off: where the kernel compacts memory on a huge-page fault (THP "defrag" on
# madvise, the common setting), a fragmented host stalls every step on it. On an AVX2 EPYC, fp32 GPT-2 124M:
# a profiled step 3.3 s with them against 2.5 s without, ours 211-219 tokens/s against 220-224 (system time
# 2.3-3.0 s against 1.0-1.1 s, peak RSS ~40 MB higher), transformers' step 6.6 s against 4.8 s.
RUNTIME_ENV = {
    # oneDNN keeps the kernels of every shape it has seen; each new batch length adds ~2 MB. Packing makes nearly
    # every step's shapes new, so training seldom reuses one: at 64, fp32 training of GPT-2 124M (its forward
    # matmuls are oneDNN's) peaked at 2.51 GiB over an epoch against 2.45 at 16. Generation ran as fast at 16.
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16",
    # ideep, torch's oneDNN layer (the bf16 matmuls), keeps one more cache of kernels by shape, of 1,024 by default.
    # Packing makes nearly every batch's token count, and so its shapes, new: it grew ~160 MB over an epoch of
    # GPT-2 124M. A step uses about a dozen shapes.
    "LRU_CACHE_CAPACITY": "32",
}


def configure_runtime() -> None:
    """Set the kernel-cache variables, and no more threads than the CPUs this process may use; call before the
    first tensor is made.

    oneDNN and ideep read their cache capacities at their first kernel: set later, they are ignored.
    Values already in the environment win, and ``OMP_NUM_THREADS`` over the
    thread cap. Safe to call more than once.
    """
    for name, value in RUNTIME_ENV.items():
        os.environ.setdefault(name, value)
    budget = None if "OMP_NUM_THREADS" in os.environ else cpu_budget()
    if budget is not None and torch.get_num_threads() > budget:
        torch.set_num_threads(budget)


def _quota_of(folder: Path) -> float | None:
    """The CPUs' worth of time one cgroup folder allows per period (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None."""
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs' worth of time this process's cgroups allow (the tightest quota on its path), or None when none caps it.

    A container may show every core of its host and grant a few (a 2-vCPU Hugging Face Space has been reported to
    show 16), and torch starts a thread per core it sees. Threads past the quota are throttled in turn and every
    parallel step waits for them: under a 1-CPU quota on a 2-core machine GPT-2 124M trained 1.17x slower on 2
    threads than on 1, and 1.28x on 8.
    """
    try:
        entries = [line.split(":", 2) for line in membership.read_text().splitlines()]
    except OSError:
        return None
    quotas = []
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        if controllers == "":
            mounts = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            mounts = [root / "cpu", root / "cpu,cpuacct"]
        else:
            continue
        for mount in mounts:  # the process's folder and each above it; in a container the mount is its own folder
            folder = mount / path.strip("/")
            while True:
                quota = _quota_of(folder)
                if quota is not None:
                    quotas.append(quota)
                if folder == mount:
                    break
                folder = folder.parent
    return min(quotas) if quotas else None


def cpu_budget() -> int:
    """Whole CPUs this process may keep busy: the cores it sees, or fewer where a cgroup quota caps it (rounded down)."""
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    return visible if quota is None else max(1, min(visible, int(quota)))


def on_zero_gpu() -> bool:
    """True on a Hugging Face Space with ZeroGPU hardware, which sets ``SPACES_ZERO_GPU`` (as the ``spaces`` package reads it).

    ZeroGPU lends a GPU only for the length of a call to a ``@spaces.GPU`` function, in a
    forked process; a background training thread never has one.
    """
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true", "yes")


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` ("cpu", "cuda", ...) or, for None and "auto", ``GPT2_INSTRUCT_DEVICE`` when set, else the
    best there is: CUDA, then MPS, then the CPU (always the CPU on ZeroGPU)."""
    if preferred and preferred != "auto":
        return torch.device(preferred)
    chosen = os.environ.get(DEVICE_ENV, "").strip()
    if chosen and chosen != "auto":
        try:
            return torch.device(chosen)
        except RuntimeError as e:
            raise ValueError(f"{DEVICE_ENV} must name a device (cpu, cuda, cuda:1, mps), got {chosen!r}") from e
    if on_zero_gpu():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flag() -> str | None:
    """The CPU flag that makes bf16 matmuls native ("avx512_bf16" or "amx_bf16"), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def native_bf16_override() -> bool | None:
    """``GPT2_INSTRUCT_NATIVE_BF16=0|1`` when set: True or False; otherwise None."""
    value = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{NATIVE_BF16_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 beats fp32 ~2x.

    ``GPT2_INSTRUCT_NATIVE_BF16=0|1`` wins over /proc/cpuinfo.
    """
    override = native_bf16_override()
    return override if override is not None else cpu_bf16_flag() is not None


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


def configure_precision(device: torch.device, dtype: torch.dtype) -> None:
    """The process-wide torch settings that go with training in ``dtype`` on ``device``; every trainer and benchmark calls it.

    In bf16 on the CPU, attention's math path (``CausalSelfAttention`` trains
    batches of instruction length on it) then keeps bf16 instead of making fp32 copies. Without it
    ``bench.train`` timed GPT-2 124M ~4 % slower than with it, at a ~60 MB higher peak.
    """
    if device.type == "cpu" and dtype == torch.bfloat16:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)


def precision_reason(device: torch.device, preferred: str | None = None) -> str:
    """The precision ``pick_dtype`` chooses and why, e.g. "fp32: this CPU has no native bf16 matmul (no AVX512-BF16/AMX)"."""
    if preferred and preferred != "auto":
        auto = precision_reason(device)
        if auto.startswith(preferred):
            return f"{preferred}: chosen explicitly (auto agrees: {auto.split(': ', 1)[1]})"
        if preferred == "bf16" and device.type == "cpu":
            return f"bf16: chosen explicitly; without native bf16 it is emulated, many times slower than fp32 (auto takes {auto})"
        return f"{preferred}: chosen explicitly (auto takes {auto})"
    if device.type == "cpu":
        override = native_bf16_override()
        if override is not None:
            return f"{'bf16' if override else 'fp32'}: forced by {NATIVE_BF16_ENV}={int(override)}"
        flag = cpu_bf16_flag()
        if flag:
            return f"bf16: {flag.upper().replace('_', '-')} found (native bf16 matmul)"
        return "fp32: this CPU has no native bf16 matmul (no AVX512-BF16/AMX)"
    if device.type == "cuda":
        if bf16_is_fast(device):
            return "bf16: this GPU multiplies bf16 natively"
        return "fp32: this GPU has no native bf16"
    return f"fp32: bf16 is not known to be fast on {device.type}"


def cpu_class() -> str:
    """"native bf16" or "fp32-only": the two CPU classes the figures are measured on."""
    return "native bf16" if cpu_has_bf16() else "fp32-only"


def describe(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return f"{name}, {str(dtype).removeprefix('torch.')}"


def hardware_note() -> str:
    """One sentence on where fine-tuning runs on this machine, which the Train tab shows before training."""
    device = pick_device()
    precision = str(pick_dtype(device)).removeprefix("torch.")
    cores = cpu_budget()
    where = f"the CPU ({cores} core{'s' if cores > 1 else ''}, {precision})" if device.type == "cpu" else describe(device, pick_dtype(device))
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


RSS_SLACK = 1.1  # trim when resident memory has grown 10 % since the last trim
_rss_at_trim = [0]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_free_memory(force: bool = False) -> None:
    """After a step: hand memory that the C allocator holds free back to the OS, when it has crept up (glibc only;
    ``force``: whatever it has grown by, e.g. after dropping models).

    Each batch has its own length, so each step's activations have new sizes;
    the freed blocks of earlier steps may fit them badly and resident memory
    creeps up. Trimming after every step bounds that, but then every step
    faults all of its buffers in again (GPT-2 124M's width, 6 layers, fp32: ~4x the page faults
    and ~2.4x the system time of not trimming). So trim only when
    resident memory has grown 10 % past its level at the last trim: in the
    steady state the next step reuses the freed blocks, as it does without any
    trim, and the peak stays within a few percent of trimming every step.
    """
    libc = _libc()
    if libc is None:
        return
    rss = _rss_bytes()
    if force or rss > _rss_at_trim[0] * RSS_SLACK:
        libc.malloc_trim(0)
        _rss_at_trim[0] = rss
