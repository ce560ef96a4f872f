"""The Train tab in the browser: a tiny fine-tune on the bundled sample draws its loss live and finishes."""
import time

import pytest

from .conftest import SHOWN_JS, choose, load_sample, open_tab, screenshot, text_of, wait_plot, wait_text

pytestmark = pytest.mark.browser
STEPS, EVAL_EVERY = 6, 2
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

    # The chart grew while the run went: raw train loss at steps 0..6, validation loss at 0, 2, 4, 6, two "before" markers.
    counts = [points for points, *_ in seen]
    drawn = [c for c in counts if c]
    assert counts == sorted(counts), f"the chart lost points: {counts}"
    assert len(set(drawn)) >= 2, f"the chart was drawn once, not growing: {counts}"
    page.wait_for_function("() => document.querySelector('#start-btn').disabled === false")
    traces = page.evaluate("() => document.querySelector('#loss-chart .js-plotly-plot').data.map(t => [t.name, t.x.length])")
    assert dict(traces) == {"train loss": STEPS + 1, "validation loss": STEPS // EVAL_EVERY + 1, "before training": 2}
    markers = page.locator("#loss-chart svg .scatterlayer path.point").count()
    assert markers == STEPS // EVAL_EVERY + 1 + 2, "the validation and baseline markers are not all drawn in the SVG"
    assert page.locator("#loss-chart svg .scatterlayer path.js-line").count() >= 2

    progress = wait_text(page, "#train-progress", "Done")  # "done", capitalised by CSS
    assert f"step {STEPS} / {STEPS}" in progress and "tiny (random init) · sample · full fine-tune" in progress
    assert "validation loss" in final and "Saved to" in final
    assert "Validation instruction" in text_of(page, "#sample-responses")
    assert not stop.is_enabled()
    # The progress bar fills up (its width eases in over 0.6 s).
    page.wait_for_function("""() => { const fill = document.querySelector('#train-progress .gi-fill');
        return fill && fill.getBoundingClientRect().width >= fill.parentElement.clientWidth - 1 }""", timeout=5_000)
    screenshot(page, "train.png")
