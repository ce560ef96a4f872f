"""The Playground in the browser: the base model and the finished run answer one instruction side by side."""
import pytest

from .conftest import open_tab, screenshot, set_slider, wait_text

pytestmark = pytest.mark.browser


def test_compare_fills_both_panels(page, finished_run):
    open_tab(page, "playground")
    page.wait_for_function("name => document.querySelector('#tuned-run input').value.startsWith(name)", arg=finished_run.name)
    wait_text(page, "#run-info", "Base model: tiny with random weights")

    # Six steps from random weights may answer greedily with blank lines: sample, seeded.
    page.get_by_text("Generation settings").click()
    set_slider(page, "#temperature", 1)
    set_slider(page, "#max-new-tokens", 16)
    page.fill("#seed input", "7")
    page.fill("#playground-instruction textarea", "Name a colour.")
    page.click("#compare-btn")
    status = wait_text(page, "#playground-status", "Both answers", timeout_ms=60_000)
    assert "sampled at temperature 1, seed 7, at most 16 new tokens" in status
    assert "empty" not in status
    base, tuned = page.input_value("#base-output textarea"), page.input_value("#tuned-output textarea")
    assert base.strip() and tuned.strip() and base != tuned
    assert page.locator("#diff-view .gi-diff").is_visible()
    assert page.locator("#diff-view ins, #diff-view del").count() > 0
    screenshot(page, "playground.png")
