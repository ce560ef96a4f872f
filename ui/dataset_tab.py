"""Dataset tab: pick a source, search and page through it, see its splits, lengths and one record's tokens.

Each visitor holds only a reference to its dataset (``{"source", "name",
"sha256", "count"}``) in a ``gr.State`` that expires; the parsed records live
once in the engine's shared, bounded dataset cache.
"""
from __future__ import annotations

import html

import gradio as gr

from data import FILE_KINDS, FILE_SUFFIXES, MAX_FILE_BYTES, STYLES, DatasetError, skip_reason, split_instructions, split_sizes, split_warnings, token_view
from data import cache
from data.batching import too_long
from data.browse import PAGE_SIZE, page_of, split_names, split_of
from data.preference import browse_preferences

from engine.public import scrub
from training.config import DEMO
from model import GPTConfig

from .charts import length_histogram
from .theme import notice
from .widgets import as_int, listed, plural, style_radio, suggested_mask

TITLE = "Dataset"
SOURCES = [
    ("Canonical: the book's 1,100 examples", "canonical"),
    ("Bundled sample: 74 examples, works offline", "sample"),
    (f"Your file: {FILE_KINDS}", "upload"),
]
HEADERS = ["#", "split", "instruction", "input", "output"]
CELL_CHARS = 160
CONTEXT = GPTConfig().block_size  # every GPT-2 preset's


def default_source(engine) -> str:
    """Canonical when it is already cached (no network needed), else the bundled sample; the sample too when the Train
    tab opens on the offline demo, whose settings (and the run time its note gives) are for those 74 records."""
    return "canonical" if cache.is_cached() and engine.suggested_model() != DEMO["model"] else "sample"


def error_notice(source: str, message: str, previous: dict | None) -> str:
    if source == "canonical" and not cache.is_cached():
        head = "<b>Offline? The canonical dataset could not be downloaded.</b> The bundled sample works without internet."
    elif source == "upload":
        head = "<b>This file cannot be used.</b>"
    else:
        head = "<b>The dataset could not be loaded.</b>"
    kept = f"<br>Still loaded: {html.escape(previous['name'])} ({plural(previous['count'], 'record')})." if previous else ""
    return notice(f"{head}<br>{html.escape(message)}{kept}", "error")


def summary_html(state: dict, records: list[dict]) -> str:
    sizes = split_sizes(split_instructions(records))
    cards = [("records", len(records)), ("train", sizes["train"]), ("validation", sizes["val"]), ("test", sizes["test"])]
    stats = "".join(f'<div class="gi-stat"><div class="value">{v:,}</div><div class="label">{k}</div></div>' for k, v in cards)
    return (f'<div class="gi-meta"><span class="gi-pill">{html.escape(state["name"])}</span>'
            f'<span>split in file order, as in the book: 85 % train, 5 % validation, 10 % test</span></div><div class="gi-stat-row">{stats}</div>')


def clip(text: str, limit: int = CELL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table_page(records: list[dict] | None, query: str = "", page: int = 1) -> tuple[list[list], str, int]:
    """Rows of one page, ``"N records, page x / y"``, and the page actually shown."""
    if not records:
        return [], "No dataset loaded", 1
    result = page_of(records, query, page, PAGE_SIZE)
    rows = [[i + 1, split_of(i, len(records)), clip(r["instruction"]), clip(r["input"]), clip(r["output"])] for i, r in result.rows]
    return rows, result.summary(), result.page


def tokens_html(view: list[tuple[str, bool]]) -> str:
    spans = []
    for i, (text, trained) in enumerate(view):
        if not text:  # the first bytes of a character that a later token completes
            continue
        shown = html.escape(text).replace("\n", "↵\n")
        spans.append(f'<span class="gi-tok {"trained" if trained else "masked"}{" alt" if i % 2 else ""}">{shown}</span>')
    return f'<div class="gi-tokens">{"".join(spans)}</div>'


def record_view(records: list[dict] | None, number: int | float | None, mask_prompt: bool,
                style: str = "alpaca") -> tuple[str, str]:
    """One record (1-based ``number``) as its training text in a prompt format, each token shaded by whether the loss
    trains on it."""
    if not records:
        return notice("Load a dataset to see its records."), ""
    index = min(max(1, box_number(number, "record #")), len(records)) - 1
    view = token_view(records[index], mask_prompt, style)
    trained = sum(t for _, t in view)
    split = split_of(index, len(records))
    skipped = skip_reason(records[index], style)
    use = f"{html.escape(skipped)}" if skipped else f"{trained} trained on · {len(view) - trained} masked"
    meta = (f'<div class="gi-meta"><span class="gi-pill">record {index + 1:,} of {len(records):,}</span>'
            f'<span class="gi-pill {split}">{split} split</span><span class="gi-pill">{plural(len(view), "token")}</span>'
            f'<span class="gi-pill">{use}</span>'
            f'<span><span class="gi-swatch" style="background:rgba(79,70,229,.35)"></span>trained on'
            f'&nbsp;&nbsp;<span class="gi-swatch" style="background:rgba(100,116,139,.25)"></span>masked (no loss)</span></div>')
    return meta, tokens_html(view)


def render(state: dict, records: list[dict], mask_prompt: bool, style: str, stats: dict) -> tuple:
    """Everything the tab shows for a freshly loaded dataset: summary, histogram, page 1, record 1."""
    rows, count, page = table_page(records)
    meta, tokens = record_view(records, 1, mask_prompt, style)
    return summary_html(state, records), length_histogram(stats), rows, count, page, "", 1, meta, tokens


def repeats_note(records: list[dict]) -> str:
    """Records that repeat an earlier one word for word, by number with the one they repeat; "" when none."""
    first, repeats = {}, []
    for i, r in enumerate(records, start=1):
        key = (r["instruction"], r["input"], r["output"])
        if key in first:
            repeats.append(f"#{i:,} = #{first[key]:,}")
        first.setdefault(key, i)
    if not repeats:
        return ""
    return (f"{plural(len(repeats), 'record')} repeating an earlier one word for word ({listed(repeats)}): "
            "each trains once more.")


def too_long_note(stats: dict, context: int = CONTEXT) -> str:
    """Which records training will skip as longer than the context, by number; "" when none."""
    totals = stats["total_tokens"]
    numbers = [i + 1 for i, total in enumerate(totals) if too_long(total - 1, context)]  # total: end token too
    if not numbers:
        return ""
    note = (f"{plural(len(numbers), 'record')} longer than GPT-2's {context:,}-token context: training skips "
            f"{'it' if len(numbers) == 1 else 'them'} ({listed([f'#{n:,}' for n in numbers])}).")
    validation = [i + 1 for i, name in enumerate(split_names(len(totals))) if name == "val"]
    if set(validation) <= set(numbers):
        span = f"#{validation[0]:,}" if len(validation) == 1 else f"#{validation[0]:,}-#{validation[-1]:,}"
        note += f" That is every validation record ({span}): a run will show no validation loss."
    return note


def load(engine, source: str, upload: str | None, previous: dict | None, mask_prompt: bool, style: str = "alpaca"):
    """Load a source: (source radio, state, message, view...). On failure the error is shown, the previous dataset
    stays and the radio goes back to it."""
    style = known_style(style)
    try:
        state, records = engine.datasets.open(source, upload)
    except DatasetError as e:
        back = previous["source"] if previous else gr.skip()
        return (back, gr.skip(), error_notice(source, scrub(str(e)), previous)) + (gr.skip(),) * 9
    stats = engine.datasets.token_stats(state, records, style)
    return (source, state, loaded_notice(state, records, stats)) + render(state, records, mask_prompt, style, stats)


def loaded_notice(state: dict, records: list[dict], stats: dict) -> str:
    """What loading this dataset says: its size, and what training will make of it in the format chosen."""
    done = notice(f"Loaded <b>{html.escape(state['name'])}</b>: {plural(state['count'], 'record')}.", "ok")
    warnings = split_warnings(state["count"])
    if warnings:
        done += notice("<b>Too few records to split.</b> " + " ".join(html.escape(w) for w in warnings), "error")
    for note in (too_long_note(stats), repeats_note(records)):
        if note:
            done += notice(html.escape(note), "error")
    return done


def load_default(engine, remembered: dict | None = None, style: str = "alpaca"):
    """On page load: the dataset this browser had before a reload while it can still be opened, else ``default_source``;
    never the network. Its record is shown masked as the Train tab's
    form opens (``suggested_mask``), and the last output sets the mask box so."""
    mask_prompt = suggested_mask(engine)
    if isinstance(remembered, dict) and (remembered.get("source") != "canonical" or cache.is_cached()):
        try:
            state, records = engine.datasets.reopen(remembered)
        except (DatasetError, OSError):
            pass
        else:
            return (state["source"], state, "") + render(state, records, mask_prompt, style,
                                                         engine.datasets.token_stats(state, records, style)) + (mask_prompt,)
    return load(engine, default_source(engine), None, None, mask_prompt, style) + (mask_prompt,)


def pick_source(engine, source: str, upload: str | None, previous: dict | None, mask_prompt: bool, style: str = "alpaca"):
    """The source radio: load it at once, except "upload" before a file is chosen."""
    if source == "upload" and not upload:
        choose = "Choose a file below: a JSON list of records, JSON Lines, or CSV / TSV whose header row names the fields."
        return (gr.skip(), gr.skip(), notice(choose)) + (gr.skip(),) * 9
    return load(engine, source, upload, previous, mask_prompt, style)


def box_number(value, name: str) -> int:
    """A record or page number as its box sends it (1 when empty); ``gr.Error`` naming the box for what only an API
    client sends (NaN or infinity in raw JSON; Gradio itself refuses text and rounds fractions)."""
    try:
        return as_int(value or 1, name)
    except ValueError as e:
        raise gr.Error(str(e)) from None


def known_style(style) -> str:
    """The prompt format, checked: the radio sends only known ones, an API client may send anything."""
    if style not in STYLES:
        raise gr.Error(f"prompt format must be one of {', '.join(STYLES)}, got {style!r}")
    return style


def records_of(engine, state: dict | None) -> list[dict] | None:
    try:
        return engine.datasets.records(state) if state else None
    except DatasetError:
        return None


def search(engine, query: str, page: int | float | None, state: dict | None):
    return table_page(records_of(engine, state), query, box_number(page, "page"))


PREFERENCE_HEADERS = ["#", "split", "instruction", "input", "chosen", "rejected"]


def preference_page(engine, query: str = "", page: int | float | None = 1):
    """One page of the book's preference pairs, chosen and rejected side by side: (message, rows, count, page)."""
    try:
        records = engine.preference_records()
    except DatasetError as e:
        head = ("<b>Offline? The book's preference pairs could not be downloaded.</b> Preference tuning still works with "
                "your own file of pairs (upload it in the Align tab)." if not cache.is_preference_cached()
                else "<b>The preference pairs could not be loaded.</b>")
        return notice(f"{head}<br>{html.escape(scrub(str(e)))}", "error"), [], "No preference pairs loaded", 1
    rows, found = browse_preferences(records, query, box_number(page, "page"))
    table = [[r["index"] + 1, r["split"], clip(r["instruction"]), clip(r["input"]), clip(r["chosen"]), clip(r["rejected"])]
             for r in rows]
    loaded = notice(f"<b>{cache.PREFERENCE_NAME}</b>: {len(records):,} pairs, each with a chosen (polite) and a rejected "
                    "(impolite) answer; the Align tab tunes a fine-tuned run towards the chosen ones.", "ok")
    return loaded, table, found.summary().replace("record", "pair"), found.page


def build(shared) -> None:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            source = gr.Radio(SOURCES, value=None, label="Source", elem_id="dataset-source")
            upload = gr.File(label=f"Instructions file ({MAX_FILE_BYTES // 2**20} MB at most)", file_types=list(FILE_SUFFIXES),
                             height=110, elem_id="upload")
            load_btn = gr.Button("Load", variant="secondary", size="sm", elem_id="load-btn")
        with gr.Column(scale=4):
            error = gr.HTML(elem_id="dataset-error")
            summary = gr.HTML(elem_id="dataset-summary")
    histogram = gr.Plot(label="Token lengths: prompt vs response", show_label=False, elem_id="length-chart")

    gr.Markdown("### Records")
    with gr.Row(equal_height=True):
        query = gr.Textbox(placeholder="Search instruction, input and output…", show_label=False, scale=5, min_width=340,
                           elem_id="dataset-search")  # a line of its own on a phone, the three page controls together below
        prev_btn = gr.Button("‹ Prev", size="sm", scale=0, min_width=70, elem_id="prev-page")
        page = gr.Number(value=1, precision=0, show_label=False, scale=0, min_width=70, elem_id="page-number")
        next_btn = gr.Button("Next ›", size="sm", scale=0, min_width=70, elem_id="next-page")
    count = gr.Markdown(elem_id="record-count")
    table = gr.Dataframe(headers=HEADERS, datatype=["number", "str", "str", "str", "str"], interactive=False, wrap=True,
                         max_height=520, column_widths=["7%", "8%", "33%", "20%", "32%"], elem_id="dataset-table")

    gr.Markdown("### One record, as the model is trained on it")
    with gr.Row(equal_height=True):
        number = gr.Number(value=1, precision=0, label="Record #", scale=0, min_width=120, elem_id="record-number")
        mask = gr.Checkbox(value=False, label="Mask the prompt (train on the response only)", elem_id="mask-prompt")
        style = style_radio("dataset-prompt-style")
    shared.prompt_view = (mask, style)
    meta = gr.HTML(elem_id="record-meta")
    tokens = gr.HTML(elem_id="record-tokens")

    with gr.Accordion("Preference pairs: chosen and rejected answers side by side", open=False, elem_id="preference-pairs"):
        with gr.Row(equal_height=True):
            pref_load = gr.Button("Load the book's preference pairs", size="sm", scale=0, min_width=260, elem_id="pref-load-btn")
            pref_query = gr.Textbox(placeholder="Search instruction, chosen and rejected answers…", show_label=False, scale=5,
                                    min_width=340, elem_id="pref-search")
            pref_prev = gr.Button("‹ Prev", size="sm", scale=0, min_width=70, elem_id="pref-prev-page")
            pref_page = gr.Number(value=1, precision=0, show_label=False, scale=0, min_width=70, elem_id="pref-page-number")
            pref_next = gr.Button("Next ›", size="sm", scale=0, min_width=70, elem_id="pref-next-page")
        pref_message = gr.HTML(elem_id="pref-message")
        pref_count = gr.Markdown(elem_id="pref-count")
        pref_table = gr.Dataframe(headers=PREFERENCE_HEADERS, interactive=False, wrap=True, max_height=520,
                                  column_widths=["6%", "7%", "22%", "13%", "26%", "26%"], elem_id="pref-table")

    engine, state = shared.engine, shared.dataset
    view_outputs = [summary, histogram, table, count, page, query, number, meta, tokens]
    load_outputs = [source, state, error] + view_outputs
    cheap = dict(concurrency_limit=None, show_progress="hidden")

    load_btn.click(lambda *a: load(engine, *a), [source, upload, state, mask, style], load_outputs, api_name="load_dataset",
                   concurrency_limit=2)
    source.input(lambda *a: pick_source(engine, *a), [source, upload, state, mask, style], load_outputs, api_visibility="private",
                 concurrency_limit=2)
    upload.upload(lambda u, s, m, f: load(engine, "upload", u, s, m, f), [upload, state, mask, style], load_outputs,
                  api_visibility="private", concurrency_limit=2)
    remembered = shared.remembered = gr.BrowserState(None, storage_key="gpt2-instruct-dataset")
    shared.app.load(lambda r, f: load_default(engine, r, f), [remembered, style], load_outputs + [mask], api_visibility="private",
                    concurrency_limit=2)
    state.change(lambda s: s if s else gr.skip(), state, remembered, api_visibility="private", **cheap)

    query.change(lambda q, s: search(engine, q, 1, s), [query, state], [table, count, page], api_visibility="private",
                 trigger_mode="always_last", **cheap)
    page.submit(lambda *a: search(engine, *a), [query, page, state], [table, count, page], api_name="search", **cheap)
    for button, step in ((prev_btn, -1), (next_btn, 1)):
        button.click(lambda q, p, s, step=step: search(engine, q, box_number(p, "page") + step, s), [query, page, state],
                     [table, count, page], api_visibility="private", **cheap)

    def select_row(state, mask_prompt, style, evt: gr.SelectData):
        row = evt.row_value or []
        if not row or row[0] in (None, ""):
            return gr.skip(), gr.skip(), gr.skip()
        return (int(row[0]),) + record_view(records_of(engine, state), int(row[0]), mask_prompt, style)

    def view(state, number, mask_prompt, style="alpaca"):
        """(the record number, put within 1..count as the record shown is, its header, its tokens)"""
        style = known_style(style)
        records = records_of(engine, state)
        shown = min(max(1, box_number(number, "record #")), len(records)) if records else gr.skip()
        return shown, *record_view(records, number, mask_prompt, style)

    def restyle(state, number, mask_prompt, style):
        """Another prompt format: the token lengths, the records too long for the context and the record shown,
        as training would see them."""
        style = known_style(style)
        records = records_of(engine, state)
        if not records:
            return (gr.skip(), gr.skip()) + view(state, number, mask_prompt, style)
        stats = engine.datasets.token_stats(state, records, style)
        return (loaded_notice(state, records, stats), length_histogram(stats)) + view(state, number, mask_prompt, style)

    pref_outputs = [pref_message, pref_table, pref_count, pref_page]
    pref_load.click(lambda: preference_page(engine), None, pref_outputs, api_visibility="private", concurrency_limit=2)
    pref_page.submit(lambda q, p: preference_page(engine, q, p), [pref_query, pref_page], pref_outputs,
                     api_name="browse_preferences", **cheap)
    pref_query.change(lambda q: preference_page(engine, q, 1), pref_query, pref_outputs, api_visibility="private",
                      trigger_mode="always_last", **cheap)  # as the records' search: the count never contradicts the box
    for button, step in ((pref_prev, -1), (pref_next, 1)):
        button.click(lambda q, p, step=step: preference_page(engine, q, box_number(p, "page") + step), [pref_query, pref_page],
                     pref_outputs, api_visibility="private", **cheap)

    table.select(select_row, [state, mask, style], [number, meta, tokens], api_visibility="private", **cheap)
    number.submit(view, [state, number, mask, style], [number, meta, tokens], api_name="record", **cheap)
    mask.change(view, [state, number, mask, style], [number, meta, tokens], api_visibility="private", **cheap)
    style.change(restyle, [state, number, mask, style], [error, histogram, number, meta, tokens], api_name="prompt_format",
                 **cheap)
