"""One job abstraction for every long task: fine-tuning, preference tuning, evaluation.

A ``Job`` runs ``work(hooks)`` in a background thread. It is started with an
owner (who alone may stop it), stops cooperatively (``hooks.should_stop()``),
and folds the typed events of ``training.events`` into a state that any number
of visitors poll with ``snapshot(since)``: a versioned, shallow view that sends
only the history rows a poller has not seen yet.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from data.errors import DatasetError
from model.weights import WeightsError
from runstore.locks import RunBusy
from training.checkpoint import ResumeError
from training.config import ConfigError
from training.events import Download, Finished, Logged, Progress, Started, Status
from training.loop import Hooks

from .public import scrub

log = logging.getLogger(__name__)
ACTIVE = ("starting", "loading", "reference", "training", "evaluating", "stopping", "saving")
ENDED = ("done", "stopped", "failed")
SCALARS_ONLY = 10**9  # a ``since`` past any history: a snapshot without its rows
# Failures whose message says all (weights that cannot be had offline, bad data or settings, a busy run): logged as
# one warning line, not as an error with a traceback the server's operator need not read.
EXPECTED_FAILURES = (ConfigError, DatasetError, ResumeError, RunBusy, WeightsError)


class JobError(RuntimeError):
    """A start or stop that cannot be done now; the message says why."""


def fresh_state(kind: str = "", title: str = "") -> dict:
    return {
        "version": 0, "kind": kind, "title": title, "status": "idle", "message": "", "owner": None, "config": None,
        "run": None, "method": None, "step": 0, "start_step": 0, "total_steps": 0, "steps_per_epoch": 0, "epoch": 0.0,
        "epochs": 0, "tokens_seen": 0, "lr": None, "tokens_per_s": 0.0, "elapsed_s": 0.0, "eta_s": None,
        "responses": [], "sample_instruction": None, "download": None, "progress": None, "error": None, "final": None,
        "result": None, "device": None, "parameters": None, "trainable_parameters": None, "started_at": None,
        "val_records": None,
    }


class Job:
    """One long task: ``work(hooks)`` returns its result (a dict) or raises; events update the shared state."""

    def __init__(self, kind: str, work: Callable[[Hooks], dict | None], owner: str | None = None, title: str = "",
                 config: dict | None = None):
        self.kind, self._work = kind, work
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_reason: bool | str = True  # what ``should_stop`` says once stopped: True (its owner) or a reason
        self._history: list[dict] = []  # rows are never changed once appended, so a slice can be shared
        self._state = fresh_state(kind, title)
        self._state.update(status="starting", message=f"Starting {title or kind}", owner=owner, config=config,
                           started_at=time.time(), version=1)
        self._thread = threading.Thread(target=self._run, name=kind, daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    @property
    def owner(self) -> str | None:
        return self._state["owner"]

    @property
    def active(self) -> bool:
        with self._lock:
            return self._state["status"] in ACTIVE

    def stop(self, owner: str | None = None, reason: str | None = None) -> bool:
        """Ask the task to stop at its next boundary (a run saves what it has). False when it is not running.

        Only its owner may; the server itself gives a ``reason`` instead (it is shutting down)."""
        with self._lock:
            if self._state["status"] not in ACTIVE:
                return False
            if reason is None and self._state["owner"] is not None and owner != self._state["owner"]:
                raise JobError(f"Only the browser session that started this {self._state['title'] or self.kind} can stop it.")
            self._stop_reason = reason or True
            self._state.update(status="stopping", message=f"Stopping ({reason or 'stopped by its owner'})",
                               version=self._state["version"] + 1)
        self._stop.set()
        return True

    def should_stop(self) -> bool | str:
        """False while it may go on; once stopped, True (its owner stopped it) or the reason."""
        return self._stop_reason if self._stop.is_set() else False

    def snapshot(self, since: int = 0) -> dict:
        """The state with ``history`` holding rows ``since`` onwards and ``history_len`` all of them; no deep copy."""
        with self._lock:
            state = dict(self._state)
            state["history"] = self._history[since:]
            state["history_len"] = len(self._history)
            state["responses"] = list(state["responses"])
        if state["status"] in ACTIVE and state["started_at"]:  # a resumed run's clock goes on from where it stopped
            state["elapsed_s"] = state.get("elapsed_before_s", 0.0) + time.time() - state["started_at"]
        return state

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task's thread ends; True when it has."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            result = self._work(Hooks(on_event=self.on_event, should_stop=self.should_stop))
            with self._lock:
                self._state["result"] = result
                if self._state["status"] not in ENDED:  # a task that emits no Finished (evaluation)
                    stopped = self._stop.is_set()
                    self._state.update(status="stopped" if stopped else "done", message="Stopped" if stopped else "Done")
                self._state["version"] += 1
        except Exception as e:  # the thread must end in a state the UI can show, whatever happened
            stopped = self._stop.is_set() and type(e).__name__.endswith("Stopped")
            if stopped:
                log.info("%s stopped: %s", self.kind, e)
            elif isinstance(e, EXPECTED_FAILURES):
                log.warning("%s failed: %s", self.kind, e)
            else:
                log.exception("%s failed", self.kind)
            self._update(status="stopped" if stopped else "failed", message=scrub(str(e)),
                         error=None if stopped else f"{type(e).__name__}: {scrub(str(e))}")

    def _update(self, **fields) -> None:
        with self._lock:
            self._state.update(fields)
            self._state["version"] += 1

    def on_event(self, event) -> None:
        with self._lock:
            s = self._state
            if isinstance(event, Status):
                if not (s["status"] == "stopping" and event.status in ("training", "evaluating")):
                    s.update(status=event.status, message=event.message)
                if event.step is not None:  # the epoch with it, as a logged row has it: not the last row's
                    s["step"] = event.step
                    if s.get("steps_per_epoch"):
                        s["epoch"] = round(event.step / s["steps_per_epoch"], 4)
            elif isinstance(event, Download):
                s["download"] = {"file": event.file, "done": event.done, "total": event.total}
            elif isinstance(event, Started):
                s.update(run=event.run_name, total_steps=event.total_steps, steps_per_epoch=event.steps_per_epoch,
                         epochs=event.epochs, device=event.device, parameters=event.parameters, method=event.method,
                         trainable_parameters=event.trainable_parameters, sample_instruction=event.sample_instruction,
                         start_step=event.start_step, step=event.start_step, elapsed_before_s=event.elapsed_before_s,
                         val_records=event.val_records)
            elif isinstance(event, Logged):
                record = event.record
                self._history.append(record)
                s.update(step=record["step"], epoch=record.get("epoch", s["epoch"]), tokens_seen=record.get("tokens_seen", 0),
                         lr=record.get("lr"), tokens_per_s=record.get("tokens_per_s", 0.0), eta_s=record.get("eta_s"))
                if event.response is not None:
                    s["responses"].append({"step": record["step"], "response": event.response})
            elif isinstance(event, Progress):
                s["progress"] = event.payload
            elif isinstance(event, Finished):
                summary = {k: v for k, v in event.summary.items() if k != "run_dir"}
                s.update(status=summary["status"], final=summary, eta_s=0.0, elapsed_s=summary.get("wall_time_s", s["elapsed_s"]),
                         message=f"{summary['status'].capitalize()} after step {summary.get('steps', 0):,}; saved as {s['run']}")
            s["version"] += 1


def idle_snapshot() -> dict:
    """What a lane with no job yet shows."""
    state = fresh_state()
    state.update(history=[], history_len=0)
    return state
