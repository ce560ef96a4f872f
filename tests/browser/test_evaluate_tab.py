"""The Evaluate tab in the browser: score the finished run against its base model on a few test examples, export it."""
import zipfile
from pathlib import Path

import pytest

from .conftest import VIEWPORT, choose, open_tab, screenshot, set_slider, wait_plot, wait_text

pytestmark = pytest.mark.browser
LIMIT, NEW_TOKENS = 4, 8
SECRET = "sk-never-saved-1234"


def test_evaluate_a_run_on_a_few_examples_and_export_it(page, finished_run):
    open_tab(page, "evaluate")
    choose(page, "#eval-run", f"{finished_run.name} · tiny")
    wait_text(page, "#eval-summary", "This run has no evaluation yet")
    assert wait_plot(page, "#eval-chart") == []  # an empty chart until there are results

    page.fill("#eval-limit input", str(LIMIT))
    set_slider(page, "#eval-max-new-tokens", NEW_TOKENS)
    page.fill("#eval-judge-key input", SECRET)  # no judge URL: unused, but sent with the evaluation's inputs
    start = page.locator("#eval-start-btn")
    assert start.is_enabled()
    start.click()
    done = wait_text(page, "#eval-progress", f"Evaluated {LIMIT} examples", timeout_ms=120_000)
    assert "eval.jsonl" in done and finished_run.name in done
    stored = page.evaluate("() => JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    assert SECRET not in stored, "the API key was kept in the browser's storage (Gradio's run history)"
    page.wait_for_function("() => !document.querySelector('#eval-start-btn').disabled")
    assert not page.locator("#eval-stop-btn").is_enabled()

    # Summary: base against fine-tuned on what was asked for.
    summary = wait_text(page, "#eval-summary", f"{LIMIT} test examples of bundled sample")
    assert f"up to {NEW_TOKENS} new tokens, greedy" in summary
    assert page.locator("#eval-summary table.gi-eval th", has_text="base").count() >= 1
    rows = page.evaluate("() => [...document.querySelectorAll('#eval-summary table.gi-eval tr')].map(r => r.innerText)")
    assert any(r.startswith("ROUGE-L F1") for r in rows) and any(r.startswith("perplexity") for r in rows), rows
    perplexity = next(r for r in rows if r.startswith("perplexity")).split("\t")
    assert all(float(v.replace(",", "")) > 1 for v in perplexity[1:3]), perplexity  # a number for each model

    # Chart: base and fine-tuned bars, drawn in the SVG.
    traces = wait_plot(page, "#eval-chart", 4)
    assert traces == [2, 1, 2, 1], traces  # ROUGE-L and "ended on its own", then perplexity, for each model
    names = page.evaluate("() => [...new Set(document.querySelector('#eval-chart .js-plotly-plot').data.map(t => t.name))]")
    assert names == ["base", "fine-tuned"]
    heights = page.evaluate("""() => [...document.querySelectorAll('#eval-chart svg .barlayer .point path')]
        .map(p => p.getBBox().height)""")
    assert len(heights) == sum(traces) and sum(h > 0 for h in heights) >= 2, heights  # at least the perplexities show

    # Table: one row per evaluated example, with both models' answers.
    page.wait_for_function("n => document.querySelector('#eval-table [role=grid]')?.getAttribute('aria-rowcount') == n", arg=LIMIT + 1)
    headers = page.evaluate("() => [...document.querySelectorAll('#eval-table thead th')].map(h => h.innerText.trim())")
    assert {"instruction", "reference", "base response", "fine-tuned response"} <= set(headers), headers
    page.set_viewport_size({"width": 420, "height": 1000})  # a phone: the text columns keep their width, the table scrolls
    page.wait_for_function("() => { const v = document.querySelector('#eval-table .virtual-table-viewport');"
                           " return v.scrollWidth > v.clientWidth + 100 }")
    cells = page.evaluate("() => [...document.querySelector('#eval-table .virtual-row').children].map(c => c.getBoundingClientRect().width)")
    assert min(cells[2:6]) >= 150, cells
    page.set_viewport_size(VIEWPORT)

    # Export: a zip of the Hugging Face files to download.
    page.click("#export-btn")
    message = wait_text(page, "#export-message", "-hf.zip", timeout_ms=60_000)
    assert f"{finished_run.name}-hf.zip" in message and f"unzip it and load the folder {finished_run.name} " in message
    zip_name = f"{finished_run.name}-hf.zip"
    assert page.locator(f'#export-file td.filename[aria-label="{zip_name}"]').is_visible()
    with page.expect_download() as download:
        page.click(f'#export-file a[download="{zip_name}"]')
    with zipfile.ZipFile(download.value.path()) as archive:
        names = archive.namelist()
    assert {Path(name).parts[0] for name in names} == {finished_run.name}, names  # one folder, named after the run
    assert {"config.json", "model.safetensors"} <= {Path(name).name for name in names}, names
    screenshot(page, "evaluate.png")


def test_a_reload_during_an_evaluation_brings_its_progress_and_stop_back(page, finished_run):
    open_tab(page, "evaluate")
    choose(page, "#eval-run", f"{finished_run.name} · tiny")
    page.fill("#eval-limit input", "0")
    page.fill("#eval-batch-size input", "1")
    set_slider(page, "#eval-max-new-tokens", 256)  # every test example, one at a time: long enough to reload
    page.click("#eval-start-btn")
    wait_text(page, "#eval-progress", "phase")

    page.reload()
    wait_text(page, "#record-count", " records, page ")
    open_tab(page, "evaluate")
    wait_text(page, "#eval-message", f"Evaluating {finished_run.name}")
    wait_text(page, "#eval-progress", "phase")
    page.wait_for_function("() => !document.querySelector('#eval-stop-btn').disabled")
    assert not page.locator("#eval-start-btn").is_enabled()
    page.click("#eval-stop-btn")
    wait_text(page, "#eval-progress", "Stopped: nothing was written", timeout_ms=60_000)
    page.wait_for_function("() => !document.querySelector('#eval-start-btn').disabled")
    assert not page.locator("#eval-stop-btn").is_enabled()
