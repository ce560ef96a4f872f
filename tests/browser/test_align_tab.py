"""Preference tuning in the browser: a DPO run of the finished run, drawn in the Align tab, then three columns in the Playground."""
import json
import time
from pathlib import Path

import pytest

from data import load_instructions

from .conftest import choose, compare_sampled, open_tab, screenshot, wait_text

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps([{**r, "chosen": r["output"], "rejected": f"Ugh: {r['output'].lower()}"}
                                for r in load_instructions("sample")]))
    return path


def align_through_the_api(app_url, parent: Path, pairs: Path, epochs: int = 1, max_steps: int = 4, stop: bool = False) -> dict:
    """Start preference tuning of ``parent`` with the uploaded ``pairs`` (stopped at once with ``stop``); its last status."""
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    started = client.predict("browser-tests", parent.name, "upload", handle_file(str(pairs)), 0.1, 1e-4, epochs, max_steps, 4, 2,
                             False, 8, 0, api_name="/start_preference")
    assert "Started preference tuning" in started, started
    if stop:
        assert "Stopping" in client.predict("browser-tests", api_name="/stop_preference")
    deadline = time.time() + 120
    while (status := client.predict(api_name="/job_status"))["status"] not in ("done", "failed", "stopped"):
        assert time.time() < deadline, f"preference tuning did not end within 120 s: {status['status']}"
        time.sleep(0.5)
    return status


@pytest.fixture(scope="module")
def aligned_run(app_url, folders, finished_run, pairs) -> Path:
    """A tiny DPO run of ``finished_run``, started through the app's API with an uploaded pairs file."""
    status = align_through_the_api(app_url, finished_run, pairs)
    assert status["status"] == "done", status.get("error")
    return folders["runs"] / status["run"]


def test_the_align_tab_draws_loss_and_reward_margin(page, aligned_run, finished_run):
    open_tab(page, "align")
    wait_text(page, "#align-final", f"Saved as run {aligned_run.name}")
    traces = page.evaluate("() => document.querySelector('#align-chart .js-plotly-plot').data.map(t => [t.name, t.x.length])")
    assert ["validation reward margin", 3] in traces and ["validation DPO loss", 3] in traces
    assert "Chosen answer" in wait_text(page, "#align-responses", "Rejected answer")
    assert page.locator("#align-start-btn").is_enabled() and page.locator("#align-stop-btn").is_disabled()
    screenshot(page, "align.png")
    page.click("#align-to-playground")  # the newest run, this one, is picked there
    page.wait_for_function("name => document.querySelector('#tuned-run input')?.checkVisibility() && window.scrollY === 0 "
                           "&& document.querySelector('#tuned-run input').value.startsWith(name)", arg=aligned_run.name)


def test_the_playground_streams_base_fine_tuned_and_aligned_together(page, aligned_run, finished_run):
    open_tab(page, "playground")
    page.locator("#refresh-tuned-runs").click()
    choose(page, "#tuned-run", aligned_run.name)
    wait_text(page, "#run-info", f"Fine-tuned: run {finished_run.name}")
    assert page.locator("#aligned-output").is_visible()
    compare_sampled(page, "Name a colour.", 12, "All three answers")
    answers = [page.input_value(f"#{box}-output textarea") for box in ("base", "tuned", "aligned")]
    assert all(a.strip() for a in answers), answers
    assert "only in the aligned answer" in wait_text(page, "#diff-view", "only in the")
    screenshot(page, "playground-three.png")

    choose(page, "#tuned-run", finished_run.name)  # an ordinary run: two columns again
    wait_text(page, "#run-info", "Fine-tuned: the same model after the run")
    page.wait_for_selector("#aligned-output", state="hidden")


def test_the_dataset_tab_shows_preference_pairs_side_by_side(page, folders):
    from data import cache
    from tests.conftest import book_file

    served = folders["cache"] / cache.PREFERENCE_NAME  # the app's cache, filled at its start when the session's had it
    if not served.exists():
        served.write_bytes(book_file("preference").read_bytes())
    page.get_by_text("Preference pairs: chosen and rejected answers side by side").click()
    page.click("#pref-load-btn")
    wait_text(page, "#pref-count", "1,100 pairs, page 1 / 44")
    headers = page.locator("#pref-table thead th").all_inner_texts()
    assert any("chosen" in h for h in headers) and any("rejected" in h for h in headers)
    page.fill("#pref-search textarea, #pref-search input", "passive")  # no Enter: the count follows the box as it is typed
    wait_text(page, "#pref-count", "29 pairs, page 1 / 2")
    page.click("#pref-next-page")
    wait_text(page, "#pref-count", "29 pairs, page 2 / 2")
    screenshot(page, "dataset-preference-pairs.png")


def test_a_stopped_preference_tuning_run_resumes_from_the_align_tab(page, app_url, folders, finished_run, pairs):
    status = align_through_the_api(app_url, finished_run, pairs, max_steps=6, stop=True)
    assert status["status"] == "stopped", status.get("error")
    name = status["run"]
    open_tab(page, "align")
    page.locator("#align-refresh-runs").click()
    choose(page, "#align-resume-run", name)
    page.click("#align-resume-btn")
    wait_text(page, "#align-message", f"Resuming {name} from its checkpoint")
    final = wait_text(page, "#align-final", "Done after 6 steps", timeout_ms=120_000)  # not the stopped run's notice
    assert f"Saved as run {name}" in final, final
    manifest = json.loads((folders["runs"] / name / "manifest.json").read_text())
    assert manifest["status"] == "done" and len(manifest["resumed_from_step"]) == 1
    assert page.locator("#align-stop-btn").is_disabled()
    screenshot(page, "align-resumed.png")
