"""Align tab: preference tuning (DPO) of a finished fine-tuned run, drawn live for every visitor.

The job shares the engine's ``train`` lane with fine-tuning (one at a time).
The tab polls that lane and draws it only while its job is preference tuning;
the chart has the DPO loss on train and validation pairs and the validation
reward margin on a second axis, extended in the browser with new rows only.
A stopped or interrupted preference-tuning run resumes here from its checkpoint.
"""
from __future__ import annotations

import html
from functools import partial
from pathlib import Path

import gradio as gr

from data import FILE_KINDS, FILE_SUFFIXES, DatasetError, cache
from data.preference import PreferenceDataset, load_preferences
from engine import ACTIVE, SCALARS_ONLY, JobError
from engine.engine import PREFERENCE
from engine.public import scrub
from model import GPTConfig
from training import ConfigError
from training.dpo import DPOConfig

from .charts import live_figure_message, live_rows_message, preference_figure
from .widgets import (as_int, bar, clock, data_name, form_error, listed, kept_or_newest, live_chart, loss_text, meta_row, notice, number,
                      playground_button, plural, resumable_runs, resume_job, run_finished, sample_answers_html, run_label, saved_run,
                      stop_job, trained_runs, val_loss_text, zero_is_none)

TITLE = "Align"
NO_VALIDATION = ("No validation pair is left once the too-long ones are left out: the chart shows no validation DPO loss "
                 "and no reward margin")
DEFAULTS = DPOConfig(parent="-").to_dict()
DATA_CHOICES = [("The book's preference pairs: 1,100 polite (chosen) and impolite (rejected) answers", "preference"),
                (f"Your file: {FILE_KINDS} with chosen and rejected", "upload")]
NO_RUNS = ("No fine-tuned run yet: fine-tune one in the <b>Train</b> tab; preference tuning starts from its saved "
           "weights and aligns it with pairs of a chosen and a rejected answer.")


def parent_choices(engine) -> list[tuple[str, str]]:
    """Finished fine-tuned runs with saved weights (not themselves preference-tuned), newest first."""
    return [(run_label(run), run.name) for run in trained_runs(engine, ("done", "stopped"))
            if run.manifest.get("method") != "dpo"]


def refresh_parents(engine, current: str | None, resuming: str | None = None):
    """The parent picker (keeping its choice while it is offered), its note, and the resumable preference-tuning runs
    (keeping the one picked, ``resuming``, while it is one)."""
    choices = parent_choices(engine)
    value = kept_or_newest(choices, current)
    return (gr.Dropdown(choices=choices, value=value), policy_note(value),
            resumable_runs(engine.runs(), dpo=True, current=resuming, being_resumed=engine.resuming()))


def parent_note(engine, name: str | None) -> str:
    """The note for a run typed or picked in the parent picker (which takes custom values)."""
    if name and name not in {n for _, n in parent_choices(engine)}:
        return notice(f"<b>{html.escape(name)}</b> is not a finished fine-tuned run on this server: pick one from the "
                      "list.", "error")
    return policy_note(name)


def policy_note(name: str | None) -> str:
    """What preference tuning does with the picked run, or how to get one."""
    if not name:
        return notice(NO_RUNS)
    return notice(f"Policy: <b>{html.escape(name)}</b>, trained further. Reference: the same model, frozen; its "
                  "log-probabilities of every pair are computed once before the first step, so the loss starts at ln 2.")


def data_note() -> str:
    """Where the book's file comes from here; offline without a cached copy only an upload works."""
    if cache.is_preference_cached():
        return notice(f"The book's <b>{cache.PREFERENCE_NAME}</b> is cached on this server (split in file order, as in the book: 85 % train, 5 % validation, 10 % test).")
    return notice(f"The book's <b>{cache.PREFERENCE_NAME}</b> is downloaded once on first use (about 1 MB) and checked. "
                  "There is no bundled offline sample of preference pairs: offline, upload your own file "
                  "(records or CSV columns with instruction, input, chosen and rejected).")


def check_upload(upload: str | None):
    """A preference file checked as soon as it is chosen, "Your file" picked: its pairs counted, or its first problem named."""
    if not upload:
        return "", gr.skip()
    try:
        pairs = load_preferences(Path(upload))
    except DatasetError as e:
        return notice(html.escape(scrub(str(e))), "error"), "upload"
    checked = notice(f"<b>{html.escape(Path(upload).name)}</b>: {plural(len(pairs), 'preference pair')}, checked. Press "
                     "<b>Start</b> to align with them.", "ok")
    return checked + "".join(notice(html.escape(w), "error") for w in pair_warnings(pairs)), "upload"


def pair_warnings(pairs: list[dict]) -> list[str]:
    """What in a checked preference file will not train: pairs longer than the context, pairs with nothing to prefer."""
    warnings = []
    context = GPTConfig().block_size
    kept = {item["index"] for item in PreferenceDataset(pairs, max_length=context)}
    if too_long := [f"#{i + 1:,}" for i in range(len(pairs)) if i not in kept]:
        warnings.append(f"{plural(len(too_long), 'pair')} longer than GPT-2's {context:,}-token context (prompt and longer "
                        f"answer): training skips {'it' if len(too_long) == 1 else 'them'} ({listed(too_long)}).")
    if same := [f"#{i + 1:,}" for i, p in enumerate(pairs) if p["chosen"].strip() == p["rejected"].strip()]:
        warnings.append(f"{plural(len(same), 'pair')} with the same chosen and rejected answer, nothing to prefer: "
                        f"{'it teaches' if len(same) == 1 else 'they teach'} nothing ({listed(same)}).")
    return warnings


def start(engine, client_id: str | None, parent: str | None, source: str, upload: str | None, beta, lr, epochs,
          max_steps, batch_size, eval_every, lora: bool, rank, checkpoint_every=0):
    """Start preference tuning owned by this browser; every problem is a message naming it, nothing raised."""
    if not client_id:
        return notice("This browser has no session id yet: reload the page.", "error"), gr.skip(), gr.skip()
    try:
        if not parent:
            raise ValueError("pick a finished fine-tuned run to align")
        if source == "upload":
            if not upload:
                raise ValueError(f"choose a {FILE_KINDS} file of preference pairs to upload")
            data = engine.store_preference_upload(upload)
        else:
            data = "preference"
        settings = dict(data=data, beta=number(beta, "beta"), lr=number(lr, "learning rate"), epochs=as_int(epochs, "epochs"),
                        max_steps=zero_is_none(max_steps, "max steps", "all of them"),
                        batch_size=as_int(batch_size, "batch size"), eval_every=as_int(eval_every, "evaluate every"),
                        lora_rank=as_int(rank, "LoRA rank") if lora else 0,
                        checkpoint_every=as_int(checkpoint_every, "checkpoint every", allow_none=True) or 0)
        engine.start_preference(parent, owner=client_id, **settings)
    except (ConfigError, JobError, DatasetError, ValueError, OSError) as e:
        return form_error(e), gr.skip(), gr.skip()
    return notice(f"Started preference tuning of <b>{html.escape(parent)}</b>.", "ok"), gr.Button(interactive=False), \
        gr.Button(interactive=True)


def stop(engine, client_id: str | None) -> str:
    snap = engine.snapshot("train", since=SCALARS_ONLY)
    if snap["kind"] != PREFERENCE:
        return notice("No preference tuning is going.")
    return stop_job(engine, "train", client_id, "No preference tuning is going.",
                    "Stopping at the next step; the model aligned so far is saved.")


def settings_line(config: dict) -> str:
    method = f"LoRA rank {config['lora_rank']}" if config.get("lora_rank") else "all weights"
    parts = [f"from {config['parent']}", str(config["data"]), f"beta {config['beta']:g}", f"lr {config['lr']:g}",
             f"batch {config['batch_size']}", f"{config['epochs']} epoch{'s' if config['epochs'] != 1 else ''}",
             f"eval every {config['eval_every']}", method]
    parts += [f"max {config['max_steps']} steps"] if config.get("max_steps") else []
    return html.escape(" · ".join(parts))


def progress_html(snap: dict, last: dict | None) -> str:
    """Step x / y, pairs/s and tokens/s, elapsed, ETA; a bar for the reference pass before the first step."""
    status = snap["status"]
    active = status in ACTIVE
    total, step = snap["total_steps"], snap["step"]
    pairs, tokens = (last or {}).get("pairs_seen"), (last or {}).get("tokens_seen")
    meta = [f'<span class="gi-status {status}">{status}</span>',
            f"step <b>{step:,}</b> / {total:,}" if total else "step –",
            f"<b>{snap['tokens_per_s']:,.0f}</b> tokens/s"]
    if pairs and tokens:
        meta.append(f"<b>{snap['tokens_per_s'] * pairs / tokens:,.1f}</b> pairs/s")
    meta.append(f"{clock(snap['elapsed_s'])} elapsed")
    if active and snap["eta_s"] is not None and total:
        meta.append(f"ETA {clock(snap['eta_s'])}")
    parts = [bar(step / total if total else 0.0), meta_row(meta)]
    reference = snap.get("progress") or {}
    if active and reference.get("phase") == "reference" and reference["done"] < reference["total"]:
        line = f"Reference log-probabilities: <b>{reference['done']:,}</b> / {reference['total']:,} pairs"
        parts += [meta_row([line]), bar(reference["done"] / reference["total"], "download")]
    info = [settings_line(snap["config"])] if snap.get("config") else []
    if snap.get("message") and active:
        info.append(html.escape(snap["message"]))
    if snap.get("device"):
        info.append(f"{html.escape(snap['device'])} · {snap['trainable_parameters']:,} of {snap['parameters']:,} parameters trained")
    if snap.get("val_records") == 0:
        info.append(NO_VALIDATION)
    if info:
        parts.append(meta_row(info))
    return f'<div class="gi-progress">{"".join(parts)}</div>'


def responses_html(snap: dict) -> str:
    """The fixed validation instruction, the policy's answer at each evaluation, and the pair's chosen and rejected
    answers."""
    return sample_answers_html(snap, "before aligning", (("chosen", "Chosen answer"), ("rejected", "Rejected answer")))


def final_html(snap: dict) -> str:
    if snap.get("error"):
        return notice(f"<b>Preference tuning failed.</b> {html.escape(snap['error'])}", "error")
    final = snap.get("final")
    if not final:
        return ""
    word = "Done" if final["status"] == "done" else "Stopped"
    accuracy = final.get("final_val_reward_accuracy")
    accuracy = f"{accuracy:.0%}" if isinstance(accuracy, (int, float)) else "–"
    return notice(
        f"<b>{word}</b> after {plural(final['steps'], 'step')} and {plural(final.get('pairs_seen', 0), 'pair')} in "
        f"{clock(final['wall_time_s'])}: "
        f"validation DPO loss <b>{val_loss_text(final)}</b>, reward margin "
        f"<b>{loss_text(final.get('final_val_reward_margin'))}</b>, reward accuracy <b>{accuracy}</b>. Saved as run "
        f"<code>{html.escape(str(snap.get('run')))}</code>.", "ok")


def other_job_html(snap: dict, aligned: list[str] = ()) -> str:
    """What the tab says while the shared lane holds no preference tuning (``aligned``: the saved aligned runs)."""
    if snap["status"] in ACTIVE:
        return notice("A fine-tuning run is going (see the <b>Train</b> tab): one training job runs at a time, so "
                      "preference tuning can start when it ends.")
    start = "Pick a fine-tuned run and press <b>Start</b>; everyone who opens the app sees it live."
    if aligned:
        return notice(f"No preference tuning is going. {plural(len(aligned), 'aligned run')} saved here (the newest: "
                      f"<b>{html.escape(aligned[0])}</b>): compare them in the <b>Playground</b> and score them in "
                      f"<b>Evaluate</b>. To align another, {start[0].lower()}{start[1:]}")
    return notice(f"No preference tuning yet. {start}")


def chart_key(snap: dict) -> str:
    return f"dpo|{snap['started_at']}"


def poll(engine, client_id: str | None, seen: dict | None):
    """One timer tick: this visitor gets only what changed, and new chart rows only."""
    seen = dict(seen or {})
    latest = engine.snapshot("train", since=SCALARS_ONLY)
    active = latest["status"] in ACTIVE
    finished, runs_changed = run_finished(latest, seen)
    if latest["kind"] != PREFERENCE:
        changed = seen.get("version") != ("other", latest["version"])
        seen.update(version=("other", latest["version"]), rows=0, active=active, can_stop=False, finished=finished)
        aligned = [run.name for run in trained_runs(engine) if run.manifest.get("method") == "dpo"] if changed else []
        # The empty chart says what will draw there, once: left blank, it was 380 px of nothing above the answers.
        chart = live_figure_message("none", [], figure=preference_figure([])) if seen.get("chart") != "none" else gr.skip()
        seen["chart"] = "none"
        return (chart, other_job_html(latest, aligned) if changed else gr.skip(), gr.skip(), gr.skip(),
                gr.Button(interactive=not active) if changed else gr.skip(), gr.Button(interactive=False) if changed else gr.skip(),
                gr.skip(), gr.Button(visible=False) if changed else gr.skip(), seen, runs_changed)
    key = chart_key(latest)
    have = seen.get("rows", 0) if seen.get("chart") == key else 0
    snap = engine.snapshot("train", since=have)
    can_stop = active and snap["owner"] is not None and snap["owner"] == client_id
    changed = seen.get("version") != snap["version"]
    last = snap["history"][-1] if snap["history"] else seen.get("last")
    if have == 0:
        config = snap.get("config") or {}
        title = f"{config.get('parent')}: DPO on {data_name(str(config.get('data')))}" if config else None
        chart = live_figure_message(key, snap["history"], figure=preference_figure(snap["history"], title))
    elif snap["history"]:
        chart = live_rows_message(key, snap["history"])
    else:
        chart = gr.skip()
    responses_key = [snap["started_at"], len(snap["responses"])]
    ended = None if active else snap["started_at"]
    out = (
        chart,
        progress_html(snap, last) if changed or active else gr.skip(),
        responses_html(snap) if seen.get("responses") != responses_key else gr.skip(),
        final_html(snap) if changed else gr.skip(),
        gr.Button(interactive=not active) if changed or seen.get("active") != active else gr.skip(),
        gr.Button(interactive=can_stop) if changed or seen.get("can_stop") != can_stop else gr.skip(),
        "" if ended and seen.get("ended") != ended else gr.skip(),
        gr.Button(visible=saved_run(snap)) if changed else gr.skip(),
    )
    seen.update(version=snap["version"], chart=key, rows=snap["history_len"], responses=responses_key, active=active,
                can_stop=can_stop, finished=finished, ended=ended,
                last={k: (last or {}).get(k) for k in ("tokens_seen", "pairs_seen")})
    return out + (seen, runs_changed)


def build(shared) -> None:
    engine = shared.engine
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            with gr.Row(equal_height=True):
                parent = gr.Dropdown([], value=None, label="Fine-tuned run to align", allow_custom_value=True, scale=5, elem_id="align-run")
                refresh = gr.Button("↻", size="sm", scale=0, min_width=48, elem_id="align-refresh-runs")
            parent_info = gr.HTML(notice(NO_RUNS), elem_id="align-run-info")
            source = gr.Radio(DATA_CHOICES, value="preference", label="Preference data", elem_id="align-data")
            upload = gr.File(label="Preference pairs file", file_types=list(FILE_SUFFIXES),
                             height=110, elem_id="align-upload")
            gr.HTML(data_note(), elem_id="align-data-note")
            with gr.Row():
                beta = gr.Number(value=DEFAULTS["beta"], label="Beta", step=0.05, elem_id="align-beta")
                lr = gr.Number(value=DEFAULTS["lr"], label="Learning rate", step=1e-6, elem_id="align-lr")
                batch_size = gr.Number(value=DEFAULTS["batch_size"], label="Batch size (pairs)",
                                       elem_id="align-batch-size")
            with gr.Row():
                epochs = gr.Number(value=DEFAULTS["epochs"], label="Epochs", elem_id="align-epochs")
                max_steps = gr.Number(value=0, label="Max steps (0: all)", elem_id="align-max-steps")
                eval_every = gr.Number(value=DEFAULTS["eval_every"], label="Evaluate every (steps)",
                                       elem_id="align-eval-every")
            checkpoint_every = gr.Number(value=DEFAULTS["checkpoint_every"],
                                         label="Checkpoint every (steps; 0: only when stopped)", elem_id="align-checkpoint-every")
            with gr.Accordion("LoRA", open=False):
                lora = gr.Checkbox(value=False, label="Train low-rank adapters instead of every weight", elem_id="align-lora")
                rank = gr.Slider(1, 64, value=16, step=1, label="Rank", elem_id="align-lora-rank")
            with gr.Row():
                start_btn = gr.Button("Start preference tuning", variant="primary", elem_id="align-start-btn")
                stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="align-stop-btn")
            message = gr.HTML(elem_id="align-message")
            with gr.Row(equal_height=True):
                resumable = gr.Dropdown([], value=None, label="Resume a stopped or interrupted DPO run from its checkpoint",
                                        scale=4, min_width=300, allow_custom_value=True, elem_id="align-resume-run")  # a line of its own on a phone
                resume_btn = gr.Button("Resume", scale=1, elem_id="align-resume-btn")
        with gr.Column(scale=3):
            progress = gr.HTML(elem_id="align-progress")
            chart = live_chart("align-chart")
            final = gr.HTML(elem_id="align-final")
            to_playground = playground_button(shared, "Compare base, fine-tuned and aligned in the Playground →",
                                              "align-to-playground")
            responses = gr.HTML(elem_id="align-responses")

    seen = gr.State(None)
    cheap = dict(concurrency_limit=None, show_progress="hidden")
    poll_outputs = [chart, progress, responses, final, start_btn, stop_btn, message, to_playground, seen, shared.runs_changed]
    settings = [parent, source, upload, beta, lr, epochs, max_steps, batch_size, eval_every, lora, rank, checkpoint_every]
    start_btn.click(partial(start, engine), [shared.client_id] + settings, [message, start_btn, stop_btn],
                    api_name="start_preference", concurrency_limit=1)
    stop_btn.click(partial(stop, engine), shared.client_id, message, api_name="stop_preference", **cheap)
    upload.change(check_upload, upload, [message, source], api_name="check_preference_file", **cheap)
    resume_btn.click(partial(resume_job, engine), [shared.client_id, resumable], [message, start_btn, stop_btn],
                     api_name="resume_preference", concurrency_limit=1).then(
        partial(refresh_parents, engine), [parent, resumable], [parent, parent_info, resumable], api_visibility="private", **cheap)
    on_poll = partial(poll, engine)
    shared.poll_while_shown(on_poll, [shared.client_id, seen], poll_outputs)
    for trigger in (shared.app.load, shared.tab.select, refresh.click, shared.runs_changed.change):
        trigger(partial(refresh_parents, engine), [parent, resumable], [parent, parent_info, resumable],
                api_visibility="private", **cheap)
    parent.input(partial(parent_note, engine), parent, parent_info, api_visibility="private", **cheap)
