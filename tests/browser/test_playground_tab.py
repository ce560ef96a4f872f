"""The Playground in the browser: the base model and the finished run answer one instruction side by side."""
import pytest

from .conftest import compare_sampled, open_tab, screenshot, wait_text

pytestmark = pytest.mark.browser


def test_compare_fills_both_panels(page, finished_run):
    open_tab(page, "playground")
    page.wait_for_function("name => document.querySelector('#tuned-run input').value.startsWith(name)", arg=finished_run.name)
    wait_text(page, "#run-info", "Base model: tiny with random weights")

    status = compare_sampled(page, "Name a colour.", 16, "Both answers", by_key=True)  # the Align tab's test clicks Compare
    assert "empty" not in status
    assert page.input_value("#playground-instruction textarea") == "Name a colour."  # Shift+Enter sent it, no new line
    base, tuned = page.input_value("#base-output textarea"), page.input_value("#tuned-output textarea")
    assert base.strip() and tuned.strip() and base != tuned
    assert page.locator("#diff-view .gi-diff").is_visible()
    assert page.locator("#diff-view ins, #diff-view del").count() > 0
    screenshot(page, "playground.png")
