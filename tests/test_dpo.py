"""Preference tuning (DPO): data, the loss against a plain reimplementation, the cached reference, the run, the CLI."""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data import DatasetError, load_instructions
from data import cache
from data.preference import (
    PreferenceDataset, browse_preferences, collate_preferences, epoch_batches, in_order_batches, load_preferences,
    split_preferences,
)
from model import EOT_ID, GPT, GPTConfig, get_tokenizer, pick_device
from model.device import precision_reason
from data.prompts import format_prompt
from runstore import CHECKPOINT, RunInfo, load_run, read_manifest, read_metrics
from training import TrainConfig, train
from training.checkpoint import ResumeError
from training.config import ConfigError
from training.dpo import DPOConfig, parent_run, resume_dpo, resume_dpo_config, train_dpo
from training.dpo_cli import main as dpo_main
from training.dpo_loss import dpo_loss, reference_logprobs, sequence_logprobs
from training.loop import resume_run
from training.events import Finished, Logged, Started, Status
from training.loop import Hooks
from training.optim import MasterWeightAdamW

REPO = Path(__file__).resolve().parents[1]
LN2 = torch.tensor(math.log(2)).item()  # ln 2 as float32 computes it


def pairs_from_sample(n: int | None = None) -> list[dict]:
    """Preference records made from the bundled sample: the reference answer is chosen, a rude one rejected."""
    records = load_instructions("sample")[:n]
    return [{**r, "chosen": r["output"], "rejected": f"Ugh, obviously: {r['output'].lower()} Figure it out yourself."}
            for r in records]


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pref") / "pairs.json"
    path.write_text(json.dumps(pairs_from_sample()))
    return path


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    train(TrainConfig(model="tiny", random_init=True, data="sample", max_steps=3, eval_every=3, sample_tokens=0,
                      lr=1e-3, out=str(out)))
    return out


def dpo_config(parent: Path, data: Path, out: Path, **overrides) -> DPOConfig:
    values = dict(parent=str(parent), data=str(data), batch_size=4, max_steps=4, eval_every=2, eval_batches=2,
                  sample_tokens=4, out=str(out))
    return DPOConfig(**{**values, **overrides})


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("tiny"))


# Data


def test_bad_preference_files_name_the_record_and_field(tmp_path):
    def load(text, name="p.json"):
        path = tmp_path / name
        path.write_text(text)
        return load_preferences(path)

    good = {"instruction": "Say hi.", "input": "", "output": "Hi.", "chosen": "Hi!", "rejected": "No."}
    for instructions in ("sample", "canonical"):
        with pytest.raises(DatasetError, match=f"{instructions} is instruction data: preference tuning takes pairs"):
            load_preferences(instructions)
    with pytest.raises(DatasetError, match=r'p\.json, record 2: field "rejected" is missing'):
        load(json.dumps([good, {k: v for k, v in good.items() if k != "rejected"}]))
    with pytest.raises(DatasetError, match=r'record 1: field "chosen" is empty'):
        load(json.dumps([{**good, "chosen": "  "}]))
    with pytest.raises(DatasetError, match=r'record 1: field "rejected" is empty: it holds only invisible characters \(U\+00AD\)'):
        load(json.dumps([{**good, "rejected": "\u00ad"}]))
    with pytest.raises(DatasetError, match=r'p\.jsonl, line 3: field "chosen" must be a string, got a number'):
        load("\n".join(json.dumps(r) for r in [good, good, {**good, "chosen": 3}]), "p.jsonl")
    with pytest.raises(DatasetError, match=r'record 1: field "instruction" is missing'):
        load(json.dumps([{k: v for k, v in good.items() if k != "instruction"}]))
    with pytest.raises(DatasetError, match=r"p\.json, line 1: not valid JSON"):
        load("[{")
    with pytest.raises(DatasetError, match=r'p\.csv, row 3: field "rejected" is empty'):
        load("instruction,input,output,chosen,rejected\nSay hi.,,Hi.,Hi!,No.\nSay no.,,No.,No!,\n", "p.csv")
    with pytest.raises(DatasetError, match=r'p\.csv, row 1: the header has no "rejected" column \(its columns: '
                                           r'instruction, Chosen, worse\)'):
        load("instruction,Chosen,worse\nSay hi.,Hi!,No.\n", "p.csv")
    assert load("instruction,chosen,rejected\nSay hi.,Hi!,No.\n", "p.csv") == [
        {"instruction": "Say hi.", "input": "", "output": "Hi!", "chosen": "Hi!", "rejected": "No."}]  # output: the chosen
    assert load("instruction,input,output,chosen,rejected\nSay hi.,,,Hi!,No.\n", "p.csv")[0]["output"] == "Hi!"  # an empty cell
    with pytest.raises(DatasetError, match=r'record 1: field "rejected": character 1 is half of a UTF-16 pair'):
        load(json.dumps([{**good, "rejected": "\udc00"}]))
    with pytest.raises(DatasetError, match="file not found"):
        load_preferences(tmp_path / "missing.json")
    no_output = {k: v for k, v in good.items() if k != "output"}
    assert load(json.dumps([no_output]))[0] == {**no_output, "input": "", "output": "Hi!"}
    assert load(json.dumps([{**good, "extra": 1}])) == [good]
    assert load("Instruction,Input,Output,Chosen,Rejected\nSay hi.,,Hi.,Hi!,No.\n", "titled.csv") == [good]
    with pytest.raises(DatasetError, match=r'record 1: field "chosen" is given 2 times \("chosen", "Chosen"\)'):
        load(json.dumps([{**good, "Chosen": "Hey!"}]))


def test_a_file_is_preference_data_when_a_record_names_chosen_or_rejected_and_then_each_is_checked(tmp_path):
    """What evaluation scores a file as: instruction data, or preference pairs whose bad record is named (a pair file
    with one bad record was read as instruction data, its error hidden behind 'field "output" is missing')."""
    from data.preference import load_preferences_if_any

    good = {"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "No."}
    pairs, plain = tmp_path / "pairs.json", tmp_path / "plain.json"
    plain.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}]))
    assert load_preferences_if_any("sample") is None and load_preferences_if_any(plain) is None
    pairs.write_text(json.dumps([good, good]))
    assert [r["output"] for r in load_preferences_if_any(pairs)] == ["Hi!", "Hi!"]
    pairs.write_text(json.dumps([good, {**good, "rejected": ""}]))
    with pytest.raises(DatasetError, match=r'pairs\.json, record 2: field "rejected" is empty'):
        load_preferences_if_any(pairs)
    pairs.write_text(json.dumps([good, {k: v for k, v in good.items() if k != "chosen"}]))
    with pytest.raises(DatasetError, match=r'record 2: field "chosen" is missing'):
        load_preferences_if_any(pairs)


def test_the_book_file_loads_from_the_cache_and_splits_like_the_book(needs_preference):
    records = load_preferences("preference")
    split = split_preferences(records)
    assert len(records) == 1100 and all(r["chosen"] and r["rejected"] for r in records)
    assert (len(split.train), len(split.test), len(split.val)) == (935, 110, 55)
    assert split.train[0] is records[0] and split.test[0] is records[935] and split.val[0] is records[1045]


def test_the_preference_file_is_downloaded_once_and_checked(needs_preference, tmp_path, monkeypatch):
    good = needs_preference
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "c"))
    monkeypatch.setattr(cache, "PREFERENCE_URL", good.as_uri())
    assert not cache.is_preference_cached()
    assert load_preferences("preference")[0]["chosen"]
    assert cache.is_preference_cached() and cache.is_cached() is False
    fake = tmp_path / "fake.json"
    fake.write_text("[]")
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "d"))
    monkeypatch.setattr(cache, "PREFERENCE_URL", fake.as_uri())
    with pytest.raises(DatasetError, match="integrity check"):
        load_preferences("preference")
    assert list((tmp_path / "d").glob("*")) == []
    monkeypatch.setattr(cache, "PREFERENCE_URL", "http://127.0.0.1:9/x.json")
    with pytest.raises(DatasetError, match="place instruction-data-with-preference.json .* by hand in the dataset cache folder "):
        load_preferences("preference")


def test_collate_targets_only_the_answers():
    tokenizer = get_tokenizer()
    record = pairs_from_sample(1)[0]
    ds = PreferenceDataset([record])
    item = ds[0]
    prompt = tokenizer.encode(format_prompt(record))
    assert item["prompt"] == prompt and item["chosen"][-1] == item["rejected"][-1] == EOT_ID
    for packed in (True, False):
        batch = collate_preferences([item, item], packed=packed)
        keep = batch.targets != -100
        assert batch.targets[keep].tolist() == (item["chosen"] + item["rejected"]) * 2
        assert batch.sequence[keep].tolist() == [0] * len(item["chosen"]) + [1] * len(item["rejected"]) + \
            [2] * len(item["chosen"]) + [3] * len(item["rejected"])
        assert batch.inputs.shape[0] == (2 if packed else 4)
    batch = collate_preferences([item], packed=True)
    assert batch.inputs.shape[1] == len(prompt) + len(item["chosen"]) + len(item["rejected"]) - 1

    # A pair whose prompt and longer answer read exactly max_length tokens fits: the end token is never read.
    longest = len(prompt) + max(len(item["chosen"]), len(item["rejected"])) - 1
    assert collate_preferences([item], packed=False).inputs.shape[1] == longest
    assert PreferenceDataset([record], max_length=longest).skipped == 0
    assert PreferenceDataset([record], max_length=longest - 1).skipped == 1
    assert int(collate_preferences([item], packed=True).positions.max()) == longest - 1

def test_browse_shows_chosen_and_rejected_side_by_side():
    records = pairs_from_sample()
    rows, page = browse_preferences(records, query="figure it out", page=2, page_size=10)
    assert page.total == len(records) and page.page == 2 and len(rows) == 10
    assert rows[0]["index"] == 10 and rows[0]["split"] == "train"
    assert rows[0]["chosen"] == records[10]["chosen"] and rows[0]["rejected"] == records[10]["rejected"]
    rows, page = browse_preferences(records, query=records[-1]["instruction"])
    assert rows[-1]["index"] == len(records) - 1 and rows[-1]["split"] == "val"


# The loss


def plain_logprob(model: GPT, prompt: list[int], answer: list[int], average: bool) -> torch.Tensor:
    """One answer on its own: full forward, full logits, log-softmax, the answer's tokens only."""
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    picked = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(prompt) - 1:]
    return picked.mean() if average else picked.sum()


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_loss_and_gradients_equal_a_plain_reimplementation(packed, average):
    ds = PreferenceDataset(pairs_from_sample(3))
    items = [ds[i] for i in range(3)]
    reference = torch.randn(3, 2) - 3 * (1 if average else 20)
    beta = 0.5

    model = tiny_model()
    logp = sequence_logprobs(model, collate_preferences(items, packed=packed), average)
    loss, chosen, rejected = dpo_loss(logp[0::2], logp[1::2], reference[:, 0], reference[:, 1], beta)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    model = tiny_model()
    pc = torch.stack([plain_logprob(model, it["prompt"], it["chosen"], average) for it in items])
    pr = torch.stack([plain_logprob(model, it["prompt"], it["rejected"], average) for it in items])
    want = -F.logsigmoid(beta * ((pc - pr) - (reference[:, 0] - reference[:, 1]))).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(chosen, beta * (pc - reference[:, 0]).detach(), atol=1e-5)
    assert torch.allclose(rejected, beta * (pr - reference[:, 1]).detach(), atol=1e-5)
    for name, p in model.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        assert (ours[name] - p.grad).abs().max().item() <= 1e-4 * scale + 1e-9, name


def test_step_zero_loss_is_ln2_when_policy_is_reference():
    ds = PreferenceDataset(pairs_from_sample(12))
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model()
        optimizer = MasterWeightAdamW(model, dtype, lr=1e-3, weight_decay=0.01)
        model.train()
        batches = epoch_batches(ds, 4, 0)
        reference = reference_logprobs(model, ds, batches, "cpu")
        for positions in batches:
            logp = sequence_logprobs(model, collate_preferences([ds[i] for i in positions]))
            ref = reference[positions]
            loss, chosen, rejected = dpo_loss(logp[0::2], logp[1::2], ref[:, 0], ref[:, 1])
            assert loss.item() == LN2 and chosen.abs().max() == rejected.abs().max() == 0
        optimizer.finish()


def test_cached_reference_equals_recomputing_each_pair_alone():
    ds = PreferenceDataset(pairs_from_sample(10))
    model = tiny_model().train()
    batches = epoch_batches(ds, 4, 0)
    rest = sorted(set(range(len(ds))) - {i for b in batches for i in b})
    cached = reference_logprobs(model, ds, batches + in_order_batches(rest, 4), "cpu")
    assert not cached.isnan().any()
    for packed in (True, False):
        alone = reference_logprobs(model, ds, [[i] for i in range(len(ds))], "cpu", packed=packed)
        assert torch.allclose(cached, alone, atol=1e-5, rtol=0)
    summed = reference_logprobs(model, ds, [[0]], "cpu", average=False)[0]
    n = torch.tensor([len(ds[0]["chosen"]), len(ds[0]["rejected"])], dtype=torch.float32)
    assert torch.allclose(summed / n, cached[0], atol=1e-5)


# The run


def test_reward_margin_grows_and_the_run_is_complete(parent, pref_file, tmp_path):
    events = []
    config = dpo_config(parent, pref_file, tmp_path / "dpo", lr=1e-3, epochs=2, max_steps=24, eval_every=12, batch_size=4)
    summary = train_dpo(config, Hooks(on_event=events.append))
    rows = read_metrics(tmp_path / "dpo")
    evals = [r for r in rows if r["val_loss"] is not None]
    assert [r["step"] for r in evals] == [0, 12, 24] and [r["step"] for r in rows] == list(range(25))
    assert evals[0]["val_loss"] == evals[0]["eval_train_loss"] == LN2 and evals[0]["val_reward_margin"] == 0
    assert rows[1]["train_loss"] == LN2  # the first step's policy is the reference, in the reference pass's batch
    assert evals[-1]["eval_train_reward_margin"] > evals[1]["eval_train_reward_margin"] > 0.05
    assert evals[-1]["eval_train_loss"] < evals[1]["eval_train_loss"] < LN2 - 0.02
    assert evals[-1]["val_reward_margin"] > evals[1]["val_reward_margin"] > 0
    assert sum(r["reward_margin"] for r in rows[-5:]) > sum(r["reward_margin"] for r in rows[1:6])
    assert evals[-1]["eval_train_reward_accuracy"] > 0.5
    for key in ("step", "train_loss", "val_loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward",
                "val_reward_margin", "val_reward_accuracy", "val_chosen_reward", "val_rejected_reward", "tokens_per_s"):
        assert key in evals[-1], key

    started = next(e for e in events if isinstance(e, Started))
    assert started.method == "dpo" and started.total_steps == 24 and started.run_name == "dpo"
    logged = [e for e in events if isinstance(e, Logged)]
    assert [e.step for e in logged if e.response is not None] == [0, 12, 24]
    assert isinstance(events[-1], Finished) and events[-1].summary == summary
    assert any(isinstance(e, Status) and e.status == "reference" for e in events)
    assert next(e for e in events if isinstance(e, Status)).message == f"Loading the preference pairs in {pref_file.name}"

    manifest = read_manifest(tmp_path / "dpo")
    assert manifest["status"] == "done" and manifest["method"] == "dpo" and manifest["parent_run"] == parent.name
    assert manifest["dpo"]["beta"] == 0.1 and manifest["config"] == read_manifest(parent)["config"]
    assert manifest["final_val_reward_margin"] == evals[-1]["val_reward_margin"]


def test_defaults_are_the_books():
    c = DPOConfig(parent="x")
    assert (c.beta, c.lr, c.weight_decay, c.batch_size, c.epochs, c.seed, c.sum_logprobs) == (0.1, 5e-6, 0.01, 8, 1, 123, False)
    with pytest.raises(ConfigError, match=r"beta must be in \(0, 100\], got 0"):
        DPOConfig(parent="x", beta=0)
    with pytest.raises(ConfigError, match="parent: name the fine-tuned run"):
        DPOConfig()
    with pytest.raises(ConfigError, match="batch_size must be between 1 and 512, got 0"):
        DPOConfig(parent="x", batch_size=0)


def test_a_stopped_run_saves_complete_weights_and_manifest(parent, pref_file, tmp_path):
    from transformers import GPT2LMHeadModel

    steps = []
    hooks = Hooks(on_event=lambda e: isinstance(e, Logged) and steps.append(e.step), should_stop=lambda: len(steps) >= 3)
    summary = train_dpo(dpo_config(parent, pref_file, tmp_path / "dpo", max_steps=20, lr=1e-3), hooks)
    run = tmp_path / "dpo"
    manifest = read_manifest(run)
    assert summary["status"] == manifest["status"] == "stopped" and manifest["steps"] == 2
    assert manifest["stop_reason"] == "stopped by its owner"
    assert manifest["method"] == "dpo" and manifest["ended"] and manifest["wall_time_s"] > 0
    ours = load_run(run)
    theirs = GPT2LMHeadModel.from_pretrained(run).eval()
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
        assert (ours(idx) - load_run(parent)(idx)).abs().max().item() > 0  # it moved


def test_a_max_length_that_skips_every_pair_is_named_as_the_cause(parent, pref_file, tmp_path):
    with pytest.raises(ValueError, match=r"0 usable pairs: .* pairs were skipped as longer than max length 16 tokens: raise max length \(at most the model's context, 1,024\)"):
        train_dpo(dpo_config(parent, pref_file, tmp_path / "dpo", max_length=16))


def test_a_failure_marks_the_run_failed(parent, pref_file, tmp_path):
    def boom(event):
        if isinstance(event, Logged) and event.step == 1:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        train_dpo(dpo_config(parent, pref_file, tmp_path / "dpo"), Hooks(on_event=boom))
    manifest = read_manifest(tmp_path / "dpo")
    assert manifest["status"] == "failed" and "disk full" in manifest["error"]


def test_an_unfinished_parent_is_refused(parent, pref_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        train_dpo(dpo_config(tmp_path / "nope", pref_file, tmp_path / "dpo"))
    running = tmp_path / "running"
    running.mkdir()
    (running / "manifest.json").write_text(json.dumps({**read_manifest(parent), "status": "running"}))
    with pytest.raises(ValueError, match="parent run running is running, not finished"):
        train_dpo(dpo_config(running, pref_file, tmp_path / "dpo"))


def test_lora_and_summed_logprobs_run(parent, pref_file, tmp_path):
    train_dpo(dpo_config(parent, pref_file, tmp_path / "dpo", lora_rank=2, sum_logprobs=True, packed=False, max_steps=2,
                         sample_tokens=0, lr=1e-3))
    manifest = read_manifest(tmp_path / "dpo")
    assert manifest["status"] == "done" and manifest["model"]["trainable_parameters"] < manifest["model"]["parameters"] / 10
    assert read_metrics(tmp_path / "dpo")[0]["val_loss"] == LN2
    load_run(tmp_path / "dpo")  # merged: plain GPT-2 weights


def test_cli(parent, pref_file, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "training.dpo", "--from", str(parent), "--data", str(pref_file), "--max-steps", "2",
         "--eval-every", "2", "--batch-size", "4", "--beta", "0.2", "--out", str(tmp_path / "cli")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "done: 2 steps" in out.stdout and "val reward margin" in out.stdout
    assert f"precision {precision_reason(pick_device())}\n" in out.stdout
    assert read_manifest(tmp_path / "cli")["dpo"]["beta"] == 0.2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "input": "", "output": "y", "chosen": "y"}]))
    out = subprocess.run([sys.executable, "-m", "training.dpo", "--from", str(parent), "--data", str(bad)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and 'bad.json, record 1: field "rejected" is missing' in out.stderr


def test_cli_stops_at_sigterm_and_saves_the_run(parent, pref_file, tmp_path):
    """SIGTERM (a scheduler's or a container's stop) ends the run at its next step, saved as stopped and resumable."""
    out = tmp_path / "sigterm"
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.dpo", "--from", str(parent), "--data", str(pref_file), "--epochs", "50",
         "--batch-size", "2", "--eval-every", "1000", "--sample-tokens", "0", "--out", str(out)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.stderr.close()
    manifest = read_manifest(out)
    assert manifest["status"] == "stopped" and manifest["stop_reason"] == "stopped by its owner"
    assert 2 <= manifest["steps"] < 50 and (out / CHECKPOINT).exists()


# Resume

TIMINGS = ("elapsed_s", "eta_s", "tokens_per_s")


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory) -> Path:
    """12 pairs: 10 for training, 2 steps of 4 an epoch."""
    path = tmp_path_factory.mktemp("few") / "pairs.json"
    path.write_text(json.dumps(pairs_from_sample(12)))
    return path


def stop_after(step: int | None, events: list | None = None) -> Hooks:
    """Hooks that ask for a stop once ``step`` has been logged; None: at once (inside the reference pass)."""
    seen = {"step": -1}

    def on_event(event):
        if events is not None:
            events.append(event)
        if isinstance(event, Logged):
            seen["step"] = event.step

    return Hooks(on_event=on_event, should_stop=lambda: step is None or seen["step"] >= step)


def figures_of(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in read_metrics(run)]


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("stop, extra", [
    (3, dict(precision="fp32")),  # inside the second epoch
    (2, dict(grouped=False)),  # at the epoch boundary
    (3, dict(lora_rank=2, grad_clip=1.0, sum_logprobs=True, packed=False)),  # AdamW after backward, frozen weights
    (None, {}),  # inside the reference pass: nothing trained yet, the resume computes the reference
])
def test_a_resumed_dpo_run_trains_exactly_as_an_uninterrupted_one(parent, few_pairs, tmp_path, stop, extra, capsys):
    """6 steps over three epochs straight, against a stop + resume: the same figures and sample answers, bit for bit,
    and the same weights; the resumed run's watchers are shown the answers from before the stop too."""
    settings = dict(epochs=3, max_steps=None, eval_every=2, eval_batches=1, sample_tokens=2, lr=1e-3, **extra)
    straight = train_dpo(dpo_config(parent, few_pairs, tmp_path / "straight", **settings))
    run = tmp_path / "resumed"
    stopped = train_dpo(dpo_config(parent, few_pairs, run, **settings), stop_after(stop))
    assert stopped["status"] == "stopped" and stopped["steps"] == (stop or 0) and stopped["stop_reason"] == "stopped by its owner"
    assert RunInfo(run, read_manifest(run)).resumable and (run / "model.safetensors").is_file()
    if stop is None:  # its weights are still its parent's: not a run to align further, evaluate or export
        from engine import Engine

        with pytest.raises(ValueError, match="parent run resumed stopped before its first step"):
            parent_run(run)
        with pytest.raises(ValueError, match="resumed stopped before its first step: nothing was trained"):
            Engine(root=tmp_path).finished_run("resumed")
        from evaluation.evaluate import main as evaluate_main

        assert evaluate_main([str(run), "--limit", "1"]) == 1  # its "aligned" column would be its parent's answers
        assert "resumed stopped before its first step: nothing was trained" in capsys.readouterr().err

    events = []
    resumed = resume_dpo(run, Hooks(on_event=events.append))
    assert resumed["status"] == straight["status"] == "done" and resumed["steps"] == straight["steps"] == 6
    started = next(e for e in events if isinstance(e, Started))
    assert started.start_step == (stop or 0) and started.elapsed_before_s > 0  # the clock goes on
    first_step = next(i for i, e in enumerate(events) if isinstance(e, Logged) and e.record["step"] > started.start_step)
    assert "training" in [e.status for e in events[events.index(started):first_step] if isinstance(e, Status)]  # not "loading"
    assert any(isinstance(e, Status) and e.status == "reference" for e in events) == (stop is None)  # kept in the checkpoint
    manifest = read_manifest(run)
    assert manifest["resumed_from_step"] == [stop or 0] and manifest["status"] == "done" and manifest["stop_reason"] is None
    assert not (run / CHECKPOINT).exists()  # a done run keeps no checkpoint
    assert [r["step"] for r in read_metrics(run)] == list(range(7))  # the earlier rows kept, each step once
    assert figures_of(run) == figures_of(tmp_path / "straight")
    assert [e.step for e in events if isinstance(e, Logged) and e.response is not None] == [0, 2, 4, 6]
    for key in ("final_train_loss", "final_val_loss", "final_val_reward_margin", "pairs_seen", "tokens_seen"):
        assert resumed[key] == straight[key], key
    assert same_weights(run, tmp_path / "straight")


def test_checkpoints_every_n_steps_and_a_resume_may_change_only_what_trains_the_same(parent, few_pairs, tmp_path):
    run, events = tmp_path / "dpo", []
    train_dpo(dpo_config(parent, few_pairs, run, epochs=3, max_steps=None, checkpoint_every=2), stop_after(3, events))
    assert read_manifest(run)["checkpoint_step"] == 3  # 2 by the setting, then 3 when stopped
    phases = [e.status for e in events if isinstance(e, Status)]
    assert phases[phases.index("saving") + 1] == "training"  # the phase shown goes back once the checkpoint is written
    assert resume_dpo_config(run, checkpoint_every=1, max_wall_s=60, eval_every=1, sample_tokens=0).eval_every == 1
    with pytest.raises(ResumeError, match="lr cannot change"):
        resume_dpo(run, lr=0.5)
    with pytest.raises(ResumeError, match="beta was 0.1, not 0.2"):
        train_dpo(DPOConfig(**{**resume_dpo_config(run).to_dict(), "beta": 0.2}), resume=run)
    with pytest.raises(ResumeError, match="is a preference-tuning \\(DPO\\) run: resume it with python -m training.dpo --resume dpo"):
        resume_run(run)
    stopped_sft = tmp_path / "sft"
    stopped_sft.mkdir()
    (stopped_sft / "manifest.json").write_text(json.dumps({**read_manifest(parent), "status": "stopped"}))
    (stopped_sft / CHECKPOINT).touch()
    with pytest.raises(ResumeError, match="sft is a fine-tuning run, not a preference-tuning one"):
        resume_dpo(stopped_sft)

    resume_dpo(run, eval_every=1)
    assert [r["step"] for r in read_metrics(run) if r["val_loss"] is not None] == [0, 2, 4, 5, 6]
    with pytest.raises(ResumeError, match="dpo is done .* nothing to resume"):
        resume_dpo(run)
    # A finished run of the other kind is named as such, not as done: resuming it would be no use either way.
    with pytest.raises(ResumeError, match="dpo is a preference-tuning \\(DPO\\) run: resume it with python -m training.dpo"):
        resume_run(run)
    with pytest.raises(ResumeError, match=f"{parent.name} is a fine-tuning run, not a preference-tuning one"):
        resume_dpo(parent)


def test_a_resume_is_refused_when_the_data_or_the_parent_changed_or_nothing_was_saved(parent, tmp_path):
    from safetensors.torch import load_file, save_file

    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs_from_sample(12)))
    copy = tmp_path / "parent"
    shutil.copytree(parent, copy)
    run = tmp_path / "dpo"
    train_dpo(dpo_config(copy, data, run, epochs=3, max_steps=None), stop_after(1))

    data.write_text(json.dumps(pairs_from_sample(13)))
    with pytest.raises(ResumeError, match="pairs.json has changed since the run started"):
        resume_dpo(run)
    data.write_text(json.dumps(pairs_from_sample(12)))
    weights = load_file(copy / "model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key] + 1  # the parent trained further
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ResumeError, match="the weights of parent have changed since the run started"):
        resume_dpo(run)
    (run / CHECKPOINT).unlink()
    with pytest.raises(ResumeError, match="stopped at step 1\\) has no checkpoint"):
        resume_dpo(run)


def test_cli_resume(parent, few_pairs, tmp_path, capsys):
    run = tmp_path / "dpo"
    train_dpo(dpo_config(parent, few_pairs, run, epochs=2, max_steps=None, sample_tokens=0), stop_after(1))
    out = subprocess.run([sys.executable, "-m", "training.dpo", "--resume", str(run), "--eval-every", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "done: 4 steps" in out.stdout and read_manifest(run)["resumed_from_step"] == [1]
    assert dpo_main(["--resume", str(run), "--beta", "0.5"]) == 1  # refused before any work: in this process
    assert "error: dpo is done (4 steps): there is nothing to resume" in capsys.readouterr().err


# Evaluation: base, fine-tuned and aligned


def test_the_parent_is_held_while_a_run_aligns_from_it_or_is_evaluated_beside_it(parent, pref_file, tmp_path):
    """The parent's weights are the reference model and the three-way comparison's middle column: resumed or deleted
    by another process meanwhile, the run and its scores would be another model's."""
    from evaluation.evaluate import evaluate_run
    from runstore import RunBusy, in_use

    from .holders import held_elsewhere

    run = tmp_path / "dpo"
    seen = []
    train_dpo(dpo_config(parent, pref_file, run, max_steps=1, sample_tokens=0),
              Hooks(on_event=lambda event: seen.append(in_use(parent)) if isinstance(event, Started) else None))
    assert seen == [True]
    with held_elsewhere(parent):  # another process resuming the parent
        with pytest.raises(RunBusy, match=f"{parent.name} is trained or resumed by another .* to align from it"):
            train_dpo(dpo_config(parent, pref_file, tmp_path / "second", max_steps=1))
        with pytest.raises(RunBusy, match=f"{parent.name} is trained or resumed by another .* to evaluate it"):
            evaluate_run(run, limit=1, max_new_tokens=2)
    assert not (tmp_path / "second").exists() and not in_use(parent)


def test_evaluate_scores_the_three_models_and_the_preference(parent, pref_file, tmp_path):
    from evaluation.evaluate import evaluate_run, format_summary, preference_margins
    from runstore.models import Models

    run = tmp_path / "dpo"
    train_dpo(dpo_config(parent, pref_file, run, max_steps=2, sample_tokens=0, lr=1e-3))
    result = evaluate_run(run, limit=3, max_new_tokens=4)
    summary, rows = result["summary"], result["rows"]
    assert summary["models"] == ["base", "tuned", "aligned"] and summary["method"] == "dpo"
    assert summary["parent_run"] == parent.name and summary["data"] == str(pref_file)
    test_pairs = split_preferences(load_preferences(pref_file)).test[:3]
    for name, weights in (("tuned", parent), ("aligned", run)):
        margins = preference_margins(Models().tuned(weights), test_pairs)
        assert [r[name]["preference_margin"] for r in rows] == pytest.approx(margins)
        assert summary[name]["preference_accuracy"] == sum(m > 0 for m in margins) / 3
    assert rows[0]["aligned"]["nll"] != rows[0]["tuned"]["nll"]
    table = format_summary(summary)
    assert "aligned" in table.splitlines()[1] and "chosen preferred to rejected" in table
    two = evaluate_run(run, limit=2, max_new_tokens=2, models=["base", "aligned"])["summary"]
    assert two["models"] == ["base", "aligned"] and "tuned" not in two
    with pytest.raises(ValueError, match="models must be some of base, tuned"):
        evaluate_run(parent, models=["aligned"])
    from runstore.export import model_card

    card = model_card(run)
    assert "tags: [gpt2, instruction-tuning, dpo]" in card and f"by DPO, the book's next stage, from the fine-tuned run {parent.name}" in card
    assert f"data {pref_file.name}, beta 0.1" in card and str(pref_file.parent) not in card
    assert "dpo" not in model_card(parent)
    # A runs folder moved whole: the fine-tuned model is found beside the aligned one, as resuming finds it.
    moved = tmp_path / "moved"
    shutil.copytree(parent, moved / parent.name)
    shutil.copytree(run, moved / "dpo")
    manifest = read_manifest(moved / "dpo")
    (moved / "dpo" / "manifest.json").write_text(json.dumps({**manifest, "parent_dir": str(tmp_path / "gone")}))
    assert evaluate_run(moved / "dpo", limit=1, max_new_tokens=1, models=["tuned"])["summary"]["models"] == ["tuned"]
    # The parent trained further after the alignment (a stopped run resumed): it is no longer the fine-tuned model.
    weights = moved / parent.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    changed = evaluate_run(moved / "dpo", limit=1, max_new_tokens=1)["summary"]
    assert changed["models"] == ["base", "aligned"] and "has been trained further since" in changed["left_out"]["tuned"]
    assert "fine-tuned left out: its fine-tuned parent run" in format_summary(changed)
    with pytest.raises(ValueError, match="trained further since.*score base and aligned alone"):
        evaluate_run(moved / "dpo", limit=1, max_new_tokens=1, models=["tuned", "aligned"])
    shutil.rmtree(moved / parent.name)
    assert evaluate_run(moved / "dpo", limit=1, max_new_tokens=1)["summary"]["left_out"] == {
        "tuned": f"its fine-tuned parent run {parent.name} is gone"}
