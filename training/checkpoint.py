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
from contextlib import contextmanager
from pathlib import Path

import torch

from data.batching import restore_loader
from model import pick_dtype
from model.device import precision_reason
from model.files import atomic_write
from runstore import CHECKPOINT, MANIFEST, RunBusy, busy_message, hold_run, in_use, read_manifest, recover_run

from .config import TrainConfig
from .events import Status

FORMAT = 1
# Settings a resumed run may change: none of them changes what is trained.
CHANGEABLE = ("checkpoint_every", "max_wall_s", "eval_every", "eval_batches", "sample_tokens")


class ResumeError(ValueError):
    """A run that cannot be resumed as asked; the message says why."""


def run_precision(device: torch.device, precision: str | None, manifest: dict | None = None) -> tuple[torch.dtype, str]:
    """A run's compute dtype and why (``precision_reason``). A resumed run (its ``manifest``) whose precision is "auto"
    keeps the dtype it trained in (the manifest's device, "CPU, bfloat16"): its checkpoint holds that precision's master
    weights, and it goes on as if it had never stopped, also where auto would pick the other one (another machine)."""
    dtype, reason = pick_dtype(device, precision), precision_reason(device, precision)
    if manifest is None or precision not in (None, "auto"):
        return dtype, reason
    saved = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        str(manifest.get("device", "")).rpartition(", ")[2])
    if saved is None or saved == dtype:
        return dtype, reason
    name = "bf16" if saved == torch.bfloat16 else "fp32"
    slow = ", emulated here: many times slower than fp32" if saved == torch.bfloat16 and device.type == "cpu" else ""
    return saved, f"{name}: the run trained in {name} before it stopped, and goes on in it{slow} (auto takes {reason})"


def save_checkpoint(run_dir: Path, optimizer, *, step: int, epoch: int, tokens_seen: int, clock, epoch_start: dict | None = None,
                    last_train: float | None = None, last_val: float | None = None, **extra) -> None:
    """Write the checkpoint at ``step``; ``epoch_start`` is ``loader_state(loader)`` as it was when ``epoch`` began.

    ``extra``: what else a trainer needs back (tensors, numbers, strings, lists and dicts of them).
    """
    state = {
        "format": FORMAT, "step": step, "epoch": epoch, "data": epoch_start, "tokens_seen": tokens_seen,
        "clock": {"elapsed_s": clock.elapsed, "train_s": clock.train_s, "eval_s": clock.eval_s, "evals": clock.evals},
        "last_train": last_train, "last_val": last_val, "rng": rng_state(), "optimizer": optimizer.state_dict(), **extra,
    }
    path = Path(run_dir) / CHECKPOINT

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # through Python's file, whose error (a full disk) torch's then carries
            torch.save(state, f)

    failure = None
    try:
        atomic_write(path, write)
    except (RuntimeError, OSError) as e:  # torch's words for a failed write ("unexpected pos 29696 vs 29584"), the file's
        cause = e if isinstance(e, OSError) else e.__context__  # error (a full disk) as their context, or the close's
        if not isinstance(cause, OSError):
            raise
        failure = cause.errno, cause.strerror
    if failure:  # one error that names the file, raised once torch's (and the frames it holds) are gone
        raise OSError(*failure, str(path))


def checkpoint_run(writer, emit, optimizer, *, step: int, write: bool = True, **state) -> int:
    """Save a checkpoint of the run ``writer`` writes (``write``: this process writes files) and say so; the step."""
    emit(Status("saving", f"Checkpoint at step {step}", step))
    if write:
        save_checkpoint(writer.dir, optimizer, step=step, **state)
    writer.update_manifest(checkpoint_step=step)
    return step


def load_checkpoint(run_dir: Path) -> dict:
    """The run's checkpoint; a run stopped at its step goes on from the wall time its manifest shows, the save at the
    stop included (the checkpoint's clock was read before it), so that the resumed clock never reads less than the stop."""
    path = Path(run_dir) / CHECKPOINT
    if path.is_file() and path.stat().st_size == 0:
        raise ResumeError(f"{Path(run_dir).name}: its checkpoint is an empty file (the disk filled up, or it was cut short)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise ResumeError(f"{Path(run_dir).name}: its checkpoint cannot be read ({e})") from None
    if state.get("format") != FORMAT:
        raise ResumeError(f"{Path(run_dir).name}: the checkpoint has format {state.get('format')}, this version reads {FORMAT}")
    manifest = read_manifest(run_dir) or {}
    wall = manifest.get("wall_time_s")
    if manifest.get("status") == "stopped" and manifest.get("steps") == state.get("step") and isinstance(wall, (int, float)):
        state["clock"]["elapsed_s"] = max(state["clock"]["elapsed_s"], wall)
    return state


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore(checkpoint: dict, optimizer, clock) -> None:
    """Put the trained weights with their AdamW state, the RNG and the clock back where the checkpoint left them."""
    optimizer.load_state_dict(checkpoint.pop("optimizer"))
    restore_rng(checkpoint["rng"])
    saved = checkpoint["clock"]
    clock.before_s, clock.train_s, clock.eval_s, clock.evals = (saved[k] for k in ("elapsed_s", "train_s", "eval_s", "evals"))


def mark_resumed(writer, step: int, **fields) -> None:
    """Reopen a run's manifest as running again from ``step``: its end (reason, error, steps) cleared, the resume listed."""
    for key in ("error", "stop_reason", "ended", "steps"):
        writer.manifest.pop(key, None)
    writer.update_manifest(**fields, resumed_from_step=writer.manifest.get("resumed_from_step", []) + [step])


def start_epoch(loader, state: dict) -> int:
    """Put the loader where it stood when the checkpoint's epoch began; that epoch."""
    restore_loader(loader, state["data"])
    return state["epoch"]


def resumable(run_dir: Path, held: bool = False, dpo: bool = False) -> dict:
    """The manifest of the run in ``run_dir`` if it can be resumed as a fine-tuning run (``dpo``: as a DPO run); else
    ``ResumeError`` saying why, the wrong kind of run first (a run of the other kind is no use even when done).

    A run that its manifest says is running but whose process is gone is marked interrupted first. One whose lock
    another process or job holds (``runstore.locks``) is refused, unless the caller's resume holds it (``held``: the
    resume under way checks the run again, or torchrun's other ranks, whose rank 0 holds it).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    name = run_dir.name
    if manifest and not held and in_use(run_dir):
        raise ResumeError(busy_message(run_dir))
    if not manifest:
        damaged = (run_dir / MANIFEST).is_file()
        raise ResumeError(f"{name}: its {MANIFEST} cannot be read (empty or damaged)" if damaged else f"{name}: not a run (no {MANIFEST})")
    if dpo and manifest.get("method") != "dpo":
        raise ResumeError(f"{name} is a fine-tuning run, not a preference-tuning one: resume it with python -m training --resume {name}")
    if not dpo and manifest.get("method") == "dpo":
        raise ResumeError(f"{name} is a preference-tuning (DPO) run: resume it with python -m training.dpo --resume {name}")
    recover_run(run_dir)
    manifest = read_manifest(run_dir)
    status = manifest.get("status")
    if status == "running":
        raise ResumeError(f"{name} is still running; stop it before resuming it")
    if status == "done":
        raise ResumeError(f"{name} is done ({manifest.get('steps')} steps): there is nothing to resume")
    if not (run_dir / CHECKPOINT).is_file():
        raise ResumeError(f"{name} ({status} at step {manifest.get('steps', 0)}) has no checkpoint to resume from; "
                          "runs save one when stopped after their first step, and every N steps with --checkpoint-every N")
    return manifest


def refuse_changes(changes: dict, saved: dict, changeable: tuple[str, ...] = CHANGEABLE) -> None:
    """Refuse ``changes`` to settings outside ``changeable``; one that repeats the ``saved`` value changes nothing
    (the run's own command line, with --resume added, is fine)."""
    refused = sorted(key for key, value in changes.items() if key not in changeable and saved.get(key) != value)
    if refused:
        raise ResumeError(f"a resumed run keeps its settings, so that it trains as if it had never stopped; "
                          f"{', '.join(refused)} cannot change (only {', '.join(changeable)} can)")


@contextmanager
def holding(resume: Path | None, writes: bool = True):
    """The lock of the run being resumed (``runstore.locks``), held from before its checks until it has ended; None for
    a new run (its writer takes one) or a process that does not write (torchrun's other ranks). Two processes that
    resumed one run at once both trained it, each over the other's files."""
    if resume is None or not writes:
        yield None
        return
    try:
        lock = hold_run(resume)
    except RunBusy as e:
        raise ResumeError(str(e)) from None
    with lock:
        yield lock


def resume_config(run_dir: Path, held: bool = False, **changes) -> TrainConfig:
    """The settings of the fine-tuning run in ``run_dir`` (with ``changes`` to those in ``CHANGEABLE``), if it can be
    resumed (``held``: as ``resumable``)."""
    manifest = resumable(run_dir, held)
    refuse_changes(changes, manifest["config"])
    return TrainConfig.from_dict({**manifest["config"], **changes, "out": str(run_dir)})


def check_unchanged(saved: dict, config, changeable: tuple[str, ...] = CHANGEABLE) -> None:
    """Refuse a resume whose settings differ from the run's (``saved``), apart from ``changeable`` ones and the folder."""
    changed = [key for key, value in config.to_dict().items() if key not in changeable + ("out",) and saved.get(key) != value]
    if changed:
        raise ResumeError("a resumed run keeps its settings, so that it trains as if it had never stopped; "
                          + ", ".join(f"{key} was {saved.get(key)!r}, not {getattr(config, key)!r}" for key in changed))


def check_resume(run_dir: Path, config: TrainConfig) -> None:
    """Refuse a resume whose settings differ from the run's, apart from ``CHANGEABLE`` ones and the folder."""
    check_unchanged(resume_config(run_dir, held=True).to_dict(), config)
