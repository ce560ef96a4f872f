"""The Evaluate tab through the app's API (gradio_client), launched in-process on a free port, offline.

One tiny run (random weights, the bundled sample, four steps) in a temporary
runs folder is evaluated, reloaded, exported and pushed to an unreachable Hub.
"""
import html
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client

from engine import Engine
from training import TrainConfig, train
from evaluation.evaluate import EVAL_ROWS, EVAL_SUMMARY, load_eval

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*(no_silent_downcasting|copy keyword).*")
RUN = "20990101-000000-tiny"
RANK = "fine-tuned ROUGE-L"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text(markup: str) -> str:
    """What an HTML output says, without tags or entities."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run in the runs folder the app reads."""
    saved = os.environ.get("GPT2_INSTRUCT_RUNS")
    root = tmp_path_factory.mktemp("evaluate") / "runs"
    os.environ["GPT2_INSTRUCT_RUNS"] = str(root)
    train(TrainConfig(model="tiny", random_init=True, data="sample", max_steps=4, eval_every=2, sample_tokens=4, out=str(root / RUN)))
    yield root / RUN
    if saved is None:
        os.environ.pop("GPT2_INSTRUCT_RUNS", None)
    else:
        os.environ["GPT2_INSTRUCT_RUNS"] = saved


def exports_of(run: Path) -> Path:
    """Where the app under test keeps its export zips: beside the runs folder, not in the shared temp folder."""
    return run.parent.parent / "exports"


@pytest.fixture(scope="module", autouse=True)
def no_stray_download_folders():
    """Removes what gradio_client leaves behind: it downloads each output file (the export's zip) through a folder
    ``<temp>/<40 hex digits>`` of its own, moves the file out and never removes the folder."""
    temp = Path(tempfile.gettempdir())
    before = set(temp.iterdir())
    yield
    for folder in set(temp.iterdir()) - before:
        if re.fullmatch(r"[0-9a-f]{40}", folder.name) and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@pytest.fixture(scope="module")
def c(run):
    from engine import Engine
    from ui.app import build_app, launch_options

    demo = build_app(Engine(exports=exports_of(run)))
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, **launch_options())
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def evaluate(c: Client, run_dir, limit=4, max_new_tokens=8, batch_size=4, judge_url="", owner="owner-a") -> dict:
    """``evaluate`` outputs by name."""
    out = c.predict(owner, Path(run_dir).name if isinstance(run_dir, Path) else run_dir, limit, max_new_tokens, batch_size, judge_url, "llama3", RANK, False, api_name="/evaluate")
    return dict(zip(["progress", "message", "summary", "chart", "table"], out))


def test_evaluation_scores_both_models_saves_them_and_reloads(c, run):
    out = evaluate(c, run)
    assert "Evaluated 4 examples" in text(out["progress"]), text(out["progress"])
    assert (run / EVAL_ROWS).is_file() and (run / EVAL_SUMMARY).is_file()
    saved = load_eval(run)
    summary = saved["summary"]
    assert summary["examples"] == 4 and summary["max_new_tokens"] == 8 and summary["batch_size"] == 4
    shown = text(out["summary"])
    for name in ("base", "tuned"):
        totals = summary[name]
        assert 9 < totals["nll"] < 12  # a barely trained random model: near ln(50257)
        assert f"{totals['rouge_l']:.3f}" in shown and f"{totals['perplexity']:,.1f}" in shown and f"{totals['nll']:.3f}" in shown
    assert "4 test examples of bundled sample" in shown and "ollama run llama3" in shown  # no judge: how to set one up

    traces = json.loads(out["chart"]["plot"])["data"]
    assert [t["name"] for t in traces] == ["base", "base", "fine-tuned", "fine-tuned"]
    assert traces[1]["y"] == [pytest.approx(summary["base"]["perplexity"])]
    assert traces[2]["y"][0] == pytest.approx(100 * summary["tuned"]["rouge_l"])

    table = out["table"]
    assert table["headers"][:6] == ["rank", "#", "instruction", "reference", "base response", "fine-tuned response"]
    assert [r[0] for r in table["data"]] == [1, 2, 3, 4] and sorted(r[1] for r in table["data"]) == [1, 2, 3, 4]
    tuned_rouge = [r[table["headers"].index("ROUGE-L tuned")] for r in table["data"]]
    assert tuned_rouge == sorted(tuned_rouge, reverse=True)
    first = saved["rows"][table["data"][0][1] - 1]
    assert table["data"][0][3] == first["output"] and table["data"][0][5] == (first["tuned"]["response"] or "(empty)")

    again = c.predict(RUN, RANK, False, api_name="/load_evaluation")  # by folder name this time
    assert text(again[0]) == shown and again[2]["data"] == table["data"]
    by_perplexity = c.predict(RUN, "fine-tuned perplexity", False, api_name="/load_evaluation")[2]["data"]
    perplexities = [r[table["headers"].index("PPL tuned")] for r in by_perplexity]
    assert perplexities == sorted(perplexities) and len(set(perplexities)) == 4


def test_a_run_without_an_evaluation_says_so(c, run):
    fresh = run.parent / "20990101-000001-tiny"
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("eval*"))
    try:
        summary, _, table = c.predict(fresh.name, RANK, False, api_name="/load_evaluation")
        assert "has no evaluation yet" in text(summary) and not any(table["data"][0] if table["data"] else [])
        assert "whole test split (7 examples)" in text(summary) and "110 examples of" not in text(summary)  # 74 -> 7 test
    finally:
        shutil.rmtree(fresh)


def test_the_progress_moves_through_the_phases(c, run):
    job = c.submit("owner-a", RUN, 7, 64, 1, "", "llama3", RANK, False, api_name="/evaluate")
    job.result(timeout=120)
    shown = [text(out[0]) for out in job.outputs() if isinstance(out[0], str)]
    phases = {m.group(0) for m in map(re.compile(r"phase \d+ / 6").search, shown) if m}
    assert len(phases) >= 2, shown  # not one "0 / 7 examples" from start to done
    assert "Evaluated 7 examples" in shown[-1]


def test_a_reloaded_page_gets_the_evaluation_back_with_stop_and_its_results(run):
    """The tab's poll: a page that did not start the evaluation (the owner's after a reload, or another visitor's)."""
    from ui.evaluate_tab import job_poll as poll

    engine = Engine()
    owner, other, same = (poll(engine, who, None, RANK, False)[-1] for who in ("owner-a", "owner-b", "owner-c"))  # idle pages
    job = engine.start_evaluation(RUN, owner="owner-a", limit=7, max_new_tokens=64, batch_size=1)
    deadline = time.time() + 60
    while not job.snapshot()["progress"] and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(Exception, match=r"an evaluation is already running \(evaluating, phase \d / 6\)"):
        engine.start_evaluation(RUN, owner="owner-b")
    progress, message, *_, picker, start, stop, owner = poll(engine, "owner-a", owner, RANK, False)
    assert "phase" in text(progress) and text(message).startswith(f"Evaluating {RUN}")
    assert (picker.interactive, start.interactive, stop.interactive) == (False, False, True)
    from ui.evaluate_tab import refresh_runs

    assert refresh_runs(engine, None).value == RUN  # a reloaded page's picker: the run being evaluated
    _, message, *_, start, stop, other = poll(engine, "owner-b", other, RANK, False)
    assert "started by another visitor" in text(message) and not start.interactive and not stop.interactive
    same = poll(engine, "owner-c", same, RANK, False, RUN)[-1]
    assert job.wait(120)
    progress, message, summary, _, table, result, picker, start, stop, owner = poll(engine, "owner-a", owner, RANK, False)
    assert "Evaluated 7 examples" in text(progress) and "7 test examples of bundled sample" in text(summary)
    assert result["run"] == RUN and len(table["data"]) == 7 and start.interactive and not stop.interactive
    progress, _, summary, *_, start, _, _ = poll(engine, "owner-b", other, RANK, False)
    assert progress == "" and not isinstance(summary, str) and start.interactive  # another run's page keeps its results
    _, _, summary, *_ = poll(engine, "owner-c", same, RANK, False, RUN)  # a page showing that run gets the new ones
    assert "7 test examples of bundled sample" in text(summary)
    assert all(not isinstance(o, (str, gr.Button)) for o in poll(engine, "owner-a", owner, RANK, False)[:-1])  # once


def test_another_visitors_evaluation_leaves_a_pages_choice_alone(run, monkeypatch):
    """A refresh (the button, or a run ending anywhere) keeps the run a page picked; only a page with no choice yet
    (just opened, or its run gone) is put on the run being evaluated."""
    from ui.evaluate_tab import refresh_runs

    from .test_engine import blocked

    other = run.parent / "20990101-000001-tiny"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("eval*"))
    try:
        engine = Engine()
        started, release = blocked(monkeypatch, "evaluate_run")
        job = engine.start_evaluation(RUN, owner="owner-a")
        assert started.wait(30)
        assert refresh_runs(engine, other.name).value == other.name
        assert refresh_runs(engine, None).value == refresh_runs(engine, "20990101-000002-gone").value == RUN
        release.set()
        assert job.wait(30)
    finally:
        shutil.rmtree(other)


def test_a_run_that_finishes_again_after_a_resume_relists_the_runs_again():
    """The shared "a run finished" state names the finish, not only the run: a stopped run resumed to its end
    changes it again, so the tabs' run lists (here the Evaluate tab's, which watches the train lane) show it done."""
    from ui.evaluate_tab import poll

    class Lanes:
        train = {"run": RUN, "status": "stopped", "started_at": 1.0}

        def snapshot(self, lane, since=None):
            idle = {"status": "idle", "owner": None, "version": 0, "started_at": None}
            return {**self.train, "owner": None, "version": 1} if lane == "train" else idle

    lanes = Lanes()
    latest = poll(lanes, "me", None, RANK, False)[-1]
    assert latest == {"run": RUN, "job": 1.0}
    assert poll(lanes, "me", None, RANK, False, None, latest)[-1] == gr.skip()
    lanes.train = {"run": RUN, "status": "running", "started_at": 2.0}
    assert poll(lanes, "me", None, RANK, False, None, latest)[-1] == gr.skip()
    lanes.train = {"run": RUN, "status": "done", "started_at": 2.0}
    assert poll(lanes, "me", None, RANK, False, None, latest)[-1] == {"run": RUN, "job": 2.0}


def test_a_key_typed_for_the_judge_goes_to_it_alone_and_is_saved_nowhere(c, run):
    from .test_evaluate import JudgeServer

    server = JudgeServer()
    try:
        c.predict("owner-a", run.name, 2, 4, 2, server.url, "llama3", RANK, False, "sk-typed-here", api_name="/evaluate")
    finally:
        server.server.shutdown()
    assert server.requests and all(r["auth"] == "Bearer sk-typed-here" for r in server.requests)
    assert not [p for p in run.iterdir() if p.is_file() and b"sk-typed-here" in p.read_bytes()]


def test_a_judge_that_is_down_is_named_and_the_scores_still_come(c, run):
    out = evaluate(c, run, limit=2, judge_url="http://127.0.0.1:9")
    shown = text(out["summary"])
    assert "The judge left 4 of 4 responses unscored" in shown and "cannot reach http://127.0.0.1:9/v1/chat/completions" in shown
    assert "LLM judge score" in shown and load_eval(run)["summary"]["judge"]["model"] == "llama3"
    assert "judge tuned" in out["table"]["headers"]


def test_stop_writes_nothing_and_only_the_owner_may_stop(c, run):
    assert "No evaluation is going" in text(c.predict("owner-a", api_name="/stop_evaluation"))
    before = (run / EVAL_SUMMARY).read_bytes(), (run / EVAL_ROWS).read_bytes()
    job = c.submit("owner-a", RUN, 0, 256, 1, "", "llama3", RANK, False, api_name="/evaluate")
    deadline = time.time() + 30
    while not job.outputs() and time.time() < deadline:
        time.sleep(0.05)
    assert "Only the browser session" in text(c.predict("owner-b", api_name="/stop_evaluation"))
    assert "Stopping" in text(c.predict("owner-a", api_name="/stop_evaluation"))
    progress = job.result(timeout=60)[0]
    assert "Stopped: nothing was written" in text(progress)
    assert ((run / EVAL_SUMMARY).read_bytes(), (run / EVAL_ROWS).read_bytes()) == before


def test_export_gives_a_zip_of_the_hugging_face_files(c, run):
    path, message = c.predict(RUN, api_name="/export_zip")
    again, _ = c.predict(RUN, api_name="/export_zip")
    assert Path(again).read_bytes() == Path(path).read_bytes()
    exports = exports_of(run)
    assert [p.name for p in exports.glob(f"{RUN}*")] == [f"{RUN}-hf.zip"]  # built once, reused
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        assert {f"{RUN}/{name}" for name in ("model.safetensors", "config.json", "vocab.json", "merges.txt")} <= names
        assert zf.read(f"{RUN}/model.safetensors") == (run / "model.safetensors").read_bytes()
    assert f"{RUN}-hf.zip" in text(message) and f'unzip it and load the folder {RUN} with GPT2LMHeadModel.from_pretrained("{RUN}")' in text(message)


def test_push_to_hub_offline_is_a_clear_message(c, run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    message = text(c.predict(RUN, "someone/gpt2-instruct", "hf_not_a_token", api_name="/push_to_hub"))
    assert time.perf_counter() - t0 < 10
    assert "cannot reach the Hugging Face Hub at http://127.0.0.1:9" in message and "nothing was uploaded" in message
    assert "Enter a repo id" in text(c.predict(RUN, " ", "", api_name="/push_to_hub"))
    assert not list(run.glob(".hub-*"))


def test_only_runs_the_app_lists_are_accepted(c, run, tmp_path):
    outside = tmp_path / RUN  # a real run, but not in the runs folder
    shutil.copytree(run, outside, ignore=shutil.ignore_patterns("eval*"))
    for name in (str(outside), "/etc", "../" + RUN, "no-such-run", ""):
        assert "pick one from the list" in text(evaluate(c, name)["progress"]), name
        assert "pick one from the list" in text(c.predict(name, RANK, False, api_name="/load_evaluation")[0]) or not name
        path, message = c.predict(name, api_name="/export_zip")
        assert path is None and "pick one from the list" in text(message)
        assert "pick one from the list" in text(c.predict(name, "someone/x", "hf_x", api_name="/push_to_hub"))
    assert not list(outside.glob("eval*")) and not list(outside.glob("*.zip"))


def test_bad_settings_and_a_missing_base_model_are_messages(c, run):
    with pytest.raises(Exception, match="257 is greater than maximum value 256"):
        evaluate(c, run, max_new_tokens=257)
    assert "batch size: enter a number" in text(evaluate(c, run, batch_size=None)["progress"])
    assert "examples: enter a number" in text(evaluate(c, run, limit=None)["progress"])
    assert "judge URL must be an http(s) address" in text(evaluate(c, run, judge_url="not a url")["progress"])
    assert "session id" in text(evaluate(c, run, owner="")["progress"])

    broken = run.parent / "20990101-000002-missing-base"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("eval*"))
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["config"].update(model=str(broken / "no-such-model"), random_init=False)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    try:
        progress = text(evaluate(c, broken)["progress"])
        assert "The evaluation failed" in progress and "no-such-model" in progress and str(broken) not in progress
        assert not (broken / EVAL_SUMMARY).exists()
    finally:
        shutil.rmtree(broken)


def test_a_clicked_row_opens_the_playground(run):
    from types import SimpleNamespace

    from ui.evaluate_tab import open_in_playground
    from ui.playground_tab import open_example

    engine = Engine(root=run.parent)
    row = {"index": 2, "instruction": "Name a colour.", "input": "", "output": "Red."}
    shared = SimpleNamespace(open_example=lambda record, name, note="": open_example(engine, record, name, note),
                             playground=(None,) * len(open_example(engine, row, RUN)))
    result = {"run": RUN, "rows": [{**row, "index": i} for i in range(2)] + [row]}
    event = gr.SelectData(None, {"index": [0, 4], "value": "…", "row_value": [1, 3, "Name a colour.", "Red."]})
    tabs, instruction, input_text, reference, run_picker, *_ = open_in_playground(shared, result, event)
    assert tabs.selected == "playground" and (instruction, input_text) == ("Name a colour.", "")
    assert "Red." in reference and run_picker.value == RUN
    missing = gr.SelectData(None, {"index": [0, 0], "value": 9, "row_value": [1, 9]})
    assert all(isinstance(out, type(gr.skip())) or out == gr.skip() for out in open_in_playground(shared, result, missing))


def test_the_table_shows_the_best_and_the_worst_or_everything():
    from ui.evaluate_tab import SHOWN, table_update

    def scored(i, rouge):
        return {"response": f"r{i}", "rouge_l": rouge, "perplexity": 10.0 + i, "nll": 2.0, "judge": None}

    rows = [{"index": i, "instruction": f"task {i}", "input": "", "output": "ref", "base": scored(i, 0.5), "tuned": scored(i, i / 20)}
            for i in range(2 * SHOWN + 2)]
    result = {"summary": {"judge": None}, "rows": rows}
    table = table_update(result, "fine-tuned ROUGE-L", False)
    ranks, examples = [r[0] for r in table["data"]], [r[1] for r in table["data"]]
    assert ranks == [1, 2, 3, 4, 5, 8, 9, 10, 11, 12] and examples == [12, 11, 10, 9, 8, 5, 4, 3, 2, 1]
    assert len(table_update(result, "fine-tuned ROUGE-L", True)["data"]) == 2 * SHOWN + 2
    gains = [r[1] for r in table_update(result, "ROUGE-L gain (fine-tuned − base)", True)["data"]]
    assert gains == list(range(2 * SHOWN + 2, 0, -1))
    assert [r[1] for r in table_update(result, "fine-tuned judge score", True)["data"]] == gains  # no judge: by ROUGE-L


def test_a_dpo_evaluation_ranks_by_the_aligned_model():
    from ui.evaluate_tab import table_update

    def scored(rouge):
        return {"response": "r", "rouge_l": rouge, "perplexity": 10.0, "nll": 2.0, "judge": None}

    rows = [{"index": i, "instruction": f"task {i}", "input": "", "output": "ref", "base": scored(0.1), "tuned": scored(i / 10),
             "aligned": scored(1 - i / 10)} for i in range(5)]
    result = {"summary": {"judge": None, "models": ["base", "tuned", "aligned"]}, "rows": rows}
    assert [r[1] for r in table_update(result, "aligned ROUGE-L", True)["data"]] == [1, 2, 3, 4, 5]
    assert [r[1] for r in table_update(result, "ROUGE-L gain (aligned − fine-tuned)", True)["data"]] == [1, 2, 3, 4, 5]
    assert [r[1] for r in table_update(result, "fine-tuned ROUGE-L", True)["data"]] == [5, 4, 3, 2, 1]
    for row in rows:
        del row["aligned"]  # a fine-tuning run's evaluation: by the fine-tuned ROUGE-L
    result["summary"]["models"] = ["base", "tuned"]
    assert [r[1] for r in table_update(result, "aligned ROUGE-L", True)["data"]] == [5, 4, 3, 2, 1]


def test_every_response_column_is_as_wide_as_text_needs_with_two_models_or_three():
    """Widths in pixels, by column name: the aligned response is text too, though it stands where a score stands in a
    fine-tuning run's table."""
    from ui.evaluate_tab import column_widths, headers

    for names, judged in ((("base", "tuned"), False), (("base", "tuned", "aligned"), True)):
        columns = headers(judged, names)
        widths = dict(zip(columns, column_widths(columns)))
        assert len(widths) == len(columns) and all(w.endswith("px") for w in widths.values())
        texts = [c for c in columns if c in ("instruction", "reference") or c.endswith(" response")]
        assert len(texts) == 2 + len(names) and min(int(widths[c][:-2]) for c in texts) >= 150
        assert max(int(w[:-2]) for c, w in widths.items() if c not in texts) <= 76


@pytest.mark.parametrize("models", [["tuned"], ["base"]])
def test_an_evaluation_of_some_models_only_shows_under_every_ranking(run, tmp_path, models):
    """``python -m evaluation --models tuned`` saves rows without the base model: the tab ranks what is there."""
    from evaluation.evaluate import evaluate_run
    from runstore import find_run
    from ui.evaluate_tab import RANKINGS, shown

    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    evaluate_run(copy, limit=3, max_new_tokens=2, models=models)
    result = load_eval(copy)
    for label in RANKINGS:
        summary, _, table, _ = shown(find_run(copy, tmp_path), result, label, True)
        assert len(table["data"]) == 3 and table["headers"][4] == f"{'fine-tuned' if models == ['tuned'] else 'base'} response"
        assert "ROUGE-L" in text(summary)
    # No judge: how to set one up, here on this machine (Ollama), and on a server others reach (public ones only).
    assert "enter http://localhost:11434/v1" in text(shown(find_run(copy, tmp_path), result, "fine-tuned ROUGE-L", True)[0])
    public = text(shown(find_run(copy, tmp_path), result, "fine-tuned ROUGE-L", True, local=False)[0])
    assert "must be on the public internet" in public and "ollama" not in public.lower()


def test_with_no_run_named_a_server_with_runs_asks_for_one_and_does_not_say_there_is_none(run):
    """An API client that names no run: "pick one", not "No finished run yet: train one" beside saved runs."""
    from ui.evaluate_tab import load_evaluation
    from ui.playground_tab import compare

    engine = Engine()
    assert text(load_evaluation(engine, None, RANK, False)[0]) == "No run picked: pick a fine-tuned run from the list."
    *_, status = next(compare(engine, "Say hi.", "", None, 8, 0, 0, 1, 0))
    assert text(status) == "No run picked: pick a fine-tuned run from the list." and "error" in status
    *_, status = next(compare(engine, "Say hi.", "", RUN, 8, 1.0, 0, 1, "abc"))
    assert text(status) == "seed must be a number, got 'abc'"
