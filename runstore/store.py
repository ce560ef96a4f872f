"""Runs on disk: one directory per fine-tuning run, every file written atomically.

    runs/<timestamp>-<model>/
        config.json, model.safetensors   the fine-tuned GPT-2 (save_pretrained)
        manifest.json                    settings, data, versions, device, times, final losses, status
        metrics.jsonl                    one JSON object per logged step
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from model.files import atomic_write

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
WEIGHTS = "model.safetensors"


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


def write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class RunWriter:
    """Writes a run's manifest and metrics as training goes."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest: dict = {}
        self.metrics: list[dict] = []

    def update_manifest(self, **fields) -> None:
        self.manifest.update(fields)
        write_atomic(self.dir / MANIFEST, json.dumps(self.manifest, indent=2, default=str))

    def log(self, record: dict) -> None:
        """Append one step's record; the file is rewritten whole so that no reader sees half a line."""
        self.metrics.append(record)
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
    def has_weights(self) -> bool:
        return (self.path / WEIGHTS).is_file()

    def label(self) -> str:
        final = self.manifest.get("final_val_loss")
        loss = f", val loss {final:.3f}" if isinstance(final, (int, float)) else ""
        return f"{self.name} ({self.status}{loss})"


def read_manifest(path: Path) -> dict:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def read_metrics(path: Path) -> list[dict]:
    try:
        lines = (Path(path) / METRICS).read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def list_runs(root: Path | None = None) -> list[RunInfo]:
    """Past runs, newest first; directories without a manifest are not runs."""
    root = root or runs_root()
    if not root.is_dir():
        return []
    runs = [RunInfo(p, read_manifest(p)) for p in root.iterdir() if (p / MANIFEST).is_file()]
    return sorted(runs, key=lambda r: r.name, reverse=True)


def find_run(name: str | Path, root: Path | None = None) -> RunInfo | None:
    """A run under ``root`` by directory name or path; None for anything else (never an arbitrary folder)."""
    wanted = Path(name)
    for run in list_runs(root):
        if run.name == str(name) or run.path.resolve() == wanted.resolve():
            return run
    return None


def process_alive(pid) -> bool:
    """True when ``pid`` is a live process other than this one."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_runs(root: Path | None = None) -> list[RunInfo]:
    """Runs left ``running`` by a process that is gone become ``interrupted``, with their last logged step.

    Called when the app or a CLI starts, before it starts runs of its own: a run
    that this process was writing cannot be going on any more, and a run whose
    recorded process is alive (a CLI run beside the app) is left alone.
    """
    recovered = []
    for run in list_runs(root):
        if run.status != "running" or process_alive(run.manifest.get("pid")):
            continue
        metrics = read_metrics(run.path)
        manifest = {**run.manifest, "status": "interrupted", "steps": metrics[-1]["step"] if metrics else 0,
                    "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "error": "the process running it ended before it finished (killed, crashed or shut down)"}
        write_atomic(run.path / MANIFEST, json.dumps(manifest, indent=2, default=str))
        recovered.append(RunInfo(run.path, manifest))
    return recovered


def load_run(path: Path, device=None, dtype=None):
    """The fine-tuned model of a run, through the same loader as any checkpoint."""
    import torch

    from model import load_pretrained

    return load_pretrained(Path(path), device=device, dtype=dtype or torch.float32)
