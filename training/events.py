"""What a long task tells its watchers: typed events, emitted through ``Hooks.on_event``.

The fine-tuning loop, preference tuning and evaluation emit these; the CLI turns
them into a progress bar and the engine's jobs into the snapshot that the app polls.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Status:
    """A phase change: loading, training, evaluating, stopping, saving."""

    status: str
    message: str = ""
    step: int | None = None


@dataclass(frozen=True)
class Download:
    """Bytes of a weights file fetched so far."""

    file: str
    done: int
    total: int


@dataclass(frozen=True)
class Started:
    """The run exists on disk and its size is known."""

    run_name: str
    run_dir: str  # on the server: the CLI prints it, the app shows only run_name
    total_steps: int
    steps_per_epoch: int
    epochs: int
    device: str
    parameters: int
    trainable_parameters: int
    sample_instruction: dict | None = None
    train_records: int = 0
    val_records: int = 0  # usable ones: 0 when every validation record is left out, and no validation loss is logged
    start_step: int = 0  # above 0 when a run resumes from a checkpoint
    elapsed_before_s: float = 0.0  # the run's wall time before this resume
    method: str = "sft"
    skipped_records: int = 0  # training records longer than the context, left out
    context: int = 0
    no_answer_records: int = 0  # training records left out since, prompt masked, their prompt fills max_length
    max_length: int = 0  # the tokens a batch is cut to
    precision: str = ""  # the precision path and why, e.g. "fp32: this CPU has no native bf16 matmul (...)"


@dataclass(frozen=True)
class Logged:
    """One metrics row (what ``metrics.jsonl`` gets); ``response`` is set at an evaluation."""

    record: dict
    response: str | None = None

    @classmethod
    def replay(cls, row: dict) -> "Logged":
        """A row as ``metrics.jsonl`` keeps it (``RunWriter.log``), its sample response apart again."""
        return cls({k: v for k, v in row.items() if k != "response"}, response=row.get("response"))

    @property
    def step(self) -> int:
        return self.record["step"]


@dataclass(frozen=True)
class Progress:
    """Work measured in items rather than steps (evaluation): ``payload`` says which phase and how far."""

    payload: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Finished:
    """The task ended (done or stopped) and its result is saved; ``summary`` is what the manifest got."""

    summary: dict


Event = Status | Download | Started | Logged | Progress | Finished
