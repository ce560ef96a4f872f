"""Evaluation and export: NLL and perplexity, ROUGE-L, the LLM judge, eval files, the Hugging Face zip, the CLI."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from data import format_prompt, load_instructions, split_instructions
from model import EOT_ID, GPT, GPTConfig, get_tokenizer, load_pretrained
from runstore import load_run
from training import TrainConfig, train
from evaluation.evaluate import (
    EVAL_ROWS, EVAL_SUMMARY, EvaluationStopped, best_and_worst, evaluate_run, load_eval, response_nll, main as evaluation_main,
)
from runstore.export import ExportError, export_zip, load_hint, push_to_hub
from runstore.models import Models
from evaluation.judge import DEFAULT_URL, Judge, chat_url, judge_help, judge_prompt, parse_score, summarize_scores
from training.loop import respond

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    train(TrainConfig(model="tiny", random_init=True, data="sample", max_steps=4, eval_every=2, sample_tokens=4, out=str(out)))
    return out


@pytest.fixture(scope="module")
def test_records():
    return split_instructions(load_instructions("sample")).test


# NLL and perplexity


def nll_by_hand(model: GPT, record: dict) -> tuple[float, int]:
    """One record, unbatched: full forward pass, fp32 log-softmax, summed over the response and its end token."""
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(format_prompt(record), disallowed_special=())
    ids = prompt + tokenizer.encode(record["output"], disallowed_special=()) + [EOT_ID]
    with torch.no_grad():
        h = model.hidden_states(torch.tensor([ids[:-1]]))
        logp = torch.log_softmax(h.float() @ model.lm_head.weight.float().t(), dim=-1)[0]
    targets = torch.tensor(ids[1:])
    picked = logp[torch.arange(len(targets)), targets][len(prompt) - 1 :]
    return -picked.sum().item(), len(picked)


def test_nll_equals_a_full_forward_pass_per_record(run, test_records):
    records = test_records[:2]
    model = load_run(run)  # fp32
    for batch_size in (1, 2):
        got = response_nll(model, records, batch_size=batch_size)
        for (total, count), record in zip(got, records):
            want_total, want_count = nll_by_hand(model, record)
            assert count == want_count == len(get_tokenizer().encode(record["output"])) + 1
            assert total == pytest.approx(want_total, rel=1e-5)
    bf16 = response_nll(Models().tuned(run), records)
    fp32 = response_nll(model, records)
    for (a, n), (b, m) in zip(bf16, fp32):
        assert n == m and a / n == pytest.approx(b / m, abs=0.05)


def test_uniform_logits_give_ln_vocab(test_records):
    """A zero LM head gives every token 1/50257: NLL ln(50257) per token, perplexity 50257."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny")).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    for total, count in response_nll(model, test_records, batch_size=3):
        assert total / count == pytest.approx(math.log(50257), rel=1e-6)
        assert math.exp(total / count) == pytest.approx(50257, rel=1e-5)


def test_a_record_too_long_for_the_context_has_no_nll(test_records):
    model = GPT(GPTConfig.from_name("tiny", block_size=64)).eval()
    long = {"instruction": "word " * 100, "input": "", "output": "yes"}
    got = response_nll(model, [long, {"instruction": "Hi", "input": "", "output": "Hello."}])
    assert got[0] is None and got[1][1] == 3


# The LLM judge


class JudgeServer:
    """A local OpenAI-compatible endpoint whose reply depends on a marker in the graded response."""

    REPLIES = {"RESP_GOOD": "85", "RESP_WORDS": "great job!", "RESP_BIG": "150", "RESP_CHATTY": "Score: 72/100"}

    def __init__(self):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                prompt = body["messages"][0]["content"]
                if "RESP_500" in prompt:
                    return self.send(500, b"model crashed")
                if "RESP_SLOW" in prompt:
                    time.sleep(1.0)
                if "RESP_NOTJSON" in prompt:
                    return self.send(200, b"<html>hi</html>")
                if "RESP_REDIRECT" in prompt:
                    self.send_response(302)
                    self.send_header("Location", "http://127.0.0.1:9/internal")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                reply = next((r for marker, r in outer.REPLIES.items() if marker in prompt), "50")
                self.send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode())

            def send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def judge_server():
    server = JudgeServer()
    yield server
    server.server.shutdown()


ENTRY = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}


def test_judge_scores_and_unscored_replies(judge_server):
    judge = Judge(judge_server.url, model="llama3", api_key="sk-test", timeout=0.4)
    assert judge.score(ENTRY, "RESP_GOOD") == (85, None)
    assert judge.score(ENTRY, "RESP_CHATTY") == (72, None)
    cases = {"RESP_WORDS": "no number", "RESP_BIG": "outside 0..100", "RESP_500": "HTTP 500",
             "RESP_SLOW": "within 0.4 s", "RESP_NOTJSON": "not an OpenAI chat completion"}
    for response, reason in cases.items():
        score, why = judge.score(ENTRY, response)
        assert score is None and reason in why, (response, why)
    request = judge_server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["temperature"] == 0 and request["body"]["model"] == "llama3"
    assert request["body"]["messages"][0]["content"] == judge_prompt(ENTRY, "RESP_GOOD") == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a primary colour.` and correct output `Red.`, score the "
        "model response `RESP_GOOD` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def test_a_public_servers_judge_never_carries_its_key_nor_calls_inside_its_network(judge_server, monkeypatch):
    from engine import Engine
    from evaluation import judge as judge_module

    monkeypatch.setenv("OPENAI_API_KEY", "sk-host")
    for url, address in ((judge_server.url, "127.0.0.1"), ("http://10.0.0.7/v1", "10.0.0.7"),
                         ("http://169.254.169.254", "169.254.169.254"), ("http://[::1]:8000/v1", "::1")):
        with pytest.raises(ValueError, match=f"judge URL: .* is {re.escape(address)}, inside this server's own network"):
            Judge(url).for_visitors()
    with pytest.raises(ValueError, match="inside this server's own network"):
        Engine(loopback=False).start_evaluation("any run", judge=Judge(judge_server.url))
    with monkeypatch.context() as rebinding:  # the name resolves to a public address when checked, to 127.0.0.1 after
        rebinding.setattr(judge_module, "addresses_of", lambda host: ["93.184.216.34"])
        score, why = Judge(judge_server.url).for_visitors().score(ENTRY, "RESP_GOOD")
        assert score is None and "127.0.0.1 is 127.0.0.1, inside this server's own network" in why
    monkeypatch.setattr(judge_module, "is_public", lambda address: True)  # as if the judge server were on the internet
    assert Judge(judge_server.url).for_visitors().score(ENTRY, "RESP_GOOD") == (85, None)
    assert judge_server.requests[-1]["auth"] is None  # the visitor chose the URL: the host's key stays home
    score, why = Judge(judge_server.url).for_visitors().score(ENTRY, "RESP_REDIRECT")
    assert score is None and "HTTP 302" in why and "redirected to http://127.0.0.1:9/internal, which a visitor's judge does not follow" in why
    assert "sk-visitor" not in repr(Judge(judge_server.url, api_key="sk-visitor"))  # a job's settings show its repr
    assert Judge(judge_server.url, api_key="sk-visitor").for_visitors().score(ENTRY, "RESP_GOOD") == (85, None)
    assert judge_server.requests[-1]["auth"] == "Bearer sk-visitor"
    assert Judge(judge_server.url).score(ENTRY, "RESP_GOOD") == (85, None)  # the owner's own judge, e.g. the CLI
    assert judge_server.requests[-1]["auth"] == "Bearer sk-host"


def test_judge_gives_up_on_a_dead_server():
    judge = Judge("http://127.0.0.1:9", timeout=1, give_up_after=3)
    t0 = time.perf_counter()
    reasons = [judge.score(ENTRY, "x")[1] for _ in range(5)]
    assert time.perf_counter() - t0 < 10
    assert all("cannot reach http://127.0.0.1:9/v1/chat/completions" in r for r in reasons[:3])
    assert all(r.startswith("not asked") for r in reasons[3:])


def test_judge_helpers():
    for url in ("localhost:11434", "http://localhost:11434", "http://localhost:11434/", "http://localhost:11434/v1", "http://localhost:11434/v1/chat/completions"):
        assert chat_url(url) == "http://localhost:11434/v1/chat/completions"
    assert parse_score("100") == (100, None) and parse_score("0") == (0, None) and parse_score(" 85.6 ") == (86, None)
    assert parse_score("-3")[0] is None and parse_score("")[0] is None
    assert summarize_scores([85, None, 40]) == {"judge_avg": 62.5, "judge_scored": 2, "judge_unscored": 1}
    assert summarize_scores([None]) == {"judge_avg": None, "judge_scored": 0, "judge_unscored": 1}
    assert "ollama run llama3" in judge_help() and "--judge http://localhost:11434/v1" in judge_help()
    for bad in ("not a url", "ftp://host/v1", "http:///v1"):  # refused before a single example is evaluated
        with pytest.raises(ValueError, match=f"judge URL must be an http.s. address such as http://localhost:11434/v1, got {bad!r}"):
            Judge(bad)
    for timeout in (0, -1, float("nan"), float("inf")):  # each request would fail, blaming the judge
        with pytest.raises(ValueError, match="judge timeout must be a number of seconds above 0"):
            Judge(DEFAULT_URL, timeout=timeout)


# evaluate_run


def test_evaluate_run_writes_rows_and_summary(run, test_records, judge_server):
    events = []
    t0 = time.perf_counter()
    result = evaluate_run(run, limit=6, max_new_tokens=8, batch_size=4, judge=Judge(judge_server.url), progress=events.append)
    seconds = time.perf_counter() - t0
    rows, summary = result["rows"], result["summary"]
    assert load_eval(run) == json.loads(json.dumps(result))
    for setting, value in (("limit", 0), ("batch_size", 0), ("max_new_tokens", -5)):
        with pytest.raises(ValueError, match=f"^{setting} must be at least 1, got {value}$"):
            evaluate_run(run, **{setting: value})
    assert len((run / EVAL_ROWS).read_text().splitlines()) == 6 and (run / EVAL_SUMMARY).is_file()
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in test_records[:6]]

    model = Models().tuned(run)
    nll = response_nll(model, test_records[:6], batch_size=4)
    for row, record, (total, count) in zip(rows, test_records, nll):
        assert row["output"] == record["output"]
        assert row["tuned"]["response"] == respond(model, record, "alpaca", 8)  # batched == one at a time
        assert row["tuned"]["nll"] == pytest.approx(total / count) and row["tuned"]["target_tokens"] == count
        assert row["tuned"]["perplexity"] == pytest.approx(math.exp(total / count))
        for name in ("base", "tuned"):
            r = row[name]
            assert 0 <= r["rouge_l"] <= 1 and r["judge"] == 50 and r["judge_error"] is None
            assert r["ended"] == (r["new_tokens"] < 8)

    for name in ("base", "tuned"):
        totals = summary[name]
        tokens = sum(r[name]["target_tokens"] for r in rows)
        assert totals["target_tokens"] == tokens
        assert totals["nll"] == pytest.approx(sum(r[name]["nll"] * r[name]["target_tokens"] for r in rows) / tokens)
        assert totals["perplexity"] == pytest.approx(math.exp(totals["nll"]))
        assert 9 < totals["nll"] < 12  # a barely trained random model: near ln(50257) = 10.8
        assert totals["rouge_l"] == pytest.approx(sum(r[name]["rouge_l"] for r in rows) / 6)
        assert totals["ended_share"] == sum(r[name]["ended"] for r in rows) / 6
        assert (totals["judge_avg"], totals["judge_scored"], totals["judge_unscored"]) == (50, 6, 0)
    assert summary["examples"] == 6 and summary["max_new_tokens"] == 8 and summary["judge"]["model"] == "llama3"
    assert not list(run.glob(".*.tmp"))

    phases = [(e["step"], e["model"], e["phase"]) for e in events]
    assert sorted(set(phases)) == [(1, "base", "loading"), (2, "base", "generating"), (3, "base", "scoring"),
                                   (4, "tuned", "loading"), (5, "tuned", "generating"), (6, "tuned", "scoring"),
                                   (7, "base", "judging"), (8, "tuned", "judging")]
    assert all(e["steps"] == 8 and 0 <= e["done"] <= e["total"] for e in events)
    assert events[-1]["done"] == events[-1]["total"] == 6 and events[-1]["eta_s"] == 0
    print(f"evaluate_run on the tiny run, 6 examples: {seconds:.2f} s")


def test_stopping_writes_nothing(run, tmp_path):
    before = load_eval(run)
    calls = []
    with pytest.raises(EvaluationStopped):
        evaluate_run(run, limit=6, max_new_tokens=8, should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert load_eval(run) == before


def test_best_and_worst():
    rows = [{"tuned": {"rouge_l": v, "nll": v}} for v in (0.2, None, 0.9, 0.5)]
    best, worst = best_and_worst(rows, "tuned.rouge_l", 2)
    assert [r["tuned"]["rouge_l"] for r in best] == [0.9, 0.5] and [r["tuned"]["rouge_l"] for r in worst] == [0.2, 0.5]
    best, worst = best_and_worst(rows, "tuned.nll", 1)
    assert best[0]["tuned"]["nll"] == 0.2 and worst[0]["tuned"]["nll"] == 0.9
    best, _ = best_and_worst(rows, lambda r: r["tuned"]["rouge_l"], 1)
    assert best[0]["tuned"]["rouge_l"] == 0.9
    best, _ = best_and_worst(rows, lambda r: r["tuned"]["nll"], 1, lower_is_better=True)
    assert best[0]["tuned"]["nll"] == 0.2


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        evaluate_run(tmp_path)


# Export


def test_exported_zip_unpacks_into_one_folder_that_loads_in_transformers(run, tmp_path):
    from transformers import GPT2LMHeadModel, GPT2Tokenizer

    path = export_zip(run, tmp_path / "out" / "model.zip")
    assert path == tmp_path / "out" / "model.zip" and not list(path.parent.glob(".*"))
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    assert {name.partition("/")[0] for name in names} == {run.name}
    assert {"model.safetensors", "config.json", "vocab.json", "merges.txt"} <= {name.partition("/")[2] for name in names}
    unzipped = tmp_path / "unzipped"
    unzipped.mkdir()
    subprocess.run([sys.executable, "-m", "zipfile", "-e", str(path), str(unzipped)], check=True)  # as `unzip` does
    assert [p.name for p in unzipped.iterdir()] == [run.name]
    folder = unzipped / run.name
    theirs = GPT2LMHeadModel.from_pretrained(folder).eval()
    ours = load_run(run)
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
        assert torch.allclose(load_pretrained(folder)(idx), ours(idx), atol=1e-5)
    hint = load_hint(run.name)
    assert f"load the folder {run.name} " in hint and f'from_pretrained("{run.name}")' in hint
    assert f'path = "{run.name}"' in (folder / "README.md").read_text()
    tokenizer = GPT2Tokenizer.from_pretrained(folder)
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    assert tokenizer.eos_token_id == EOT_ID
    assert "### Response:" in (folder / "README.md").read_text()
    snippet = (folder / "README.md").read_text().split("```python\n")[1].split("```")[0].replace("max_new_tokens=128", "max_new_tokens=4")
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=unzipped, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]  # the card's example runs as it stands, beside the unzipped folder


def test_the_model_card_names_a_local_model_by_its_folder_alone(run, tmp_path):
    from runstore.export import model_card

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["config"] = {**manifest["config"], "model": "/home/alice/private/gpt2-local", "random_init": False}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    card = model_card(copy)
    assert "GPT-2 (gpt2-local) instruction fine-tuned" in card and "/home/alice" not in card
    manifest["config"]["model"] = "someone/gpt2-custom"  # a Hub id is a public name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert "GPT-2 (someone/gpt2-custom) instruction fine-tuned" in model_card(copy)


def test_export_of_an_unfinished_run_is_refused(tmp_path):
    with pytest.raises(ExportError, match="model.safetensors"):
        export_zip(tmp_path)


def test_export_of_cut_short_weights_is_refused(run, tmp_path):
    """A weights file cut short (a full disk, a copy that stopped) made a zip that loaded nowhere."""
    copy = tmp_path / "cut"
    shutil.copytree(run, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ExportError, match="model.safetensors is not a readable safetensors file: .*nothing to export"):
        export_zip(copy, tmp_path / "cut.zip")
    assert not (tmp_path / "cut.zip").exists()


def test_push_to_hub_offline_fails_fast(run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(ExportError) as error:
        push_to_hub(run, "someone/gpt2-instruct")
    assert time.perf_counter() - t0 < 5
    assert "127.0.0.1" in str(error.value) and "nothing was uploaded" in str(error.value)
    assert not list(run.glob(".hub-*"))
    for repo_id in ("bad repo id!!", "../../x"):  # named as such, not as the Hub being unreachable
        with pytest.raises(ExportError, match=rf"^{re.escape(repr(repo_id))} is not a Hub repo id \(your-name/model-name\): "
                                              r"Repo id must [^`]*$"):
            push_to_hub(run, repo_id)


def test_push_to_hub_says_whether_the_repo_is_private(run, monkeypatch):
    """A repo that existed keeps its visibility: the push reports what the Hub says, not what it asked for."""
    import huggingface_hub

    from runstore import export

    class Hub:  # the Hub's answers for a repo that exists and is public
        calls = []

        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok, repo_type):
            Hub.calls.append(("create", private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, repo_type, commit_message):
            Hub.calls.append(("upload", sorted(p.name for p in Path(folder_path).iterdir())))

        def repo_info(self, repo_id, repo_type):
            return type("Info", (), {"private": False})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.setattr(export, "hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    url, private = push_to_hub(run, "someone/public-one", token="hf_x")
    assert url == "https://huggingface.co/someone/public-one" and private is False
    assert Hub.calls[0] == ("create", True, True) and "model.safetensors" in Hub.calls[1][1]
    from types import SimpleNamespace

    from ui import evaluate_tab

    engine = SimpleNamespace(loopback=True, finished_run=lambda name: SimpleNamespace(path=run))
    said = evaluate_tab.push(engine, "a-run", "someone/public-one", "hf_x")
    assert "(a public repo: it existed already, and keeps its visibility)" in said and "private repo" not in said


# The CLI


def test_cli_prints_the_summary(run, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "evaluation", str(run), "--limit", "3", "--max-new-tokens", "4",
         "--export", str(tmp_path / "cli.zip")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "fine-tuned" in out.stdout and "perplexity" in out.stdout and "ROUGE-L" in out.stdout
    assert "ollama run llama3" in out.stdout
    assert (tmp_path / "cli.zip").is_file()
    assert load_eval(run)["summary"]["examples"] == 3


def test_cli_reports_a_bad_run_dir(tmp_path, capsys):
    """The CLI's ``main`` in this process, as for every refusal below: a process each cost 2-3 s of imports."""
    assert evaluation_main([str(tmp_path / "nope")]) == 1
    assert f"{tmp_path / 'nope'}' is not a run folder (no manifest.json)" in capsys.readouterr().err


def test_cli_takes_a_run_by_name_checks_export_first_and_says_when_the_judge_is_down(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2_INSTRUCT_RUNS", str(run.parent))
    with pytest.raises(SystemExit) as folder:
        evaluation_main([run.name, "--export", str(tmp_path)])
    assert folder.value.code == 2 and f"--export {tmp_path}: give the path of a .zip file to write" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert evaluation_main([run.name, "--export", str(tmp_path / "a-file" / "m.zip")]) == 1
    blocked = capsys.readouterr()
    assert blocked.err.startswith(f"error: cannot write {tmp_path / 'a-file' / 'm.zip'}: {tmp_path / 'a-file'} is a file, not a folder") and not blocked.out
    assert evaluation_main([run.name, "--judge", "not a url"]) == 1
    assert capsys.readouterr().err.startswith("error: judge URL must be")
    env = {**os.environ, "GPT2_INSTRUCT_RUNS": str(run.parent)}
    out = subprocess.run([sys.executable, "-m", "evaluation", run.name, "--limit", "2", "--max-new-tokens", "4",
                          "--judge", "http://127.0.0.1:9/v1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"saved eval.jsonl and eval_summary.json in {run}" in out.stdout
    assert "warning: the judge left 4 of 4 responses unscored: cannot reach http://127.0.0.1:9/v1/chat/completions" in out.stderr


def test_an_evaluation_registers_as_a_cpu_job_while_it_runs_and_only_then(run, tmp_path, monkeypatch):
    """So that a training in another process shares the cores with it (``training.cores``)."""
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    seen = []
    evaluate_run(run, limit=1, max_new_tokens=1, models=["tuned"],
                 progress=lambda p: seen.append(len(list((tmp_path / "cache" / "cpu-jobs").glob("*")))))
    assert seen and all(n == 1 for n in seen)
    assert not list((tmp_path / "cache" / "cpu-jobs").glob("*"))
    with pytest.raises(EvaluationStopped):
        evaluate_run(run, limit=1, max_new_tokens=1, models=["tuned"], should_stop=lambda: True)
    assert not list((tmp_path / "cache" / "cpu-jobs").glob("*"))  # gone however it ends
