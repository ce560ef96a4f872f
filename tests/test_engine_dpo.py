"""Preference tuning through the engine: a finished fine-tuned run, named, aligned in the shared ``train`` lane."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from data import DatasetError, load_instructions
from engine import Engine, JobError, Limits
from runstore import read_manifest, read_metrics
from training import Hooks, TrainConfig
from training.config import ConfigError
from training.dpo import DPOConfig, train_dpo
from training.events import Logged


def pairs_file(folder, n: int | None = None):
    records = load_instructions("sample")[:n]
    pairs = [{**r, "chosen": r["output"], "rejected": f"Ugh: {r['output'].lower()} Figure it out."} for r in records]
    path = folder / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path


def long_pairs_file(folder):
    """Pairs of about 800 tokens: a pair trains as one row (prompt, chosen and rejected)."""
    path = folder / "long" / "pairs.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps([{"instruction": "Write.", "input": "", "output": "a " * 400, "chosen": "a " * 400,
                                 "rejected": "b " * 400}] * 20))
    return path


LONG_PAIRS_REFUSED = (r"tiny with full fine-tuning needs about 1\.1 GB at batch 8 with training examples of up to 8\d\d "
                      r"tokens, and 1\.0 GB is available")


@pytest.fixture
def engine(tmp_path, monkeypatch) -> Engine:
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    return Engine(root=tmp_path / "runs", exports=tmp_path / "exports")


@pytest.fixture
def parent(engine) -> str:
    config = TrainConfig(model="tiny", random_init=True, data="sample", max_steps=2, eval_every=2, eval_batches=1,
                         sample_tokens=0, lr=1e-3)
    assert engine.start_training(config, owner="alice").wait(90)
    assert engine.snapshot("train")["status"] == "done"
    return engine.runs()[0].name


def settings(engine, tmp_path, **overrides) -> dict:
    data = engine.store_preference_upload(pairs_file(tmp_path))
    return {**dict(data=data, batch_size=4, max_steps=4, eval_every=2, eval_batches=1, sample_tokens=4, lr=1e-4), **overrides}


def test_a_finished_run_is_aligned_by_name_into_a_dpo_run_watched_like_any_job(engine, parent, tmp_path):
    job = engine.start_preference(parent, owner="alice", **settings(engine, tmp_path))
    assert job.wait(120)
    snap = engine.snapshot("train")
    assert snap["status"] == "done", snap["error"]
    assert snap["kind"] == "preference tuning" and snap["method"] == "dpo" and snap["step"] == snap["total_steps"] == 4
    assert [h["step"] for h in snap["history"]] == [0, 1, 2, 3, 4]
    assert all(h["val_reward_margin"] is not None for h in snap["history"] if h["step"] in (0, 2, 4))
    assert [r["step"] for r in snap["responses"]] == [0, 2, 4]
    assert snap["config"]["parent"] == parent and snap["config"]["model"] == "tiny"
    assert str(tmp_path) not in json.dumps(snap, default=str)  # no server path reaches a visitor
    run = next(r for r in engine.runs() if r.name == snap["run"])
    manifest = read_manifest(run.path)
    assert run.status == "done" and manifest["method"] == "dpo" and manifest["parent_run"] == parent
    with pytest.raises(ValueError, match="already preference-tuned"):
        engine.start_preference(run.name, owner="alice", **settings(engine, tmp_path))


    from ui import align_tab, train_tab  # what the Align and Train tabs draw from this job

    chart, progress, responses, final, start_btn, stop_btn, message, to_playground, seen, finished = align_tab.poll(engine, "alice", None)
    message = json.loads(chart)
    margin = [t for t in message["figure"]["data"] if t.get("meta") == "live-margin"]
    assert len(margin) == 1 and margin[0]["yaxis"] == "y2" and margin[0]["x"] == []  # the browser fills it from the rows
    assert [row[1] for row in message["rows"]] == [0, 1, 2, 3, 4]
    assert [row[1] for row in message["rows"] if row[5] is not None] == [0, 2, 4]  # the margin, where it was evaluated
    assert "pairs/s" in progress and "step <b>4</b> / 4" in progress and "from " + parent in progress
    assert "Chosen answer" in responses and "Rejected answer" in responses and "reward margin" in final
    assert finished == {"run": snap["run"], "job": snap["started_at"]} and seen["rows"] == 5
    assert to_playground.visible is True  # the aligned model is one click from the Playground
    assert align_tab.poll(engine, "alice", seen)[0] == {"__type__": "update"}  # nothing new: no chart sent
    on_train = train_tab.poll(engine, "alice", None, [])
    assert "see the <b>Align</b> tab" in on_train[1] and on_train[7].visible is False  # the Train tab's button is its own runs'
    assert on_train[-1] == finished  # shown on any other tab, the Train poll still refreshes every run list
    assert json.loads(train_tab.redraw(engine, [], None)[0])["rows"] == []  # the Train chart leaves DPO curves to Align


def test_the_align_tab_tells_every_tab_once_when_a_fine_tuning_run_has_finished(engine, parent):
    from ui import align_tab

    *_, seen, finished = align_tab.poll(engine, "alice", None)
    assert finished == {"run": parent, "job": engine.snapshot("train")["started_at"]}
    assert align_tab.poll(engine, "alice", seen)[-1] == {"__type__": "update"}


def test_refused_before_start_for_unfinished_or_unknown_parents_paths_and_limits(engine, parent, tmp_path):
    running = read_manifest(engine.run(parent).path)
    unfinished = engine.root / "20000101-000000-unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text(json.dumps({**running, "status": "running"}))
    with pytest.raises(ValueError, match="not a finished run"):
        engine.start_preference(unfinished.name, owner="alice", **settings(engine, tmp_path))
    with pytest.raises(ValueError, match="never given as paths"):
        engine.start_preference(str(engine.run(parent).path), owner="alice")
    with pytest.raises(ConfigError, match="set by the server"):
        engine.start_preference(parent, owner="alice", out=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="uploaded here"):
        engine.start_preference(parent, owner="alice", data=str(pairs_file(tmp_path)))
    with pytest.raises(ConfigError, match="beta"):
        engine.start_preference(parent, owner="alice", **settings(engine, tmp_path, beta=0))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "Hi", "input": "", "output": "Hi", "chosen": "Hi"}]))
    with pytest.raises(DatasetError, match='record 1: field "rejected" is missing'):
        engine.store_preference_upload(bad)
    few = engine.store_preference_upload(pairs_file(tmp_path, n=4))
    with pytest.raises(ValueError, match="fewer than one batch"):
        engine.start_preference(parent, owner="alice", **{**settings(engine, tmp_path), "data": few})
    limited = Engine(limits=Limits(max_epochs=1, memory_gb=0.001), root=engine.root)
    with pytest.raises(ConfigError, match="epochs: this server allows at most 1"):
        limited.start_preference(parent, owner="alice", **settings(limited, tmp_path, epochs=2))
    with pytest.raises(ConfigError, match="not enough memory"):
        limited.start_preference(parent, owner="alice", **settings(limited, tmp_path))
    one_gb = Engine(limits=Limits(memory_gb=1.0), root=engine.root)
    with pytest.raises(ConfigError, match=LONG_PAIRS_REFUSED):
        one_gb.preference_config(parent, **settings(one_gb, tmp_path, batch_size=8,
                                                    data=one_gb.store_preference_upload(long_pairs_file(tmp_path))))
    one_gb.preference_config(parent, **settings(one_gb, tmp_path, batch_size=8))  # the sample's pairs fit
    assert engine.snapshot("train")["kind"] == "fine-tuning"  # nothing started


def test_only_the_owner_stops_it_the_lane_is_shared_and_a_stopped_run_is_saved(engine, parent, tmp_path):
    engine.start_preference(parent, owner="alice", **settings(engine, tmp_path, max_steps=None, epochs=50, eval_every=500))
    deadline = time.monotonic() + 90
    while engine.snapshot("train")["step"] < 2:
        assert time.monotonic() < deadline and engine.snapshot("train")["status"] != "failed"
        time.sleep(0.05)
    with pytest.raises(JobError, match="Only the browser session that started this preference-tuning run"):
        engine.stop("train", "bob")
    with pytest.raises(JobError, match="already running"):
        engine.start_training(TrainConfig(model="tiny", random_init=True, data="sample", max_steps=2), owner="bob")
    assert engine.stop("train", "alice")
    assert engine.job("train").wait(60)
    snap = engine.snapshot("train")
    run = next(r for r in engine.runs() if r.name == snap["run"])
    assert snap["status"] == "stopped" and run.status == "stopped" and run.has_weights


def test_the_reference_pass_counts_as_running(engine, parent, tmp_path, monkeypatch):
    import training.dpo as dpo

    original, seen = dpo.reference_logprobs, []

    def slow(*args, **kwargs):
        seen.append(engine.job("train").active)
        return original(*args, **kwargs)

    monkeypatch.setattr(dpo, "reference_logprobs", slow)
    assert engine.start_preference(parent, owner="alice", **settings(engine, tmp_path, max_steps=1)).wait(120)
    assert seen and all(seen)


def test_an_interrupted_dpo_run_resumes_through_the_engine_as_if_it_had_never_stopped(engine, parent, tmp_path):
    values = dict(parent=str(engine.run(parent).path), **settings(engine, tmp_path, max_steps=6, checkpoint_every=2))
    train_dpo(DPOConfig(**values, out=str(engine.root / "straight")))
    killed = engine.root / "killed"

    def kill_at_step_3(event):  # a copy taken now is what a process killed now leaves: running, the checkpoint of step 2
        if isinstance(event, Logged) and event.step == 3:
            shutil.copytree(engine.root / "running", killed)

    train_dpo(DPOConfig(**values, out=str(engine.root / "running")), Hooks(on_event=kill_at_step_3))
    restarted = Engine(root=engine.root, exports=tmp_path / "exports", limits=Limits(max_wall_minutes=30))
    assert [run.name for run in restarted.recovered] == ["killed"] and restarted.run("killed").status == "interrupted"

    from ui import align_tab, train_tab  # the Align tab offers it; the Train tab, whose trainer it is not, does not

    assert align_tab.refresh_parents(restarted, None)[2].choices == [("killed · interrupted at step 3, resumes from step 2", "killed")]
    assert train_tab.runs_table(restarted)[2].choices == []
    message, start_btn, stop_btn = align_tab.resume_job(restarted, "bob", "killed")
    assert "Resuming <b>killed</b>" in message
    assert restarted.job("train").wait(120)
    snap = restarted.snapshot("train")
    assert snap["status"] == "done", snap["error"]
    assert snap["kind"] == "preference tuning" and snap["start_step"] == 2 and snap["step"] == 6
    assert [h["step"] for h in snap["history"]] == list(range(7)) and snap["config"]["parent"] == parent
    assert str(tmp_path) not in json.dumps(snap, default=str)
    manifest = read_manifest(killed)
    assert manifest["status"] == "done" and manifest["resumed_from_step"] == [2] and manifest["dpo"]["max_wall_s"] == 1800
    timings = ("elapsed_s", "eta_s", "tokens_per_s")
    figures = [[{k: v for k, v in r.items() if k not in timings} for r in read_metrics(engine.root / run)] for run in ("straight", "killed")]
    assert figures[0] == figures[1]
    a, b = load_file(engine.root / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="killed is done .* nothing to resume"):
        restarted.resume_training("killed", owner="bob")


def test_the_server_wall_time_limit_stops_preference_tuning_and_saves_it_resumable(engine, parent, tmp_path):
    limited = Engine(root=engine.root, exports=tmp_path / "exports", limits=Limits(max_wall_minutes=1e-9))
    config, _ = limited.preference_config(parent, **settings(limited, tmp_path, max_wall_s=3600))
    assert config.max_wall_s == pytest.approx(6e-8)
    assert limited.start_preference(parent, owner="alice", **settings(limited, tmp_path)).wait(120)
    snap = limited.snapshot("train")
    run = limited.run(snap["run"])
    assert snap["status"] == "stopped" and run.manifest["stop_reason"].startswith("wall time limit") and run.resumable


def test_a_stopped_run_on_long_pairs_resumes_only_where_its_rows_fit(engine, parent, tmp_path):
    """A resumed preference-tuning run is admitted at its own batch size on its own pairs, as its start was."""
    limited = Engine(root=engine.root, exports=tmp_path / "exports", limits=Limits(max_wall_minutes=1e-9))
    data = limited.store_preference_upload(long_pairs_file(tmp_path))
    assert limited.start_preference(parent, owner="alice", **settings(limited, tmp_path, batch_size=8, data=data)).wait(120)
    name = limited.snapshot("train")["run"]
    assert limited.run(name).resumable
    with pytest.raises(ConfigError, match=LONG_PAIRS_REFUSED):
        Engine(root=engine.root, limits=Limits(memory_gb=1.0)).resume_training(name, owner="alice")
    assert Engine(root=engine.root, limits=Limits(memory_gb=1.2)).resume_training(name, owner="alice").wait(120)


def test_the_preference_estimate_covers_the_measured_peaks():
    """GPT-2 124M preference tuning at batch 8 peaked at 2.53 GB with pairs of 118 tokens and 5.92 GB with pairs of
    958 (fp32-only CPU): the estimate is at or above each, by at most 5 %."""
    from engine.engine import memory_needed
    from model import GPTConfig
    from training.estimate import PREFERENCE_ACTIVATION_BYTES

    gpt2, config = GPTConfig.from_name("gpt2"), TrainConfig(model="gpt2", batch_size=8)
    for longest, peak in ((118, 2.53), (958, 5.92)):
        assert peak <= memory_needed(gpt2, config, longest, PREFERENCE_ACTIVATION_BYTES) <= peak * 1.05


def test_a_run_whose_validation_pairs_are_all_left_out_says_it_has_no_validation_loss(engine, parent, tmp_path):
    from ui.align_tab import NO_VALIDATION, progress_html

    pairs = json.loads(pairs_file(tmp_path, 20).read_text())
    pairs[-1]["chosen"] = "word " * 2000  # #20 alone is the validation split
    long_ = tmp_path / "long-last.json"
    long_.write_text(json.dumps(pairs))
    data = engine.store_preference_upload(long_)
    assert engine.start_preference(parent, owner="alice", **settings(engine, tmp_path, data=data, max_steps=1)).wait(120)
    snap = engine.snapshot("train")
    assert snap["status"] == "done" and snap["val_records"] == 0 and NO_VALIDATION in progress_html(snap, None)
    assert engine.start_preference(parent, owner="alice", **settings(engine, tmp_path, max_steps=1)).wait(120)
    snap = engine.snapshot("train")
    assert snap["val_records"] > 0 and NO_VALIDATION not in progress_html(snap, None)
