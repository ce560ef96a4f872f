"""The Dataset tab in the browser: load, search, page, read one record's tokens; a bad upload is explained."""
import pytest

from data import load_instructions
from data.browse import PAGE_SIZE, matches

from .conftest import VIEWPORT, count_text, load_sample, open_tab, screenshot, text_of, wait_plot, wait_text

pytestmark = pytest.mark.browser


def table_rows(page) -> list[list[str]]:
    """The cells of the rows the table has drawn (it draws the rows on screen: the first ones of a page)."""
    return page.evaluate("""() => [...document.querySelectorAll('#dataset-table .virtual-row[role=row]')]
        .sort((a, b) => a.dataset.index - b.dataset.index)
        .map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))""")


def table_size(page) -> int:
    """Rows in the table's page, as the grid announces them (the header row excluded)."""
    return int(page.get_attribute("#dataset-table [role=grid]", "aria-rowcount")) - 1


def wait_first_row(page, number: int) -> None:
    page.wait_for_function("n => document.querySelector('#dataset-table [data-testid=\"cell-0-0\"]')?.innerText.trim() === String(n)",
                           arg=number)


def binned_records(page, selector: str) -> list[int]:
    """Records each histogram trace draws: its bins' counts summed, as Plotly binned them in the page (the counts
    arrive packed, so the traces' own ``x`` is not a list to count)."""
    return page.evaluate("s => document.querySelector(s + ' .js-plotly-plot').calcdata"
                         ".map(bins => bins.reduce((sum, bin) => sum + (bin.s || 0), 0))", selector)


def test_browse_search_page_and_read_a_record(page, folders):
    # On load: the canonical dataset when it is cached (here: copied into the app's cache), else the sample; the sample
    # too when the Train tab opens on the offline demo (tiny: no GPT-2 weights here), whose settings are for it.
    open_tab(page, "train")
    demo = page.input_value("#model-preset input").startswith("tiny ·")
    open_tab(page, "dataset")
    default = load_instructions("canonical" if (folders["cache"] / "instruction-data.json").is_file() and not demo else "sample")
    assert text_of(page, "#record-count") == count_text(len(default))
    wait_plot(page, "#length-chart", 2)  # prompt and response lengths
    assert binned_records(page, "#length-chart") == [len(default)] * 2

    load_sample(page)
    assert "1,100" not in page.inner_text(".gi-header")  # the header claims no count that the loaded data may not have
    sample = load_instructions("sample")
    assert [c.inner_text() for c in page.locator("#dataset-summary .gi-stat .value").all()] == ["74", "62", "5", "7"]
    wait_first_row(page, 1)
    assert table_size(page) == PAGE_SIZE
    first = table_rows(page)[0]
    assert first[:3] == ["1", "train", " ".join(sample[0]["instruction"].split())]
    page.set_viewport_size({"width": 420, "height": 1000})  # a phone: the columns keep readable widths, the table scrolls
    page.wait_for_function("() => { const c = document.querySelector('#dataset-table .table-container');"
                           " return c.scrollWidth > c.clientWidth + 200 }")
    cells = page.evaluate("() => [...document.querySelector('#dataset-table .virtual-row').children].map(c => c.getBoundingClientRect().width)")
    assert min(cells[2:]) >= 150 and cells[1] >= 60, cells  # "validation" fits its split column
    tabs = page.locator("[role=tablist] [role=tab]")  # every tab stays in sight (wrapped), none behind a "..." menu
    page.wait_for_function("() => [...document.querySelectorAll('[role=tablist] [role=tab]')].filter(t => t.offsetParent).length == 5")
    assert [t.inner_text() for t in tabs.all() if t.is_visible()] == ["Dataset", "Train", "Playground", "Evaluate", "Align"]
    page.set_viewport_size(VIEWPORT)

    # Typing narrows the table to the records that say it, in any field, in any case.
    expected = [i + 1 for i in matches(sample, "passive")]
    assert 1 < len(expected) < PAGE_SIZE
    page.locator("#dataset-search textarea").press_sequentially("PASSIVE", delay=30)
    wait_text(page, "#record-count", count_text(len(expected)))
    page.wait_for_function("n => document.querySelector('#dataset-table [role=grid]').getAttribute('aria-rowcount') == n",
                           arg=len(expected) + 1)
    rows = table_rows(page)
    assert [int(r[0]) for r in rows] == expected[:len(rows)] and rows
    assert all("passive" in " ".join(r[2:]).lower() for r in rows)

    page.locator("#dataset-search textarea").fill("no record says this")
    wait_text(page, "#record-count", count_text(0))

    # Paging through all 74: 25, 25, 24; Prev goes back.
    page.locator("#dataset-search textarea").fill("")
    wait_text(page, "#record-count", count_text(74))
    page.click("#next-page")
    wait_text(page, "#record-count", count_text(74, 2))
    wait_first_row(page, 26)
    assert page.input_value("#page-number input") == "2"
    page.click("#next-page")
    wait_text(page, "#record-count", count_text(74, 3))
    wait_first_row(page, 51)
    assert table_size(page) == 24
    page.click("#next-page")  # past the end: stays on the last page
    wait_first_row(page, 51)
    assert text_of(page, "#record-count") == count_text(74, 3)
    page.click("#prev-page")
    wait_text(page, "#record-count", count_text(74, 2))
    wait_first_row(page, 26)

    # A record as the model sees it: every token coloured, trained on or masked.
    wait_text(page, "#record-meta", "record 1 of 74")
    assert "train split" in text_of(page, "#record-meta")
    tokens = page.locator("#record-tokens .gi-tok")
    assert tokens.count() > 20
    colours = page.evaluate("""() => Object.fromEntries(['trained', 'masked'].map(k =>
        [k, getComputedStyle(document.querySelector('#record-tokens .gi-tok.' + k)).backgroundColor]))""")
    assert len(set(colours.values())) == 2 and "rgba(0, 0, 0, 0)" not in colours.values(), colours
    # The view opens masked as the Train tab's form is (the offline demo masks the prompt, the book's settings do
    # not), and the two boxes are one choice: a click in either moves the other.
    page.click("#tab-train-button")
    opened_masked = page.is_checked("#train-mask-prompt input")
    page.click("#tab-dataset-button")
    assert page.is_checked("#mask-prompt input") == opened_masked
    if opened_masked:
        page.uncheck("#mask-prompt input")
        page.wait_for_function("() => document.querySelectorAll('#record-tokens .gi-tok.masked').length === 1")
        page.click("#tab-train-button")
        assert not page.is_checked("#train-mask-prompt input")
        page.click("#tab-dataset-button")
    unmasked = page.locator("#record-tokens .gi-tok.masked").count()
    page.click("#tab-train-button")
    page.check("#train-mask-prompt input")
    page.click("#tab-dataset-button")
    assert page.is_checked("#mask-prompt input")
    page.wait_for_function("n => document.querySelectorAll('#record-tokens .gi-tok.masked').length > n", arg=unmasked)
    masked = page.locator("#record-tokens .gi-tok.masked").count()
    assert f"{masked} masked" in text_of(page, "#record-meta")
    # The Phi-3 format of exercise 7.1: the same record, shorter, and the lengths chart follows.
    alpaca_median = page.evaluate("() => document.querySelector('#length-chart .js-plotly-plot').data[0].name")
    page.locator("#dataset-prompt-style").get_by_label("Phi-3", exact=False).check()
    wait_text(page, "#record-tokens", "<|user|>")
    page.wait_for_function("m => document.querySelector('#length-chart .js-plotly-plot')?.data[0].name !== m", arg=alpaca_median)
    assert "### Instruction" not in text_of(page, "#record-tokens")
    page.click("#tab-train-button")  # the Train tab's format moved with it
    assert page.locator("#train-prompt-style input:checked").get_attribute("value") == "phi3"
    page.click("#tab-dataset-button")
    page.locator("#dataset-prompt-style").get_by_label("Alpaca", exact=False).check()
    wait_text(page, "#record-tokens", "### Instruction")

    # Clicking a row opens that record: the 4th row of page 2 is record 29.
    page.click('#dataset-table [data-testid="cell-3-2"]')
    wait_text(page, "#record-meta", "record 29 of 74")
    assert page.input_value("#record-number input") == "29"
    assert " ".join(sample[28]["instruction"].split()[:3]) in text_of(page, "#record-tokens")
    screenshot(page, "dataset.png")


def test_a_malformed_upload_names_the_record_and_field_and_keeps_the_dataset(page, tmp_path):
    load_sample(page)
    bad = tmp_path / "mine.json"
    bad.write_text('[{"instruction": "Say hi", "input": "", "output": "hi"},\n'
                   ' {"instruction": "Say bye", "input": ""}]')
    page.set_input_files("#upload input[type=file]", bad)
    error = wait_text(page, "#dataset-error", "This file cannot be used.")
    assert 'mine.json, record 2: field "output" is missing' in error
    assert "Still loaded: bundled sample (74 records)." in error
    assert page.locator("#dataset-error .gi-notice.error").is_visible()
    # The table, the summary and the record view still show the sample.
    assert text_of(page, "#record-count") == count_text(74)
    assert [c.inner_text() for c in page.locator("#dataset-summary .gi-stat .value").all()][0] == "74"
    assert table_rows(page)[0][0] == "1" and table_size(page) == PAGE_SIZE
    assert "record 1 of 74" in text_of(page, "#record-meta")


def test_a_spreadsheets_csv_loads(page, tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text('instruction,input,output\n"Say hi, twice",,hi hi\nSay bye,,bye\nName a fruit,,Apple\n')
    page.wait_for_function("() => localStorage.getItem('gpt2-instruct-dataset') !== null")  # the default has loaded
    page.set_input_files("#upload input[type=file]", sheet)
    wait_text(page, "#dataset-error", "Loaded sheet.csv: 3 records.")
    assert text_of(page, "#record-count") == count_text(3)
    assert table_rows(page)[0][2] == "Say hi, twice"


def test_a_reload_keeps_the_dataset_this_browser_loaded(page, tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(f'{{"instruction": "Say {i}.", "input": "", "output": "{i}"}}\n' for i in range(12)))
    kept = "() => localStorage.getItem('gpt2-instruct-dataset')"
    page.wait_for_function(f"() => ({kept})() !== null")  # the default dataset, stored once the page has loaded it
    before = page.evaluate(kept)
    page.set_input_files("#upload input[type=file]", mine)
    wait_text(page, "#dataset-error", "Loaded mine.jsonl: 12 records.")
    page.wait_for_function(f"before => ({kept})() !== before", arg=before)  # the browser has stored its choice
    page.reload()
    wait_text(page, "#record-count", count_text(12))  # not the default dataset: training would have used it
    open_tab(page, "train")
    wait_text(page, "#train-data", "Data: mine.jsonl, 12 records")
