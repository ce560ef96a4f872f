"""What more than one tab shows: progress bars, clocks, run pickers. Tabs import this, never each other."""
from __future__ import annotations

import html
import re
import time
from pathlib import Path
from typing import Callable

import gradio as gr

from data import STYLES
from runstore.store import loss_name

from .theme import notice

__all__ = ["notice", "bar", "clock", "listed", "number", "run_label", "trained_runs", "finished_run_choices", "kept_or_newest", "keep_or_fill", "data_name", "no_runs_note", "loss_text", "model_label", "live_chart", "stop_job", "as_int",
           "resumable_runs", "resume_job", "run_finished", "saved_run", "playground_button", "style_radio"]

STYLE_LABELS = {"alpaca": "Alpaca (the book's)", "phi3": "Phi-3 (exercise 7.1: shorter prompts)"}


def style_radio(elem_id: str) -> gr.Radio:
    """The prompt format, as the Dataset tab shows a record and the Train tab trains on it (in a row, it wraps onto a
    line of its own on a phone rather than squeezing its neighbours)."""
    return gr.Radio([(STYLE_LABELS.get(s, s), s) for s in STYLES], value=STYLES[0], label="Prompt format", min_width=330,
                    elem_id=elem_id)


def form_values(preset: str) -> dict:
    """The settings a preset fills the Train tab's form with: the offline demo's for tiny, else the book's."""
    from training.config import DEMO, defaults

    return DEMO if preset == "tiny" else defaults()


def suggested_mask(engine) -> bool:
    """Whether a page opens with the prompt masked: as the form of the model it suggests (the offline demo masks it,
    the book's settings do not), so that the Dataset tab's record view opens as that run would train on it."""
    return form_values(engine.suggested_model())["mask_prompt"]


COPY_JS = "(value) => value"  # an event that sets its output to its input in the browser, with no call to the server


def link_prompt_controls(train: tuple[gr.Checkbox, gr.Radio], view: tuple[gr.Checkbox, gr.Radio]) -> None:
    """The Train tab's "Mask the prompt" and prompt format and the Dataset tab's record view are one choice: a
    visitor's change to either moves the other. (Page load sets both from ``suggested_mask``, not through this link:
    the two tabs load at once, and the record view would be drawn from a dataset not loaded yet.)"""
    for mine, other in ((train, view), (view, train)):
        for control, follower in zip(mine, other):
            control.input(None, control, follower, js=COPY_JS)


def saved_run(snap: dict) -> bool:
    """Whether the lane's last run ended with a model saved (done, or stopped after a step): one to open in the Playground."""
    final = snap.get("final")
    return bool(final and final.get("steps")) and not snap.get("error") and snap["status"] in ("done", "stopped")


def playground_button(shared, text: str, elem_id: str) -> gr.Button:
    """A button, hidden until a tab's poll shows it, that opens the run that just finished (the visitor's latest seen,
    ``runs_changed``) in the Playground, at the top of the page, not at the depth the page was scrolled to."""
    button = gr.Button(text, visible=False, size="sm", elem_id=elem_id)
    button.click(lambda latest: (gr.Tabs(selected="playground"), {"run": (latest or {}).get("run"), "at": time.time()}),
                 shared.runs_changed, [shared.tabs, shared.open_run], api_visibility="private",
                 js="(latest) => { window.scrollTo({top: 0}); return [latest]; }", concurrency_limit=None, show_progress="hidden")
    return button


def kept_or_newest(choices: list[tuple[str, str]], current: str | None) -> str | None:
    """A run picker's value: ``current`` while it is one of the (label, name) ``choices``, else the first (the
    newest), else None."""
    names = [name for _, name in choices]
    return current if current in names else (names[0] if names else None)


def keep_or_fill(choices: list[tuple[str, str]], current: str | None, fill: Callable[[], tuple], outputs: int) -> tuple:
    """A run picker brought up to date: while ``current`` is still listed, only its list changes (the choice and what
    the tab shows for it stay: answers, results); else ``fill()`` picks a run and shows it (the picker and ``outputs``
    more)."""
    if current in {name for _, name in choices}:
        return (gr.Dropdown(choices=choices),) + (gr.skip(),) * outputs
    return fill()


def run_finished(snap: dict, seen: dict | None) -> tuple:
    """(this finish, ``{"run", "job"}``, when a job's snapshot says its run has finished, else None; the shared
    "latest finished run" update: this finish the first time this browser sees it (``seen["finished"]`` differs),
    which refreshes every tab's run list, else ``gr.skip()``).

    The job's start time tells one finish of a run from the next: a run stopped, then resumed to its end, finishes twice.
    """
    finished = {"run": snap["run"], "job": snap["started_at"]} if snap.get("run") and snap["status"] in ("done", "stopped") else None
    return finished, finished if finished and (seen or {}).get("finished") != finished else gr.skip()


def stop_job(engine, lane: str, client_id: str | None, nothing: str, stopping: str) -> str:
    """Ask the lane's job to stop for this browser: ``stopping`` when it will, ``nothing`` when no job runs, else why not."""
    from engine import JobError

    try:
        stopped = engine.stop(lane, client_id)
    except JobError as e:
        return notice(html.escape(str(e)), "error")
    return notice(stopping, "info") if stopped else notice(nothing)


def as_int(value, name: str, allow_none: bool = False) -> int | None:
    """A form's number as a whole number; a ``ConfigError`` naming the field otherwise."""
    from training.config import ConfigError

    if allow_none and (value is None or value == ""):
        return None
    value = number(value, name)
    if value != int(value):
        raise ConfigError(f"{name} must be a whole number, got {value}")
    return int(value)


def zero_is_none(value, name: str, zero: str) -> int | None:
    """A form's box where 0 means no limit ("Max steps (0: all)") as the settings take it: None for 0, and a negative
    number refused in the box's own terms (``zero`` says what 0 means)."""
    from training.config import ConfigError

    n = as_int(value, name, allow_none=True)
    if n is not None and n < 0:
        raise ConfigError(f"{name} must be 0 ({zero}) or more, got {n}")
    return n or None


def number(value, name: str) -> float:
    """A form's number as a float; a ``ConfigError`` naming the field when it is empty, not a number, or not finite
    (an API client may send any of them)."""
    import math

    from training.config import ConfigError

    if value is None or value == "":
        raise ConfigError(f"{name}: enter a number")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    return value


SETTING_NAMES = {"lr": "learning rate", "lora_alpha": "LoRA alpha", "lora_rank": "LoRA rank", "eval_every": "evaluate every"}


def form_error(error: Exception, typed: str | None = None) -> str:
    """An error notice for a form: a setting the message starts with (``max_steps``, ``lr``) is named as the form
    labels it (a file name such as ``alpaca_data.json`` is left as it is), and server paths are cut to their last
    part, except the path the visitor ``typed``."""
    from dataclasses import fields

    from engine.public import scrub
    from training import TrainConfig
    from training.dpo import DPOConfig

    settings = {f.name for config in (TrainConfig, DPOConfig) for f in fields(config)}
    text = re.sub(r"^([a-z_]+)\b(?!\.)", lambda m: SETTING_NAMES.get(m[1], m[1].replace("_", " ")) if m[1] in settings
                  else m[1], str(error))
    parts = text.split(typed) if typed else [text]
    return notice(html.escape((typed or "").join(scrub(part) for part in parts)), "error")


def listed(items: list[str], shown: int = 5) -> str:
    """``#3, #4 and 2 more``: the first few of a list."""
    more = len(items) - shown
    return ", ".join(items[:shown]) + (f" and {more:,} more" if more > 0 else "")


def plural(n: int, noun: str) -> str:
    """``1 record``, ``1,100 records``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def meta_row(items) -> str:
    """One row of a progress panel's small facts (status, step, speed, settings), wrapping as the width allows."""
    return f'<div class="gi-progress-meta">{"".join(f"<span>{item}</span>" for item in items)}</div>'


def bar(fraction: float, extra: str = "") -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return f'<div class="gi-track"><div class="gi-fill {extra}" style="width:{pct:.1f}%"></div></div>'


def sample_answers_html(snap: dict, before: str, references: tuple[tuple[str, str], ...]) -> str:
    """A run's fixed validation instruction, the model's answer at each evaluation (the newest first, ``before``
    naming step 0), then the record's ``references`` as (key, caption)."""
    record = snap.get("sample_instruction")
    if not record:
        return notice("At every evaluation the model answers one fixed validation instruction; its answers appear here.")

    def when(response: dict) -> str:
        return before if response["step"] == 0 else f"step {response['step']}"

    def answer(response: dict) -> str:
        return html.escape(response["response"]) or "<i>(empty)</i>"

    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    parts = [f'<div class="gi-caption">Validation instruction</div><div class="instruction">{html.escape(prompt)}</div>']
    items = snap.get("responses") or []
    if items:
        latest = items[-1]
        parts.append(f'<div class="gi-caption">Model\'s answer, {when(latest)}</div><div class="response">{answer(latest)}</div>')
        older = "".join(f'<div class="gi-older"><span class="gi-caption">{when(r)}:</span> {answer(r)}</div>' for r in reversed(items[:-1]))
        if older:
            parts.append(f'<div class="gi-older-list">{older}</div>')
    for key, caption in references:
        if record.get(key):
            parts.append(f'<div class="gi-caption">{caption}</div><div class="response">{html.escape(record[key])}</div>')
    return f'<div class="gi-sample">{"".join(parts)}</div>'


def loss_text(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def data_name(source: str) -> str:
    """A run's data as the Dataset tab names it: "bundled sample", "canonical (book, ch. 7)", "the book's preference
    pairs", or an upload's file name."""
    from data.cache import file_label
    from engine.datasets import BUILT_IN

    return BUILT_IN.get(source) or ("the book's preference pairs" if source == "preference" else file_label(source))


def model_label(manifest: dict) -> str:
    """``gpt2 (random init)`` or ``gpt2``: what a run started from."""
    config = manifest.get("config") or {}
    return str(config.get("model", "?")) + (" (random init)" if config.get("random_init") else "")


def val_loss_text(summary: dict, dpo: bool = False) -> str:
    """``runstore.val_loss_text``, a dash when there is none; with ``dpo``, a preference-tuned run's marked (DPO)."""
    from runstore.store import val_loss_text as text

    loss = text(summary)
    return "–" if loss is None else loss + (" (DPO)" if dpo and summary.get("method") == "dpo" else "")


def run_label(run) -> str:
    loss = val_loss_text(run.manifest)
    ended = "" if run.status == "done" else f" · {run.status} at step {run.last_step:,}"
    return f"{run.name} · {model_label(run.manifest)}{ended}" + (f" · {loss_name(run.manifest)} {loss}" if loss != "–" else "")


def trained_runs(engine, statuses=("done", "stopped", "interrupted")) -> list:
    """Runs with saved weights that took at least one step, newest first: a run stopped before its first step
    (an older one may have saved its starting weights) has nothing to compare or evaluate."""
    return [run for run in engine.runs() if run.has_weights and run.status in statuses and run.last_step > 0]


def finished_run_choices(engine) -> list[tuple[str, str]]:
    """Runs with saved weights, newest first, as (label, run name) choices."""
    return [(run_label(run), run.name) for run in trained_runs(engine)]


def no_runs_note(engine, text: str, use: str, level: str = "info") -> str:
    """What a tab with no run picked says: ``text`` (how to get a first run) while no run has finished, unless a
    fine-tuning run is going now: then that it can be used here (``use``) once it is saved; to pick one when some
    have finished (an API client that named none)."""
    from engine import ACTIVE, SCALARS_ONLY

    if trained_runs(engine):
        return notice("No run picked: pick a fine-tuned run from the list.", level)
    snap = engine.snapshot("train", since=SCALARS_ONLY)
    if snap["status"] in ACTIVE and snap["kind"] == "fine-tuning":
        return notice(f"No finished run yet: a fine-tuning run is going now in the <b>Train</b> tab; {use} here once "
                      "it is saved.", level)
    return notice(text, level)


def resumable_runs(runs, dpo: bool, current: str | None = None, being_resumed: set[str] = frozenset()):
    """A run picker for the Resume button: the stopped or interrupted runs with a checkpoint, preference-tuned ones
    (``dpo``) or fine-tuned ones, newest first, but those ``being_resumed`` (``Engine.resuming``); ``current`` stays
    picked while it can be resumed, else the newest."""
    choices = [(resume_label(run), run.name) for run in runs
               if run.resumable and (run.manifest.get("method") == "dpo") == dpo and run.name not in being_resumed]
    return gr.Dropdown(choices=choices, value=kept_or_newest(choices, current))


def resume_label(run) -> str:
    """Where a run ended and, when its last checkpoint is older (an interrupted run), the step it goes on from."""
    saved = run.manifest.get("checkpoint_step")
    since = f", resumes from step {saved}" if isinstance(saved, int) and saved != run.last_step else ""
    return f"{run.name} · {run.status} at step {run.last_step}{since}"


def resume_job(engine, client_id: str | None, name: str | None):
    """Continue a stopped or interrupted run, owned by this browser from now on: (message, Start button, Stop button)."""
    from engine import JobError
    from training.config import ConfigError

    if not client_id:
        return notice("This browser has no session id yet: reload the page.", "error"), gr.skip(), gr.skip()
    if not name:
        return notice("Pick a stopped or interrupted run to resume.", "error"), gr.skip(), gr.skip()
    try:
        engine.resume_training(name, owner=client_id)
    except (ConfigError, JobError, ValueError, OSError) as e:
        return form_error(e), gr.skip(), gr.skip()
    return notice(f"Resuming <b>{html.escape(name)}</b> from its checkpoint.", "ok"), gr.Button(interactive=False), \
        gr.Button(interactive=True)


LIVE_CHART_JS = (Path(__file__).with_name("live_chart.js")).read_text()


def live_chart(elem_id: str, height: int = 380) -> gr.HTML:
    """A Plotly chart drawn in the browser from messages (see ``charts.live_figure_message``): new points keep the zoom."""
    return gr.HTML(value=None, html_template=f'<div class="gi-live-chart" style="min-height:{height}px"></div>',
                   js_on_load=LIVE_CHART_JS, elem_id=elem_id, padding=False)
