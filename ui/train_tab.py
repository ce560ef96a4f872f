"""Train tab: settings, Start / Stop, and the run drawn live for every visitor.

The engine runs one fine-tuning job at a time, shared by all visitors. A
``gr.Timer`` polls its snapshot with the number of history rows this visitor
already has, so only new rows travel; the chart draws them in the browser and
keeps the visitor's zoom. Only the browser that started a run (its id in
``gr.BrowserState``) may stop it.
"""
from __future__ import annotations

import html
from functools import partial
from pathlib import Path

import gradio as gr

from data import DatasetError
from engine import ACTIVE, SCALARS_ONLY, JobError, public_data
from engine.engine import PREFERENCE
from engine.public import scrub
from model import HUB_PRESETS, PRESETS
from runstore import METRICS, read_metrics
from training import ConfigError, TrainConfig
from training.config import DEMO, defaults, demo_text
from training.estimate import Estimate, all_presets

from .charts import live_figure_message, live_rows_message
from .widgets import (COPY_JS, as_int, bar, clock, data_name, form_error, form_values, link_prompt_controls, live_chart, loss_text,
                      meta_row, model_label, notice, number, playground_button, plural, resumable_runs, resume_job, run_finished, sample_answers_html,
                      saved_run, stop_job, style_radio, val_loss_text, zero_is_none)

TITLE = "Train"
RUN_HEADERS = ["run", "model", "data", "status", "steps", "val loss", "time"]
DEFAULTS = defaults()
BUILT_IN_NAMES = {"canonical": "the book's data", "sample": "the bundled sample"}


def preset_label(e: Estimate) -> str:
    if e.name == "tiny":
        return f"tiny · {e.params_label()} params · random weights, offline demo"
    return (f"{e.name} · {e.params_label()} params · full fine-tune ≈ {e.full_gb:.1f} GB · "
            f"LoRA ≈ {e.lora_gb:.1f} GB · inference ≈ {e.inference_gb:.2g} GB")


def make_config(preset: str, custom: str, random_init: bool, epochs, batch_size, lr, mask_prompt: bool, lora: bool,
                rank, alpha, grouped: bool, max_steps, eval_every, data: str, checkpoint_every=0, style=DEFAULTS["style"],
                max_length=0) -> TrainConfig:
    """The form's values as a ``TrainConfig``; every problem is a ``ConfigError`` naming the setting."""
    model = (custom or "").strip() or preset
    if not model:
        raise ConfigError("model: pick one from the list, or type a path or Hugging Face Hub id")
    if random_init and model not in PRESETS:
        raise ConfigError(f"random init builds one of the presets ({', '.join(PRESETS)}); untick it to load {model!r}")
    if model == "tiny" and not random_init:
        raise ConfigError("tiny has no pretrained weights: tick random init")
    return TrainConfig(
        model=model, random_init=bool(random_init), data=data, epochs=as_int(epochs, "epochs"),
        batch_size=as_int(batch_size, "batch size"), lr=number(lr, "learning rate"), mask_prompt=bool(mask_prompt), grouped=bool(grouped),
        lora_rank=as_int(rank, "LoRA rank") if lora else 0, lora_alpha=number(alpha, "LoRA alpha") if lora else DEFAULTS["lora_alpha"],
        max_steps=zero_is_none(max_steps, "max steps", "all of them"), eval_every=as_int(eval_every, "evaluate every"),
        checkpoint_every=as_int(checkpoint_every, "checkpoint every", allow_none=True) or 0, style=style or DEFAULTS["style"],
        max_length=zero_is_none(max_length, "max length", "the whole context"),
    )


def start(engine, client_id: str | None, dataset: dict | None, preset: str, custom: str, random_init: bool, epochs,
          batch_size, lr, mask_prompt: bool, lora: bool, rank, alpha, grouped: bool, max_steps, eval_every, checkpoint_every=0,
          style=DEFAULTS["style"], max_length=0):
    """Start a run owned by this browser; a bad setting, a limit or a run already going is reported, not raised."""
    if not client_id:
        return notice("This browser has no session id yet: reload the page.", "error"), gr.skip(), gr.skip()
    try:
        data = engine.datasets.training_source(dataset) if dataset else "sample"
        name = dataset["name"] if dataset else "bundled sample"
        config = make_config(preset, custom, random_init, epochs, batch_size, lr, mask_prompt, lora, rank, alpha,
                             grouped, max_steps, eval_every, data=data, checkpoint_every=checkpoint_every, style=style,
                             max_length=max_length)
        engine.start_training(config, owner=client_id)
    except (ConfigError, JobError, ValueError, OSError) as e:
        return form_error(e, typed=(custom or "").strip()), gr.skip(), gr.skip()
    text = f"Started fine-tuning <b>{html.escape(config.model)}</b> on <b>{html.escape(name)}</b>."
    return notice(text, "ok"), gr.Button(interactive=False), gr.Button(interactive=True)


def restore_dataset(engine, dataset: dict | None, remembered: dict | None):
    """Before a Start: the page's dataset choice, opened again from the browser's copy once the server's has expired
    (``session_minutes`` after it was made), so that the run trains on the data the page shows, not the sample."""
    if dataset or not remembered:
        return gr.skip()
    try:
        return engine.datasets.reopen(remembered)[0]
    except (DatasetError, OSError) as e:
        raise gr.Error(f"This page's dataset choice expired after {engine.limits.session_minutes:g} minutes and could "
                       f"not be opened again ({scrub(str(e))}): load a dataset in the Dataset tab.") from None


def stop(engine, client_id: str | None):
    return stop_job(engine, "train", client_id, "No run is going.", "Stopping at the next step; the model trained so far is saved.")


def settings_line(config: dict) -> str:
    """The run's settings in one line, so a visitor who reconnects sees what is running."""
    method = f"LoRA rank {config['lora_rank']}, alpha {config['lora_alpha']:g}" if config.get("lora_rank") else "full fine-tune"
    parts = [model_label({"config": config}), str(config["data"]), method, f"lr {config['lr']:g}", f"batch {config['batch_size']}",
             f"{config['epochs']} epoch{'s' if config['epochs'] != 1 else ''}", f"eval every {config['eval_every']}"]
    parts += ["prompt masked"] if config.get("mask_prompt") else []
    parts += [f"{config['style']} prompts"] if config.get("style", "alpaca") != "alpaca" else []
    parts += [f"max {config['max_steps']} steps"] if config.get("max_steps") else []
    parts += [f"rows cut at {config['max_length']:,} tokens"] if config.get("max_length") else []
    return html.escape(" · ".join(parts))


NO_VALIDATION = "No validation record is left once the too-long ones are left out: the chart shows no validation loss"


def progress_html(snap: dict) -> str:
    """Step x / y, tokens/s, elapsed, ETA and status; a second bar while weights download."""
    status = snap["status"]
    active = status in ACTIVE
    total, step = snap["total_steps"], snap["step"]
    meta = [f'<span class="gi-status {status}">{status}</span>',
            f"step <b>{step:,}</b> / {total:,}" if total else "step –",
            f"epoch {snap['epoch']:.2f} / {snap['epochs'] or '–'}",
            f"<b>{snap['tokens_per_s']:,.0f}</b> tokens/s",
            f"{clock(snap['elapsed_s'])} elapsed"]
    if active and snap["eta_s"] is not None and total:
        meta.append(f"ETA {clock(snap['eta_s'])}")
    parts = [bar(step / total if total else 0.0), meta_row(meta)]
    download = snap.get("download")
    if download and download.get("total") and download["done"] < download["total"] and active:
        done, size = download["done"] / 2**20, download["total"] / 2**20
        line = f'Downloading <b>{html.escape(download["file"])}</b>: {done:,.0f} / {size:,.0f} MB'
        parts += [meta_row([line]),
                  bar(done / size, "download")]
    info = [settings_line(snap["config"])] if snap.get("config") else []
    if snap.get("message") and active:
        info.append(html.escape(snap["message"]))
    if snap.get("device"):
        trained = snap["trainable_parameters"]
        share = "all trained" if trained == snap["parameters"] else f"{trained:,} trained (LoRA)"
        info.append(f"{html.escape(snap['device'])} · {snap['parameters']:,} parameters, {share}")
    if snap.get("val_records") == 0:
        info.append(NO_VALIDATION)
    if info:
        parts.append(meta_row(info))
    return f'<div class="gi-progress">{"".join(parts)}</div>'


def overlaid(run) -> bool:
    """A past run the loss chart may draw: one with a curve of the next-token loss (a preference-tuned run's DPO loss
    is another quantity, ln 2 at its start)."""
    return (run.path / METRICS).is_file() and run.manifest.get("method") != "dpo"


def idle_html(engine) -> str:
    """Before the first run since the app started: how to start one, and where the past runs are (a restart keeps them)."""
    text = "Choose a model and press <b>Start</b>; everyone who opens the app sees the run live."
    past = sum(map(overlaid, engine.runs()))
    if not past:
        return notice(f"No run yet. {text}")
    return notice(f"No run since the app started. {text} Past runs with curves: {past:,}. Pick any under "
                  "<b>Overlay past runs</b> to draw it here; <b>Past runs</b> below lists them all.")


def responses_html(snap: dict) -> str:
    """The fixed validation instruction, the model's answer at each evaluation, and the reference answer."""
    return sample_answers_html(snap, "before training", (("output", "Reference answer"),))


PATH_BOX = "…or a local path / Hugging Face Hub id"


def final_html(snap: dict, local_paths: bool = True) -> str:
    if snap.get("error"):
        hint = ""
        if snap["error"].startswith("WeightsError"):
            model = (snap.get("config") or {}).get("model")
            where = (f"Type a local folder holding model.safetensors and config.json in the <b>{PATH_BOX}</b> box"
                     if local_paths else "Choose a preset or check the Hugging Face Hub id")
            hint = (f"<br>You asked for <code>{html.escape(str(model))}</code>. " if model else "<br>") + (
                    f"{where}, or tick <b>Random init</b> for the offline demo.")
        return notice(f"<b>The run failed.</b> {html.escape(snap['error'])}{hint}", "error")
    final = snap.get("final")
    if not final:  # stopped while loading, before the run existed: its message says so
        return notice(html.escape(snap["message"])) if snap.get("status") == "stopped" and snap.get("message") else ""
    word, run = "Done" if final["status"] == "done" else "Stopped", html.escape(str(snap.get("run")))
    reason = f" ({html.escape(final['stop_reason'])})" if final.get("stop_reason") else ""
    return notice(
        f"<b>{word}</b>{reason} after {plural(final['steps'], 'step')} and {plural(final['tokens_seen'], 'token')} in "
        f"{clock(final['wall_time_s'])}: "
        f"train loss <b>{loss_text(final['final_train_loss'])}</b>, validation loss <b>{val_loss_text(final)}</b>. "
        + (f"Saved as run <code>{run}</code>." if final["steps"] else
           f"Run <code>{run}</code> stopped before its first step: nothing was trained, "
           "so no model was saved and the other tabs do not list it."), "ok")


def chart_message(engine, snap: dict, overlays: list[str] | None) -> str:
    """The whole live chart for this run and overlay choice, with the chosen past runs (by name) overlaid."""
    known = {run.name: run.path for run in engine.runs() if overlaid(run)} if overlays else {}
    past = [(name, read_metrics(known[name])) for name in overlays or [] if name in known]
    config = snap.get("config") or {}
    title = f"{config['model']} on {data_name(str(config['data']))}" if config else None
    return live_figure_message(chart_key(snap, overlays), snap["history"], past, title)


def chart_key(snap: dict, overlays: list[str] | None) -> str:
    return f"{snap['started_at']}|{'|'.join(sorted(overlays or []))}"


def poll(engine, client_id: str | None, seen: dict | None, overlays: list[str] | None):
    """One timer tick: only what changed since this visitor's last tick is computed and sent."""
    seen = dict(seen or {})
    latest = engine.snapshot("train", since=SCALARS_ONLY)
    if latest["kind"] == PREFERENCE:
        return preference_poll(latest, seen)
    key = chart_key(latest, overlays)
    have = seen.get("rows", 0) if seen.get("chart") == key else 0
    snap = engine.snapshot("train", since=have)
    active = snap["status"] in ACTIVE
    can_stop = active and snap["owner"] is not None and snap["owner"] == client_id
    changed = seen.get("version") != snap["version"]
    if have == 0 and (snap["history"] or seen.get("chart") != key):
        chart = chart_message(engine, snap, overlays)
    elif snap["history"]:
        chart = live_rows_message(key, snap["history"])
    else:
        chart = gr.skip()
    responses_key = [snap["started_at"], len(snap["responses"])]
    final_key = [snap["started_at"], snap["status"], snap.get("error")]
    finished, runs_changed = run_finished(snap, seen)
    # A run that ended takes the Start / Stop message with it: "Started…" or "only the browser…" is stale by then.
    # Its end also resets both buttons: a run that failed or finished within a tick was never seen active here.
    ended = None if active or snap["status"] == "idle" else snap["started_at"]
    just_ended = bool(ended) and seen.get("ended") != ended
    out = (
        chart,
        (idle_html(engine) if snap["status"] == "idle" else progress_html(snap)) if changed or active else gr.skip(),
        responses_html(snap) if seen.get("responses") != responses_key else gr.skip(),
        final_html(snap, engine.limits.local_paths) if seen.get("final") != final_key else gr.skip(),
        gr.Button(interactive=not active) if just_ended or seen.get("active") != active else gr.skip(),
        gr.Button(interactive=can_stop) if just_ended or seen.get("can_stop") != can_stop else gr.skip(),
    )
    message = "" if just_ended else gr.skip()
    to_playground = gr.Button(visible=saved_run(snap)) if seen.get("final") != final_key else gr.skip()
    seen.update(version=snap["version"], chart=key, rows=snap["history_len"], responses=responses_key, active=active,
                can_stop=can_stop, finished=finished, ended=ended, final=final_key)
    return out + (message, to_playground, seen, runs_changed)


def preference_poll(snap: dict, seen: dict):
    """While the shared lane holds preference tuning: a pointer to the Align tab, Start off until it ends."""
    active = snap["status"] in ACTIVE
    changed = seen.get("version") != snap["version"]
    what = "is going" if active else "was the last job here"
    text = notice(f"Preference tuning of <b>{html.escape(str((snap.get('config') or {}).get('parent')))}</b> {what} "
                  f"({html.escape(snap['status'])}, step {snap['step']:,} / {snap['total_steps']:,}): see the <b>Align</b> tab."
                  + (" One training job runs at a time: fine-tuning can start when it ends." if active else ""))
    finished, runs_changed = run_finished(snap, seen)
    seen.update(version=snap["version"], chart=None, rows=0, active=active, can_stop=False, finished=finished)
    skip = gr.skip()
    return (skip, text if changed else skip, skip, skip, gr.Button(interactive=not active) if changed else skip,
            gr.Button(interactive=False) if changed else skip, skip, gr.Button(visible=False) if changed else skip, seen,
            runs_changed)


def redraw(engine, overlays: list[str] | None, seen: dict | None):
    """The whole chart at once when the overlaid runs change."""
    snap = engine.snapshot("train")
    if snap["kind"] == PREFERENCE:  # its curves are drawn in the Align tab
        snap.update(history=[], history_len=0, config=None)
    seen = dict(seen or {})
    seen.update(chart=chart_key(snap, overlays), rows=snap["history_len"])
    return chart_message(engine, snap, overlays), seen


def job_status(engine) -> dict:
    """The shared run's state as plain data (everything but its owner's id)."""
    snap = engine.snapshot("train")
    snap.pop("owner", None)
    return snap


def run_config(preset: str, lora: bool, rank, epochs, batch_size, grouped: bool, max_steps, eval_every,
               mask_prompt: bool, style=DEFAULTS["style"], max_length=0) -> TrainConfig | None:
    """The form's run as far as its time goes, or None when it is one epoch at the loop's defaults (or not valid yet)."""
    try:
        config = make_config(preset, "", True, epochs, batch_size, DEFAULTS["lr"], mask_prompt, lora, rank, None, grouped,
                             max_steps, eval_every, data="sample", style=style, max_length=max_length)
    except (ConfigError, TypeError, ValueError):
        return None
    default = TrainConfig(model=preset, random_init=True)
    fields = ("epochs", "batch_size", "grouped", "max_steps", "eval_every", "mask_prompt", "style", "max_length")
    return None if all(getattr(config, f) == getattr(default, f) for f in fields) else config


def expected_html(engine, preset: str, lora: bool, rank, dataset: dict | None = None, *form, result=None) -> str:
    """The precision path with its reason, and the expected time measured on this machine: one epoch of the book's
    data; of the visitor's own data (the bundled sample when none is chosen); and, given the ``form``'s epochs,
    batch size, grouping, max steps, evaluation interval, prompt masking, format and max length, of the run it describes."""
    from model import pick_device
    from model.device import hardware_note, precision_reason

    reason = f"{html.escape(hardware_note())} Precision: {html.escape(precision_reason(pick_device()))}"
    lora_rank = int(rank or 16) if lora else 0
    found = result or engine.calibration(preset, lora_rank)
    method = f"LoRA rank {lora_rank}" if lora_rank else "full fine-tuning"
    last = last_trained_text(engine, preset, lora_rank, method, found)
    if found is None:
        when = (f"Expected epoch of the book's data for <b>{html.escape(preset)}</b>, {method}: not measured on this machine yet "
                "(<b>Measure</b> times a few real steps, a few seconds to a minute).")
        return notice(f"{when}{last}<br>{reason}.")
    when = (f"Expected on this machine for <b>{html.escape(preset)}</b>, {method}, evaluations included: one epoch of "
            f"{html.escape(found.timed_on)} <b>{clock(found.epoch_s)}</b> ({plural(found.steps, 'step')} at {found.tokens_per_s:,.0f} tokens/s)")
    source = dataset["source"] if dataset else "sample"
    name = BUILT_IN_NAMES.get(source) or html.escape(dataset["name"])
    if source != found.data:
        try:
            mine = engine.project_run(found, dataset)
            when += f"; of {name} <b>{clock(mine.total_s)}</b> ({plural(mine.steps, 'step')})"
        except ValueError as e:
            when += f"; none for {name}: {html.escape(scrub(str(e)))}"
    when += "."
    run = run_config(preset, lora, rank, *form) if form else None
    if run is not None:
        this_run = (f"This run, {run.epochs} epoch{'s' if run.epochs != 1 else ''} of {name} at batch {run.batch_size}"
                    f"{', prompts masked (the answers alone trained)' if run.mask_prompt else ''}"
                    f"{in_format(run.style)}{f', rows cut at {run.max_length:,} tokens' if run.max_length else ''}")
        try:
            this = engine.project_run(found, dataset, run)
            when += f"<br>{this_run}: <b>{clock(this.total_s)}</b> ({plural(this.steps, 'step')})."
        except ValueError as e:
            when += f"<br>{this_run}: none, {html.escape(scrub(str(e)))}."
    return notice(f"{when}{last}<br>{reason}.")


def in_format(style: str | None) -> str:
    """A run's prompt format where it is not the book's, as words to follow its data."""
    return " in the Phi-3 format" if style == "phi3" else ""


def last_trained_text(engine, preset: str, lora_rank: int, method: str, calibration=None) -> str:
    """The newest finished run of this preset and method here: what it took, and what the estimate says for it."""
    found = engine.last_trained(preset, lora_rank, calibration)
    if found is None:
        return ""
    run, expected = found
    m = run.manifest
    source = (m.get("data") or {}).get("source", "?")
    data = BUILT_IN_NAMES.get(source) or html.escape(Path(public_data(str(source))).name)
    data += in_format((m.get("config") or {}).get("style"))
    took = (m.get("train_time_s") or 0) + (m.get("eval_time_s") or 0)
    rate = m.get("tokens_seen", 0) / m["train_time_s"]
    said = f"; estimated for it: {clock(expected.total_s)}" if expected is not None else ""
    wall = m.get("wall_time_s")
    in_all = f" ({clock(wall)} in all, with loading)" if isinstance(wall, (int, float)) and clock(wall) != clock(took) else ""
    return (f"<br>Last finished run of {html.escape(preset)}, {method} here ({html.escape(run.name)}): "
            f"{m.get('steps', 0)} steps of {data} took <b>{clock(took)}</b> training and evaluating{in_all}, at "
            f"{rate:,.0f} tokens/s{said}.")


def measure(engine, preset: str, lora: bool, rank, dataset: dict | None = None, *form) -> str:
    """Time a few real training steps of the chosen preset and method (``Engine.measure``: alone on the machine).
    ``form``: as ``expected_html`` takes it, for the run's expected time."""
    try:
        result = engine.measure(preset, int(rank or 16) if lora else 0)
    except (JobError, ConfigError) as e:
        return notice(f"Not measured: {html.escape(scrub(str(e)))}.", "error")
    except DatasetError as e:  # neither the book's data nor the bundled sample could be read
        return notice(f"The expected epoch could not be measured: {html.escape(scrub(str(e)))}", "error")
    return expected_html(engine, preset, lora, rank, dataset, *form, result=result)


def runs_table(engine, resuming: str | None = None) -> tuple[list[list], dict, dict]:
    """Past runs as table rows, the overlay picker's choices (runs that logged metrics), and the resumable fine-tuning runs
    (a preference-tuning run resumes in the Align tab), keeping the one picked (``resuming``) while it is one."""
    rows, choices = [], []
    runs, being_resumed = engine.runs(), engine.resuming()
    for run in runs:
        m = run.manifest
        data = (m.get("data") or {}).get("source", "?")
        status = "resuming" if run.name in being_resumed and run.status != "running" else run.status
        rows.append([run.name, model_label(m), public_data(str(data)), status, m.get("steps", ""),
                     val_loss_text(m, dpo=True), clock(m.get("wall_time_s"))])
        if overlaid(run):
            choices.append((run.label(), run.name))
    return rows, gr.Dropdown(choices=choices), resumable_runs(runs, dpo=False, current=resuming, being_resumed=being_resumed)


def data_line(engine, dataset: dict | None, preset: str | None = None) -> str:
    """What the run trains on; with tiny on other data than the sample, that the demo's note is about the sample."""
    if not dataset:
        return notice("Data: <b>bundled sample</b> (change it in the Dataset tab).")
    demo = (" The offline demo's note above is about the bundled sample's 74 records; an epoch of these takes its own "
            "steps and time." if preset == "tiny" and dataset["source"] != "sample" else "")
    return notice(f"Data: <b>{html.escape(dataset['name'])}</b>, {plural(dataset['count'], 'record')} (change it in the Dataset "
                  f"tab).{demo}")


def limits_html(engine) -> str:
    """Each limit as its variable and value, its meaning beneath: a list that fits the form's narrow column and a phone."""
    rows = "".join(f"<dt><code>{html.escape(var)}</code> <b>{html.escape(value)}</b></dt><dd>{html.escape(text)}</dd>"
                   for var, value, text in engine.limits.rows())
    return f'<dl class="gi-limits">{rows}</dl>'


def model_note(preset: str, why: str = "", max_epochs: int = 100, local_paths: bool = True) -> str:
    """What this preset is (tiny: the offline demo and what it can show; GPT-2: a download on first use), within the
    server's epoch limit and whether it takes local paths; ``why`` the server preselected it, if it did."""
    if preset == "tiny":
        why = f"<b>tiny is preselected</b>: {html.escape(why)}. " if why else ""
        what, shows = demo_text(max_epochs, local_paths)
        return notice(f"{why}{html.escape(what)} The form holds the demo's settings: {min(DEMO['epochs'], max_epochs)} "
                      f"epochs, learning rate {DEMO['lr']:g}, prompt masked.<details class=\"gi-more\"><summary>What it "
                      f"can show, and how to see real instruction following</summary>{html.escape(shows)}</details>")
    repo = HUB_PRESETS.get(preset)
    if not repo:
        return ""
    return notice(f"{html.escape(preset)} starts from OpenAI's pretrained weights: untick <b>Random init</b> and they are "
                  f"downloaded once from the Hugging Face Hub (<code>{repo}</code>) and cached. The form holds the book's "
                  "settings.")


def preset_settings(preset: str, max_epochs: int = 100, why: str = "", local_paths: bool = True) -> tuple:
    """(random init, epochs, learning rate, mask prompt, note) for a chosen preset: the demo's for tiny, else the book's."""
    values = form_values(preset)
    return (preset == "tiny", min(values["epochs"], max_epochs), values["lr"], values["mask_prompt"],
            model_note(preset, why, max_epochs, local_paths))


def suggested_model(engine):
    model = engine.suggested_model()
    return (gr.Dropdown(value=model),) + preset_settings(model, engine.limits.max_epochs, engine.why_suggested(model),
                                                         engine.limits.local_paths)


def build(shared) -> None:
    engine = shared.engine
    allowed = engine.allowed_presets()
    presets = [e for e in all_presets() if e.name in allowed]
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            preset = gr.Dropdown([(preset_label(e), e.name) for e in presets], value="tiny" if "tiny" in allowed else allowed[0],
                                 label="Model", elem_id="model-preset")
            custom = gr.Textbox(label=PATH_BOX if engine.limits.local_paths else "…or a Hugging Face Hub id",
                                placeholder="e.g. ./my-gpt2 or openai-community/gpt2" if engine.limits.local_paths
                                else "e.g. openai-community/gpt2", elem_id="model-path")
            random_init = gr.Checkbox(value=True, label="Random init (no download: for the offline demo)", elem_id="random-init")
            note = gr.HTML(model_note("tiny", max_epochs=engine.limits.max_epochs, local_paths=engine.limits.local_paths),
                           elem_id="model-note")
            with gr.Row():
                epochs = gr.Number(value=min(DEMO["epochs"], engine.limits.max_epochs), label="Epochs", elem_id="epochs")
                batch_size = gr.Number(value=DEFAULTS["batch_size"], label="Batch size", elem_id="batch-size")
                lr = gr.Number(value=DEMO["lr"], step=1e-5, label="Learning rate", elem_id="learning-rate")
            with gr.Row():
                max_steps = gr.Number(value=0, label="Max steps (0: all)", elem_id="max-steps")
                eval_every = gr.Number(value=DEFAULTS["eval_every"], label="Evaluate every (steps)",
                                       elem_id="eval-every")
            mask_prompt = gr.Checkbox(value=DEMO["mask_prompt"], label="Mask the prompt (loss on the response only)",
                                      elem_id="train-mask-prompt")
            style = style_radio("train-prompt-style")
            grouped = gr.Checkbox(value=DEFAULTS["grouped"], label="Length-grouped batches (the book shuffles; padding is skipped either way)", elem_id="grouped")
            with gr.Row():
                checkpoint_every = gr.Number(value=DEFAULTS["checkpoint_every"],
                                             label="Checkpoint every (steps; 0: only when stopped)", elem_id="checkpoint-every")
                max_length = gr.Number(value=0, label="Max length (tokens a row keeps; 0: all 1,024)", elem_id="max-length")
            with gr.Accordion("LoRA", open=False):
                lora = gr.Checkbox(value=False, label="Train low-rank adapters instead of every weight", elem_id="lora")
                with gr.Row():
                    rank = gr.Slider(1, 64, value=16, step=1, label="Rank", elem_id="lora-rank")
                    alpha = gr.Number(value=DEFAULTS["lora_alpha"], label="Alpha", elem_id="lora-alpha")
            expected = gr.HTML(expected_html(engine, "tiny", False, 16), elem_id="expected-epoch")  # the column's width
            with gr.Row():
                measure_btn = gr.Button("Measure", size="sm", scale=0, min_width=90, elem_id="measure-btn")
            data = gr.HTML(data_line(engine, None), elem_id="train-data")
            with gr.Row():
                start_btn = gr.Button("Start fine-tuning", variant="primary", elem_id="start-btn")
                stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop-btn")
            message = gr.HTML(elem_id="train-message")
            with gr.Accordion("This server's limits", open=False):
                gr.HTML(limits_html(engine), elem_id="server-limits")
        with gr.Column(scale=3):
            progress = gr.HTML(elem_id="train-progress")
            loss_chart = live_chart("loss-chart")
            overlay = gr.Dropdown([], value=[], multiselect=True, label="Overlay past runs", allow_custom_value=True,
                                  elem_id="overlay-runs")  # custom: an API client names runs it never saw listed
            final = gr.HTML(elem_id="train-final")
            to_playground = playground_button(shared, "Compare it with its base model in the Playground →", "to-playground")
            responses = gr.HTML(elem_id="sample-responses")
    with gr.Accordion("Past runs", open=False):
        runs = gr.Dataframe(headers=RUN_HEADERS, interactive=False, wrap=True, elem_id="runs-table")
        with gr.Row(equal_height=True):
            resumable = gr.Dropdown([], value=None, label="Resume a stopped or interrupted run from its checkpoint", scale=4,
                                    min_width=300, allow_custom_value=True, elem_id="resume-run")  # a line of its own on a phone
            resume_btn = gr.Button("Resume", scale=1, elem_id="resume-btn")
            refresh = gr.Button("Refresh", size="sm", scale=1, elem_id="refresh-runs")

    seen = gr.State(None)
    cheap = dict(concurrency_limit=None, show_progress="hidden")
    settings = [preset, custom, random_init, epochs, batch_size, lr, mask_prompt, lora, rank, alpha, grouped, max_steps, eval_every,
                checkpoint_every, style, max_length]
    poll_outputs = [loss_chart, progress, responses, final, start_btn, stop_btn, message, to_playground, seen, shared.runs_changed]

    def on_poll(client_id, seen_, overlays):
        return poll(engine, client_id, seen_, overlays)

    preset_outputs = [random_init, epochs, lr, mask_prompt, note]
    shared.app.load(lambda: suggested_model(engine), None, [preset] + preset_outputs, api_visibility="private", **cheap)
    preset.input(lambda p: preset_settings(p, engine.limits.max_epochs, local_paths=engine.limits.local_paths), preset, preset_outputs,
                 api_visibility="private", **cheap).then(None, mask_prompt, shared.prompt_view[0], js=COPY_JS)  # the tiny demo masks
    link_prompt_controls((mask_prompt, style), shared.prompt_view)
    custom.input(lambda c, r: False if (c or "").strip() else r, [custom, random_init], random_init, api_visibility="private", **cheap)
    start_btn.click(partial(restore_dataset, engine), [shared.dataset, shared.remembered], shared.dataset,
                    api_visibility="private", **cheap).success(
        lambda *a: start(engine, *a), [shared.client_id, shared.dataset] + settings, [message, start_btn, stop_btn],
        api_name="start_training", concurrency_limit=1)
    stop_btn.click(lambda c: stop(engine, c), shared.client_id, message, api_name="stop_training", **cheap)
    shared.poll_while_shown(on_poll, [shared.client_id, seen, overlay], poll_outputs, api_name="poll_status", api_visibility="public")
    overlay.change(lambda o, s: redraw(engine, o, s), [overlay, seen], [loss_chart, seen], api_visibility="private", **cheap)
    for trigger in (shared.app.load, shared.tab.select, refresh.click, shared.runs_changed.change):
        trigger(partial(runs_table, engine), resumable, [runs, overlay, resumable], api_visibility="private", **cheap)
    resume_btn.click(partial(resume_job, engine), [shared.client_id, resumable], [message, start_btn, stop_btn],
                     api_name="resume_training", concurrency_limit=1).then(
        partial(runs_table, engine), resumable, [runs, overlay, resumable], api_visibility="private", **cheap)
    for trigger in (shared.dataset.change, preset.change):
        trigger(partial(data_line, engine), [shared.dataset, preset], data, api_visibility="private", **cheap)
    gr.api(partial(job_status, engine), api_name="job_status", concurrency_limit=None)
    expected_inputs = [preset, lora, rank, shared.dataset, epochs, batch_size, grouped, max_steps, eval_every, mask_prompt, style,
                       max_length]
    for trigger in [control.change for control in expected_inputs] + [shared.runs_changed.change]:
        trigger(partial(expected_html, engine), expected_inputs, expected, api_visibility="private", **cheap)
    measure_btn.click(partial(measure, engine), expected_inputs, expected, api_name="measure_epoch", concurrency_limit=1,
                      show_progress="minimal")
