"""Checkpoints: what a run needs to go on as if it had never stopped, in one file that appears whole.

``checkpoint.pt`` in the run folder holds the trained parameters' master weights and
AdamW state (``MasterWeightAdamW.state_dict``), the step, the data order (the
loader's state at the start of the epoch in progress), the clock, the last losses
and the RNG states; each checkpoint replaces the one before. A resumed run rebuilds
the model from its settings (frozen weights included), loads this, skips the
batches of the epoch already trained and carries on: its losses are those of a
run that never stopped.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from data.batching import restore_loader
from model.files import atomic_write
from runstore import CHECKPOINT, read_manifest, recover_run

from .config import TrainConfig

FORMAT = 1
# Settings a resumed run may change: none of them changes what is trained.
CHANGEABLE = ("checkpoint_every", "max_wall_s", "eval_every", "eval_batches", "sample_tokens")


class ResumeError(ValueError):
    """A run that cannot be resumed as asked; the message says why."""


def save_checkpoint(run_dir: Path, optimizer, *, step: int, epoch: int, epoch_start: dict, tokens_seen: int,
                    clock, last_train: float, last_val: float) -> None:
    """Write the checkpoint at ``step``; ``epoch_start`` is ``loader_state(loader)`` as it was when ``epoch`` began."""
    state = {
        "format": FORMAT, "step": step, "epoch": epoch, "data": epoch_start, "tokens_seen": tokens_seen,
        "clock": {"elapsed_s": clock.elapsed, "train_s": clock.train_s, "eval_s": clock.eval_s, "evals": clock.evals},
        "last_train": last_train, "last_val": last_val, "rng": rng_state(), "optimizer": optimizer.state_dict(),
    }
    atomic_write(Path(run_dir) / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise ResumeError(f"{Path(run_dir).name}: its checkpoint cannot be read ({e})") from None
    if state.get("format") != FORMAT:
        raise ResumeError(f"{Path(run_dir).name}: the checkpoint has format {state.get('format')}, this version reads {FORMAT}")
    return state


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def start_epoch(loader, state: dict) -> int:
    """Put the loader where it stood when the checkpoint's epoch began; that epoch."""
    restore_loader(loader, state["data"])
    return state["epoch"]


def resume_config(run_dir: Path, **changes) -> TrainConfig:
    """The settings of the run in ``run_dir`` (with ``changes`` to those in ``CHANGEABLE``), if it can be resumed.

    A run that its manifest says is running but whose process is gone is marked interrupted first.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    name = run_dir.name
    if not manifest:
        raise ResumeError(f"{name}: not a run (no manifest.json)")
    recover_run(run_dir)
    status = read_manifest(run_dir).get("status")
    if status == "running":
        raise ResumeError(f"{name} is still running; stop it before resuming it")
    if status == "done":
        raise ResumeError(f"{name} is done ({manifest.get('steps')} steps): there is nothing to resume")
    if not (run_dir / CHECKPOINT).is_file():
        raise ResumeError(f"{name} ({status} at step {manifest.get('steps', 0)}) has no checkpoint to resume from; "
                          "runs save one when stopped, and every N steps with --checkpoint-every N")
    refused = sorted(set(changes) - set(CHANGEABLE))
    if refused:
        raise ResumeError(f"a resumed run keeps its settings, so that it trains as if it had never stopped; "
                          f"{', '.join(refused)} cannot change (only {', '.join(CHANGEABLE)} can)")
    return TrainConfig.from_dict({**manifest["config"], **changes, "out": str(run_dir)})


def check_resume(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a resume whose settings differ from the run's, apart from ``CHANGEABLE`` ones and the folder."""
    saved = resume_config(run_dir).to_dict()
    changed = [key for key, value in config.to_dict().items() if key not in CHANGEABLE + ("out",) and saved.get(key) != value]
    if changed:
        raise ResumeError("a resumed run keeps its settings, so that it trains as if it had never stopped; "
                          + ", ".join(f"{key} was {saved.get(key)!r}, not {getattr(config, key)!r}" for key in changed))

