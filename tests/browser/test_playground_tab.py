"""The Playground in the browser: the base model and the finished run answer one instruction side by side."""
import shutil

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


def test_an_example_keeps_its_reference_answer_until_its_instruction_is_edited(page, finished_run):
    """Shift+Enter (compare) in the instruction box leaves the example's reference answer; editing the instruction
    clears it, since it no longer answers what is asked."""
    open_tab(page, "playground")
    page.locator("#playground-examples tbody tr, #playground-examples .gallery-item").first.click()
    wait_text(page, "#reference-answer", "Reference answer")
    instruction = page.input_value("#playground-instruction textarea")
    assert instruction
    page.press("#playground-instruction textarea", "Shift+Enter")
    wait_text(page, "#playground-status", "Both answers", timeout_ms=60_000)
    assert "Reference answer" in page.inner_text("#reference-answer")
    assert page.input_value("#playground-instruction textarea") == instruction
    page.press("#playground-instruction textarea", "End")
    page.keyboard.type(" Briefly.")
    page.wait_for_function("() => !document.querySelector('#reference-answer').innerText.includes('Reference answer')")


def test_opening_the_tab_lists_the_runs_as_they_are_now(page, finished_run, folders):
    """A run that appears or goes while the page is open (another visitor's, the runs budget) is listed or gone as soon
    as the tab is opened again; the choice stays."""
    open_tab(page, "playground")
    page.wait_for_function("name => document.querySelector('#tuned-run input').value.startsWith(name)", arg=finished_run.name)
    copy = folders["runs"] / f"{finished_run.name}-copy"

    def listed_after_reopening() -> list[str]:
        """The picker's runs, once the list the tab's opening asked for has come (or after 5 s, as it stands)."""
        open_tab(page, "evaluate")
        open_tab(page, "playground")
        for _ in range(10):
            page.wait_for_timeout(500)
            page.click("#tuned-run input")
            page.get_by_role("option").first.wait_for()
            names = [option.get_attribute("aria-label").split(" · ")[0] for option in page.get_by_role("option").all()]
            page.keyboard.press("Escape")
            if (copy.name in names) == copy.is_dir():
                break
        return names

    shutil.copytree(finished_run, copy)
    try:
        assert listed_after_reopening()[:2] == [copy.name, finished_run.name]
    finally:
        shutil.rmtree(copy)
    assert copy.name not in listed_after_reopening()
    assert page.input_value("#tuned-run input").startswith(finished_run.name)
