"""The Train tab in the browser: a tiny fine-tune on the bundled sample draws its loss live and finishes."""
import time

import pytest

from .conftest import SHOWN_JS, choose, load_sample, open_tab, screenshot, text_of, wait_plot, wait_text

pytestmark = pytest.mark.browser
STEPS, EVAL_EVERY = 24, 6  # long enough on an idle machine for the page to see the chart grow
RUN_TIMEOUT_S = 120


def test_a_tiny_fine_tune_draws_its_loss_live_and_finishes(page):
    load_sample(page)
    open_tab(page, "train")
    wait_text(page, "#train-data", "Data: bundled sample, 74 records")
    choose(page, "#model-preset", "tiny ·")  # the default is GPT-2 124M where its weights are cached or the Hub answers
    page.check("#random-init input")
    page.fill("#max-steps input", str(STEPS))
    page.fill("#eval-every input", str(EVAL_EVERY))
    wait_plot(page, "#loss-chart")  # drawn: empty, inviting a start, or with the previous run
    start, stop = page.locator("#start-btn"), page.locator("#stop-btn")
    assert start.is_enabled()
    assert page.input_value("#model-preset input").startswith("tiny ·") and page.is_checked("#random-init input")

    before = text_of(page, "#train-final")  # a previous run's "Done …" stays until the next tick
    start.click()
    wait_text(page, "#train-message", "Started fine-tuning tiny on bundled sample.")
    # Sample what a person sees until the run says it is done: the number of points on the chart,
    # whether Start and Stop can be pressed, and the progress line.
    sample = f"""() => [(document.querySelector('#loss-chart .js-plotly-plot')?.data || []).reduce((n, t) => n + t.x.length, 0),
        !document.querySelector('#start-btn').disabled, !document.querySelector('#stop-btn').disabled, ({SHOWN_JS})('#train-final')]"""
    seen = []
    deadline = time.time() + RUN_TIMEOUT_S
    while True:
        seen.append(page.evaluate(sample))
        final = seen[-1][3]
        if final != before and ("Done" in final or "failed" in final):
            break
        assert time.time() < deadline, f"the run did not finish within {RUN_TIMEOUT_S} s: {text_of(page, '#train-progress')!r}"
        time.sleep(0.2)
    assert final.startswith(f"Done after {STEPS} steps"), final
    running = seen[:-1]
    assert running, "the run ended before the page showed it running"
    assert not any(enabled for _, enabled, _, _ in running), "Start could be pressed while the run was going"
    assert any(can_stop for _, _, can_stop, _ in running), "Stop never became available to the browser that started the run"

    # The chart grew while the run went: raw and smoothed train loss at every step, validation loss every EVAL_EVERY, two "before" markers.
    counts = [points for points, *_ in seen]
    drawn = [c for c in counts if c]
    assert counts == sorted(counts), f"the chart lost points: {counts}"
    assert len(set(drawn)) >= 2, f"the chart was drawn once, not growing: {counts}"
    page.wait_for_function("() => document.querySelector('#start-btn').disabled === false")
    traces = page.evaluate("() => document.querySelector('#loss-chart .js-plotly-plot').data.map(t => [t.name, t.x.length])")
    assert dict(traces) == {"train loss (raw)": STEPS + 1, "train loss": STEPS + 1, "validation loss": STEPS // EVAL_EVERY + 1,
                            "before training": 2}
    markers = page.locator("#loss-chart svg .scatterlayer path.point").count()
    assert markers == STEPS // EVAL_EVERY + 1 + 2, "the validation and baseline markers are not all drawn in the SVG"
    assert page.locator("#loss-chart svg .scatterlayer path.js-line").count() >= 2
    chart = page.locator("#loss-chart .js-plotly-plot").bounding_box()  # the mouse over it shows Plotly's mode bar
    page.mouse.move(chart["x"] + chart["width"] / 2, chart["y"] + chart["height"] / 2)
    page.wait_for_selector("#loss-chart .modebar", state="visible")
    title, bar = (page.locator(f"#loss-chart {part}").bounding_box() for part in (".gtitle", ".modebar"))
    assert page.locator("#loss-chart .gtitle").text_content() == "tiny on bundled sample"  # as the Dataset tab names it
    assert title["x"] + title["width"] < bar["x"] or title["y"] + title["height"] < bar["y"], "the mode bar covers the title"

    progress = wait_text(page, "#train-progress", "Done")  # "done", capitalised by CSS
    assert f"step {STEPS} / {STEPS}" in progress and "tiny (random init) · sample · full fine-tune" in progress
    assert "validation loss" in final and "Saved as run" in final
    assert text_of(page, "#train-message") == ""  # "Started fine-tuning…" went with the run
    assert "Validation instruction" in text_of(page, "#sample-responses")
    assert not stop.is_enabled()
    run = final.split("Saved as run ")[1].split()[0].rstrip(".")
    wait_text(page, "#expected-epoch", f"Last finished run of tiny, full fine-tuning here ({run}): {STEPS} steps of the bundled sample took")
    # The progress bar fills up (its width eases in over 0.6 s).
    page.wait_for_function("""() => { const fill = document.querySelector('#train-progress .gi-fill');
        return fill && fill.getBoundingClientRect().width >= fill.parentElement.clientWidth - 1 }""", timeout=5_000)
    screenshot(page, "train.png")
    # The finished run is one click from the Playground, picked there.
    page.click("#to-playground")
    page.wait_for_function("() => document.querySelector('#tuned-run input')?.checkVisibility() && window.scrollY === 0")
    run = final.split("Saved as run ")[1].rstrip(".").strip()
    page.wait_for_function("name => document.querySelector('#tuned-run input').value.startsWith(name)", arg=run)


CHART = "document.querySelector('#loss-chart .gi-live-chart')"
TRAIN_POINTS = f"() => (({CHART}?.data || []).find(t => t.meta === 'live-train')?.x || []).length"


def test_the_live_chart_keeps_the_zoom_while_new_points_arrive(page):
    load_sample(page)
    open_tab(page, "train")
    choose(page, "#model-preset", "tiny ·")
    note = wait_text(page, "#model-note", "The offline demo fine-tunes tiny")
    assert "openai-community/gpt2" not in note  # the rest of the note opens on a click
    page.click("#model-note summary")
    note = wait_text(page, "#model-note", "openai-community/gpt2")
    assert "path box" in note
    page.check("#random-init input")
    page.fill("#max-steps input", "60")
    page.fill("#eval-every input", "10")
    page.locator("#start-btn").click()
    wait_text(page, "#train-message", "Started fine-tuning tiny on bundled sample.")
    # The chart still shows the previous run's points until this run's first tick redraws it with the progress line.
    wait_text(page, "#train-progress", "/ 60", timeout_ms=RUN_TIMEOUT_S * 1000)
    page.wait_for_function(f"({TRAIN_POINTS})() >= 3", timeout=RUN_TIMEOUT_S * 1000)

    # Zoom onto the points drawn so far as a person's drag does (Plotly.relayout), and mark the element:
    # an element drawn anew would lose the mark.
    before, zoom = page.evaluate(f"""async () => {{ const div = {CHART}; div.dataset.zoomedByTest = 'yes';
        const xs = div.data.find(t => t.meta === 'live-train').x;
        const zoom = {{'xaxis.range': [xs[1], xs[xs.length - 1]], 'yaxis.range': [1, 9]}};
        await window.Plotly.relayout(div, zoom); return [xs.length, zoom] }}""")
    page.wait_for_function(f"({TRAIN_POINTS})() >= {before + 3}", timeout=RUN_TIMEOUT_S * 1000)
    after = page.evaluate(f"""() => {{ const div = {CHART};
        return [div.dataset.zoomedByTest, div.layout.xaxis.range, div.layout.yaxis.range, ({TRAIN_POINTS})()] }}""")
    assert after[:3] == ["yes", zoom["xaxis.range"], zoom["yaxis.range"]], f"the zoom was lost while points arrived: {after}"
    assert after[3] >= before + 3
    screenshot(page, "train-zoomed.png")

    page.locator("#stop-btn").click()
    wait_text(page, "#train-final", "Stopped", timeout_ms=RUN_TIMEOUT_S * 1000)
    assert text_of(page, "#train-message") == ""  # "Stopping at the next step…" went with the run
