"""The Gradio app through its API (gradio_client), launched in-process on a free port, offline.

Runs and uploads go to temporary folders; training uses the tiny preset with
random weights on the bundled sample, so nothing is downloaded.
"""
import html
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from data import cache, load_instructions, token_stats
from data.browse import matches
from runstore import CHECKPOINT, read_manifest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*(no_silent_downcasting|copy keyword).*")
REPO = Path(__file__).resolve().parents[1]
TINY = dict(preset="tiny", custom="", random_init=True, epochs=1, batch_size=8, lr=5e-5, mask_prompt=False, lora=False,
            rank=8, alpha=16, grouped=True, max_steps=6, eval_every=2, checkpoint_every=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Runs and the dataset cache in temporary folders; the canonical file is copied over when it is cached."""
    canonical = cache.cache_dir() / cache.CANONICAL_NAME if cache.is_cached() else None
    saved = {k: os.environ.get(k) for k in ("GPT2_INSTRUCT_RUNS", "GPT2_INSTRUCT_CACHE")}
    root = tmp_path_factory.mktemp("app")
    os.environ["GPT2_INSTRUCT_RUNS"] = str(root / "runs")
    os.environ["GPT2_INSTRUCT_CACHE"] = str(root / "cache")
    if canonical:
        cache.store_canonical(canonical.read_bytes())
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def url(folders):
    from engine import Engine
    from ui.app import build_app, launch_options

    demo = build_app(Engine())
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, **launch_options())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def client(url) -> Client:
    """A fresh API session: its own per-visitor state, like a new browser tab."""
    return Client(url, verbose=False)


def load(c: Client, source: str, upload=None):
    """``load_dataset`` outputs by name."""
    out = c.predict(source, handle_file(str(upload)) if upload else None, False, api_name="/load_dataset")
    names = ["source", "error", "summary", "histogram", "table", "count", "page", "query", "number", "meta", "tokens"]
    return dict(zip(names, out))


def search(c: Client, query: str = "", page: int = 1):
    table, count, page = c.predict(query, page, api_name="/search")
    return table["data"], count, page


def start(c: Client, owner: str, **overrides) -> str:
    return c.predict(owner, *{**TINY, **overrides}.values(), api_name="/start_training")


def wait_until_idle(c: Client, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = c.predict(api_name="/job_status")
        if status["status"] in ("idle", "done", "stopped", "failed"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"the run did not end within {timeout} s: {status['status']}")


def text(markup: str) -> str:
    """What an HTML output says, without tags or entities."""
    return html.unescape(re.sub(r"<[^>]+>", " ", markup)).replace("  ", " ")


def test_sample_loads_and_search_pages_on_the_server(url):
    c = client(url)
    out = load(c, "sample")
    assert "74 records" in text(out["error"])
    assert out["count"] == "74 records, page 1 / 3"
    rows = out["table"]["data"]
    assert len(rows) == 25 and rows[0][:2] == [1, "train"]
    assert json.loads(out["histogram"]["plot"])["data"][0]["type"] == "histogram"
    assert "62" in text(out["summary"]) and "validation" in text(out["summary"])  # 74 -> 62 / 5 / 7

    records = load_instructions("sample")
    expected = matches(records, "PASSIVE")
    rows, count, page = search(c, "PASSIVE")
    assert count == f"{len(expected)} records, page 1 / 1" and len(expected) > 1
    assert [r[0] - 1 for r in rows] == expected
    rows, count, page = search(c, "", 3)
    assert count == "74 records, page 3 / 3" and [r[0] for r in rows] == list(range(51, 75))
    rows, count, page = search(c, "", 9)
    assert count.endswith("page 3 / 3")
    rows, count, _ = search(c, "no record says this")
    assert rows in ([], [[]]) or all(not any(r) for r in rows)
    assert count == "0 records, page 1 / 1"


def test_record_view_shows_masking_and_split(url):
    c = client(url)
    load(c, "sample")
    _, meta, tokens = c.predict(1, False, api_name="/record")
    _, meta_masked, tokens_masked = c.predict(1, True, api_name="/record")
    trained = int(re.search(r"(\d+) trained on", text(meta)).group(1))
    trained_masked = int(re.search(r"(\d+) trained on", text(meta_masked)).group(1))
    total = int(re.search(r"(\d+) tokens", text(meta)).group(1))
    assert "train split" in text(meta)
    assert trained == total - 1 and 0 < trained_masked < trained
    assert tokens.count('class="gi-tok masked') == 1 and tokens_masked.count('class="gi-tok masked') == total - trained_masked
    _, meta, _ = c.predict(70, False, api_name="/record")
    assert "val split" in text(meta)  # 74 records: 62 train, 7 test, then 5 validation
    import gradio as gr
    from gradio_client.exceptions import AppError

    from ui.dataset_tab import box_number

    with pytest.raises(AppError, match=re.escape("prompt format must be one of alpaca, phi3, got None")):
        c.predict(1, False, None, api_name="/record")  # what only an API client can send
    assert box_number(None, "page") == 1 and box_number(3.0, "page") == 3
    with pytest.raises(gr.Error, match=re.escape("page must be a finite number, got nan")):  # raw JSON's NaN
        box_number(float("nan"), "page")
    shown, meta, _ = c.predict(99999, False, api_name="/record")
    assert shown == 74 and "record 74 of 74" in text(meta)  # the box says which record is shown


def test_the_phi3_prompt_format_from_the_dataset_tab_to_a_run(url, folders):
    """Exercise 7.1: the Dataset tab shows a record and the token lengths in the Phi-3 format, and the Train tab
    trains in it."""
    c = client(url)
    load(c, "sample")
    _, meta, tokens = c.predict(1, False, api_name="/record")
    _, histogram, shown, meta_phi3, tokens_phi3 = c.predict(1, False, "phi3", api_name="/prompt_format")
    joined = lambda spans: html.unescape(re.sub(r"<[^>]+>", "", spans))  # the tokens' text, as one string
    assert "### Instruction:" in joined(tokens) and "<|user|>" not in joined(tokens)
    assert joined(tokens_phi3).startswith("<|user|>↵\nRewrite the sentence") and "↵\n<|assistant|>↵\nThree apple" in joined(tokens_phi3)
    count = lambda m: int(re.search(r"(\d+) tokens", text(m)).group(1))
    assert shown == 1 and count(meta_phi3) <= count(meta) - 20  # no Alpaca preamble
    stats = token_stats(load_instructions("sample"), style="phi3")
    assert f"prompt (median {statistics.median(stats['prompt_tokens']):.0f})" in json.dumps(histogram)
    assert c.predict(1, False, api_name="/record")[1] == meta  # the API's default stays the book's format

    wait_until_idle(c)
    assert "Started fine-tuning tiny" in text(start(c, "owner-p", style="phi3"))
    status = wait_until_idle(c)
    assert status["status"] == "done" and status["config"]["style"] == "phi3"
    assert read_manifest(folders / "runs" / status["run"])["config"]["style"] == "phi3"
    assert "phi3 prompts" in text(c.predict("owner-p", [], api_name="/poll_status")[1])


def test_max_length_cuts_the_rows_as_the_books_allowed_max_length_does(url, folders):
    """The Train tab's max length (exercise 7.3's remedy for long records): rows cut there, said in the run's line."""
    c = client(url)
    load(c, "sample")
    wait_until_idle(c)
    assert "Started fine-tuning tiny" in text(start(c, "owner-m", max_steps=2, style="alpaca", max_length=32))
    status = wait_until_idle(c)
    assert status["status"] == "done" and status["config"]["max_length"] == 32
    assert read_manifest(folders / "runs" / status["run"])["config"]["max_length"] == 32
    assert "rows cut at 32 tokens" in text(c.predict("owner-m", [], api_name="/poll_status")[1])
    assert "max length must be at least 8, got 4" in text(start(c, "owner-m", style="alpaca", max_length=4))
    assert "max length must be 0 (the whole context) or more, got -1" in text(start(c, "owner-m", style="alpaca", max_length=-1))


def test_canonical_loads_1100_records(url, needs_canonical):
    if not cache.is_cached():  # downloaded into the session's cache after this module's cache was made
        cache.store_canonical(needs_canonical.read_bytes())
    c = client(url)
    out = load(c, "canonical")
    assert out["count"] == "1,100 records, page 1 / 44"
    summary = text(out["summary"])
    assert all(n in summary for n in ("1,100", "935", "55", "110"))


def test_a_bad_upload_names_the_problem_and_keeps_the_previous_dataset(url, tmp_path):
    c = client(url)
    load(c, "sample")
    bad = tmp_path / "mine.json"
    bad.write_text('[{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "x", "output": 3}]')
    out = load(c, "upload", bad)
    message = text(out["error"])
    assert 'mine.json, record 2: field "output" must be a string, got a number' in message
    assert "Still loaded: bundled sample (74 records)" in message
    assert search(c)[1] == "74 records, page 1 / 3"

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    assert "broken.jsonl, line 2: not valid JSON" in text(load(c, "upload", broken)["error"])
    assert search(c)[1] == "74 records, page 1 / 3"

    sheet = tmp_path / "sheet.csv"
    sheet.write_text("instruction,input,output\nSay hi,,hi\nSay no,,\n")
    assert 'sheet.csv, row 3: field "output" is empty' in text(load(c, "upload", sheet)["error"])
    assert search(c)[1] == "74 records, page 1 / 3"


def test_a_good_upload_is_kept_at_a_stable_path(url, folders, tmp_path):
    c = client(url)
    good = tmp_path / "twelve.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "output": str(i)}) + "\n" for i in range(12)))
    out = load(c, "upload", good)
    assert out["count"] == "12 records, page 1 / 1"
    kept = list((folders / "cache" / "uploads").glob("*-twelve.jsonl"))
    assert len(kept) == 1 and kept[0].read_bytes() == good.read_bytes()
    sheet = tmp_path / "twelve.csv"
    sheet.write_text("instruction,output\n" + "".join(f'"Count to {i}, slowly.",{i}\n' for i in range(12)))
    assert load(c, "upload", sheet)["count"] == "12 records, page 1 / 1"
    assert search(c, "slowly")[1].startswith("12 records")


def test_training_runs_live_refuses_a_second_start_and_the_playground_compares(url, folders):
    c = client(url)
    load(c, "sample")
    assert "Started fine-tuning tiny on bundled sample" in text(start(c, "owner-a"))
    again = start(c, "owner-b")
    assert "already running" in text(again)
    assert "Only the browser session that started this fine-tuning run can stop it" in text(c.predict("owner-b", api_name="/stop_training"))

    lengths, status = [], {}
    deadline = time.time() + 90
    while time.time() < deadline:
        status = c.predict(api_name="/job_status")
        lengths.append(len(status["history"]))
        if status["status"] in ("done", "failed", "stopped"):
            break
        time.sleep(0.05)
    assert status["status"] == "done", status.get("error")
    assert "owner" not in status
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths)  # seen growing, never shrinking
    history = status["history"]
    assert [r["step"] for r in history] == list(range(7))
    assert history[0]["val_loss"] is not None and history[0]["tokens_seen"] == 0
    assert [r["step"] for r in status["responses"]] == [0, 2, 4, 6]
    assert status["final"]["steps"] == 6 and (folders / "runs" / status["run"]).is_dir()
    assert "/" not in json.dumps(status["config"]) and "run_dir" not in status["final"]  # no server paths

    chart, progress, responses, final, started = c.predict("owner-a", [], api_name="/poll_status")
    assert started == ""  # the run has ended: "Started fine-tuning…" goes
    message = json.loads(chart)
    traces = message["figure"]["data"]
    assert {t["name"] for t in traces} >= {"train loss", "validation loss", "before training"}
    assert [row[1] for row in message["rows"]] == list(range(7))
    assert "step <b>6</b> / 6" in progress and "done" in text(progress)
    assert f"Saved as run {status['run']}" in text(final) and "Validation instruction" in text(responses)
    chart_again = c.predict("owner-a", [], api_name="/poll_status")[0]
    assert chart_again["__type__"] == "update" and "value" not in chart_again  # nothing new: nothing sent

    run_dir = status["run"]
    base, tuned, aligned, diff, note = c.predict("Rewrite the sentence in passive voice.", "The cat ate the fish.", run_dir,
                                        24, 0, 0, 1, 123, api_name="/compare")
    assert aligned == ""  # an ordinary run: two columns
    assert base.strip() and isinstance(tuned, str)  # six steps from random weights: greedy may give blank lines
    assert "gi-diff" in diff and "greedy, at most 24 new tokens: " in text(note)
    said = re.search(r"at most 24 new tokens: ([\d,]+) new tokens? \((\d+) \+ (\d+)\) in [\d.]+ s(, [\d.]+ tokens/s)?\.", text(note))
    assert said and int(said[1]) == int(said[2]) + int(said[3]) and 0 < int(said[2]) <= 24 and int(said[3]) <= 24, text(note)

    sampled = c.predict("Name a colour.", "", run_dir, 16, 1.0, 0, 1, 7, api_name="/compare")
    base, tuned = sampled[0], sampled[1]
    assert base.strip() and tuned.strip()  # six steps at 5e-5 move the tuned model's tokens little from the base's
    assert "temperature 1, seed 7" in text(sampled[4]) and " tokens/s." in text(sampled[4])
    assert c.predict("Name a colour.", "", run_dir, 16, 1.0, 0, 1, 7, api_name="/compare")[:2] == (base, tuned)
    assert c.predict("Name a colour.", "", run_dir, 16, 1.0, 0, 1, 8, api_name="/compare")[:2] != (base, tuned)

    too_long = c.predict("Summarize: " + "word " * 3000, "", run_dir, 8, 0, 0, 1, 123, api_name="/compare")[4]
    assert re.search(r"The prompt is 3,0\d\d tokens: beside 8 new tokens, the [\d,]+-token context holds its last", text(too_long))
    assert "did not see its first" in text(too_long) and "did not see" not in text(note)
    assert "Shorten the instruction or the input." in text(too_long) and "Lower" not in text(too_long)
    nearly = c.predict("Summarize: " + "word " * 960, "", run_dir, 64, 0, 0, 1, 123, api_name="/compare")[4]
    fits = 1024 - int(re.search(r"The prompt is ([\d,]+) tokens", text(nearly)).group(1).replace(",", ""))
    assert 0 < fits < 64 and f"Lower Max new tokens to {fits} or fewer to keep it whole" in text(nearly)
    tiny_temperature = c.predict("Name a colour.", "", run_dir, 8, 1e-40, 0, 1, 7, api_name="/compare")  # was NaN
    assert tiny_temperature[:2] == c.predict("Name a colour.", "", run_dir, 8, 0, 0, 1, 7, api_name="/compare")[:2]


def test_the_playground_status_says_generating_while_tokens_stream(url, folders):
    c = client(url)
    runs = sorted(p.name for p in (folders / "runs").iterdir() if (p / "model.safetensors").is_file())
    assert runs, "needs the run of the training test"
    job = c.submit("Name a colour.", "", runs[0], 16, 1.0, 0, 1, 7, api_name="/compare")
    job.result(timeout=90)
    status, streamed = "", 0
    for base, tuned, _, _, note in job.outputs():
        status = text(note) if isinstance(note, str) else status
        if any(isinstance(t, str) and t for t in (base, tuned)):
            streamed += 1
            assert "Loading the models" not in status, status
    assert streamed >= 2 and "temperature 1, seed 7" in status
    assert "started from random weights (tiny, the offline demo)" in status  # what the demo can and cannot show


def test_only_the_owner_can_stop_a_run(url):
    c = client(url)
    load(c, "sample")
    wait_until_idle(c)
    assert "Started" in text(start(c, "owner-a", epochs=50, max_steps=0, eval_every=100))
    assert "Only the browser session" in text(c.predict("owner-b", api_name="/stop_training"))
    assert c.predict(api_name="/job_status")["status"] not in ("stopped", "done")
    deadline = time.time() + 60
    while c.predict(api_name="/job_status")["step"] < 1:  # stopped before its first step, a run saves no model
        assert time.time() < deadline, "the run did not reach step 1"
        time.sleep(0.1)
    assert "Stopping at the next step" in text(c.predict("owner-a", api_name="/stop_training"))
    status = wait_until_idle(c)
    assert status["status"] == "stopped" and status["final"]["steps"] < 50 * 7
    assert (Path(os.environ["GPT2_INSTRUCT_RUNS"]) / status["run"] / "model.safetensors").is_file()
    # A client that never loaded the page (its pickers list nothing) names the run to resume and to overlay.
    other = client(url)
    assert "Resuming" in text(other.predict("owner-c", status["run"], api_name="/resume_training"))
    assert "Stopping at the next step" in text(other.predict("owner-c", api_name="/stop_training"))
    assert wait_until_idle(other)["status"] == "stopped"
    assert "no-such-run" in text(other.predict("owner-c", "no-such-run", api_name="/resume_training"))
    chart = other.predict("owner-c", [status["run"], "no-such-run"], api_name="/poll_status")[0]
    assert status["run"] in chart
    assert "No run is going" in text(c.predict("owner-a", api_name="/stop_training"))


def test_a_tiny_upload_warns_that_it_cannot_be_split_and_a_too_long_record_is_shown_as_skipped(url, tmp_path):
    c = client(url)
    two = tmp_path / "two.jsonl"
    two.write_text('{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": "Say bye.", "output": "Bye."}\n')
    message = text(load(c, "upload", two)["error"])
    assert "Loaded two.jsonl : 2 records." in message
    assert "Only 1 of the 2 records go to training (85 %): fewer than one batch of 8" in message
    assert "No test records" in message
    assert "Too few" not in text(load(c, "sample")["error"])

    long_ = tmp_path / "long.jsonl"
    records = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(11)] + [
        {"instruction": "Long.", "output": "word " * 2000}, {"instruction": "Long.", "output": "word " * 1000}]
    long_.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "2 records longer than GPT-2's 1,024-token context: training skips them (#12, #13)." in text(
        load(c, "upload", long_)["error"])
    assert [token_stats(records[12:], style=s)["total_tokens"] for s in ("alpaca", "phi3")] == [[1034], [1018]]
    message = text(c.predict(1, False, "phi3", api_name="/prompt_format")[0])  # #13 fits without Alpaca's preamble
    assert "Loaded long.jsonl : 13 records." in message
    assert "1 record longer than GPT-2's 1,024-token context: training skips it (#12)." in message
    assert "2 records longer" in text(c.predict(1, False, "alpaca", api_name="/prompt_format")[0])
    _, meta, tokens = c.predict(12, False, api_name="/record")
    assert "skipped in training" in text(meta) and "context window" in text(meta) and "trained on ·" not in text(meta)
    assert 'class="gi-tok trained' not in tokens
    _, meta, _ = c.predict(1, False, api_name="/record")
    assert "trained on ·" in text(meta) and "skipped" not in text(meta)


def test_a_failed_canonical_download_puts_the_source_back(url, tmp_path, monkeypatch):
    c = client(url)
    assert load(c, "sample")["source"] == "sample"
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(cache, "CANONICAL_URL", "http://127.0.0.1:9/instruction-data.json")
    out = load(c, "canonical")
    assert "could not be downloaded" in text(out["error"]) and "Still loaded: bundled sample (74 records)" in text(out["error"])
    assert out["source"] == "sample"  # the radio follows what is loaded


def test_measure_shows_the_expected_time_of_the_books_data_the_visitors_own_and_this_run(url, tmp_path, needs_canonical):
    c = client(url)
    wait_until_idle(c)

    def measure(epochs=1, batch_size=8, max_steps=0, eval_every=20, mask_prompt=False) -> str:
        return text(c.predict("tiny", False, 16, epochs, batch_size, False, max_steps, eval_every, mask_prompt,
                              api_name="/measure_epoch"))

    out = measure()
    assert re.search(r"evaluations included: one epoch of the book's data \d+:\d\d \(116 steps at [\d,]+ tokens/s\); "
                     r"of the bundled sample \d+:\d\d \(7 steps\)\.", out), out
    assert "This run" not in out and "Training runs on the CPU (" in out and "Precision: " in out
    assert re.search(r"This run, 20 epochs of the bundled sample at batch 8: \d+:\d\d \(140 steps\)", measure(epochs=20)), out
    capped = measure(epochs=20, batch_size=4, max_steps=50)
    assert "This run, 20 epochs of the bundled sample at batch 4: " in capped and "(50 steps)" in capped
    load(c, "canonical")
    again = measure(epochs=2)
    assert "bundled sample" not in again.split("Last finished run")[0] and "This run, 2 epochs of the book's data at batch 8: " in again and "(232 steps)" in again
    few = tmp_path / "three.json"
    few.write_text(json.dumps([{"instruction": f"Say {n}.", "input": "", "output": str(n)} for n in range(3)]))
    load(c, "upload", few)
    assert ("none for three.json: the training split has 2 usable records: fewer than one step of batch 8; "
            "use more records (a smaller batch leaves the test split empty).") in measure()
    load(c, "sample")
    assert "at batch 64: none, the training split has 62 usable records: fewer than one step of batch 64; use a smaller batch, or more records" in measure(epochs=2, batch_size=64)


def test_measure_offline_times_the_bundled_sample(url, tmp_path, monkeypatch):
    c = client(url)
    wait_until_idle(c)
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(cache, "CANONICAL_URL", "http://127.0.0.1:9/instruction-data.json")
    out = text(c.predict("tiny", False, 16, 20, 8, False, 0, 6, True, api_name="/measure_epoch"))
    assert re.search(r"one epoch of the bundled sample \(the book's data is not cached and could not be downloaded\) "
                     r"\d+:\d\d \(7 steps at [\d,]+ tokens/s\)\.", out), out
    assert "; of the bundled sample" not in out  # the epoch timed is the visitor's
    assert re.search(r"This run, 20 epochs of the bundled sample at batch 8, prompts masked \(the answers alone trained\): "
                     r"\d+:\d\d \(140 steps\)", out), out

def test_settings_errors_are_messages(url):
    c = client(url)
    before = wait_until_idle(c)
    assert "batch size must be between 1 and 512, got 0" in text(start(c, "x", batch_size=0))  # TrainConfig's bounds
    assert "epochs must be a whole number, got 2.5" in text(start(c, "x", epochs=2.5))  # not rounded to 2
    assert "evaluate every must be at least 1, got 0" in text(start(c, "x", eval_every=0))
    assert "max steps must be 0 (all of them) or more, got -5" in text(start(c, "x", max_steps=-5))  # as the form says: 0 is all
    assert "learning rate must be in (0, 1], got -1" in text(start(c, "x", lr=-1))
    assert "tick random init" in text(start(c, "x", random_init=False))
    assert "untick it to load '/srv/models/my-gpt2'" in text(start(c, "x", custom="/srv/models/my-gpt2"))  # as typed
    assert "session id" in text(start(c, ""))
    after = c.predict(api_name="/job_status")
    assert (after["status"], after["started_at"]) == (before["status"], before["started_at"])  # nothing started


def test_a_form_error_names_a_setting_as_the_form_does_and_leaves_file_names_alone():
    from ui.widgets import form_error

    said = {e: text(form_error(ValueError(e))).strip() for e in ("max_steps must be 0 (all of them) or more", "lr must be in (0, 1]",
                                                         "beta must be above 0", "alpaca_data.json has 5 records",
                                                         "my_records has no records", "max_steps.json is empty")}
    assert list(said.values()) == ["max steps must be 0 (all of them) or more", "learning rate must be in (0, 1]",
                                   "beta must be above 0", "alpaca_data.json has 5 records", "my_records has no records",
                                   "max_steps.json is empty"]


def test_one_record_and_one_test_example_are_singular():
    from types import SimpleNamespace

    from ui.evaluate_tab import not_yet
    from ui.train_tab import data_line

    assert "Data: one.json , 1 record (change it" in text(data_line(None, {"source": "upload", "name": "one.json", "count": 1}))
    run = SimpleNamespace(manifest={"data": {"split": {"test": 1}}})
    assert "the whole test split (1 example):" in text(not_yet(run))
    assert "at most 1 test example (this server" in text(not_yet(SimpleNamespace(manifest={}), cap=1))


def test_a_preference_tuned_runs_loss_is_named_dpo_loss_beside_cross_entropy_ones():
    """A DPO loss starts at ln 2 (0.693): beside a cross-entropy of 6.8 it would read as a ten times better model."""
    from types import SimpleNamespace

    from ui.widgets import run_label, val_loss_text

    def run(method):
        manifest = {"method": method, "final_val_loss": 0.69, "steps": 4, "config": {"model": "tiny", "random_init": True}}
        return SimpleNamespace(name=f"r-{method}", status="done", last_step=4, manifest=manifest)

    assert run_label(run("dpo")) == "r-dpo · tiny (random init) · DPO val loss 0.690"
    assert run_label(run("full")) == "r-full · tiny (random init) · val loss 0.690"
    assert val_loss_text(run("dpo").manifest, dpo=True) == "0.690 (DPO)" and val_loss_text({}, dpo=True) == "–"


def test_the_evaluate_tab_offers_only_the_rankings_an_evaluation_has_scores_for():
    from ui.evaluate_tab import RANKINGS, rank_choices

    plain = rank_choices({"summary": {"models": ["base", "tuned"]}}, "aligned ROUGE-L")
    assert plain.choices == [(c, c) for c in ("fine-tuned ROUGE-L", "ROUGE-L gain (fine-tuned − base)",
                                              "fine-tuned perplexity", "NLL drop (base − fine-tuned)")]
    assert plain.value == "fine-tuned ROUGE-L"  # the ranking the table falls back to
    judged = rank_choices({"summary": {"models": ["base", "tuned"], "judge": {"model": "llama3"}}}, "fine-tuned perplexity")
    assert ("fine-tuned judge score", "fine-tuned judge score") in judged.choices and judged.value == "fine-tuned perplexity"
    every = rank_choices({"summary": {"models": ["base", "tuned", "aligned"], "judge": {"model": "x"}}}, "aligned ROUGE-L")
    assert len(every.choices) == len(RANKINGS) and every.value == "aligned ROUGE-L"


def test_an_example_picked_in_the_playground_clears_the_answers_to_the_last_question():
    from ui.playground_tab import pick_example

    record = {"instruction": "Name a color.", "input": "", "output": "Red."}
    picked = pick_example(0, [record])
    assert picked[:2] == ("Name a color.", "") and "Red." in picked[2] and picked[3:] == ("",) * 5


def test_a_comparison_cancelled_by_another_pick_ends_with_its_answers_cleared(tmp_path):
    """Another run, example or opened run cancels a streaming comparison, and clears the boxes; a chunk that the
    comparison drew after that clearing (3 of 7 switches in Chromium, before) is cleared again once the cancel has gone
    through: Gradio runs a cancelled event's ``.failure()`` then, and a successful comparison's never."""
    from engine import Engine
    from ui.app import build_app

    demo = build_app(Engine(root=tmp_path / "runs", exports=tmp_path / "exports"))
    blocks = {b._id: b for b in demo.blocks.values()}
    compare = next(fn for fn in demo.fns.values() if fn.api_name == "compare")
    boxes = {"base-output", "tuned-output", "aligned-output", "diff-view", "playground-status"}
    assert {blocks[o._id].elem_id for o in compare.outputs} == boxes
    cancelling = [fn for fn in demo.fns.values() if fn.cancels and compare._id in fn.cancels]
    assert {blocks[t[0]].elem_id for fn in cancelling for t in fn.targets} >= {"tuned-run", "playground-examples"}
    after = [fn for fn in demo.fns.values() if fn.trigger_after == compare._id]
    assert len(after) == 1 and after[0].trigger_only_on_failure
    assert {blocks[o._id].elem_id for o in after[0].outputs} == boxes and after[0].fn() == ("",) * 5


def test_the_playground_examples_say_which_dataset_they_come_from(tmp_path):
    """They are the Dataset tab's data, which need not be the data the picked run trained on."""
    from engine import Engine
    from ui.playground_tab import examples_update

    engine = Engine(root=tmp_path)
    chosen, _ = engine.datasets.open("sample")
    shown, records = examples_update(engine, chosen)
    assert shown.constructor_args["label"] == "Examples from the test split of bundled sample, the Dataset tab's data (click one)"
    assert len(records) == len(shown.constructor_args["samples"]) == 7


def test_the_align_tab_points_to_saved_aligned_runs_when_none_is_going():
    from ui.align_tab import other_job_html

    idle = {"status": "done"}
    assert text(other_job_html(idle)).strip().startswith("No preference tuning yet. Pick a fine-tuned run")
    said = text(other_job_html(idle, ["b-dpo", "a-dpo"])).strip()
    assert said.startswith("No preference tuning is going. 2 aligned runs saved here (the newest: b-dpo ): compare")
    assert said.endswith("To align another, pick a fine-tuned run and press Start ; everyone who opens the app sees it live.")


def test_a_failed_run_takes_the_started_message_away_and_names_the_path_box(url, tmp_path):
    c = client(url)
    load(c, "sample")
    wait_until_idle(c)
    c.predict("owner-a", [], api_name="/poll_status")  # this visitor has seen the previous run end
    not_a_model = tmp_path / "my-gpt2"
    not_a_model.mkdir()
    refused = text(start(c, "owner-a", preset="gpt2", custom=str(not_a_model), random_init=False))  # before Start
    assert "Started" not in refused and "my-gpt2 holds no model.safetensors" in refused, refused
    refused = text(start(c, "owner-a", preset="gpt2", custom=str(tmp_path / "nowhere"), random_init=False))
    assert "nowhere: no such file or folder on this server" in refused, refused
    (not_a_model / "model.safetensors").write_bytes(b"not a safetensors file")  # found, and fails as it loads
    assert "Started" in text(start(c, "owner-a", preset="gpt2", custom=str(not_a_model), random_init=False))
    status = wait_until_idle(c)
    assert status["status"] == "failed" and status["error"].startswith("WeightsError")
    _, _, _, final, message = c.predict("owner-a", [], api_name="/poll_status")
    assert message == ""  # no green "Started…" beside the red failure
    assert "The run failed" in text(final) and "--model" not in text(final)
    assert "…or a local path / Hugging Face Hub id box" in text(final)


def test_a_run_that_ends_between_two_polls_gives_the_start_button_back(folders, tmp_path):
    from engine import Engine
    from ui.train_tab import make_config, poll

    engine = Engine()
    seen = poll(engine, "owner-a", None, [])[-2]  # the page is open
    (tmp_path / "nothing-here").mkdir()
    (tmp_path / "nothing-here" / "model.safetensors").write_bytes(b"no weights")  # found, and fails as it loads
    config = make_config(**{**TINY, "preset": "gpt2", "custom": str(tmp_path / "nothing-here"), "random_init": False},
                         data="sample")
    job = engine.start_training(config, owner="owner-a")  # fails within a tick: this page never sees it going
    assert job.wait(60) and job.snapshot()["status"] == "failed"
    out = poll(engine, "owner-a", seen, [])
    start_button, stop_button, final = out[4], out[5], text(out[3])
    assert start_button.interactive is True and stop_button.interactive is False
    assert out[7].visible is False  # no model to open in the Playground
    assert "The run failed" in final and f"You asked for {tmp_path / 'nothing-here'}" in final
    assert not hasattr(poll(engine, "owner-a", out[-2], [])[4], "interactive")  # sent once, not every tick


def test_while_the_first_run_trains_the_other_tabs_say_it_is_going_and_show_it_once_saved(tmp_path):
    """The Playground's and Evaluate's note, when they are opened with no run picked: how to train a first run, or
    that one is going; opened again once it is saved, they pick it."""
    import gradio as gr

    from engine import Engine
    from ui.app import build_app
    from ui.train_tab import make_config
    from ui.widgets import finished_run_choices

    engine = Engine(root=tmp_path)
    demo = build_app(engine)
    tabs = {b._id: b.id for b in demo.blocks.values() if isinstance(b, gr.Tab)}
    opened = {tabs[t[0]]: fn.fn for fn in demo.fns.values() for t in fn.targets
              if t[1] == "select" and t[0] in tabs and fn.inputs and fn.inputs[0].elem_id in ("tuned-run", "eval-run")}
    assert sorted(opened) == ["evaluate", "playground"]

    def notes():  # (picked run, note) of each tab when it is opened with none picked
        shown = [opened["playground"](None), opened["evaluate"](None, "fine-tuned ROUGE-L", False)]
        return [(out[0].value, text(out[1]).strip()) for out in shown]

    assert [(run, note.startswith("No f") and "going now" not in note) for run, note in notes()] == [(None, True)] * 2
    job = engine.start_training(make_config(**{**TINY, "max_steps": 10_000}, data="sample"), owner="owner-a")
    try:
        (_, play), (_, score) = going = notes()
        assert [run for run, _ in going] == [None, None]
        assert play == ("No finished run yet: a fine-tuning run is going now in the Train tab; compare it with the "
                        "model it started from here once it is saved.")
        assert score.startswith("No finished run yet: a fine-tuning run is going now in the Train tab; score it")
        deadline = time.time() + 60
        while job.snapshot()["step"] < 1 and time.time() < deadline:  # a step taken: stopping saves a run
            time.sleep(0.1)
    finally:
        engine.stop("train", "owner-a")
        assert job.wait(60)
    name = job.snapshot()["run"]
    (run, play), (again, score) = notes()  # the stopped run, saved
    assert run == again == name and play.startswith("Base model: tiny with random weights") and "no evaluation" in score
    picked = opened["playground"](name)  # a run picked: only the list is brought up to date, answers are kept
    assert picked[0].constructor_args == {"choices": finished_run_choices(engine)}
    assert all(out == gr.skip() for out in picked[1:])


def test_a_run_that_ends_keeps_another_visitors_choices_and_its_button_opens_it(tmp_path):
    """Every page's run lists follow a run that ends; a page comparing answers keeps its run and answers, one with
    none picked shows the new run, the button under the ended run opens that run in the Playground, and a run
    picked to resume stays picked."""
    import gradio as gr

    from engine import Engine
    from ui.app import build_app
    from ui.train_tab import make_config, runs_table
    from ui.widgets import finished_run_choices

    engine = Engine(root=tmp_path)
    demo = build_app(engine)
    blocks = {b._id: b for b in demo.blocks.values()}

    def handler(event: str, trigger: type, first_input, first_output):
        return next(fn.fn for fn in demo.fns.values() for t in fn.targets if t[1] == event
                    and isinstance(blocks[t[0]], trigger) and fn.inputs and first_input(fn.inputs[0])
                    and fn.outputs and first_output(fn.outputs[0]))

    def picker(block):
        return getattr(block, "elem_id", None) == "tuned-run"

    def train(owner):  # a run stopped after its second step, with a checkpoint: one to compare and to resume
        job = engine.start_training(make_config(**{**TINY, "max_steps": 10_000, "checkpoint_every": 1}, data="sample"),
                                    owner=owner)
        while job.snapshot()["step"] < 2:
            assert job.snapshot()["status"] != "failed"
            time.sleep(0.05)
        engine.stop("train", owner)
        assert job.wait(60) and job.snapshot()["status"] == "stopped"
        return job.snapshot()["run"], {"run": job.snapshot()["run"], "job": job.snapshot()["started_at"]}

    runs_changed = handler("change", gr.State, picker, picker)  # the shared "a run ended" state
    open_run = handler("change", gr.State, lambda b: isinstance(b, gr.State), picker)
    button = handler("click", gr.Button, lambda b: isinstance(b, gr.State), lambda b: isinstance(b, gr.Tabs))
    first, first_ended = train("owner-a")
    second, second_ended = train("owner-b")
    from ui import evaluate_tab

    polls = [fn for fn in demo.fns.values() if getattr(fn.fn, "func", None) is evaluate_tab.poll]
    shared_state = next(blocks[t[0]] for fn in demo.fns.values() for t in fn.targets if fn.fn is runs_changed)
    assert polls and all(fn.outputs[-1] is shared_state and fn.inputs[-1] is shared_state for fn in polls)
    assert polls[0].fn("owner-c", None, "fine-tuned ROUGE-L", False, None, first_ended)[-1] == second_ended  # on Evaluate too
    assert polls[0].fn("owner-c", None, "fine-tuned ROUGE-L", False, None, second_ended)[-1] == gr.skip()
    kept = runs_changed(first)  # a page comparing answers with the first run
    assert kept[0].constructor_args == {"choices": finished_run_choices(engine)}
    assert [name for _, name in kept[0].choices] == [second, first] and all(out == gr.skip() for out in kept[1:])
    shown = runs_changed(None)  # a page with no run picked shows the newest
    assert shown[0].value == second and "Base model: tiny with random weights" in text(shown[1])
    assert "the same model after the run, on bundled sample (alpaca prompts)" in text(shown[1])  # as the Dataset tab says
    tab, asked = button(first_ended)  # the button under the run that page saw end
    assert tab.constructor_args == {"selected": "playground"} and asked["run"] == first
    opened = open_run(asked)
    assert opened[0].value == first and opened[2].value == opened[3].value == ""  # its answer boxes fresh
    assert runs_table(engine)[2].value == second and runs_table(engine, first)[2].value == first
    assert runs_table(engine, "gone")[2].value == second


def test_a_start_after_the_pages_dataset_choice_expired_trains_on_the_data_the_page_shows(folders, tmp_path):
    """The server forgets a page's dataset choice after ``session_minutes``; a Start then opens it again from the
    browser's copy instead of training on the bundled sample, or says why it cannot."""
    import gradio as gr

    from engine import Engine
    from ui.app import build_app
    from ui.train_tab import restore_dataset

    engine = Engine(root=tmp_path / "runs")
    upload = tmp_path / "my_records.json"
    upload.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(40)]))
    chosen, _ = engine.datasets.open("upload", str(upload))
    assert restore_dataset(engine, chosen, chosen) == gr.skip()  # not expired
    assert restore_dataset(engine, None, None) == gr.skip()  # never chosen (an API client): the sample, as before
    again = restore_dataset(engine, None, dict(chosen))
    assert again == chosen and engine.datasets.training_source(again).endswith(chosen["key"])
    (engine.datasets.uploads_dir / chosen["key"]).unlink()
    with pytest.raises(gr.Error, match=r"expired after 120 minutes and could not be opened again \(my_records.json is no "
                                       r"longer on the server\): load a dataset in the Dataset tab"):
        restore_dataset(engine, None, chosen)
    demo = build_app(engine)  # wired before the Start, which runs only when the choice is there or was restored
    start = next(fn for fn in demo.fns.values() if fn.api_name == "start_training")
    restore = next(fn for fn in demo.fns.values() if fn._id == start.trigger_after)
    assert start.trigger_only_on_success and restore.fn.func is restore_dataset


def test_playground_reports_models_it_cannot_load(url, folders):
    c = client(url)
    runs = sorted((folders / "runs").iterdir())
    assert runs, "needs the run of the training test"
    assert "Type an instruction" in text(c.predict("", "", runs[0].name, 8, 0, 0, 1, 1, api_name="/compare")[4])
    assert "not a run on this server" in text(c.predict("Hi", "", "etc", 8, 0, 0, 1, 1, api_name="/compare")[4])
    assert "runs are named, never given as paths (e.g. etc)" in text(c.predict("Hi", "", "/etc", 8, 0, 0, 1, 1, api_name="/compare")[4])
    for seed, shown in ((1e20, "1e+20"), (-1, "-1"), (1.5, "1.5")):  # sampled, a seed no generator takes is named before anything loads
        note = text(c.predict("Hi", "", runs[0].name, 8, 0.7, 0, 1, seed, api_name="/compare")[4])
        assert f"seed must be a whole number from 0 to 2^53, got {shown}" in note

    broken = folders / "runs" / "99999999-000000-missing-base"
    shutil.copytree(runs[0], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["config"].update(model=str(folders / "no-such-model"), random_init=False)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    base, tuned, _, _, note = c.predict("Hi", "", broken.name, 8, 0, 0, 1, 1, api_name="/compare")
    assert (base, tuned) == ("", "")
    assert "could not be loaded" in text(note) and "no such file or directory: no-such-model" in text(note)
    assert str(folders) not in note
    shutil.rmtree(broken)


def test_server_address_flags_win_then_environment_then_space():
    from app import server_address

    assert server_address(env={}) == ("127.0.0.1", 7860)
    assert server_address(env={"SPACE_ID": "me/app"}) == ("0.0.0.0", 7860)
    env = {"GRADIO_SERVER_NAME": "10.0.0.5", "GRADIO_SERVER_PORT": "9000", "SPACE_ID": "me/app"}
    assert server_address(env=env) == ("10.0.0.5", 9000)
    assert server_address("127.0.0.2", 7000, env=env) == ("127.0.0.2", 7000)


def test_app_py_serves_quickly_with_no_network_and_a_sigterm_saves_the_running_job(tmp_path):
    """A Space restarting sends SIGTERM: the run in progress stops at its next step and saves a checkpoint."""
    port = free_port()
    env = {**os.environ, "GPT2_INSTRUCT_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.time() < deadline, "app.py did not serve within 60 s"
                time.sleep(0.3)
        assert "Instruction fine-tuning GPT-2" in page
        c = client(f"http://127.0.0.1:{port}/")
        load(c, "sample")
        assert "Started fine-tuning" in text(start(c, "owner-a", epochs=30, max_steps=0, eval_every=1000))
        deadline = time.time() + 60
        while c.predict(api_name="/job_status")["step"] < 2:
            assert time.time() < deadline, "the run did not reach step 2"
            time.sleep(0.2)
        proc.terminate()
        output = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0, output
        run = next((tmp_path / "runs").iterdir())
        manifest = read_manifest(run)
        assert manifest["status"] == "stopped" and manifest["stop_reason"] == "the server is shutting down", output
        assert (run / CHECKPOINT).is_file() and f"fine-tuning run: Stopped after step {manifest['steps']}" in output
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)


def test_form_values_map_to_a_train_config():
    from ui.train_tab import make_config

    config = make_config("gpt2", "", False, 2, 16, 1e-4, True, False, 8, 32, False, 0, 10, data="sample")
    assert (config.model, config.random_init, config.epochs, config.batch_size, config.lr) == ("gpt2", False, 2, 16, 1e-4)
    assert (config.mask_prompt, config.grouped, config.lora_rank, config.max_steps, config.eval_every) == (True, False, 0, None, 10)
    lora = make_config("gpt2", " ./local-gpt2 ", False, 1, 8, 5e-5, False, True, 8, 32, True, 12, 20, data="canonical")
    assert (lora.model, lora.lora_rank, lora.lora_alpha, lora.max_steps) == ("./local-gpt2", 8, 32.0, 12)
    from training import ConfigError
    from ui.evaluate_tab import whole

    empty = {"alpha": "LoRA alpha", "lr": "learning rate", "eval_every": "evaluate every"}
    for field, name in empty.items():  # an emptied box is named as the form labels it, never filled in silently
        values = dict(preset="gpt2", custom="", random_init=False, epochs=1, batch_size=8, lr=5e-5, mask_prompt=False,
                      lora=True, rank=8, alpha=32, grouped=False, max_steps=0, eval_every=10, data="sample")
        with pytest.raises(ConfigError, match=f"^{name}: enter a number$"):
            make_config(**{**values, field: None})
    with pytest.raises(ConfigError, match="^model: pick one from the list, or type a path or Hugging Face Hub id$"):
        make_config(**{**values, "preset": None})
    for value, says in (("abc", "must be a number, got 'abc'"), (float("nan"), "must be a finite number, got nan"),
                        (float("inf"), "must be a finite number, got inf")):  # what an API client may send
        with pytest.raises(ConfigError, match=f"^epochs {says}$"):
            make_config(**{**values, "epochs": value})
    with pytest.raises(ValueError, match="^examples: enter a number$"):
        whole(None, "examples", 0, 10)


def test_preset_labels_carry_size_and_memory():
    from training.estimate import estimate
    from ui.train_tab import preset_label

    assert preset_label(estimate("tiny")) == "tiny · 7.4M params · random weights, offline demo"
    assert preset_label(estimate("gpt2")) == "gpt2 · 124M params · full fine-tune ≈ 2.5 GB · LoRA ≈ 1.8 GB · inference ≈ 0.5 GB"


def test_every_dark_mode_rule_has_one_selector():
    """Gradio scopes the app's CSS by prefixing each selector of a rule and moves ``.dark`` before the first one only:
    in ``.dark .a, .dark .b`` the second selector never matches, and the diff's legend stayed light in dark mode."""
    from ui.theme import CSS

    rules = re.findall(r"([^{}]+)\{", re.sub(r"/\*.*?\*/", "", CSS, flags=re.S))
    dark = [selector.strip() for selector in rules if ".dark" in selector]
    assert dark and [s for s in dark if "," in s] == []


def test_differences_are_marked_word_by_word():
    from ui.playground_tab import diff_html

    out = diff_html("The cat sat on the mat.", "The dog sat on the mat.")
    assert out.endswith('<div class="gi-diff">The <del>cat</del><ins>dog</ins> sat on the mat.</div>')
    # Two unrelated answers are one change, not interleaved through the spaces they share.
    assert diff_html("vowel vowel vowel", "The capital of").endswith("<del>vowel vowel vowel</del><ins>The capital of</ins></div>")
    assert diff_html("a\nb", "a\nc d").endswith("a\n<del>b</del><ins>c d</ins></div>")
    assert "&lt;b&gt;" in diff_html("", "<b>")
    assert diff_html("", "") == ""


def test_the_train_tab_says_why_tiny_is_chosen_and_what_gpt2_presets_download():
    from training.config import DEMO, demo_text
    from ui.train_tab import model_note, preset_settings

    note = model_note("tiny", why="GPT-2's weights are not on this server")
    what, shows = demo_text()
    assert "tiny is preselected : GPT-2's weights are not on this server. The offline demo" in text(note)
    assert what in text(note) and shows in text(note)
    # What the demo is shows at once; what it can show and what shows more opens on a click.
    lead, more = note.split("<details", 1)
    assert what in text(lead) and "20 epochs" in text(lead) and shows in text(more) and "<summary>" in more
    assert "openai-community/gpt2" in shows and "path box" in shows and "cannot follow instructions" in shows
    assert "140 short steps" in what and "at 30 epochs" in shows
    space = text(preset_settings("tiny", max_epochs=3, local_paths=False)[-1])  # a Space: 3 epochs, no local paths
    assert "21 short steps" in space and "3 epochs" in space and "20 epochs" not in space
    assert "at 30 epochs" not in space and "path" not in space
    assert "preselected" not in text(model_note("tiny"))
    gpt2 = text(model_note("gpt2"))
    assert "downloaded once from the Hugging Face Hub" in gpt2 and "openai-community/gpt2" in gpt2 and "Random init" in gpt2
    assert preset_settings("tiny")[:4] == (True, DEMO["epochs"], DEMO["lr"], DEMO["mask_prompt"])
    assert preset_settings("tiny", max_epochs=3)[1] == 3  # a server's epoch limit wins
    assert preset_settings("gpt2")[:4] == (False, 1, 5e-5, False)


def test_the_runs_table_names_a_random_init_start(tmp_path):
    from engine import Engine
    from ui.train_tab import runs_table

    for name, random_init in (("20990101-000000-gpt2", True), ("20990101-000001-gpt2", False)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        manifest = {"status": "done", "config": {"model": "gpt2", "random_init": random_init}, "data": {"source": "sample"}}
        (tmp_path / "runs" / name / "manifest.json").write_text(json.dumps(manifest))
    rows = runs_table(Engine(root=tmp_path / "runs", exports=tmp_path / "exports"))[0]
    assert {row[0]: row[1] for row in rows} == {"20990101-000000-gpt2": "gpt2 (random init)", "20990101-000001-gpt2": "gpt2"}


def test_a_run_being_resumed_is_listed_as_resuming_and_not_offered_again(tmp_path, monkeypatch):
    """From the Resume press until the job has loaded (its manifest then says running), the Past runs table and every
    page's Resume list know the run is being resumed; once it has ended, it is as its manifest says."""
    import threading

    import engine.engine as engine_module
    from engine import Engine
    from ui.train_tab import make_config, runs_table

    engine = Engine(root=tmp_path / "runs", exports=tmp_path / "exports")
    names = []
    for owner in ("a", "b"):  # two stopped runs with checkpoints
        job = engine.start_training(make_config(**{**TINY, "max_steps": 10_000, "checkpoint_every": 1}, data="sample"), owner=owner)
        while job.snapshot()["step"] < 1:
            assert job.snapshot()["status"] != "failed"
            time.sleep(0.05)
        engine.stop("train", owner)
        assert job.wait(60) and job.snapshot()["status"] == "stopped"
        names.append(job.snapshot()["run"])
    loading, resume_run = threading.Event(), engine_module.resume_run
    monkeypatch.setattr(engine_module, "resume_run", lambda *a, **k: loading.wait(30) and resume_run(*a, **k))
    job = engine.resume_training(names[0], owner="a")
    assert engine.resuming() == {names[0]}
    rows, _, resumable = runs_table(engine, names[0])
    assert {row[0]: row[3] for row in rows} == {names[0]: "resuming", names[1]: "stopped"}
    assert [name for _, name in resumable.choices] == [names[1]] and resumable.value == names[1]
    engine.stop("train", "a")
    loading.set()
    assert job.wait(60) and engine.resuming() == set()
    assert {row[0]: row[3] for row in runs_table(engine)[0]} == {names[0]: "stopped", names[1]: "stopped"}


def test_the_loss_chart_overlays_only_runs_with_a_next_token_loss(tmp_path):
    """A preference-tuned run's DPO loss (ln 2 at its start) is not drawn on the loss axis beside cross-entropies."""
    from engine import Engine
    from ui.train_tab import chart_message, idle_html, runs_table

    for name, method in (("20990101-000000-tiny", None), ("20990101-000001-tiny-dpo", "dpo")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        manifest = {"status": "done", "config": {"model": "tiny", "random_init": True}, "data": {"source": "sample"},
                    **({"method": method} if method else {})}
        (tmp_path / "runs" / name / "manifest.json").write_text(json.dumps(manifest))
        (tmp_path / "runs" / name / "metrics.jsonl").write_text(json.dumps({"step": 0, "epoch": 0.0, "tokens_seen": 0, "train_loss": 0.693, "val_loss": 0.693}) + "\n")
    engine = Engine(root=tmp_path / "runs", exports=tmp_path / "exports")
    assert [name for _, name in runs_table(engine)[1].choices] == ["20990101-000000-tiny"]
    assert "Past runs with curves: 1." in text(idle_html(engine))
    snap = engine.snapshot("train")
    drawn = json.loads(chart_message(engine, snap, ["20990101-000000-tiny", "20990101-000001-tiny-dpo"]))  # an API client
    assert {trace["name"].split(" · ")[0] for trace in drawn["figure"]["data"]} == {"20990101-000000-tiny"}  # names both


def test_an_idle_align_tab_draws_its_empty_chart_once(tmp_path):
    """With no preference tuning in the lane (nothing yet, or a fine-tuning run), the chart says what will draw there,
    sent on the first tick alone."""
    from engine import Engine
    from ui.align_tab import poll

    engine = Engine(root=tmp_path / "runs", exports=tmp_path / "exports")
    first = poll(engine, "visitor", None)
    figure = json.loads(first[0])["figure"]
    assert "Press Start to align" in figure["layout"]["annotations"][0]["text"]
    assert poll(engine, "visitor", first[-2])[0] == {"__type__": "update"}


def test_an_idle_train_tab_points_to_the_past_runs_that_survived_a_restart(tmp_path):
    from engine import Engine
    from ui.train_tab import poll

    def idle_text():
        return text(poll(Engine(root=tmp_path / "runs", exports=tmp_path / "exports"), "visitor", None, [])[1]).strip()

    assert idle_text().startswith("No run yet.")
    for name in ("20990101-000000-tiny", "20990101-000001-tiny"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        manifest = {"status": "done", "config": {"model": "tiny", "random_init": True}, "data": {"source": "sample"}}
        (tmp_path / "runs" / name / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "runs" / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "train_loss": 9.0}) + "\n")
    assert idle_text().startswith("No run since the app started.")
    assert "Past runs with curves: 1. Pick any under Overlay past runs to draw it here" in idle_text()


def preference_pairs(folder: Path, n: int | None = None) -> Path:
    pairs = [{**r, "chosen": r["output"], "rejected": f"Ugh: {r['output'].lower()} Figure it out."}
             for r in load_instructions("sample")[:n]]
    path = folder / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path


def align(c: Client, owner: str, parent: str, upload, **overrides) -> str:
    settings = dict(source="upload", upload=handle_file(str(upload)), beta=0.1, lr=1e-4, epochs=1, max_steps=4,
                    batch_size=4, eval_every=2, lora=False, rank=8)
    return c.predict(owner, parent, *{**settings, **overrides}.values(), api_name="/start_preference")


def test_preference_tuning_from_a_run_then_three_columns_in_the_playground(url, folders, tmp_path):
    c = client(url)
    wait_until_idle(c)
    load(c, "sample")
    assert "Started fine-tuning" in text(start(c, "owner-a", max_steps=2))
    parent = wait_until_idle(c)["run"]
    pairs = preference_pairs(tmp_path)

    assert f"never given as paths (e.g. {parent}): pick one" in text(align(c, "owner-a", str(folders / "runs" / parent), pairs))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "Hi", "input": "", "output": "Hi", "chosen": "Hi"}]))
    assert 'field "rejected" is missing' in text(align(c, "owner-a", parent, bad))
    checked, source = c.predict(handle_file(str(bad)), api_name="/check_preference_file")  # on upload, before Start
    assert 'bad.json, record 1: field "rejected" is missing' in text(checked) and source == "upload"
    checked, _ = c.predict(handle_file(str(pairs)), api_name="/check_preference_file")
    assert "pairs.json : 74 preference pairs, checked. Press Start to align with them." in text(checked)
    sheet = tmp_path / "pairs.csv"
    sheet.write_text("instruction,chosen,rejected\nSay hi.,Hi!,No.\nSay yes.,Yes!,\n")
    checked, _ = c.predict(handle_file(str(sheet)), api_name="/check_preference_file")
    assert 'pairs.csv, row 3: field "rejected" is empty' in text(checked)
    assert "Started preference tuning" in text(align(c, "owner-a", parent, pairs))
    assert "already running" in text(start(c, "owner-b"))
    assert "Only the browser session that started this preference-tuning run" in \
        text(c.predict("owner-b", api_name="/stop_preference"))
    status = wait_until_idle(c, timeout=120)
    assert status["status"] == "done" and status["kind"] == "preference tuning", status.get("error")
    assert status["config"]["parent"] == parent and "/" not in json.dumps(status["config"])
    assert [r["step"] for r in status["history"]] == [0, 1, 2, 3, 4]
    aligned_run = status["run"]
    manifest = json.loads((folders / "runs" / aligned_run / "manifest.json").read_text())
    assert manifest["method"] == "dpo" and manifest["parent_run"] == parent

    progress = c.predict("owner-a", [], api_name="/poll_status")[1]
    assert "Preference tuning of " + parent in text(progress) and "Align" in text(progress)

    base, tuned, aligned, diff, note = c.predict("Name a colour.", "", aligned_run, 12, 1.0, 0, 1, 7, api_name="/compare")
    assert base.strip() and tuned.strip() and aligned.strip()
    assert "All three answers sampled at temperature 1, seed 7" in text(note)
    assert "only in the aligned answer" in text(diff)
    assert (base, tuned) == c.predict("Name a colour.", "", parent, 12, 1.0, 0, 1, 7, api_name="/compare")[:2]

    out = c.predict("owner-a", aligned_run, 3, 4, 2, "", "llama3", "fine-tuned ROUGE-L", True, api_name="/evaluate")
    progress, summary, chart, table = out[0], out[2], out[3], out[4]
    assert "Evaluated 3 examples" in text(progress), text(progress)
    shown = text(summary)
    assert "base fine-tuned aligned" in shown and "chosen answer more likely than rejected" in shown
    names = [t["name"] for t in json.loads(chart["plot"])["data"]]
    assert names == ["base", "base", "fine-tuned", "fine-tuned", "aligned", "aligned"]
    assert table["headers"][4:7] == ["base response", "fine-tuned response", "aligned response"]
    assert "ROUGE-L aligned" in table["headers"] and len(table["data"]) == 3


def test_preference_pairs_are_browsed_with_chosen_and_rejected_side_by_side(url, monkeypatch):
    from tests.conftest import book_file

    c = client(url)
    if not cache.is_preference_cached():
        monkeypatch.setattr(cache, "PREFERENCE_URL", "http://127.0.0.1:9/instruction-data-with-preference.json")
        message, rows, count, _ = c.predict("", 1, api_name="/browse_preferences")
        assert "Offline? The book's preference pairs could not be downloaded" in text(message) and rows["data"] == []
        monkeypatch.undo()  # the real URL, for the session's one download try
        cache.store_preference(book_file("preference").read_bytes())
    message, rows, count, page = c.predict("", 2, api_name="/browse_preferences")
    assert "1,100 pairs" in text(message) and count.startswith("1,100 pairs, page 2 / ") and page == 2
    assert rows["headers"] == ["#", "split", "instruction", "input", "chosen", "rejected"]
    first = rows["data"][0]
    assert first[1] == "train" and first[4] != first[5]
    message, rows, count, page = c.predict("passive", 1, api_name="/browse_preferences")
    assert count == "29 pairs, page 1 / 2" and len(rows["data"]) == 25  # found in the instruction or either answer


def test_a_tab_polls_only_while_it_is_shown():
    """An open browser costs one poll a second: the Align or Evaluate tab's while it is shown, else the Train tab's,
    which tells every tab when a run has finished."""
    import gradio as gr

    from engine import Engine
    from ui.app import build_app

    demo = build_app(Engine())
    timers = {b._id: b for b in demo.blocks.values() if isinstance(b, gr.Timer)}
    assert [t.active for t in timers.values()] == [True, False, False]
    tabs = {b._id: b.id for b in demo.blocks.values() if isinstance(b, gr.Tab)}
    shown = {}
    for fn in demo.fns.values():
        tab = next((tabs[t[0]] for t in fn.targets if t[1] == "select" and t[0] in tabs), None)
        if tab is not None and [o._id for o in fn.outputs] == list(timers):
            shown[tab] = [update.active for update in fn.fn()]
    # The timers of the Train, Evaluate and Align tabs, in the tabs' order.
    assert shown == {"dataset": [True, False, False], "train": [True, False, False], "playground": [True, False, False],
                     "evaluate": [False, True, False], "align": [False, False, True]}
    # and Gradio's per-event pandas summary of its event log runs once per 1,000 events, not after each poll
    assert demo._queue.ANAYLTICS_CACHE_FREQUENCY == 1000 and demo._queue.ANALYTICS_MAX_EVENTS == 1000


def test_picking_another_run_or_example_ends_the_comparison_streaming_into_the_answer_boxes():
    """Answers still streaming must not go on filling the boxes under another run or question: the Playground's run
    picker, its examples and another tab's "Compare it in the Playground" cancel the comparison."""
    from engine import Engine
    from ui.app import build_app

    config = build_app(Engine()).get_config_file()
    elem = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    compare = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "compare")
    cancelling = {(elem[target], event) for d in config["dependencies"] if compare in (d.get("cancels") or [])
                  for target, event in d["targets"]}
    assert {("tuned-run", "input"), ("playground-examples", "click")} <= cancelling
    assert len(cancelling) == 3  # and the open-run request from the Train, Evaluate and Align tabs' buttons


def test_a_run_stopped_before_its_first_step_is_not_offered_to_compare_and_stopped_runs_say_so(tmp_path):
    from engine import Engine
    from training import TrainConfig, train
    from training.events import Logged
    from training.loop import Hooks
    from ui.train_tab import final_html
    from ui.widgets import finished_run_choices, saved_run

    def run(name, steps):
        config = TrainConfig(model="tiny", random_init=True, data="sample", max_steps=5, eval_every=5, sample_tokens=0,
                             out=str(tmp_path / name))
        done = []  # the first evaluation's row, then a row a step
        summary = train(config, Hooks(on_event=lambda e: isinstance(e, Logged) and done.append(e),
                                      should_stop=lambda: len(done) > steps))
        return summary

    never = run("20990101-000000-never", 0)
    run("20990101-000001-two", 2)
    run("20990101-000002-whole", 99)
    engine = Engine(root=tmp_path)
    labels = dict((name, label) for label, name in finished_run_choices(engine))
    assert list(labels) == ["20990101-000002-whole", "20990101-000001-two"]
    assert " · stopped at step 2 · " in labels["20990101-000001-two"] and "stopped" not in labels["20990101-000002-whole"]
    assert "before its first step" in text(final_html({"final": never, "run": "20990101-000000-never"}))
    assert not saved_run({"status": "stopped", "final": never})  # no button to open it in the Playground
    assert saved_run({"status": "stopped", "final": {"steps": 2}}) and saved_run({"status": "done", "final": {"steps": 5}})
    assert not saved_run({"status": "failed", "final": None, "error": "WeightsError: ..."})
    loading = {"status": "stopped", "message": "Stopped while the model loaded: no run was started, nothing was written"}
    assert text(final_html(loading)).strip() == loading["message"]


def test_the_length_histogram_stays_on_non_negative_token_counts():
    from ui.charts import length_histogram
    from ui.dataset_tab import too_long_note

    fig = length_histogram({"prompt_tokens": [30] * 5, "response_tokens": [4] * 5})  # one length each
    assert fig.layout.xaxis.rangemode == "nonnegative"
    many = {"total_tokens": [1025, 10, 2000, *[1026] * 6]}
    assert too_long_note({"total_tokens": [1025, 10]}) == ""  # 1,024 read, the end token only predicted
    assert too_long_note(many) == ("7 records longer than GPT-2's 1,024-token context: training skips them "
                                   "(#3, #4, #5, #6, #7 and 2 more). That is every validation record (#8-#9): "
                                   "a run will show no validation loss.")
    assert "validation" not in too_long_note({"total_tokens": [*[10] * 8, 2000]})  # validation is #8-#9, and #8 fits
    assert too_long_note({"total_tokens": [*[10] * 19, 2000]}).endswith("every validation record (#20): a run will show no validation loss.")
    from ui.dataset_tab import repeats_note

    record = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    assert repeats_note([record, {**record, "output": "Hello."}]) == ""
    assert repeats_note([record, {**record, "input": "x"}, record, record]) == (
        "2 records repeating an earlier one word for word (#3 = #1, #4 = #1): each trains once more.")


def test_the_align_tab_names_a_typed_run_that_is_not_a_finished_fine_tuned_one(tmp_path):
    from engine import Engine
    from training import TrainConfig, train
    from ui.align_tab import parent_note

    train(TrainConfig(model="tiny", random_init=True, data="sample", max_steps=1, sample_tokens=0,
                      out=str(tmp_path / "20990101-000000-tiny")))
    engine = Engine(root=tmp_path)
    assert "Policy: 20990101-000000-tiny" in text(parent_note(engine, "20990101-000000-tiny"))
    assert text(parent_note(engine, "garbage-run")).strip() == ("garbage-run is not a finished fine-tuned run on this server: "
                                                        "pick one from the list.")


def test_a_checked_preference_file_names_pairs_that_will_not_train(tmp_path):
    from ui.align_tab import check_upload

    pair = {"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "Go away."}
    pairs = [pair] * 18 + [{**pair, "rejected": "Hi!"}] * 2 + [{**pair, "chosen": "word " * 1100}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    message = text(check_upload(str(path))[0])
    assert "pairs.json : 21 preference pairs, checked." in message
    assert "1 pair longer than GPT-2's 1,024-token context (prompt and longer answer): training skips it (#21)." in message
    assert "2 pairs with the same chosen and rejected answer, nothing to prefer: they teach nothing (#19, #20)." in message
    path.write_text(json.dumps([pair] * 20))
    assert "skips" not in text(check_upload(str(path))[0]) and "nothing to prefer" not in text(check_upload(str(path))[0])


def test_the_offline_demo_opens_on_the_sample_its_settings_are_for(monkeypatch):
    """The Dataset tab opens on the book's data when it is cached, except beside the offline demo (tiny, preselected
    where GPT-2's weights cannot be had): its 20 epochs are for the 74 records of the sample, not 2,320 steps."""
    from types import SimpleNamespace

    from ui.dataset_tab import default_source

    engine = SimpleNamespace(suggested_model=lambda: "tiny")
    monkeypatch.setattr(cache, "is_cached", lambda: True)
    assert default_source(engine) == "sample"
    engine.suggested_model = lambda: "gpt2"
    assert default_source(engine) == "canonical"
    monkeypatch.setattr(cache, "is_cached", lambda: False)
    assert default_source(engine) == "sample"


def test_charts_and_summaries_name_the_data_as_the_dataset_tab_does():
    from ui.widgets import data_name

    assert [data_name(s) for s in ("sample", "canonical", "preference")] == [
        "bundled sample", "canonical (book, ch. 7)", "the book's preference pairs"]
