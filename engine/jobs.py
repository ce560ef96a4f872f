"""One fine-tuning run at a time, in a background thread, observed through ``snapshot()``.

The UI never owns training state: it calls ``start`` / ``stop`` and polls
``snapshot()``, a copy made under a lock, so any number of visitors can watch
the same run while only the session that started it may stop it.
"""
from __future__ import annotations

import copy
import logging
import threading
import time

from training.config import TrainConfig
from training.events import Download, Finished, Logged, Started, Status
from training.loop import Hooks, train

log = logging.getLogger(__name__)
ACTIVE = ("starting", "loading", "training", "evaluating", "stopping", "saving")


class JobError(RuntimeError):
    """A start or stop that cannot be done now; the message says why."""


def _fresh_state() -> dict:
    return {
        "version": 0, "status": "idle", "message": "", "owner": None, "config": None, "run_dir": None,
        "step": 0, "total_steps": 0, "steps_per_epoch": 0, "epoch": 0.0, "epochs": 0, "tokens_seen": 0,
        "lr": None, "tokens_per_s": 0.0, "elapsed_s": 0.0, "eta_s": None, "history": [], "responses": [],
        "sample_instruction": None, "download": None, "error": None, "final": None, "device": None,
        "parameters": None, "trainable_parameters": None, "started_at": None,
    }


class TrainingJob:
    def __init__(self):
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = _fresh_state()

    def start(self, config: TrainConfig, owner: str | None = None) -> None:
        """Begin a run in the background; ``JobError`` if one is already running."""
        config.validate()
        with self._lock:
            if self._state["status"] in ACTIVE:
                raise JobError(f"a fine-tuning run is already running ({self._state['status']}, step "
                               f"{self._state['step']}/{self._state['total_steps']}); wait for it or stop it first")
            self._stop.clear()
            self._state = _fresh_state()
            self._state.update(status="starting", message="Starting", owner=owner, config=config.to_dict(),
                               epochs=config.epochs, started_at=time.time(), version=1)
            self._thread = threading.Thread(target=self._run, args=(config,), name="fine-tuning", daemon=True)
            self._thread.start()

    def stop(self, owner: str | None = None) -> bool:
        """Ask the run to stop at the next step boundary (it saves what it has). False if nothing runs."""
        with self._lock:
            if self._state["status"] not in ACTIVE:
                return False
            if self._state["owner"] is not None and owner != self._state["owner"]:
                raise JobError("only the browser session that started this run can stop it")
            self._state.update(status="stopping", message="Stopping at the next step", version=self._state["version"] + 1)
        self._stop.set()
        return True

    @property
    def running(self) -> bool:
        with self._lock:
            return self._state["status"] in ACTIVE

    @property
    def version(self) -> int:
        """Grows with every change: a poller compares it before asking for a whole snapshot."""
        with self._lock:
            return self._state["version"]

    def snapshot(self) -> dict:
        """A consistent copy of the run's state; ``version`` grows with every change."""
        with self._lock:
            state = copy.deepcopy(self._state)
        if state["status"] in ACTIVE and state["started_at"]:
            state["elapsed_s"] = time.time() - state["started_at"]
        return state

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run's thread ends; True when it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def _run(self, config: TrainConfig) -> None:
        try:
            train(config, Hooks(on_event=self._on_event, should_stop=self._stop.is_set))
        except Exception as e:  # the thread must end in a state the UI can show, whatever happened
            log.exception("fine-tuning failed")
            self._update(status="failed", message=f"Failed: {e}", error=f"{type(e).__name__}: {e}")

    def _update(self, **fields) -> None:
        with self._lock:
            self._state.update(fields)
            self._state["version"] += 1

    def _on_event(self, event) -> None:
        with self._lock:
            s = self._state
            if isinstance(event, Status):
                if not (s["status"] == "stopping" and event.status in ("training", "evaluating")):
                    s.update(status=event.status, message=event.message)
                if event.step is not None:
                    s["step"] = event.step
            elif isinstance(event, Download):
                s["download"] = {"file": event.file, "done": event.done, "total": event.total}
            elif isinstance(event, Started):
                s.update(run_dir=event.run_dir, total_steps=event.total_steps, steps_per_epoch=event.steps_per_epoch,
                         device=event.device, parameters=event.parameters,
                         trainable_parameters=event.trainable_parameters, sample_instruction=event.sample_instruction)
            elif isinstance(event, Logged):
                record = event.record
                s["history"].append(record)
                s.update(step=record["step"], epoch=record["epoch"], tokens_seen=record["tokens_seen"], lr=record["lr"],
                         tokens_per_s=record["tokens_per_s"], eta_s=record["eta_s"])
                if event.response is not None:
                    s["responses"].append({"step": record["step"], "response": event.response})
            elif isinstance(event, Finished):
                summary = event.summary
                s.update(status=summary["status"], final=dict(summary), eta_s=0.0, elapsed_s=summary["wall_time_s"],
                         message=f"{summary['status'].capitalize()} after {summary['steps']} steps; saved to {summary['run_dir']}")
            s["version"] += 1
