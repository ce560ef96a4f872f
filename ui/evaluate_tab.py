"""Evaluate tab: score a run's base and fine-tuned model on the test split, see where tuning helped, export the model.

The engine runs the evaluation as a job (one at a time); the Evaluate handler
starts it and streams the job's progress, then the results. Only the browser
that started it may stop it. Results are saved in the run folder, so a run
evaluated before shows them as soon as it is picked. Runs are named, never
given as paths.
"""
from __future__ import annotations

import html
import time
from functools import partial

import gradio as gr

from engine import ACTIVE, ENDED, SCALARS_ONLY, JobError
from engine.public import scrub
from evaluation.evaluate import EVAL_ROWS, EVAL_SUMMARY, best_and_worst, judge_gaps, load_eval
from evaluation.judge import DEFAULT_MODEL, DEFAULT_URL, Judge
from runstore import RunInfo
from runstore.export import ExportError, load_hint, push_to_hub

from .charts import empty_figure, evaluation_figure
from .widgets import (as_int, bar, clock, data_name, finished_run_choices, kept_or_newest, meta_row, no_runs_note, notice, plural,
                      run_finished)

TITLE = "Evaluate"
MAX_NEW_TOKENS = 256
MAX_BATCH = 64
SHOWN = 5  # best and worst examples in the table unless every example is asked for
MODEL_NAMES = {"base": "base model", "tuned": "fine-tuned model", "aligned": "aligned model"}
COLUMNS = {"base": "base", "tuned": "fine-tuned", "aligned": "aligned"}
SHORT = {"base": "base", "tuned": "tuned", "aligned": "aligned"}


def models_of(summary: dict) -> list[str]:
    """The models an evaluation scored: base and fine-tuned, and aligned for a preference-tuned run."""
    return list(summary.get("models") or ("base", "tuned"))


def difference(row: dict, minuend: str, subtrahend: str, score: str) -> float | None:
    """``row[minuend][score] - row[subtrahend][score]``; None where a model was not scored (``--models`` left it out)."""
    a, b = (row.get(minuend) or {}).get(score), (row.get(subtrahend) or {}).get(score)
    return None if a is None or b is None else a - b


def rouge_gain(row: dict) -> float | None:
    return difference(row, "tuned", "base", "rouge_l")


def aligned_gain(row: dict) -> float | None:
    return difference(row, "aligned", "tuned", "rouge_l")


def nll_drop(row: dict) -> float | None:
    return difference(row, "base", "tuned", "nll")


RANKINGS = {  # label -> (key for best_and_worst, lower is better)
    "fine-tuned ROUGE-L": ("tuned.rouge_l", False),
    "ROUGE-L gain (fine-tuned − base)": (rouge_gain, False),
    "fine-tuned perplexity": ("tuned.perplexity", True),
    "NLL drop (base − fine-tuned)": (nll_drop, False),
    "fine-tuned judge score": ("tuned.judge", False),
    # a DPO run's evaluation; others fall back to the fine-tuned ROUGE-L
    "aligned ROUGE-L": ("aligned.rouge_l", False),
    "ROUGE-L gain (aligned − fine-tuned)": (aligned_gain, False),
    "aligned perplexity": ("aligned.perplexity", True),
    "aligned judge score": ("aligned.judge", False),
}
NO_RUNS = "No finished run yet: fine-tune one in the <b>Train</b> tab, then score it here against its base model."
POLL_S = 0.1


def not_yet(run: RunInfo, cap: int | None = None) -> str:
    """The hint for a run with no evaluation: how many test examples its data has, and how many of them this server
    scores (``cap``: its most examples an evaluation)."""
    test = ((run.manifest.get("data") or {}).get("split") or {}).get("test")
    models = "the base, the fine-tuned and the aligned model" if run.manifest.get("method") == "dpo" else \
        "the base and the fine-tuned model"
    if cap is not None and (test is None or test > cap):
        where = (f"the first {cap:,} of its {plural(test, 'test example')}" if test else
                 f"at most {plural(cap, 'test example')}") + " (this server's most an evaluation)"
    else:
        where = f"the whole test split ({plural(test, 'example') if test else 'its test split'})"
    return (f"This run has no evaluation yet. Press <b>Evaluate</b> to score {models} on {where}: about 1-2 minutes "
            "per model per 110 examples for GPT-2 124M on a CPU; a limit tries it on the first few.")


def run_to_show(engine, current: str | None) -> tuple[list, str | None]:
    """(the picker's choices, the current choice while it still exists, else the run being evaluated, else the newest).

    A page just opened has no choice yet: it shows the evaluation going on, which after a reload is its own; another
    visitor's evaluation, or a run that ends, leaves a page's choice and the results it shows alone."""
    choices = finished_run_choices(engine)
    names = [n for _, n in choices]
    if current in names:
        return choices, current
    evaluating = evaluated_run(engine.snapshot("evaluate", since=SCALARS_ONLY))
    return choices, evaluating if evaluating in names else kept_or_newest(choices, None)


def refresh_runs(engine, current: str | None):
    """The run picker on the run to show (see ``run_to_show``)."""
    choices, value = run_to_show(engine, current)
    return gr.Dropdown(choices=choices, value=value)


def pick_and_load(engine, rank_by: str, show_all: bool) -> tuple:
    """The picker on the run to show (see ``run_to_show``) and that run's saved evaluation."""
    choices, value = run_to_show(engine, None)
    return (gr.Dropdown(choices=choices, value=value),) + load_evaluation(engine, value, rank_by, show_all)


def evaluated_run(snap: dict) -> str | None:
    """The run an evaluation that is going scores, else None."""
    return (snap.get("config") or {}).get("run") if snap["status"] in ACTIVE else None


def whole(value, name: str, low: int, high: int) -> int:
    value = as_int(value, name)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def judge_of(url: str | None, model: str | None, key: str | None = None) -> Judge | None:
    url = (url or "").strip()
    return Judge(url, (model or "").strip() or DEFAULT_MODEL, api_key=(key or "").strip() or None, timeout=30) if url else None


def num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def summary_html(summary: dict, rows: list[dict], local: bool = True) -> str:
    """Base against fine-tuned in a table, what was evaluated, and the judge: its settings, failures, or how to set one up."""
    names = models_of(summary)
    lines = [
        ("ROUGE-L F1 against the reference", "rouge_l", ".3f", "higher is better"),
        ("perplexity of the reference", "perplexity", ",.1f", "lower is better"),
        ("mean NLL of the reference (nats/token)", "nll", ".3f", "lower is better"),
        ("ended with &lt;|endoftext|&gt;", "ended_share", ".0%", "before the token limit"),
    ]
    if summary.get("judge"):
        lines.append(("LLM judge score (0-100)", "judge_avg", ".1f", f"{summary['judge']['model']}"))
    if all("preference_accuracy" in summary[n] for n in names):
        lines.append(("chosen answer more likely than rejected", "preference_accuracy", ".0%", "preference score, higher is better"))

    def cells(key: str, spec: str) -> str:
        return "".join(f"<td>{'<b>' if n == names[-1] else ''}{num(summary[n].get(key), spec)}{'</b>' if n == names[-1] else ''}</td>"
                       for n in names)

    body = "".join(f"<tr><th>{label}</th>{cells(key, spec)}"
                   f'<td class="gi-caption">{html.escape(note)}</td></tr>' for label, key, spec, note in lines)
    columns = "".join(f"<th>{COLUMNS[n]}</th>" for n in names)
    head = (f"{plural(summary['examples'], summary['split'] + ' example')} of <b>{html.escape(data_name(str(summary['data'])))}</b> "
            f"({summary['style']} prompts), up to {summary['max_new_tokens']} new tokens, greedy · "
            f"{clock(summary['wall_time_s'])} on {html.escape(str(summary['device']))} · {html.escape(str(summary['started'])[:16])}")
    parts = [f'<div class="gi-caption">{head}</div>',
             f'<div class="gi-scroll"><table class="gi-eval"><tr><th></th>{columns}<th></th></tr>{body}</table></div>']
    for name, why in (summary.get("left_out") or {}).items():
        parts.append(f'<div class="gi-caption">{COLUMNS.get(name, name)} left out: {html.escape(why)}.</div>')
    too_long = max(summary[n]["too_long"] for n in names)
    if too_long:
        parts.append(f'<div class="gi-caption">{too_long} reference(s) too long for the context window: left out of the NLL.</div>')
    parts.append(judge_note(summary, rows, local))
    return "".join(parts)


def judge_note(summary: dict, rows: list[dict], local: bool = True) -> str:
    """How to set a judge up (``local``: the server is this machine, so Ollama on it can be one), or what it left unscored."""
    if not summary.get("judge"):
        where = (f"Ollama (https://ollama.com) on this machine is one: run <code>ollama run {DEFAULT_MODEL}</code> once to "
                 f"download the model, keep <code>ollama serve</code> running, and enter <code>{DEFAULT_URL}</code>."
                 if local else "On this server it must be on the public internet, with your own API key if it needs one.")
        return notice("No LLM judge was set, so the responses are not scored 0-100 as the book scores them. To score them, "
                      f"enter an OpenAI-compatible server under <b>LLM judge</b> and evaluate again. {where}")
    unscored, total, reasons = judge_gaps(summary, rows)
    if not unscored:
        return ""
    why = "".join(f"<br>{html.escape(reason)}" for reason in reasons[:2])
    return notice(f"<b>The judge left {unscored} of {total} responses unscored.</b>{why}", "error")


def column_widths(names: list[str]) -> list[str]:
    """In pixels, not shares of the width (on a phone, shares squeezed the text columns to a word a line: the table
    scrolls instead), found by name, since a preference-tuned run's evaluation has a third response column."""
    text = {"rank": "56px", "#": "48px", "instruction": "200px", "reference": "150px"}
    return [text.get(name) or ("150px" if name.endswith(" response") else "64px" if name.startswith("judge") else "76px")
            for name in names]


def rank_choices(result: dict | None, current: str) -> gr.Dropdown:
    """The rankings an evaluation has scores for (a judge's only when a judge scored it, the aligned model's only for
    a preference-tuned run), keeping ``current`` while it is one of them."""
    summary = (result or {}).get("summary") or {}
    judged, aligned = bool(summary.get("judge")), "aligned" in models_of(summary)
    choices = [label for label in RANKINGS if ("judge" not in label or judged) and ("aligned" not in label or aligned)]
    return gr.Dropdown(choices=choices, value=current if current in choices else choices[0])


def table_update(result: dict | None, rank_by: str, show_all: bool) -> dict:
    """The best and worst examples by ``rank_by`` (or all of them), best first; ``rank`` is the place among all."""
    if not result:
        return {"headers": headers(False), "data": []}
    rows, judged, names = result["rows"], bool(result["summary"].get("judge")), models_of(result["summary"])
    key, lower = RANKINGS.get(rank_by, RANKINGS["fine-tuned ROUGE-L"])
    ranked, _ = best_and_worst(rows, key, n=len(rows), lower_is_better=lower)
    if not ranked:  # e.g. by judge score in an evaluation without a judge, or a model it did not score
        ranked, _ = best_and_worst(rows, f"{names[-1]}.rouge_l", n=len(rows))
    places = list(enumerate(ranked, start=1))
    if not show_all and len(places) > 2 * SHOWN:
        places = places[:SHOWN] + places[-SHOWN:]
    return {"headers": headers(judged, names), "data": [table_row(place, row, judged, names) for place, row in places]}


def headers(judged: bool, names=("base", "tuned")) -> list[str]:
    scores = [f"ROUGE-L {SHORT[n]}" for n in names] + [f"PPL {SHORT[n]}" for n in names]
    scores += [f"judge {SHORT[n]}" for n in names] if judged else []
    return ["rank", "#", "instruction", "reference"] + [f"{COLUMNS[n]} response" for n in names] + scores


def table_row(place: int, row: dict, judged: bool, names=("base", "tuned")) -> list:
    models = [row[n] for n in names]
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    scores = [round(m["rouge_l"], 3) for m in models] + [None if m["perplexity"] is None else round(m["perplexity"], 1)
                                                         for m in models]
    scores += [m["judge"] for m in models] if judged else []
    return [place, row["index"] + 1, prompt, row["output"], *(m["response"] or "(empty)" for m in models), *scores]


def shown(run: RunInfo, result: dict | None, rank_by: str, show_all: bool, local: bool = True,
          cap: int | None = None) -> tuple:
    """(summary, chart, table, result state) for a run's results, or the empty state when it has none."""
    if not result:
        return notice(not_yet(run, cap)), empty_figure("No evaluation of this run yet", height=340), table_update(None, rank_by, show_all), None
    result = {**result, "run": run.name}
    return (summary_html(result["summary"], result["rows"], local), evaluation_figure(result["summary"]),
            table_update(result, rank_by, show_all), result)


def load_evaluation(engine, name: str | None, rank_by: str, show_all: bool):
    """The run's saved evaluation (``eval_summary.json`` and ``eval.jsonl``), shown at once."""
    if not name:
        return (no_runs_note(engine, NO_RUNS, "score it against its base model"), empty_figure("No run picked", height=340),
                table_update(None, rank_by, show_all), None)
    try:
        run = engine.finished_run(name)
    except ValueError as e:
        return notice(html.escape(str(e)), "error"), gr.skip(), gr.skip(), None
    return shown(run, load_eval(run.path), rank_by, show_all, engine.loopback, engine.limits.eval_examples)


def progress_html(event: dict) -> str:
    """Phase x / y, which model is doing what, examples done, this phase's ETA, elapsed; downloads in MB."""
    done, total = event["done"], event["total"]
    fraction = (event["step"] - 1 + (done / total if total else 0)) / event["steps"]
    what = f"{MODEL_NAMES[event['model']]}: <b>{event['phase']}</b>"
    if event["phase"] == "loading" and total > 1:
        count = f"downloading {done / 2**20:,.0f} / {total / 2**20:,.0f} MB"
    else:
        count = f"<b>{done:,}</b> / {total:,}" + (" examples" if event["phase"] != "loading" else "")
    meta = ['<span class="gi-status evaluating">evaluating</span>', f"phase {event['step']} / {event['steps']}", what, count]
    if event["eta_s"] is not None and done < total:
        meta.append(f"ETA {clock(event['eta_s'])} for this phase")
    meta.append(f"{clock(event['elapsed_s'])} elapsed")
    return f'<div class="gi-progress">{bar(fraction)}{meta_row(meta)}</div>'


def failure(error: str) -> str:
    return notice(f"<b>The evaluation failed.</b> {html.escape(error)}", "error")


def controls(busy: bool, can_stop: bool = False) -> tuple:
    """(run picker, Evaluate, Stop) while an evaluation goes (``busy``) or when none does."""
    return gr.Dropdown(interactive=not busy), gr.Button(interactive=not busy), gr.Button(interactive=can_stop)


def evaluate(engine, client_id: str | None, name: str | None, limit, max_new_tokens, batch_size, judge_url: str,
             judge_model: str, rank_by: str, show_all: bool, seen: dict | None = None, judge_key: str | None = None):
    """Start the evaluation job and stream (progress, message, summary, chart, table, result, run picker, Evaluate, Stop,
    seen) to this page; ``poll`` shows the job to every other page, this browser's after a reload included."""
    idle = controls(busy=False)
    unchanged = (gr.skip(),) * 4
    try:
        if not client_id:
            raise ValueError("This browser has no session id yet: reload the page.")
        run = engine.finished_run(name)
        settings = dict(limit=whole(limit, "examples", 0, 100_000) or None, judge=judge_of(judge_url, judge_model, judge_key),
                        max_new_tokens=whole(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS),
                        batch_size=whole(batch_size, "batch size", 1, MAX_BATCH))
        job = engine.start_evaluation(run.name, owner=client_id, **settings)
    except (ValueError, JobError) as e:
        yield notice(html.escape(scrub(str(e))), "error"), "", *unchanged, *idle, gr.skip()
        return
    busy = controls(busy=True, can_stop=True)
    streaming = {**(seen or {}), "streaming": True}
    capped = "" if engine.evaluation_limit(settings["limit"]) == settings["limit"] else \
        f" This server scores at most {engine.limits.eval_examples:,} examples an evaluation."
    yield notice(f"Starting the evaluation of <b>{html.escape(run.name)}</b>…{capped}"), "", *unchanged, *busy, streaming
    version = None
    while (snap := job.snapshot(since=SCALARS_ONLY))["status"] not in ENDED:
        if snap["version"] != version and snap["progress"]:
            version = snap["version"]
            yield progress_html(snap["progress"]), gr.skip(), *unchanged, *busy, gr.skip()
        time.sleep(POLL_S)
    yield *outcome(engine, snap, rank_by, show_all), *idle, {"streaming": False, "ended": snap["started_at"], "active": False}


def outcome(engine, snap: dict, rank_by: str, show_all: bool) -> tuple:
    """(progress, message, summary, chart, table, result) for an evaluation that has ended."""
    unchanged = (gr.skip(),) * 4
    if snap["status"] == "stopped":
        return notice("Stopped: nothing was written; the run's previous results, if any, are as they were."), "", *unchanged
    if snap["status"] == "failed":
        return failure(snap["message"] or snap["error"] or "unknown error"), "", *unchanged
    payload = snap["result"]
    summary = payload["summary"]
    name = snap["config"]["run"]
    done = (f"Evaluated <b>{plural(summary['examples'], 'example')}</b> in {clock(summary['wall_time_s'])}; saved "
            f"<code>{EVAL_ROWS}</code> and <code>{EVAL_SUMMARY}</code> with run <code>{html.escape(name)}</code>.")
    try:
        results = shown(engine.finished_run(name), payload, rank_by, show_all, engine.loopback)
    except ValueError:  # the run was deleted meanwhile
        results = unchanged
    return notice(done, "ok"), "", *results


def poll(engine, client_id: str | None, seen: dict | None, rank_by: str, show_all: bool, name: str | None = None,
         latest: dict | None = None):
    """One timer tick for a page that is not streaming the evaluation itself (another visitor's, or this browser's
    after a reload): its progress and Stop while it goes; at its end, the results for the browser that started it
    and for pages showing that run (``name``: the page's picked run), whose old results they replace. Last, the
    shared latest finish of a run (``latest``): a training run that ends while this tab is shown is listed here too."""
    _, runs_changed = run_finished(engine.snapshot("train", since=SCALARS_ONLY), {"finished": latest})
    return job_poll(engine, client_id, seen, rank_by, show_all, name) + (runs_changed,)


def job_poll(engine, client_id: str | None, seen: dict | None, rank_by: str, show_all: bool, name: str | None = None) -> tuple:
    """``poll``'s (progress, message, summary, chart, table, result, run picker, Evaluate, Stop, seen)."""
    seen = dict(seen or {})
    skip = (gr.skip(),) * 10
    if seen.get("streaming"):
        return skip
    snap = engine.snapshot("evaluate", since=SCALARS_ONLY)
    active = snap["status"] in ACTIVE
    mine = snap["owner"] is not None and snap["owner"] == client_id
    ended = None if active or snap["status"] == "idle" else snap["started_at"]
    if active:
        name = evaluated_run(snap)
        changed = seen.get("version") != snap["version"]
        progress = progress_html(snap["progress"]) if changed and snap["progress"] else gr.skip()
        first = not seen.get("active")
        message = (notice(f"Evaluating <b>{html.escape(name)}</b>" + ("…" if mine else ", started by another visitor: "
                          "one evaluation runs at a time, and you can start yours when it ends.")) if first else gr.skip())
        # the owner's picker was put on the run at page load (refresh_runs); another visitor may go on browsing results
        buttons = (gr.Dropdown(interactive=not mine), *controls(busy=True, can_stop=mine)[1:]) if first else (gr.skip(),) * 3
        out = (progress, message, *(gr.skip(),) * 4, *buttons)
    elif seen.get("active") and ended and seen.get("ended") != ended:  # watched here until it ended
        showing = name is not None and name == (snap.get("config") or {}).get("run")
        results = outcome(engine, snap, rank_by, show_all) if mine or showing else ("", "", *(gr.skip(),) * 4)
        out = (*results, *controls(busy=False))
    else:
        out = (gr.skip(),) * 9
    seen.update(version=snap["version"], active=active, ended=ended)
    return out + (seen,)


def stop(engine, client_id: str | None) -> str:
    try:
        stopped = engine.stop("evaluate", client_id)
    except JobError as e:
        return notice(html.escape(str(e)), "error")
    return notice("Stopping after the current batch…") if stopped else notice("No evaluation is going.")


def open_in_playground(shared, result: dict | None, evt: gr.SelectData):
    """A clicked table row: the Playground tab opens with its instruction, input and reference, and this run."""
    rows = {row["index"] + 1: row for row in (result or {}).get("rows", [])}
    try:
        row = rows.get(int(evt.row_value[1]))  # the "#" column: sorting the table does not change it
    except (TypeError, ValueError, IndexError):
        row = None
    if row is None:
        return (gr.skip(),) * (1 + len(shared.playground))
    note = notice(f"Example #{row['index'] + 1} of the test split, opened from the evaluation: press <b>Compare</b>.")
    return gr.Tabs(selected="playground"), *shared.open_example(row, result["run"], note)


def export(engine, name: str | None):
    """The run's model as a zip of the Hugging Face files, built once per saved model and offered for download."""
    try:
        path = engine.export(name)
    except (ValueError, ExportError, OSError) as e:
        return None, notice(f"<b>The export failed.</b> {html.escape(scrub(str(e)))}", "error")
    size = path.stat().st_size / 2**20
    return str(path), notice(f"<b>{html.escape(path.name)}</b>, {size:,.1f} MB: {html.escape(load_hint(path.name.removesuffix('-hf.zip')))}.", "ok")


def push(engine, name: str | None, repo_id: str, token: str) -> str:
    """Upload the run's model to a Hub repo, created private; the reason, not a traceback, when it cannot."""
    repo_id, token = (repo_id or "").strip(), (token or "").strip()
    if not repo_id:
        return notice("Enter a repo id, e.g. <code>your-name/gpt2-instruct</code>.", "error")
    if not token and not engine.loopback:
        return notice("Enter a Hugging Face token with write access: a server that others can reach never uses "
                      "the credentials stored on it.", "error")
    try:
        url, private = push_to_hub(engine.finished_run(name).path, repo_id, token or None)
    except (ValueError, ExportError) as e:
        return notice(html.escape(scrub(str(e))), "error")
    seen = {True: "a private repo", False: "a public repo: it existed already, and keeps its visibility",
            None: "private if it was created now; a repo that existed keeps its visibility"}[private]
    return notice(f'Uploaded to <a href="{html.escape(url)}" target="_blank">{html.escape(url)}</a> ({seen}).', "ok")


def build(shared) -> None:
    with gr.Row(equal_height=True, elem_classes="gi-stack-phone"):  # on a phone the run's name gets the whole width
        run = gr.Dropdown([], value=None, label="Fine-tuned run", allow_custom_value=True, scale=5, elem_id="eval-run")
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="eval-refresh-runs")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            with gr.Row():
                cap = shared.engine.limits.eval_examples
                limit = gr.Number(value=0, label="Examples (0 = all)" if cap is None else f"Examples (0 = all, at most {cap:,} here)",
                                  elem_id="eval-limit")
                batch_size = gr.Number(value=8, label="Batch size", elem_id="eval-batch-size")
            max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=128, step=1, label="Max new tokens", elem_id="eval-max-new-tokens")
            with gr.Accordion("LLM judge (optional): any OpenAI-compatible server", open=True):
                with gr.Row():
                    example = DEFAULT_URL if shared.engine.loopback else "https://api.openai.com/v1"  # local ones are refused there
                    judge_url = gr.Textbox(label="Judge URL", placeholder=f"e.g. {example}", scale=3, elem_id="eval-judge-url")
                    judge_model = gr.Textbox(value=DEFAULT_MODEL, label="Judge model", scale=2, min_width=120, elem_id="eval-judge-model")
                judge_key = gr.Textbox(label="API key (optional: sent to the judge URL alone, never saved)", type="password",
                                       elem_id="eval-judge-key")
                if not shared.engine.loopback:
                    gr.HTML(notice("On this server the judge must be on the public internet (local and private addresses are "
                                   "refused), with your own key if it needs one."), elem_id="eval-judge-public")
            with gr.Row():
                start_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-start-btn")
                stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="eval-stop-btn")
            message = gr.HTML(elem_id="eval-message")
            progress = gr.HTML(elem_id="eval-progress")
        with gr.Column(scale=3):
            summary = gr.HTML(notice(NO_RUNS), elem_id="eval-summary")
            chart = gr.Plot(empty_figure("No evaluation yet", height=340), show_label=False, elem_id="eval-chart")
    with gr.Row(equal_height=True, elem_classes="gi-stack-phone"):  # on a phone, one above the other
        rank_by = gr.Dropdown(list(RANKINGS), value="fine-tuned ROUGE-L", label="Rank examples by", scale=3, elem_id="eval-rank-by")
        show_all = gr.Checkbox(value=False, label=f"Every example (else the {SHOWN} best and {SHOWN} worst)", scale=2,
                               elem_id="eval-show-all")
    gr.HTML('<div class="gi-caption">Click a row to open that example in the Playground; sort by any column from the ⋮ menu '
            "in its header.</div>")
    table = gr.Dataframe(value=[], headers=headers(False), interactive=False, wrap=True, max_height=560, max_chars=240,
                         column_widths=column_widths(headers(False)), elem_id="eval-table")
    with gr.Accordion("Export the fine-tuned model", open=True):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=220):
                export_btn = gr.Button("Build the Hugging Face zip", elem_id="export-btn")
                gr.HTML('<div class="gi-caption">model.safetensors, config.json, the GPT-2 tokenizer files and a model card; '
                        "<code>transformers</code> loads the unzipped folder as it is.</div>")
            export_file = gr.File(label="Zip", interactive=False, height=60, scale=2, elem_id="export-file")
        export_message = gr.HTML(elem_id="export-message")
        with gr.Row(equal_height=True):
            hub_repo = gr.Textbox(label="Hub repo id", placeholder="your-name/gpt2-instruct", scale=3, elem_id="hub-repo")
            hub_token = gr.Textbox(label="Token with write access", type="password", scale=3, elem_id="hub-token")
            hub_btn = gr.Button("Push to the Hub", scale=1, elem_id="hub-push-btn")
        hub_message = gr.HTML(elem_id="hub-message")

    result = gr.State(None)
    seen = gr.State(None)
    engine = shared.engine
    cheap = dict(concurrency_limit=None, show_progress="hidden")
    shown_outputs = [summary, chart, table, result]
    load_shown = partial(load_evaluation, engine)
    job_outputs = [progress, message, *shown_outputs, run, start_btn, stop_btn, seen]
    start_btn.click(partial(evaluate, engine), [shared.client_id, run, limit, max_new_tokens, batch_size, judge_url, judge_model,
                                               rank_by, show_all, seen, judge_key],
                    job_outputs, api_name="evaluate",
                    concurrency_limit=2, concurrency_id="evaluate", show_progress="minimal", show_progress_on=progress)
    shared.poll_while_shown(partial(poll, engine), [shared.client_id, seen, rank_by, show_all, run, shared.runs_changed],
                            [*job_outputs, shared.runs_changed])
    stop_btn.click(partial(stop, engine), shared.client_id, message, api_name="stop_evaluation", **cheap)
    run.input(load_shown, [run, rank_by, show_all], shown_outputs, api_name="load_evaluation", **cheap)
    for trigger in (shared.app.load, refresh.click, shared.runs_changed.change):
        trigger(partial(refresh_runs, engine), run, run, api_visibility="private", **cheap).then(
            load_shown, [run, rank_by, show_all], shown_outputs, api_visibility="private", **cheap)
    shared.relist_when_shown(run, partial(finished_run_choices, engine), partial(pick_and_load, engine), [rank_by, show_all],
                             shown_outputs)
    for control in (rank_by, show_all):
        control.input(table_update, [result, rank_by, show_all], table, api_visibility="private", **cheap)
    result.change(rank_choices, [result, rank_by], rank_by, api_visibility="private", **cheap)
    table.change(lambda shown: gr.Dataframe(column_widths=column_widths(list(shown.columns))), table, table,
                 api_visibility="private", **cheap)  # a preference-tuned run's evaluation has a column more
    if shared.tabs is not None and shared.playground:
        def on_select(result_, evt: gr.SelectData):
            return open_in_playground(shared, result_, evt)

        table.select(on_select, result, [shared.tabs, *shared.playground], api_visibility="private", **cheap)
    export_btn.click(partial(export, engine), run, [export_file, export_message], api_name="export_zip")
    hub_btn.click(partial(push, engine), [run, hub_repo, hub_token], hub_message, api_name="push_to_hub")
