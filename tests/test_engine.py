"""The engine: one job abstraction, admission control, server limits, runs that never lie, bounded growth, no paths."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from data import DatasetError, cache, load_instructions
from engine import Engine, JobError, Limits
from engine.public import scrub
from model import GPT
from runstore import load_run, read_manifest, read_metrics
from training import TrainConfig
from training.config import ConfigError
from training.loop import train
from ui.widgets import clock

from .test_runs import stop_after


def tiny(tmp_path: Path | None = None, **overrides) -> TrainConfig:
    values = dict(model="tiny", random_init=True, data="sample", max_steps=6, eval_every=3, eval_batches=2, sample_tokens=8,
                  lr=1e-3)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture
def engine(tmp_path, monkeypatch) -> Engine:
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    return Engine(root=tmp_path / "runs", exports=tmp_path / "exports")


def wait_for(engine: Engine, lane: str, predicate, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = engine.snapshot(lane)
        if predicate(snap):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"timed out; last snapshot status {engine.snapshot(lane)['status']}")


def has_absolute_path(value, roots) -> bool:
    text = json.dumps(value, default=str)
    return any(str(root) in text for root in roots)


def test_a_run_is_a_job_watched_through_versioned_snapshots_that_send_only_new_rows(engine, tmp_path):
    job = engine.start_training(tiny(), owner="alice")
    assert job.wait(90)
    snap = engine.snapshot("train")
    assert snap["status"] == "done" and snap["step"] == snap["total_steps"] == 6
    assert [h["step"] for h in snap["history"]] == list(range(7)) and snap["history_len"] == 7
    assert [r["step"] for r in snap["responses"]] == [0, 3, 6]
    assert snap["version"] > 10 and snap["run"] == engine.runs()[0].name
    later = engine.snapshot("train", since=5)
    assert [h["step"] for h in later["history"]] == [5, 6] and later["history_len"] == 7
    assert later["history"][0] is snap["history"][5]  # rows are shared, never copied per poll
    assert not has_absolute_path(snap, [tmp_path, Path.home()])


def test_only_the_owner_stops_and_a_stopped_run_is_saved(engine):
    engine.start_training(tiny(max_steps=None, eval_every=50), owner="alice")
    wait_for(engine, "train", lambda s: s["step"] >= 3)
    with pytest.raises(JobError, match="Only the browser session that started this fine-tuning run"):
        engine.stop("train", "bob")
    with pytest.raises(JobError, match="already running"):
        engine.start_training(tiny(), owner="bob")
    assert engine.stop("train", "alice")
    assert engine.job("train").wait(60)
    snap = engine.snapshot("train")
    run = engine.runs()[0]
    assert snap["status"] == "stopped" and run.status == "stopped" and run.manifest["steps"] == snap["step"]
    model = load_run(run.path)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
    assert not engine.stop("train", "alice")


def test_a_failure_inside_a_step_fails_the_job_and_the_run_and_the_lane_is_usable_again(engine, monkeypatch):
    calls = {"n": 0}
    original = GPT.loss

    def flaky(self, idx, targets, **kwargs):
        calls["n"] += 1
        if torch.is_grad_enabled() and calls["n"] > 8:
            raise RuntimeError("simulated out of memory in step")
        return original(self, idx, targets, **kwargs)

    monkeypatch.setattr(GPT, "loss", flaky)
    assert engine.start_training(tiny(max_steps=20, eval_every=50)).wait(60)
    snap = engine.snapshot("train")
    assert snap["status"] == "failed" and "simulated out of memory in step" in snap["error"]
    assert engine.runs()[0].status == "failed"
    monkeypatch.setattr(GPT, "loss", original)
    assert engine.start_training(tiny(max_steps=2)).wait(60) and engine.snapshot("train")["status"] == "done"


def test_a_start_whose_estimate_exceeds_available_memory_is_refused_before_anything_is_allocated(tmp_path):
    engine = Engine(limits=Limits(memory_gb=2.0), root=tmp_path / "runs")
    rss = psutil.Process().memory_info().rss
    with pytest.raises(ConfigError) as refused:
        engine.start_training(TrainConfig(model="gpt2-xl", random_init=True, data="sample"), owner="a")
    message = str(refused.value)
    assert "needs about 22.6 GB" in message and "2.0 GB is available" in message and "LoRA" in message
    assert engine.job("train") is None and not (tmp_path / "runs").exists()
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20  # nothing of the model's size was allocated
    with pytest.raises(ConfigError, match="gpt2 with LoRA needs about 1.8 GB, and 1.0 GB"):
        Engine(limits=Limits(memory_gb=1.0), root=tmp_path / "runs").admit(TrainConfig(model="gpt2", lora_rank=16))
    assert Engine.memory_estimate(TrainConfig(model="someone/unknown-model")) is None  # unknown size: no guess


def test_models_loaded_to_compare_count_against_the_memory_limit_and_make_room_for_a_run(tmp_path, monkeypatch):
    """With ``GPT2_INSTRUCT_MEMORY_GB`` set, the models loaded for the Playground (and their int8 drafts) take from it; a
    run that fits only without them drops them (the next compare loads them again), one that fits either way or not
    at all leaves them loaded. Without the limit the machine's available memory decides, measured again after."""
    from engine.engine import memory_needed
    from model import GPTConfig, init_generator
    from model.inference import held_bytes, int8_copy

    engine = Engine(root=tmp_path / "runs")
    base = engine.models.base("tiny", random_init=True)
    weights = sum(p.numel() * 4 for p in base.parameters())  # fp32, the tied head once
    assert held_bytes(base) == weights
    int8_copy(base)
    linears = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))  # the LM head among them
    assert weights + linears < held_bytes(base) < weights + 1.05 * linears  # a byte a weight, a scale per row
    held = engine.models.held_gb()
    assert held == held_bytes(base) / 1e9  # the GB of the estimates
    needed = memory_needed(GPTConfig.from_name("tiny"), tiny())

    def limited(gb: float) -> Engine:
        engine.limits = Limits(memory_gb=gb)
        return engine

    limited(needed + 2 * held).admit(tiny())
    assert engine.models.registry.keys()  # room enough beside them
    engine.models.registry.get("more", lambda: GPT(GPTConfig.from_name("tiny"), init_generator(1)))  # 0.06 GB in all
    with pytest.raises(ConfigError, match=f"needs about {needed:.1f} GB, and .* beside the 0.1 GB of models loaded to compare"):
        limited(needed - 0.05).admit(tiny())
    assert len(engine.models.registry.keys()) == 2  # dropping them would not have helped
    engine.models.registry.clear()
    engine.models.base("tiny", random_init=True)
    assert limited(needed + held / 2).memory_available() < needed
    limited(needed + held / 2).admit(tiny())
    assert engine.models.registry.keys() == [] and engine.memory_available() == needed + held / 2

    engine.limits = Limits()
    engine.models.base("tiny", random_init=True)
    seen = []
    monkeypatch.setattr("engine.engine.available_memory_gb", lambda: seen.append(1) or (needed - held / 2 if engine.models.registry.keys() else needed + held / 2))
    engine.admit(tiny())
    assert engine.models.registry.keys() == [] and len(seen) == 2


def test_long_records_need_more_memory_and_a_refusal_says_so(tmp_path, monkeypatch):
    """The estimate counts a batch's activations beyond the book's batches: a tiny run fits 1 GB on the sample, not on
    records of ~1,000 tokens at batch 8 (at batch 2 it does), and GPT-2 124M's estimate meets its measured peaks."""
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    long_ = tmp_path / "long.json"
    long_.write_text(json.dumps([{"instruction": "Write a long story.", "input": "", "output": "word " * 960}] * 24))
    engine = Engine(limits=Limits(memory_gb=1.0), root=tmp_path / "runs")
    engine.check_training(tiny())
    with pytest.raises(ConfigError, match=r"tiny with full fine-tuning needs about 1\.1 GB at batch 8 with training examples of "
                                          r"up to 996 tokens, and 1\.0 GB is available on this server; try a smaller batch size or max length"):
        engine.check_training(tiny(data=str(long_)))
    engine.check_training(tiny(data=str(long_), batch_size=2))
    train(tiny(data=str(long_), eval_batches=1, sample_tokens=0), stop_after(1), root=tmp_path / "runs")  # on a bigger server
    assert engine.runs()[0].resumable
    with pytest.raises(ConfigError, match="needs about 1\\.1 GB at batch 8 with training examples of up to 996 tokens"):
        engine.resume_training(engine.runs()[0].name)  # resumed here: its rows counted again
    gpt2, story = TrainConfig(model="gpt2"), json.loads(long_.read_text())[:1]  # rows of 996 tokens
    too_long = [{"instruction": "Write.", "input": "", "output": "word " * 2000}]  # skipped in training: not counted
    assert Engine.memory_estimate(gpt2, load_instructions("sample")) == Engine.memory_estimate(gpt2) == pytest.approx(2.54, abs=0.01)
    assert Engine.memory_estimate(gpt2, story + too_long) == pytest.approx(5.86, rel=0.03)  # measured: 5.46 GiB = 5.86 GB
    assert Engine.memory_estimate(dataclasses.replace(gpt2, max_length=91), story) == Engine.memory_estimate(gpt2)


def test_server_limits_come_from_the_environment_and_are_enforced(tmp_path):
    limits = Limits.from_env({"SPACE_ID": "me/app", "GPT2_INSTRUCT_MODELS": "tiny,gpt2", "GPT2_INSTRUCT_MAX_STEPS": "4"})
    assert (limits.max_epochs, limits.max_wall_minutes, limits.local_paths, limits.models, limits.max_steps) == \
        (3, 60.0, False, ("tiny", "gpt2"), 4)
    assert Limits.from_env({}).local_paths and Limits.from_env({}).max_wall_minutes is None
    with pytest.raises(ValueError, match="GPT2_INSTRUCT_MAX_EPOCHS must be a whole number, got 'many'"):
        Limits.from_env({"GPT2_INSTRUCT_MAX_EPOCHS": "many"})
    engine = Engine(limits=limits, root=tmp_path / "runs")
    with pytest.raises(ConfigError, match="epochs: this server allows at most 3, got 5"):
        engine.start_training(tiny(epochs=5))
    with pytest.raises(ConfigError, match="trains only tiny, gpt2; 'gpt2-medium' is not allowed"):
        engine.start_training(TrainConfig(model="gpt2-medium", data="sample"))
    for path in (str(tmp_path / "exists-or-not"), "tests/browser", "tests", "~/weights", "x.safetensors"):
        with pytest.raises(ConfigError, match="local paths are turned off"):  # ids that name this server's folders too
            engine.check_training(TrainConfig(model=path, data="sample"))
    assert engine.allowed_presets() == ["tiny", "gpt2"] and engine.suggested_model() in ("tiny", "gpt2")
    engine._suggestion = None  # the background look for GPT-2's weights has not answered yet
    assert engine.suggested_model() == "tiny" and "still finding out" in engine.why_suggested("tiny")
    engine._suggestion = "tiny"
    assert "the Hugging Face Hub cannot be reached" in engine.why_suggested("tiny") and engine.why_suggested("gpt2") == ""
    only_medium = Engine(limits=Limits.from_env({"GPT2_INSTRUCT_MODELS": "tiny,gpt2-medium"}), root=tmp_path / "runs")
    only_medium._suggestion = "gpt2"
    assert only_medium.suggested_model() == "tiny"
    assert only_medium.why_suggested("tiny") == "this server does not offer GPT-2 124M (GPT2_INSTRUCT_MODELS)"
    with pytest.raises(ConfigError, match="trains only tiny, gpt2; 'gpt2-medium' is not measured here"):
        engine.measure("gpt2-medium")
    with pytest.raises(ConfigError, match="not enough memory: gpt2-xl with full fine-tuning needs about 22.6 GB"):
        Engine(limits=Limits(memory_gb=2.0), root=tmp_path / "runs").measure("gpt2-xl")
    checked = engine.check_training(tiny(max_steps=100))
    assert checked.max_steps == 4 and checked.max_wall_s == 3600
    assert ("GPT2_INSTRUCT_MAX_EPOCHS", "3", "most epochs one run may ask for") in limits.rows()


def test_data_that_cannot_make_a_run_fails_before_the_job_starts(engine, tmp_path, monkeypatch):
    two = tmp_path / "two.json"
    two.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(2)]))
    with pytest.raises(ValueError, match="has 2 records: its training split .85 %. has 1, fewer than one step of batch 8; "
                                         r"use more records \(a smaller batch leaves the test split empty\)"):
        engine.start_training(tiny(data=str(two)))
    nine = tmp_path / "nine.json"
    nine.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(9)]))
    with pytest.raises(ValueError, match="nine.json has 9 records: its test .10 %. split is empty; .* at least 10 records"):
        engine.start_training(tiny(data=str(nine), batch_size=2))
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"instruction": "Say 1.", "input": "", "output": "1"}]))
    with pytest.raises(ValueError, match="^one.json has 1 record: its training split"):
        engine.start_training(tiny(data=str(one)))
    from data import cache

    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    stored = cache.store_upload(two)  # as the Dataset tab keeps an upload: <hash>-two.json
    assert stored.name != "two.json"
    with pytest.raises(ValueError, match="^two.json has 2 records"):  # named as the visitor knows it
        engine.start_training(tiny(data=str(stored)))
    assert engine.job("train") is None


def test_a_run_left_running_by_a_dead_process_becomes_interrupted_on_start_up(engine, tmp_path):
    assert engine.start_training(tiny()).wait(60)
    run = engine.runs()[0]
    manifest = {**run.manifest, "status": "running", "owner": {**run.manifest["owner"], "pid": 2**22 + 12345}}  # no such process
    (run.path / "manifest.json").write_text(json.dumps(manifest))
    recovered = Engine(root=tmp_path / "runs").recovered
    assert [r.name for r in recovered] == [run.name]
    assert read_manifest(run.path)["status"] == "interrupted" and read_manifest(run.path)["steps"] == 6
    parent = psutil.Process(os.getppid())  # a live process that is not us: a CLI run beside the app
    alive = {**manifest, "owner": {**manifest["owner"], "pid": parent.pid, "process_started": parent.create_time()}}
    (run.path / "manifest.json").write_text(json.dumps(alive))
    assert Engine(root=tmp_path / "runs").recovered == [] and read_manifest(run.path)["status"] == "running"


def test_evaluation_is_a_job_in_its_own_lane(engine):
    assert engine.start_training(tiny(max_steps=2)).wait(60)
    name = engine.runs()[0].name
    job = engine.start_evaluation(name, owner="a", limit=2, max_new_tokens=4, batch_size=2)
    with pytest.raises(JobError, match="Only the browser session that started this evaluation"):
        engine.stop("evaluate", "b")
    assert job.wait(120)
    snap = engine.snapshot("evaluate")
    assert snap["status"] == "done" and snap["result"]["summary"]["examples"] == 2
    assert snap["progress"]["step"] == snap["progress"]["steps"]
    for bad in ("/etc", "../" + name, "nope"):
        with pytest.raises(ValueError, match="pick one from the list"):
            engine.start_evaluation(bad)


def test_a_server_scores_at_most_its_examples_an_evaluation(engine):
    """On a Space 220 (Alpaca's test split is 5,200); asking for all of them, or more, scores that many."""
    from ui.evaluate_tab import evaluate, not_yet

    assert Limits.from_env({"SPACE_ID": "me/app"}).eval_examples == 220 and Limits.from_env({}).eval_examples is None
    assert [engine.evaluation_limit(n) for n in (None, 3, 500)] == [None, 3, 500]
    assert engine.start_training(tiny(max_steps=2)).wait(60)
    capped = Engine(root=engine.root, limits=Limits(eval_examples=3))
    assert [capped.evaluation_limit(n) for n in (None, 2, 500)] == [3, 2, 3]
    run = capped.runs()[0]
    assert "the first 3 of its 7 test examples (this server's most an evaluation)" in not_yet(run, 3)
    assert "on the whole test split (7 examples)" in not_yet(run, 10) == not_yet(run)
    started = evaluate(capped, "a", run.name, 0, 2, 1, "", "llama3", "fine-tuned ROUGE-L", False)  # the tab's Evaluate
    assert "This server scores at most 3 examples an evaluation." in next(started)[0]
    assert capped.job("evaluate").wait(120)
    assert capped.snapshot("evaluate")["result"]["summary"]["examples"] == 3


def test_a_start_makes_room_on_disk_and_spares_the_run_being_evaluated(tmp_path, monkeypatch):
    """Under ``runs_gb`` a new run first deletes the oldest ended runs, never one an evaluation is reading."""
    import engine.engine as engine_module

    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    assert Limits.from_env({"SPACE_ID": "me/app"}).runs_gb == 20 and Limits.from_env({}).runs_gb is None
    engine = Engine(limits=Limits(runs_gb=0.05), root=tmp_path / "runs")  # a tiny run's weights: 29 MB
    names = []
    for _ in range(2):
        assert engine.start_training(tiny(max_steps=1)).wait(60)
        names.append(engine.runs()[0].name)
    assert engine.runs()[0].manifest["status"] == "done" and len(engine.runs()) == 2  # 59 MB: over, but nothing started since
    reading, release = threading.Event(), threading.Event()

    def slow_evaluation(*args, **kwargs):
        reading.set()
        release.wait(30)
        return {}
    monkeypatch.setattr(engine_module, "evaluate_run", slow_evaluation)
    evaluation = engine.start_evaluation(names[0], owner="a")
    assert reading.wait(30)
    assert engine.start_training(tiny(max_steps=1)).wait(60)
    assert [run.name for run in engine.runs()][1:] == [names[0]]  # the newer one went: the older is being evaluated
    release.set()
    assert evaluation.wait(30)
    assert engine.start_training(tiny(max_steps=1)).wait(60)
    assert names[0] not in [run.name for run in engine.runs()] and len(engine.runs()) == 2


def blocked(monkeypatch, name: str) -> tuple[threading.Event, threading.Event]:
    """``engine.engine.<name>`` (the job's work) replaced by one that waits: (it has started, let it end)."""
    import engine.engine as engine_module

    started, release = threading.Event(), threading.Event()

    def wait(*args, **kwargs):
        started.set()
        release.wait(30)
        return {}
    monkeypatch.setattr(engine_module, name, wait)
    return started, release


@pytest.mark.parametrize("first", ["evaluate", "resume"])
def test_a_run_being_resumed_is_not_evaluated_and_the_other_way_round(engine, monkeypatch, first):
    """The second of a resume and an evaluation of one run is refused at once, not accepted and then failed by the
    run's lock (the job starts before it takes the lock); an aligned run's evaluation uses its parent too."""
    engine.start_training(tiny(max_steps=None, epochs=50, eval_every=500), owner="alice")
    wait_for(engine, "train", lambda s: s["step"] >= 2)
    engine.stop("train", "alice")
    assert engine.job("train").wait(60)
    name = engine.runs()[0].name
    started, release = blocked(monkeypatch, "evaluate_run" if first == "evaluate" else "resume_run")
    if first == "evaluate":
        engine.start_evaluation(name, owner="bob")
        assert started.wait(30)
        with pytest.raises(JobError, match=f"^{name} is in use by another process or job right now .* to resume it$"):
            engine.resume_training(name, owner="alice")
        assert engine.snapshot("train")["status"] == "stopped"
    else:
        engine.resume_training(name, owner="alice")
        assert started.wait(30)
        with pytest.raises(JobError, match=f"^{name} is trained or resumed by another process or job right now: wait "
                                           "until it ends to evaluate it$"):
            engine.start_evaluation(name, owner="bob")
        assert engine.snapshot("evaluate")["status"] == "idle"
    release.set()
    assert engine.job(first if first == "evaluate" else "train").wait(30)


def test_an_upload_in_use_stays_and_one_gone_is_named_until_it_is_uploaded_again(tmp_path, monkeypatch):
    """Another visitor's upload does not prune the file a run is training on; once pruned, evaluating the run is refused
    up front, naming the file, until the same file is uploaded again."""
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    engine = Engine(limits=Limits(uploads_mb=0.03), root=tmp_path / "runs")
    files = []
    for who in ("a", "b"):
        files.append(tmp_path / f"{who}.json")
        files[-1].write_text(json.dumps([{"instruction": f"Say {who} {i}. " + "x" * 600, "input": "", "output": str(i)}
                                         for i in range(30)]))  # 20 KB each: one fits the budget, not two
    ref, _ = engine.datasets.open("upload", str(files[0]))
    mine = engine.datasets.training_source(ref)
    engine.start_training(tiny(data=mine, max_steps=None, epochs=50, eval_every=500), owner="alice")
    wait_for(engine, "train", lambda s: s["step"] >= 1)
    engine.datasets.open("upload", str(files[1]))
    assert Path(mine).is_file()  # kept while the run trains on it
    engine.stop("train", "alice")
    assert engine.job("train").wait(60)
    engine.datasets.open("upload", str(files[1]))
    assert not Path(mine).exists()  # no longer in use: over the budget, it goes
    name = engine.runs()[0].name
    with pytest.raises(DatasetError, match=f"^{name} was trained on an uploaded file, a.json, that is no longer on this "
                                           r"server \(uploads are kept 24 hours .*\): upload the same file again, then "
                                           "evaluate it$"):
        engine.start_evaluation(name, owner="alice")
    engine.datasets.open("upload", str(files[0]))
    started, release = blocked(monkeypatch, "evaluate_run")
    engine.start_evaluation(name, owner="alice")
    assert started.wait(30)
    release.set()
    assert engine.job("evaluate").wait(30)


def test_export_twice_gives_one_file(engine):
    assert engine.start_training(tiny(max_steps=2)).wait(60)
    name = engine.runs()[0].name
    first = engine.export(name)
    mtime = first.stat().st_mtime_ns
    again = engine.export(name)
    assert again == first and again.stat().st_mtime_ns == mtime
    assert [p.name for p in engine.exports.iterdir()] == [f"{name}-hf.zip"]


def test_fifty_sessions_with_uploads_keep_memory_and_disk_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    engine = Engine(limits=Limits(uploads_mb=0.05, datasets_in_memory=4), root=tmp_path / "runs")
    refs = []
    for visitor in range(50):
        upload = tmp_path / f"visitor-{visitor}.json"
        upload.write_text(json.dumps([{"instruction": f"Task {visitor}-{i} " + "x" * 200, "input": "", "output": "y"}
                                      for i in range(20)]))
        ref, records = engine.datasets.open("upload", str(upload))
        refs.append(ref)
        assert len(records) == 20 and "records" not in ref and set(ref) >= {"source", "name", "sha256", "count"}
    uploads = cache.cache_dir() / "uploads"
    assert sum(p.stat().st_size for p in uploads.iterdir()) <= 0.05 * 2**20
    assert engine.datasets.cached() == 4
    assert engine.datasets.records(refs[-1])[0]["instruction"].startswith("Task 49-0")
    with pytest.raises(DatasetError, match="visitor-0.json is no longer on the server .* upload it again"):
        engine.datasets.records(refs[0])
    being_written = uploads / ".mine.json.x1y2.tmp"  # another visitor's upload, not yet renamed into place
    being_written.write_bytes(b"x" * 2**20)
    (uploads / "gone.json").symlink_to(uploads / "removed-meanwhile.json")  # listed, then gone before its stat
    assert being_written not in engine.datasets.prune() and being_written.exists()


def test_a_kept_reference_reopens_only_what_the_server_still_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    engine = Engine(root=tmp_path / "runs")
    upload = tmp_path / "mine.json"
    upload.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(12)]))
    ref, _ = engine.datasets.open("upload", str(upload))
    forged = {**ref, "sha256": "0" * 64, "count": 10**6, "name": "kept.json"}  # what a browser says is not trusted
    again, records = engine.datasets.reopen(forged)
    assert again == {**ref, "name": "kept.json"} and len(records) == 12
    assert engine.datasets.reopen({"source": "sample"})[0]["count"] == 74
    for bad in ({"source": "upload", "key": "../../../etc/passwd"}, {"source": "upload"}, {"source": "elsewhere"}, "x"):
        with pytest.raises(DatasetError):
            engine.datasets.reopen(bad)
    (cache.cache_dir() / "uploads" / ref["key"]).unlink()
    with pytest.raises(DatasetError, match="kept.json is no longer on the server"):
        engine.datasets.reopen(forged)


def test_token_counts_are_made_once_per_file_and_prompt_format(tmp_path, monkeypatch):
    import engine.datasets
    from data import token_stats

    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    counted = []
    monkeypatch.setattr(engine.datasets, "token_stats", lambda records, style: counted.append(style) or token_stats(records, style=style))
    datasets = Engine(limits=Limits(datasets_in_memory=2), root=tmp_path / "runs").datasets
    upload = tmp_path / "mine.json"
    upload.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(12)]))
    for visitor in range(3):  # the same file uploaded by three visitors, or reloaded
        ref, records = datasets.open("upload", str(upload))
        assert datasets.token_stats(ref, records, "alpaca") == token_stats(records, style="alpaca")
    assert datasets.token_stats(ref, records, "phi3") == token_stats(records, style="phi3")
    assert datasets.token_stats(ref, records, "alpaca") is datasets.token_stats(ref, records, "alpaca")
    assert counted == ["alpaca", "phi3"]
    sample, sample_records = datasets.open("sample")
    datasets.token_stats(sample, sample_records, "alpaca")  # a third entry: the least recently used (phi3) goes
    datasets.token_stats(ref, records, "phi3")
    assert counted == ["alpaca", "phi3", "alpaca", "phi3"]


def test_texts_a_visitor_sees_carry_no_server_paths():
    assert scrub("WeightsError: /srv/app/cache/model.safetensors: not found") == "WeightsError: model.safetensors: not found"
    assert scrub("data: /home/u/.cache/gpt2-instruct/uploads/0123456789abcdef-mine.json") == "data: mine.json"
    assert scrub("see https://huggingface.co/openai-community/gpt2") == "see https://huggingface.co/openai-community/gpt2"


def test_a_stop_while_loading_or_at_the_first_evaluation_saves_no_model(engine, tmp_path, monkeypatch):
    """A large model takes minutes to load and to evaluate at step 0: a stop then must not wait for them, nor save
    the untrained model with its optimizer state as a run."""
    import threading

    import training.loop as loop
    from runstore import CHECKPOINT, WEIGHTS
    from training.events import Status

    loaded, build_model = threading.Event(), loop.build_model
    monkeypatch.setattr(loop, "build_model", lambda *args, **kwargs: (loaded.wait(30), build_model(*args, **kwargs))[1])
    engine.start_training(tiny(), owner="alice")
    wait_for(engine, "train", lambda s: s["status"] == "loading" and "tiny" in s["message"])
    assert engine.stop("train", "alice")
    loaded.set()
    assert engine.job("train").wait(60)
    snap = engine.snapshot("train")
    assert snap["status"] == "stopped" and snap["error"] is None
    assert snap["message"] == "Stopped while the model loaded: no run was started, nothing was written"
    assert engine.runs() == []

    events = []
    asked = lambda: any(isinstance(e, Status) and e.status == "evaluating" for e in events)
    summary = loop.train(tiny(out=str(tmp_path / "early")), loop.Hooks(on_event=events.append, should_stop=asked))
    assert summary["status"] == "stopped" and summary["steps"] == 0
    assert not (tmp_path / "early" / WEIGHTS).exists() and not (tmp_path / "early" / CHECKPOINT).exists()
    rows = read_metrics(tmp_path / "early")  # the interrupted evaluation's step keeps its row, without a validation loss
    assert [r["step"] for r in rows] == [0] and rows[0]["val_loss"] is None and rows[0]["train_loss"] is not None
    assert not any(isinstance(e, Status) and e.status == "saving" for e in events)


def test_a_stopped_run_resumes_through_the_engine_and_finishes(engine):
    engine.start_training(tiny(max_steps=None, epochs=3, eval_every=50), owner="alice")  # 3 x 7 steps
    wait_for(engine, "train", lambda s: s["step"] >= 3)
    engine.stop("train", "alice")
    assert engine.job("train").wait(60)
    run = engine.runs()[0]
    assert run.status == "stopped" and run.resumable
    assert engine.last_trained("tiny") is None  # a stopped run says nothing about an epoch
    with pytest.raises(ValueError, match="pick one from the list"):
        engine.resume_training("../" + run.name)
    job = engine.resume_training(run.name, owner="bob")
    going = wait_for(engine, "train", lambda s: s["status"] == "training" and s["step"] > run.last_step)
    assert going["elapsed_s"] > run.manifest["wall_time_s"] > 0  # the clock goes on from the stop, as the final figure does
    assert job.wait(90)
    snap = engine.snapshot("train")
    assert snap["status"] == "done" and snap["step"] == 21 and snap["start_step"] == run.last_step < 21
    assert [r["step"] for r in snap["history"]][-1] == 21
    resumed = engine.runs()[0]
    assert resumed.name == run.name and resumed.status == "done" and not resumed.resumable


def test_a_stopped_run_whose_data_has_gone_is_refused_up_front_and_resumes_once_it_is_back(engine, tmp_path):
    """No job starts (and no run is marked failed) for a resume whose data has left the server; the refusal names it."""
    data = tmp_path / "mine.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)]))
    engine.start_training(tiny(data=str(data), max_steps=None, epochs=50, eval_every=500), owner="alice")  # 50 x 4 steps
    wait_for(engine, "train", lambda s: s["step"] >= 2)
    engine.stop("train", "alice")
    assert engine.job("train").wait(60)
    run, saved = engine.runs()[0], data.read_bytes()
    data.unlink()
    with pytest.raises(DatasetError, match=f"^{run.name} was trained on mine.json, which is no longer on this server: "
                                           "it is needed to resume it$"):
        engine.resume_training(run.name, owner="alice")
    assert engine.snapshot("train")["status"] == "stopped" and engine.runs()[0].resumable
    data.write_bytes(saved)
    engine.resume_training(run.name, owner="alice")
    wait_for(engine, "train", lambda s: s["step"] > run.last_step)
    engine.stop("train", "alice")
    assert engine.job("train").wait(60) and engine.runs()[0].status == "stopped"


def test_the_expected_epoch_shows_the_last_finished_run_beside_its_estimate(engine):
    from ui.train_tab import expected_html

    def shown(preset="tiny", lora=False) -> str:
        return re.sub(r"<[^>]+>", "", expected_html(engine, preset, lora, 4))

    assert engine.start_training(tiny(max_steps=None, epochs=2, eval_every=5), owner="alice").wait(90)  # 2 x 7 steps
    run = engine.runs()[0]
    assert engine.last_trained("tiny") == (run, None)  # not measured: what it took, no estimate
    assert engine.last_trained("tiny", lora_rank=4) is None and engine.last_trained("gpt2") is None
    took = clock(run.manifest["train_time_s"] + run.manifest["eval_time_s"])
    wall = clock(run.manifest["wall_time_s"])  # the Done line's time, loading included: said beside it when it differs
    in_all = f" ({wall} in all, with loading)" if wall != took else ""
    assert f"not measured on this machine yet (Measure times a few real steps, a few seconds to a minute).Last finished run of tiny, full fine-tuning here ({run.name}): 14 steps of the bundled sample took {took} training and evaluating{in_all}, at " in shown()
    assert "Last finished run" not in shown(lora=True) and "Last finished run" not in shown("gpt2")
    engine.measure("tiny")
    found, expected = engine.last_trained("tiny", calibration=engine.calibration("tiny"))
    assert found == run and expected.steps == 14 and expected.eval_s > 0  # the run's own settings: 2 epochs, evaluated every 5
    assert re.search(rf"took {took} training and evaluating{re.escape(in_all)}, at [\d,]+ tokens/s; estimated for it: {clock(expected.total_s)}\.", shown())


def test_a_measurement_runs_alone_so_that_nothing_skews_it(engine, monkeypatch):
    """Measure times real steps: refused while a job runs or another measurement does; no job starts meanwhile."""
    import importlib
    import threading

    started, release, results = threading.Event(), threading.Event(), []

    def slow_calibrate(preset, lora_rank=0, refresh=False):
        started.set()
        assert release.wait(30)
        return (preset, lora_rank, refresh)

    monkeypatch.setattr(importlib.import_module("engine.engine"), "calibrate", slow_calibrate)
    timing = threading.Thread(target=lambda: results.append(engine.measure("tiny", 4)))
    timing.start()
    assert started.wait(30)
    with pytest.raises(JobError, match="the expected epoch of tiny is being measured"):
        engine.start_training(tiny())
    with pytest.raises(JobError, match="tiny is being measured already"):
        engine.measure("gpt2")
    release.set()
    timing.join(30)
    assert results == [("tiny", 4, True)]
    public = Engine(root=engine.root, loopback=False)  # visitors of a public server measure what is not measured yet
    monkeypatch.setattr(importlib.import_module("engine.engine"), "cached", lambda preset, rank: f"cached {preset}")
    assert public.measure("tiny") == "cached tiny" and engine.measure("tiny") == ("tiny", 0, True)

    job = engine.start_training(tiny(max_steps=200), owner="alice")
    wait_for(engine, "train", lambda s: s["status"] == "training")
    with pytest.raises(JobError, match="a fine-tuning run is running: measure once it has ended"):
        engine.measure("tiny")
    engine.stop("train", "alice")
    assert job.wait(60)
    assert engine.measure("tiny") == ("tiny", 0, True)
    with pytest.raises(ConfigError, match="only the presets .* can be measured, not 'gpt9'"):
        engine.measure("gpt9")


def test_an_estimate_for_an_upload_that_left_the_server_comes_back_when_it_is_uploaded_again(engine, tmp_path):
    """The estimate's "upload it again" is not kept under the file's hash: uploaded again, the file has an estimate."""
    from training.calibrate import Calibration

    measured = Calibration(model="tiny", method="full", data="canonical", epoch_s=1.0, train_s=1.0, eval_s=0.0, steps=1,
                           tokens_per_s=1.0, precision="fp32", reason="", cpu_class="", flop_s=1e-9, step_s=0.01,
                           forward_flop_s=1e-9, new_token_s=0.01, measured_s=1.0, measured_at=0.0)
    upload = tmp_path / "mine.json"
    upload.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(60)]))
    ref, _ = engine.datasets.open("upload", str(upload))
    (engine.datasets.uploads_dir / ref["key"]).unlink()  # pruned before the page asked for an estimate,
    engine.datasets._parsed.clear()  # and its records left the shared cache
    with pytest.raises(ValueError, match="mine.json is no longer on the server"):
        engine.project_run(measured, ref)
    again, _ = engine.datasets.open("upload", str(upload))
    assert again == ref and engine.project_run(measured, again).steps == 6  # 60 records: 51 to train, 8 a batch


def test_a_job_stopped_by_its_owner_is_logged_as_stopped_and_a_failure_with_its_traceback_unless_expected(caplog):
    """The server's log: a stop is no error (it was logged as one, traceback and all); a failure keeps its traceback."""
    import logging

    from engine.jobs import Job

    class EvaluationStopped(Exception):
        pass

    def stoppable(hooks):
        while not hooks.should_stop():
            time.sleep(0.01)
        raise EvaluationStopped("stopped after 3 of 7 examples")

    def failing(hooks):
        raise RuntimeError("simulated failure")

    def offline(hooks):
        from model.weights import WeightsError

        raise WeightsError("gpt2's weights are not cached and the Hugging Face Hub cannot be reached")

    with caplog.at_level(logging.INFO, logger="engine.jobs"):
        job = Job("evaluation", stoppable, owner="alice").start()
        threading.Timer(0.05, job.stop, ("alice",)).start()
        assert job.wait(10) and job.snapshot()["status"] == "stopped"
        assert Job("evaluation", failing).start().wait(10)
        assert Job("fine-tuning", offline).start().wait(10)
    stops = [r for r in caplog.records if "stopped after 3 of 7" in r.getMessage()]
    assert len(stops) == 1 and stops[0].levelno == logging.INFO and stops[0].exc_info is None
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 1 and failures[0].exc_info[0] is RuntimeError
    expected = [r for r in caplog.records if r.levelno == logging.WARNING]  # its message says all: one line
    assert [r.getMessage() for r in expected] == ["fine-tuning failed: gpt2's weights are not cached and the Hugging Face "
                                                  "Hub cannot be reached"] and expected[0].exc_info is None


def test_a_phase_at_a_step_moves_the_epoch_with_the_step():
    """'Evaluating at step 10' shows step 10's epoch, not the last logged row's."""
    from engine.jobs import Job
    from training.events import Logged, Started, Status

    job = Job("fine-tuning", lambda hooks: None)
    job.on_event(Started(run_name="r", run_dir="/r", total_steps=19, steps_per_epoch=7, epochs=3, device="cpu",
                         parameters=1, trainable_parameters=1))
    job.on_event(Logged({"step": 9, "epoch": round(9 / 7, 4)}))
    job.on_event(Status("evaluating", "Evaluating at step 10", 10))
    snap = job.snapshot()
    assert (snap["status"], snap["step"], snap["epoch"]) == ("evaluating", 10, round(10 / 7, 4))


def test_a_run_whose_validation_records_are_all_left_out_says_it_has_no_validation_loss(engine, tmp_path):
    from ui.train_tab import NO_VALIDATION, progress_html

    long_ = {"instruction": "Long.", "input": "", "output": "word " * 2000}
    data = tmp_path / "data.json"  # 20 records: #20 alone is the validation split
    data.write_text(json.dumps([*({"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(19)), long_]))
    assert engine.start_training(tiny(data=str(data), batch_size=2, max_steps=1, sample_tokens=0), owner="alice").wait(90)
    snap = engine.snapshot("train")
    assert snap["status"] == "done" and snap["val_records"] == 0 and NO_VALIDATION in progress_html(snap)
    assert engine.start_training(tiny(max_steps=1, sample_tokens=0), owner="alice").wait(90)
    snap = engine.snapshot("train")
    assert snap["val_records"] == 5 and NO_VALIDATION not in progress_html(snap)
