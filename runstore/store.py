"""Runs on disk: one directory per fine-tuning run, every file written atomically.

    runs/<timestamp>-<model>/
        config.json, model.safetensors   the fine-tuned GPT-2 (save_pretrained)
        manifest.json                    settings, data, versions, device, times, final losses, status
        metrics.jsonl                    one JSON object per logged step (an evaluation's: its sample response too)
        checkpoint.pt                    what a stopped or interrupted run needs to resume (training/checkpoint.py)

A manifest's ``status`` is running, done, stopped, failed or interrupted; ``owner``
names the process that writes a running run, so that ``recover_runs`` can tell a
live run from one whose process died.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from model.files import atomic_write

from .locks import RunLock, hold_run, in_use

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
STATUSES = ("running", "done", "stopped", "failed", "interrupted")
_WRITING: set[Path] = set()  # runs that this process is writing now
_MANIFESTS = threading.Lock()  # a writer's manifest updates and close against recover_run's read, check and write


def runs_root() -> Path:
    """``$GPT2_INSTRUCT_RUNS`` if set, else ``runs/`` in the working directory."""
    return Path(os.environ.get("GPT2_INSTRUCT_RUNS", "runs"))


def new_run_dir(model: str, root: Path | None = None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name or model).strip("_") or "model"
    base = (root or runs_root()) / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def claim_run_dir(path: str | Path) -> Path:
    """``path`` (a run's ``--out``) made, or taken when it is an empty folder; ``ValueError`` when it holds anything, so
    that a run never writes over another run's files (or a folder of the user's)."""
    path = Path(path)
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise ValueError(f"{path} is a file: --out must name a new or empty folder") from None
        if any(path.iterdir()):
            raise ValueError(f"{path} already holds files: --out must name a new or empty folder (to continue a "
                             "stopped run, use --resume)") from None
    except OSError as e:
        raise ValueError(f"cannot make the run folder {path}: {e.strerror or e}") from None
    return path


def write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class RunWriter:
    """Writes a run's manifest and metrics as training goes; ``close()`` when the run has ended.

    With ``resume_step`` it reopens an existing run: the manifest is kept and the metrics
    up to that step (later rows belong to steps that will be trained again). The writer holds the run's lock
    (``runstore.locks``) until ``close()``: ``lock``, the one a resume took before its checks, or one it takes.
    """

    def __init__(self, directory: Path, resume_step: int | None = None, lock: RunLock | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = lock or hold_run(self.dir, doing="write it")
        self.own_lock = lock is None
        self.manifest: dict = read_manifest(self.dir) if resume_step is not None else {}
        self.metrics: list[dict] = []
        if resume_step is not None:
            self.metrics = [r for r in read_metrics(self.dir) if r["step"] <= resume_step]
            self.write_metrics()
        _WRITING.add(self.dir.resolve())

    def close(self) -> None:
        with _MANIFESTS:
            _WRITING.discard(self.dir.resolve())
        if self.own_lock:
            self.lock.release()

    def update_manifest(self, **fields) -> None:
        with _MANIFESTS:
            self.manifest.update(fields)
            write_atomic(self.dir / MANIFEST, json.dumps(self.manifest, indent=2, default=str))

    def log(self, record: dict, response: str | None = None) -> None:
        """Append one step's record as one line (a reader skips a last line caught half written: ``read_metrics``),
        with the sample ``response`` of an evaluation, which a resumed run shows again (``Logged.replay``).
        Rewriting the file whole each step cost a 100-epoch run minutes, growing with every step."""
        row = record if response is None else {**record, "response": response}
        self.metrics.append(row)
        with open(self.dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def write_metrics(self) -> None:
        write_atomic(self.dir / METRICS, "".join(json.dumps(r) + "\n" for r in self.metrics))


@dataclass
class RunInfo:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return self.manifest.get("status", "unknown")

    @property
    def started(self) -> str:
        """When the run started (its manifest's UTC time), else when its manifest was last written (a damaged or
        half-written one): runs are ordered by it, whatever their names (``--out`` names a run anything)."""
        if isinstance(started := self.manifest.get("started"), str) and started:
            return started
        try:
            mtime = (self.path / MANIFEST).stat().st_mtime
        except OSError:
            return ""
        return utc_time(mtime)

    @property
    def has_weights(self) -> bool:
        return (self.path / WEIGHTS).is_file()

    @property
    def last_step(self) -> int:
        """The last step trained: the manifest's once the run has ended, else the last metrics row's."""
        if self.status != "running" and "steps" in self.manifest:
            return int(self.manifest["steps"])
        rows = read_metrics(self.path)
        return rows[-1]["step"] if rows else 0

    @property
    def resumable(self) -> bool:
        """Has a checkpoint and is neither done nor still running."""
        return self.status not in ("done", "running") and (self.path / CHECKPOINT).is_file()

    def label(self) -> str:
        loss = val_loss_text(self.manifest)
        return f"{self.name} ({self.status}{f', {loss_name(self.manifest)} {loss}' if loss else ''})"


def loss_name(manifest: dict) -> str:
    """What a run's validation loss is: the next-token cross-entropy, or a preference-tuned run's DPO loss (ln 2 at
    its start), which is not comparable with it."""
    return "DPO val loss" if manifest.get("method") == "dpo" else "val loss"


def val_loss_text(summary: dict) -> str | None:
    """A run's last validation loss, with the step it is from when that is not the run's last step (a stopped run's
    may be from well before); None when it has none."""
    loss, at = summary.get("final_val_loss"), summary.get("final_val_step")
    if not isinstance(loss, (int, float)):
        return None
    return f"{loss:.3f}" + (f" at step {at:,}" if at is not None and at != summary.get("steps") else "")


def read_manifest(path: Path) -> dict:
    """The run's manifest; {} when it cannot be read or is not a JSON object (damaged)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def read_metrics(path: Path) -> list[dict]:
    """The run's metrics rows. A last line still being written is left out, and so is a line a disk or copy error
    damaged: one bad row must not keep the app from starting or a chart from drawing."""
    try:
        text = (Path(path) / METRICS).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def process_owner() -> dict:
    """Who writes a run: this process's id, host, the host's boot time and the process's start time.

    A pid alone is not enough: after a restart (of the app, its container or the machine)
    the same pid names another process. The start time tells them apart.
    """
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_time": psutil.boot_time(),
            "process_started": psutil.Process().create_time()}


def owner_alive(owner: dict | None, run_dir: Path) -> bool:
    """Whether the process recorded as a running run's owner may still be writing it.

    - This very process: alive only while it has the run open (a ``RunWriter`` not yet closed),
      so a run left behind by a crashed thread is recovered, the one being trained is not.
    - Another process on this host, since the same boot: alive if a process with that pid exists
      and started at the recorded time; a pid now used by another process does not count.
    - Another boot or another host, or no owner recorded (older runs): dead. A runs folder belongs
      to the machine that trains into it; the host name changes when the app's container restarts,
      so a run from another host is one whose process is gone.
    """
    if not owner:
        return False
    me = process_owner()
    if owner.get("host") != me["host"] or abs(owner.get("boot_time", 0) - me["boot_time"]) > 1:
        return False
    if owner.get("pid") == me["pid"] and abs(owner.get("process_started", 0) - me["process_started"]) < 0.01:
        return Path(run_dir).resolve() in _WRITING
    try:
        return abs(psutil.Process(owner["pid"]).create_time() - owner.get("process_started", 0)) < 0.01
    except (psutil.Error, KeyError, TypeError):
        return False


def recover_run(path: Path) -> RunInfo | None:
    """Mark one run ``interrupted`` if its manifest says running but its process is dead (see ``owner_alive``).

    Its ``steps`` become the last step in metrics.jsonl and ``ended`` the time its files last changed.
    Returns the run when it was changed, else None (also when the folder cannot be written: it stays as it is).
    """
    path = Path(path)
    with _MANIFESTS:  # a run of this process cannot end (manifest "done", writer closed) between the read and the write
        manifest = read_manifest(path)
        if manifest.get("status") != "running" or in_use(path) or owner_alive(manifest.get("owner"), path):
            return None  # a process holding the run's lock writes it, whatever host name it recorded
        rows = read_metrics(path)
        last_change = max((f.stat().st_mtime for f in (path / MANIFEST, path / METRICS) if f.exists()), default=time.time())
        manifest.update(status="interrupted", steps=rows[-1]["step"] if rows else 0,
                        ended=utc_time(last_change),
                        stop_reason="its process ended before the run finished")
        try:
            write_atomic(path / MANIFEST, json.dumps(manifest, indent=2, default=str))
        except OSError:
            return None
    return RunInfo(path, manifest)


def recover_runs(root: Path | None = None) -> list[RunInfo]:
    """Turn every run left ``running`` by a dead process into ``interrupted``; the runs changed.

    Called when the app starts (and safe at any time): runs that this process or another live
    one is writing are left alone.
    """
    return [run for info in list_runs(root) if info.status == "running" and (run := recover_run(info.path))]


def list_recovered(root: Path | None = None) -> list[RunInfo]:
    """``list_runs``, with every run whose process died since (a command line killed, a crash) shown interrupted, as
    ``recover_runs`` leaves it, instead of running until the app restarts."""
    return [(info.status == "running" and recover_run(info.path)) or info for info in list_runs(root)]


def utc_time(seconds: float | None = None) -> str:
    """A POSIX time (now by default) as manifests record times: UTC, ISO 8601 to the second. One format for every
    time a manifest holds, so that runs sort by them as strings (``list_runs``)."""
    return datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc).isoformat(timespec="seconds")


def list_runs(root: Path | None = None) -> list[RunInfo]:
    """Past runs, newest started first; directories without a manifest are not runs."""
    root = root or runs_root()
    if not root.is_dir():
        return []
    runs = [RunInfo(p, read_manifest(p)) for p in root.iterdir() if (p / MANIFEST).is_file()]
    return sorted(runs, key=lambda r: (r.started, r.name), reverse=True)


def run_bytes(path: Path) -> int:
    """What a run folder holds on disk, its checkpoint included; a file that goes while it is counted (another process's
    temporary file, renamed) counts nothing."""
    total = 0
    for f in Path(path).rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:
            pass
    return total


def prune_runs(root: Path, max_bytes: float, keep=()) -> list[str]:
    """Delete the oldest ended runs until the runs under ``root`` fill at most ``max_bytes``; the names deleted.

    Never a running run, one named in ``keep``, or one that a process holds the lock of (``runstore.locks``: another
    process resuming or evaluating it); a fine-tuned run that a kept preference-tuning run started from goes only after
    that run (its three-way comparison needs it). What is left may still be over the budget.
    """
    runs = list_runs(root)[::-1]
    sizes = {run.name: run_bytes(run.path) for run in runs}
    total, deleted, busy = sum(sizes.values()), [], set()
    while total > max_bytes:
        parents = {run.manifest.get("parent_run") for run in runs}
        victim = next((run for run in runs if run.status != "running" and run.path.resolve() not in _WRITING
                       and run.name not in keep and run.name not in parents and run.name not in busy), None)
        if victim is None:
            break
        with RunLock(victim.path) as lock:
            try:
                free = lock.acquire()
            except OSError:
                free = True
            if not free:
                busy.add(victim.name)
                continue
            shutil.rmtree(victim.path, ignore_errors=True)
        runs.remove(victim)
        total -= sizes[victim.name]
        deleted.append(victim.name)
    return deleted


def find_run(name: str | Path, root: Path | None = None) -> RunInfo | None:
    """A run under ``root`` by directory name or path; None for anything else (never an arbitrary folder)."""
    wanted = Path(name)
    for run in list_runs(root):
        if run.name == str(name) or run.path.resolve() == wanted.resolve():
            return run
    return None


def run_folder(name: str) -> Path:
    """A run for a command line: by name under the runs folder, or a run folder's path; ``ValueError`` otherwise."""
    if not str(name).strip():
        raise ValueError("no run given: name a run under the runs folder, or a run folder")
    run = find_run(name)
    if run is not None:
        return run.path
    if (Path(name) / MANIFEST).is_file():
        return Path(name)
    raise ValueError(f"no run named {name!r} under the runs folder, and {name!r} is not a run folder (no {MANIFEST})")


def parent_folder(run_dir: Path, manifest: dict) -> Path:
    """The fine-tuned run a DPO run started from: beside it first (a runs folder moved whole), else where it was."""
    beside = Path(run_dir).parent / manifest["parent_run"]
    return beside if (beside / MANIFEST).is_file() else Path(manifest["parent_dir"])


def load_run(path: Path, device=None, dtype=None):
    """The fine-tuned model of a run, through the same loader as any checkpoint."""
    import torch

    from model import load_pretrained

    return load_pretrained(Path(path), device=device, dtype=dtype or torch.float32)
