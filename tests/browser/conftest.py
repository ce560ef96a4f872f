"""Browser tests: ``python app.py`` served from a subprocess, driven by Debian's Chromium through Playwright.

One app and one browser for the whole session; each test gets a fresh page
(its own browser context: its own per-visitor state and client id). Runs and
the dataset cache live in temporary folders; the canonical dataset is copied
there from the real cache when it is cached, so the app never downloads and
uploads never touch the user's cache. Screenshots go to ``artifacts/``
(git-ignored), plus ``failed-<test>.png`` when a test fails.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SAMPLE_LABEL = "Bundled sample: 74 examples, works offline"
VIEWPORT = {"width": 1400, "height": 1000}
TIMEOUT_MS = 30_000  # one UI step: a click answered, a text shown
SERVE_TIMEOUT_S = 90
# The browser tests share one app, hence one training job: the stages run in this order (a later stage
# that runs alone trains its own run through the API, see ``finished_run``).
STAGES = ("test_dataset_tab", "test_train_tab", "test_playground_tab", "test_evaluate_tab", "test_align_tab")
# The Train tab's form as its test leaves it (the offline demo's learning rate): at the book's 5e-5, six steps leave
# the random model nearly as it was, and the Playground's two answers came out the same.
TINY_RUN = dict(preset="tiny", custom="", random_init=True, epochs=1, batch_size=8, lr=1e-3, mask_prompt=False, lora=False,
                rank=8, alpha=16, grouped=True, max_steps=6, eval_every=2, checkpoint_every=0)


def pytest_collection_modifyitems(items):
    """The browser tests in ``STAGES`` order, in the slots they already hold (other tests keep their places)."""
    def stage(item) -> str:
        module = getattr(item, "module", None)
        return module.__name__.rpartition(".")[2] if module else ""

    slots = [i for i, item in enumerate(items) if stage(item) in STAGES]
    ordered = sorted((items[i] for i in slots), key=lambda item: STAGES.index(stage(item)))
    for i, item in zip(slots, ordered):
        items[i] = item


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Temporary runs and cache folders; the cache holds the book's files when the real cache does."""
    from data import cache

    root = tmp_path_factory.mktemp("browser-app")
    paths = {"root": root, "runs": root / "runs", "cache": root / "cache", "tmp": root / "tmp"}  # tmp: exports, uploads
    paths["cache"].mkdir()
    paths["tmp"].mkdir()
    if cache.is_cached():
        canonical = cache.cache_dir() / cache.CANONICAL_NAME
        (paths["cache"] / cache.CANONICAL_NAME).write_bytes(canonical.read_bytes())
    if cache.is_preference_cached():
        preference = cache.cache_dir() / cache.PREFERENCE_NAME
        (paths["cache"] / cache.PREFERENCE_NAME).write_bytes(preference.read_bytes())
    return paths


def serves(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).read()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def app_url(folders) -> str:
    """``python app.py --port <free port>`` until the session ends; its output is in ``<tmp>/app.log``."""
    port = free_port()
    env = {**os.environ, "GPT2_INSTRUCT_RUNS": str(folders["runs"]), "GPT2_INSTRUCT_CACHE": str(folders["cache"]),
           "TMPDIR": str(folders["tmp"]), "GRADIO_TEMP_DIR": str(folders["tmp"] / "gradio"),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log_path = folders["root"] / "app.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + SERVE_TIMEOUT_S
        while not serves(url):
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log_path.read_text()}", pytrace=False)
            if time.time() > deadline:
                pytest.fail(f"app.py did not serve within {SERVE_TIMEOUT_S} s:\n{log_path.read_text()}", pytrace=False)
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from Debian: never one downloaded by Playwright."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's Chromium. Install it with "
                    "`apt-get update && apt-get install -y chromium` (the README's test command does this).", pytrace=False)
    from playwright.sync_api import sync_playwright

    for stale in ARTIFACTS.glob("failed-*.png"):  # from an earlier session
        stale.unlink()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember whether a test's body failed, for the page fixture's failure screenshot."""
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


@pytest.fixture
def page(browser, app_url, request):
    """A fresh page on the app, once its first load has filled the Dataset tab; uncaught page errors fail the test."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url)
    wait_text(page, "#record-count", " records, page ")
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    if request.node.stash.get(FAILED, False):
        page.screenshot(path=ARTIFACTS / f"failed-{request.node.name}.png", full_page=True)
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="session")
def finished_run(app_url, folders) -> Path:
    """The newest finished run: the last one the Train tab's tests made, else a tiny one trained through the API."""
    runs = finished_runs(folders["runs"])
    if runs:
        return runs[0]
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    client.predict("sample", None, False, api_name="/load_dataset")
    client.predict("browser-tests", *TINY_RUN.values(), api_name="/start_training")
    deadline = time.time() + 120
    while (status := client.predict(api_name="/job_status"))["status"] not in ("done", "failed", "stopped"):
        assert time.time() < deadline, f"the run did not end within 120 s: {status['status']}"
        time.sleep(0.5)
    assert status["status"] == "done", status.get("error")
    return folders["runs"] / status["run"]  # the job shows the run by name only


def finished_runs(root: Path) -> list[Path]:
    """Finished runs (done, or stopped with its weights saved) newest first: the order of the app's run pickers."""
    runs = []
    for manifest in root.glob("*/manifest.json"):
        if json.loads(manifest.read_text()).get("status") in ("done", "stopped") and (manifest.parent / "model.safetensors").is_file():
            runs.append(manifest.parent)
    return sorted(runs, reverse=True)


# Helpers for the tests.

# What a Gradio block shows, without its status tracker (which may flash "queue: 1/1 | 0.0/0.0s" in it).
SHOWN_JS = """s => { const e = document.querySelector(s);
    return e ? [...e.children].filter(c => c.dataset.testid !== 'status-tracker').map(c => c.innerText).join('\\n').trim() : null }"""


def text_of(page, selector: str) -> str | None:
    """The text a person reads in a block (None when it is not on the page)."""
    return page.evaluate(SHOWN_JS, selector)


def wait_text(page, selector: str, text: str, timeout_ms: int = TIMEOUT_MS) -> str:
    """Wait until the block's text contains ``text``; return that text. The failure says what it showed instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"([s, t]) => (({SHOWN_JS})(s) || '').includes(t)", arg=[selector, text], timeout=timeout_ms)
    except PlaywrightTimeout as e:
        shown = text_of(page, selector)
        raise AssertionError(f"{selector} never showed {text!r} within {timeout_ms / 1000:g} s; it shows {shown!r}") from e
    return text_of(page, selector)


def count_text(n: int, page: int = 1) -> str:
    """What ``#record-count`` says for ``n`` records on page ``page``."""
    from data.browse import PAGE_SIZE

    return f"{n:,} records, page {page} / {max(1, math.ceil(n / PAGE_SIZE))}"


def load_sample(page) -> None:
    """Choose the bundled sample (74 records) in the Dataset tab and wait until it is shown."""
    page.get_by_label(SAMPLE_LABEL).check()
    wait_text(page, "#dataset-error", "Loaded bundled sample: 74 records.")
    wait_text(page, "#record-count", count_text(74))


def open_tab(page, name: str) -> None:
    """Click a tab's button and wait until its panel is shown."""
    page.click(f"#tab-{name}-button")
    page.wait_for_selector(f"#tab-{name}", state="visible")


def choose(page, selector: str, label_start: str) -> None:
    """Pick the dropdown's option whose label starts with ``label_start``, as a person does: open it, click the option."""
    page.click(f"{selector} input")
    page.get_by_role("option", name=re.compile("^" + re.escape(label_start))).click()
    page.wait_for_function("([s, v]) => document.querySelector(s + ' input').value.startsWith(v)", arg=[selector, label_start])


def set_slider(page, selector: str, value, tries: int = 3) -> None:
    """Type a value into a slider's number box until the slider has moved there.

    Typed just after the slider appears (an accordion opened), the value is sometimes put back to the
    slider's own: hence a few tries.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(f"{selector} input[type=number]")
    for attempt in range(tries):
        box.fill(str(value))
        box.press("Enter")
        try:
            page.wait_for_function("([s, v]) => document.querySelector(s + ' input[type=range]').value == v",
                                   arg=[selector, str(value)], timeout=3_000)
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                shown = page.input_value(f"{selector} input[type=range]")
                raise AssertionError(f"{selector} stays at {shown} after typing {value} {tries} times") from None


def compare_sampled(page, instruction: str, max_new_tokens: int, done: str, by_key: bool = False) -> str:
    """Ask the Playground for answers sampled at temperature 1, seed 7 (a few steps from random weights may answer
    greedily with blank lines), and return the status line once it says ``done``. ``by_key``: Shift+Enter in the
    instruction box instead of the Compare button."""
    page.get_by_text("Generation settings").click()
    set_slider(page, "#temperature", 1)
    set_slider(page, "#max-new-tokens", max_new_tokens)
    page.fill("#seed input", "7")
    page.fill("#playground-instruction textarea", instruction)
    if by_key:
        page.press("#playground-instruction textarea", "Shift+Enter")
    else:
        page.click("#compare-btn")
    status = wait_text(page, "#playground-status", done, timeout_ms=60_000)
    assert f"sampled at temperature 1, seed 7, at most {max_new_tokens} new tokens" in status
    return status


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=path, full_page=True)
    return path


def plot_points(page, selector: str) -> list[int]:
    """Points per trace of the Plotly figure inside ``selector`` (from the plot's DOM node); [] before it is drawn."""
    return page.evaluate("s => (document.querySelector(s + ' .js-plotly-plot')?.data || []).map(t => (t.x || t.y || []).length)",
                         selector)


def wait_plot(page, selector: str, traces: int = 0) -> list[int]:
    """Wait until the Plotly figure inside ``selector`` is drawn with at least ``traces`` traces; their point counts."""
    page.wait_for_function("([s, n]) => { const data = document.querySelector(s + ' .js-plotly-plot')?.data;"
                           " return Array.isArray(data) && data.length >= n }", arg=[selector, traces])
    return plot_points(page, selector)
