"""Trainings (and evaluations) on one machine share its cores: each process takes its share of threads while others run.

Two trainings at once, each with a thread per core, slow each other far more
than by half: a waiting OpenMP thread spins on a core that the other
process's threads need, and every parallel step waits for it. On 2 cores
(``python -m bench.together --model gpt2``), GPT-2 124M made 728-841
tokens/s alone and 18-241 each side by side (fp32-only: 312 alone, 45 each);
sharing, 449-473 each (fp32-only: 160-162). So a training or an evaluation
on the CPU registers itself in the cache folder, and at each step or batch
(at most twice a second) counts the other live processes there and takes
``threads // processes`` threads, at least one; the process's own threads
come back when it is alone again. Jobs of one process (the app's training
and evaluation) count once: threads are the process's.
``GPT2_INSTRUCT_SHARE_CORES=0`` turns this off.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path

import psutil
import torch

from data.cache import cache_dir

SHARE_ENV = "GPT2_INSTRUCT_SHARE_CORES"
_process = {"shares": 0, "threads": 1}  # this process's jobs that share, and its threads from before the first began
_process_lock = threading.Lock()


def alive(pid: int, entry: Path) -> bool:
    """Whether the process that wrote ``entry`` still runs: ``pid`` lives and started before the file was written
    (a pid reused since is another process)."""
    try:
        return psutil.Process(pid).create_time() <= entry.stat().st_mtime + 1
    except (psutil.Error, OSError):
        return False


class CoreShare:
    """One job's place among the processes that train or evaluate on this machine; ``check()`` once a step,
    ``close()`` at the end."""

    def __init__(self, device: torch.device, folder: Path | None = None, every_s: float = 0.5):
        self.active = device.type == "cpu" and os.environ.get(SHARE_ENV, "1").strip() != "0"
        self.folder = Path(folder) if folder else cache_dir() / "cpu-jobs"
        self.host = socket.gethostname()
        self.own = self.folder / f"{self.host}-{os.getpid()}-{secrets.token_hex(4)}"  # one file per job
        self.threads = torch.get_num_threads()
        self.every_s, self.checked = every_s, float("-inf")
        if self.active:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.own.touch()
            except OSError:
                self.active = False  # a read-only cache: train alone, as before
        if self.active:
            with _process_lock:  # the threads the caller set (or OMP_NUM_THREADS) before this process's jobs began
                if _process["shares"] == 0:
                    _process["threads"] = self.threads
                _process["shares"] += 1
                self.threads = _process["threads"]
        self.check()

    def others(self) -> int:
        """Other live processes on this machine with a job registered; the files of dead ones are removed."""
        pids = set()
        for entry in self.folder.iterdir():
            name = re.fullmatch(r"(.+)-(\d+)-[0-9a-f]+", entry.name)  # <host>-<pid>-<job>
            if name is None or name[1] != self.host or int(name[2]) == os.getpid():
                continue
            if alive(int(name[2]), entry):
                pids.add(int(name[2]))
            else:
                entry.unlink(missing_ok=True)
        return len(pids)

    def check(self) -> int:
        """The threads this process uses now."""
        now = time.monotonic()
        if self.active and now - self.checked >= self.every_s:
            self.checked = now
            try:
                want = max(1, self.threads // (1 + self.others()))
            except OSError:
                want = self.threads
            if want != torch.get_num_threads():
                torch.set_num_threads(want)
        return torch.get_num_threads()

    def __enter__(self) -> "CoreShare":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Leave the machine's list; the last of this process's jobs to end gives the process its threads back."""
        if self.active:
            self.own.unlink(missing_ok=True)
            self.active = False
            with _process_lock:
                _process["shares"] -= 1
                if _process["shares"] == 0:
                    torch.set_num_threads(self.threads)
