"""Playground tab: one instruction, the base model and a fine-tuned run answering side by side.

The models stream in step at the same settings (greedy by default, or the
same seeded sampling), so what differs is the training, not the draw. A
preference-tuned (DPO) run adds a third column: base, fine-tuned (the run it
started from) and aligned.
"""
from __future__ import annotations

import difflib
import html
import re
import time
from functools import partial

import gradio as gr

from data import DatasetError, extract_response, format_prompt, split_instructions
from runstore import read_manifest
from runstore.models import run_config
from engine.public import scrub
from model import WeightsError, get_tokenizer, stream_side_by_side
from training import ConfigError

from .widgets import data_name, finished_run_choices, keep_or_fill, kept_or_newest, no_runs_note, notice, number, plural

TITLE = "Playground"
MAX_NEW_TOKENS = 256
EXAMPLES = 30
SPEED_EVERY_S = 0.5  # the status line's live speed: twice a second, not at every token
NO_RUNS = "No fine-tuned run yet: train one in the <b>Train</b> tab, then compare it here with the model it started from."


def refresh_runs(engine, current: str | None):
    """The run picker on ``current`` while it exists, else the newest run, its note and answer boxes (cleared)."""
    choices = finished_run_choices(engine)
    value = kept_or_newest(choices, current)
    return (gr.Dropdown(choices=choices, value=value), run_info(engine, value)) + columns(engine, value)


def relist(engine, current: str | None) -> tuple:
    """The run list as it is now, keeping the picked run and its answers while it exists (a run another visitor
    finished must not wipe them), else the newest run, shown."""
    return keep_or_fill(finished_run_choices(engine), current, lambda: refresh_runs(engine, None), 5)


def parent_of(engine, run):
    """The fine-tuned run a DPO run started from (by its name on this server), or None for an ordinary run."""
    manifest = read_manifest(run.path)
    if manifest.get("method") != "dpo":
        return None
    try:
        return engine.run(manifest.get("parent_run"))
    except ValueError:
        raise ValueError(f"{run.name} was aligned from {manifest.get('parent_run')}, which is no longer on this server") from None


def is_aligned(engine, name: str | None) -> bool:
    try:
        return bool(name) and read_manifest(engine.finished_run(name).path).get("method") == "dpo"
    except (ValueError, OSError):
        return False


def columns(engine, name: str | None) -> tuple:
    """The answer boxes' labels, cleared: a third box only for a preference-tuned run."""
    aligned = is_aligned(engine, name)
    tuned = "Fine-tuned model (the run it was aligned from)" if aligned else "Fine-tuned model"
    return (gr.Textbox(label="Base model", value=""), gr.Textbox(label=tuned, value=""),
            gr.Textbox(label="Aligned model (preference-tuned)", value="", visible=aligned), "")


def run_info(engine, name: str | None) -> str:
    if not name:
        return no_runs_note(engine, NO_RUNS, "compare it with the model it started from")
    try:
        run = engine.finished_run(name)
        config = run_config(run.path)
        parent = parent_of(engine, run)
    except (FileNotFoundError, ConfigError, ValueError) as e:
        return notice(html.escape(scrub(str(e))), "error")
    base = f"{config.model} with random weights (seed {config.seed})" if config.random_init else f"pretrained {config.model}"
    if parent is not None:
        return notice(f"Base model: <b>{html.escape(base)}</b>. Fine-tuned: run <b>{html.escape(parent.name)}</b> on "
                      f"<b>{html.escape(data_name(str(config.data)))}</b>. Aligned: that run after preference tuning (DPO). "
                      "The three answer together.")
    return notice(f"Base model: <b>{html.escape(base)}</b>. Fine-tuned: the same model after the run, on "
                  f"<b>{html.escape(data_name(str(config.data)))}</b> ({config.style} prompts).")


def diff_html(base: str, tuned: str, names: tuple[str, str] = ("base", "fine-tuned")) -> str:
    """Word-level differences from the base answer to the fine-tuned one (or any two): removed struck out, added highlighted."""
    if not base and not tuned:
        return ""
    a, b = re.findall(r"\s*\S+", base), re.findall(r"\s*\S+", tuned)  # words with the space before them
    matcher = difflib.SequenceMatcher(None, [w.lstrip() for w in a], [w.lstrip() for w in b], autojunk=False)
    out = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        old, new = "".join(a[i1:i2]), "".join(b[j1:j2])
        if op == "equal":
            out.append(html.escape(old))
            continue
        space = re.match(r"\s*", old or new).group()
        out.append(html.escape(space))
        if old:
            out.append(f"<del>{html.escape(old.lstrip())}</del>")
        if new:
            out.append(f"<ins>{html.escape(new.lstrip())}</ins>")
    legend = (f'<div class="gi-caption gi-legend"><del>only in the {names[0]} answer</del> · '
              f'<ins>only in the {names[1]} answer</ins></div>')
    return f'{legend}<div class="gi-diff">{"".join(out)}</div>'


def sampling(temperature, top_k, top_p, seed) -> dict:
    """Generation settings from the form; ``ValueError`` for a seed that no generator takes."""
    temperature = number(temperature or 0, "temperature")
    if temperature <= 0:
        return {"temperature": 0.0}
    seed = number(seed or 0, "seed")
    if seed != int(seed) or not 0 <= seed <= 2**53:  # the form's numbers are floats: whole up to 2^53
        raise ValueError(f"seed must be a whole number from 0 to 2^53, got {seed:,.15g}")
    return {"temperature": temperature, "top_k": int(top_k) or None,
            "top_p": float(top_p) if top_p and float(top_p) < 1 else None, "seed": int(seed)}


def compare(engine, instruction: str, input_text: str, name: str | None, max_new_tokens, temperature, top_k, top_p, seed):
    """Stream (base answer, fine-tuned answer, aligned answer, differences, status); aligned only for a DPO run."""
    if not (instruction or "").strip():
        yield "", "", "", "", notice("Type an instruction first.", "error")
        return
    if not name:
        yield "", "", "", "", no_runs_note(engine, NO_RUNS, "compare it with the model it started from", "error")
        return
    try:
        settings = sampling(temperature, top_k, top_p, seed)
        run = engine.finished_run(name)
        parent = parent_of(engine, run)
    except ValueError as e:
        yield "", "", "", "", notice(html.escape(str(e)), "error")
        return
    yield "", "", "", "", notice("Loading the models…")
    try:
        config = run_config(run.path)
        models = [engine.models.base_of_run(run.path), engine.models.tuned(parent.path if parent else run.path)]
        if parent is not None:
            models.append(engine.models.tuned(run.path))
    except (WeightsError, FileNotFoundError, ConfigError, ValueError, OSError) as e:
        yield "", "", "", "", notice(f"<b>The models could not be loaded.</b> {html.escape(scrub(str(e)))}", "error")
        return
    tokenizer = get_tokenizer()
    prompt = format_prompt({"instruction": instruction, "input": input_text or ""}, config.style)
    ids = tokenizer.encode(prompt, disallowed_special=())
    context = models[0].config.block_size
    limit = max(1, min(int(max_new_tokens or MAX_NEW_TOKENS), MAX_NEW_TOKENS, context - 1))
    cropped = cropped_note(len(ids), limit, context)
    yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), notice(f"Generating…{cropped}", "error" if cropped else "info")
    names = ("base", "fine-tuned", "aligned")[:len(models)]
    texts = ("",) * len(models)

    def shown(texts):
        diff = diff_html(texts[1], texts[2], ("fine-tuned", "aligned")) if parent else diff_html(*texts)
        return texts[0], texts[1], texts[2] if parent else "", diff

    started = shown_at = time.perf_counter()
    tokens = (0,) * len(models)
    for answers in stream_side_by_side(models, tokenizer, ids, limit, **settings):
        texts, tokens = tuple(extract_response(t, config.style) for t in answers), answers.tokens
        now, status = time.perf_counter(), gr.skip()
        if now - shown_at >= SPEED_EVERY_S:
            shown_at, status = now, notice(f"Generating… {speed_note(tokens, now - started)}.{cropped}", "error" if cropped else "info")
        yield *shown(texts), status
    speed = speed_note(tokens, time.perf_counter() - started)
    mode = "greedy" if not float(temperature or 0) else f"sampled at temperature {float(temperature):g}, seed {int(seed or 0)}"
    silent = [name for name, text in zip(names, texts) if not text]
    note = f" The {' and the '.join(silent)} model's answer is empty (it ended at once or wrote only blank lines)." if silent else ""
    if config.random_init:
        note += (f" This run started from random weights ({html.escape(config.model)}, the offline demo): it learns the "
                 "words and shape of its training answers, not to follow instructions. For that, fine-tune a GPT-2 preset "
                 "from its pretrained weights (see the Train tab).")
    which = "All three answers" if parent else "Both answers"
    yield *shown(texts), notice(f"{which} {mode}, at most {limit} new tokens: {speed}.{cropped}{note}",
                                "error" if cropped else "info")


def speed_note(tokens: tuple[int, ...], seconds: float) -> str:
    """How many new tokens the models have generated, each's and in all, and how fast: "64 new tokens (40 + 24) in
    1.5 s, 43 tokens/s"."""
    total = sum(tokens)
    rate = total / seconds if seconds > 0 else 0
    rate = f", {rate:.{1 if rate < 10 else 0}f} tokens/s" if total and rate else ""
    return f"{plural(total, 'new token')} ({' + '.join(f'{n:,}' for n in tokens)}) in {seconds:.1f} s{rate}"


def cropped_note(prompt_tokens: int, max_new_tokens: int, context: int) -> str:
    """What the models did not see of a prompt too long for their context window (generation keeps its end)."""
    keep = context - min(max_new_tokens, context - 1)
    if prompt_tokens <= keep:
        return ""
    fix = (f"Lower <b>Max new tokens</b> to {context - prompt_tokens:,} or fewer to keep it whole, or shorten the "
           "instruction or the input." if prompt_tokens < context else "Shorten the instruction or the input.")
    return (f" <b>The prompt is {prompt_tokens:,} tokens:</b> beside {max_new_tokens} new tokens, the {context:,}-token "
            f"context holds its last {keep:,}, so the models did not see its first {prompt_tokens - keep:,} (the "
            f"prompt's header and the start of the instruction). {fix}")


def examples_of(engine, dataset: dict | None) -> list[dict]:
    try:
        return split_instructions(engine.datasets.records(dataset)).test[:EXAMPLES] if dataset else []
    except DatasetError:
        return []


def examples_update(engine, dataset: dict | None):
    """The first test examples of the dataset the Dataset tab holds (which need not be the run's), saying whose."""
    records = examples_of(engine, dataset)
    whose = f" of {dataset['name']}, the Dataset tab's data" if records else ""
    return gr.Dataset(samples=[[r["instruction"], r["input"]] for r in records],
                      label=f"Examples from the test split{whose} (click one)"), records


def reference_html(record: dict) -> str:
    """A test record's answer under the boxes, tagged with the instruction it answers (``reference_outlived``)."""
    return (f'<div class="gi-caption" data-instruction="{html.escape(record["instruction"])}">Reference answer (test split)'
            f'</div><div class="gi-ref">{html.escape(record["output"])}</div>')


def reference_outlived(instruction: str, reference: str | None):
    """The reference cleared once the instruction is edited away from the one it answers; left alone otherwise (Gradio
    reports a key that changes nothing, Shift+Enter to compare, as an input too)."""
    found = re.search(r'data-instruction="([^"]*)"', reference or "")
    return gr.skip() if found and html.unescape(found.group(1)) == instruction else ""


def pick_example(index: int, records: list[dict]):
    """(instruction, input, reference, then the answers, diff and status cleared: they answered another question)."""
    if index is None or not 0 <= index < len(records or []):
        return (gr.skip(),) * 8
    r = records[index]
    return r["instruction"], r["input"], reference_html(r), "", "", "", "", ""


def open_example(engine, record: dict, name: str, note: str = ""):
    """Values for ``shared.playground``: a record opened here from another tab, with its run picked, answers cleared."""
    base, tuned, aligned, diff = columns(engine, name)
    return (record["instruction"], record.get("input", ""), reference_html(record),
            gr.Dropdown(choices=finished_run_choices(engine), value=name), run_info(engine, name), base, tuned, aligned,
            diff, note)


def build(shared) -> None:
    with gr.Row(equal_height=True, elem_classes="gi-stack-phone"):  # on a phone the run's name gets the whole width
        run = gr.Dropdown([], value=None, label="Fine-tuned run", allow_custom_value=True, scale=5, elem_id="tuned-run")
        refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="refresh-tuned-runs")
    info = gr.HTML(notice(NO_RUNS), elem_id="run-info")
    with gr.Row():
        instruction = gr.Textbox(label="Instruction", lines=3, scale=3, placeholder="e.g. Rewrite the sentence in passive voice.",
                                 info="Shift+Enter in either box compares", elem_id="playground-instruction")
        input_text = gr.Textbox(label="Input (optional)", lines=3, scale=2, placeholder="e.g. The chef cooked the meal.",
                                elem_id="playground-input")
    records = gr.State([])
    examples = gr.Dataset(components=[instruction, input_text], samples=[], type="index", samples_per_page=5,
                          headers=["Instruction", "Input"], label="Examples from the test split (click one)",
                          elem_id="playground-examples")
    with gr.Accordion("Generation settings: greedy unless the temperature is above 0", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=128, step=1, label="Max new tokens", elem_id="max-new-tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)", elem_id="temperature")
        with gr.Row():
            top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0: off)", elem_id="top-k")
            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (1: off)", elem_id="top-p")
            seed = gr.Number(value=123, label="Seed", elem_id="seed")  # no rounding: sampling() names a fractional seed
    compare_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
    status = gr.HTML(elem_id="playground-status")
    with gr.Row(equal_height=True):
        base_out = gr.Textbox(label="Base model", lines=8, max_lines=20, interactive=False, elem_id="base-output")
        tuned_out = gr.Textbox(label="Fine-tuned model", lines=8, max_lines=20, interactive=False, elem_id="tuned-output")
        aligned_out = gr.Textbox(label="Aligned model (preference-tuned)", lines=8, max_lines=20, interactive=False,
                                 visible=False, elem_id="aligned-output")
    reference = gr.HTML(elem_id="reference-answer")
    diff = gr.HTML(elem_id="diff-view")
    shared.playground = (instruction, input_text, reference, run, info, base_out, tuned_out, aligned_out, diff, status)
    engine = shared.engine
    shared.open_example = lambda record, name, note="": open_example(engine, record, name, note)

    cheap = dict(concurrency_limit=None, show_progress="hidden")
    comparing = gr.on([compare_btn.click, instruction.submit, input_text.submit], partial(compare, engine),
          [instruction, input_text, run, max_new_tokens, temperature, top_k, top_p, seed],
          [base_out, tuned_out, aligned_out, diff, status], api_name="compare", concurrency_limit=1, concurrency_id="generate")
    # A comparison cancelled midway (another run or example picked) could draw a chunk after the pick had cleared the
    # boxes; Gradio runs a cancelled event's .failure() once the cancel has gone through, so the boxes end up empty.
    comparing.failure(lambda: ("",) * 5, None, [base_out, tuned_out, aligned_out, diff, status], api_visibility="private", **cheap)
    picked = [run, info, base_out, tuned_out, aligned_out, diff]
    shared.app.load(lambda current: refresh_runs(engine, current), run, picked, api_visibility="private", **cheap)
    for trigger in (refresh.click, shared.runs_changed.change):
        trigger(partial(relist, engine), run, picked, api_visibility="private", **cheap)
    # Another run or example picked while the answers stream: that comparison ends, its answers no longer fit.
    shared.open_run.change(lambda asked: refresh_runs(engine, (asked or {}).get("run")), shared.open_run, picked,
                           api_visibility="private", cancels=[comparing], **cheap)
    shared.relist_when_shown(run, partial(finished_run_choices, engine), lambda: refresh_runs(engine, None), [], picked[1:])
    run.input(lambda name: (run_info(engine, name), *columns(engine, name), ""), run, [*picked[1:], status],
              api_visibility="private", cancels=[comparing], **cheap)
    shared.dataset.change(lambda d: examples_update(engine, d), shared.dataset, [examples, records], api_visibility="private", **cheap)
    examples.click(pick_example, [examples, records], [instruction, input_text, reference, base_out, tuned_out, aligned_out,
                                                       diff, status], api_visibility="private", cancels=[comparing], **cheap)
    instruction.input(reference_outlived, [instruction, reference], reference, api_visibility="private", **cheap)
