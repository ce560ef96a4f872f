"""Trainings on one machine share its cores: each takes its share of threads while others run.

Two trainings at once, each with a thread per core, slow each other far more
than by half: a waiting OpenMP thread spins on a core that the other
process's threads need, and every parallel step waits for it. On 2 cores
(``python -m bench.together --model gpt2``), GPT-2 124M made 835-841
tokens/s alone and 78-241 each side by side (fp32-only: 312 alone, 45 each);
sharing, 449-457 each (fp32-only: 160-162). So a training on the CPU
registers itself in the cache folder, and at each step (at most twice a
second) counts the live trainings there and takes ``threads // count``
threads, at least one; its own threads come back when it is alone again.
``GPT2_INSTRUCT_SHARE_CORES=0`` turns this off.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil
import torch

from data.cache import cache_dir

SHARE_ENV = "GPT2_INSTRUCT_SHARE_CORES"


def alive(pid: int, entry: Path) -> bool:
    """Whether the process that wrote ``entry`` still runs: ``pid`` lives and started before the file was written
    (a pid reused since is another process)."""
    try:
        return psutil.Process(pid).create_time() <= entry.stat().st_mtime + 1
    except (psutil.Error, OSError):
        return False


class CoreShare:
    """This process's place among the trainings on this machine; ``check()`` once a step, ``close()`` at the end."""

    def __init__(self, device: torch.device, folder: Path | None = None, every_s: float = 0.5):
        self.active = device.type == "cpu" and os.environ.get(SHARE_ENV, "1").strip() != "0"
        self.folder = Path(folder) if folder else cache_dir() / "trainings"
        self.host = socket.gethostname()
        self.own = self.folder / f"{self.host}-{os.getpid()}"
        self.threads = torch.get_num_threads()  # this process's threads alone
        self.every_s, self.checked = every_s, float("-inf")
        if self.active:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.own.touch()
            except OSError:
                self.active = False  # a read-only cache: train alone, as before
        self.check()

    def others(self) -> int:
        """Live trainings on this machine besides this one; the files of dead ones are removed."""
        count = 0
        for entry in self.folder.iterdir():
            host, _, pid = entry.name.rpartition("-")
            if entry == self.own or host != self.host or not pid.isdigit():
                continue
            if alive(int(pid), entry):
                count += 1
            else:
                entry.unlink(missing_ok=True)
        return count

    def check(self) -> int:
        """The threads this training uses now."""
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

    def close(self) -> None:
        if self.active:
            self.own.unlink(missing_ok=True)
            torch.set_num_threads(self.threads)
            self.active = False
