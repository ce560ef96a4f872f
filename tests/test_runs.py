"""Runs never lie: failures, stops, wall-time limits, dead processes and resumes all leave the manifest telling the truth."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from data import DatasetError
from runstore import (CHECKPOINT, RunInfo, RunWriter, find_run, list_runs, process_owner, prune_runs, read_manifest, read_metrics,
                      recover_runs)
from training import TrainConfig
from training.checkpoint import ResumeError, resume_config
from training.events import Finished, Logged, Started, Status
from training.distributed import Context
from training.loop import Clock, Hooks, check_data, records_needed, resume_run, train

from .holders import held_elsewhere

REPO = Path(__file__).resolve().parents[1]


def small_data(tmp_path: Path, n: int = 10) -> str:
    """The first ``n`` records of the bundled sample; at n=10, 8 training records: 4 steps of 2 per epoch."""
    path = tmp_path / f"data-{n}.json"
    path.write_text(json.dumps(json.loads((REPO / "data" / "sample.json").read_text())[:n]))
    return str(path)


def tiny(tmp_path: Path, out: str, **overrides) -> TrainConfig:
    values = dict(model="tiny", random_init=True, data=small_data(tmp_path), epochs=2, batch_size=2, eval_every=3,
                  eval_batches=1, sample_tokens=0, lr=1e-3, out=str(tmp_path / out))
    return TrainConfig(**{**values, **overrides})


def stop_after(step: int, events: list | None = None) -> Hooks:
    """Hooks that ask for a stop once ``step`` has been logged."""
    seen = {"step": 0}

    def on_event(event):
        if events is not None:
            events.append(event)
        if isinstance(event, Logged):
            seen["step"] = event.step

    return Hooks(on_event=on_event, should_stop=lambda: seen["step"] >= step)


# Resume


@pytest.mark.parametrize("precision, grouped, stop, extra", [
    ("fp32", True, 5, {}),  # resumes inside the second epoch
    ("fp32", False, 4, {}),  # stops at the epoch boundary
    ("auto", True, 4, {}),
    ("auto", False, 3, {}),
    ("auto", True, 5, dict(grad_accum=2, batch_size=1, grad_clip=1.0, warmup_steps=2, cosine=True, lora_rank=4)),
])
def test_a_resumed_run_trains_exactly_as_an_uninterrupted_one(tmp_path, precision, grouped, stop, extra):
    """8 steps over two epochs straight, against `stop` steps + stop + resume: equal losses and equal final weights,
    and the resumed run's watchers shown every sample answer, those from before the stop too.

    Bit for bit only with the machine to itself: a training in another process at the same time makes this one
    share the cores (``training.cores``), and a change of threads midway changes the order of some sums."""
    settings = dict(precision=precision, grouped=grouped, sample_tokens=3, **extra)
    straight_events, events = [], []
    straight = train(tiny(tmp_path, "straight", **settings), Hooks(on_event=straight_events.append))
    stopped = train(tiny(tmp_path, "resumed", **settings), stop_after(stop))
    assert stopped["status"] == "stopped" and stopped["steps"] == stop and stopped["stop_reason"] == "stopped by its owner"
    run = tmp_path / "resumed"
    assert RunInfo(run, read_manifest(run)).resumable and (run / "model.safetensors").is_file()

    resumed = resume_run(run, Hooks(on_event=events.append))
    assert resumed["status"] == straight["status"] == "done" and resumed["steps"] == straight["steps"] == 8
    started = next(e for e in events if isinstance(e, Started))
    assert started.start_step == stop
    manifest = read_manifest(run)
    assert manifest["resumed_from_step"] == [stop] and manifest["status"] == "done" and manifest["stop_reason"] is None
    assert not (run / CHECKPOINT).exists()  # a done run keeps no checkpoint
    a, b = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [r["step"] for r in b] == list(range(9))  # the earlier rows kept, each step once
    assert [(r["train_loss"], r["val_loss"], r["lr"], r["tokens_seen"]) for r in a] == \
        [(r["train_loss"], r["val_loss"], r["lr"], r["tokens_seen"]) for r in b]
    wa, wb = load_file(tmp_path / "straight" / "model.safetensors"), load_file(run / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)
    answers = [[(e.step, e.response) for e in got if isinstance(e, Logged) and e.response is not None] for got in (straight_events, events)]
    assert answers[0] == answers[1] and [step for step, _ in answers[0]] == [0, 3, 6, 8]
    assert all("response" not in e.record for e in events if isinstance(e, Logged))


def test_an_auto_precision_run_resumes_in_the_precision_it_trained_in_and_with_as_many_processes(tmp_path, monkeypatch):
    """A run stopped where auto took bf16 (a bf16 CPU, a GPU) and resumed where auto takes fp32: its checkpoint holds
    bf16 master weights, so it goes on in bf16, and says why; a run of two processes resumes only with two."""
    monkeypatch.setenv("GPT2_INSTRUCT_NATIVE_BF16", "1")
    train(tiny(tmp_path, "run", max_steps=3), stop_after(1))
    monkeypatch.setenv("GPT2_INSTRUCT_NATIVE_BF16", "0")
    events = []
    assert resume_run(tmp_path / "run", Hooks(on_event=events.append))["status"] == "done"
    started = next(e for e in events if isinstance(e, Started))
    assert started.device == "CPU, bfloat16" and started.precision.startswith(
        "bf16: the run trained in bf16 before it stopped, and goes on in it, emulated here")
    train(tiny(tmp_path, "two", max_steps=3), stop_after(1))
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    (tmp_path / "two" / "manifest.json").write_text(json.dumps({**manifest, "processes": 2}))
    with pytest.raises(ResumeError, match=r"the run trained in 2 processes \(torchrun --nproc-per-node 2\), which split "
                                          r"each step's batches: resume it with as many, not 1"):
        resume_run(tmp_path / "two")


def test_a_lora_run_resumes_only_on_the_base_it_started_from(tmp_path):
    """Its checkpoint holds the adapters alone, so a local base model changed meanwhile would silently make it another run."""
    from model import GPT, GPTConfig, init_generator, save_pretrained

    base = tmp_path / "my-base"
    save_pretrained(GPT(GPTConfig.from_name("tiny"), init_generator(1)), base)
    train(tiny(tmp_path, "run", model=str(base), random_init=False, lora_rank=2, max_steps=3), stop_after(1))
    assert len(read_manifest(tmp_path / "run")["base_fingerprint"]) == 16
    save_pretrained(GPT(GPTConfig.from_name("tiny"), init_generator(2)), base)  # trained further, say
    with pytest.raises(ResumeError, match=r"the weights of .*my-base have changed since the run started: LoRA trains"):
        resume_run(tmp_path / "run")
    assert read_manifest(tmp_path / "run")["status"] == "stopped"  # refused before anything was written
    save_pretrained(GPT(GPTConfig.from_name("tiny"), init_generator(1)), base)  # as it was
    assert resume_run(tmp_path / "run")["status"] == "done"


def test_run_files_get_the_mode_a_plain_open_gives(tmp_path):
    from model.files import UMASK

    train(tiny(tmp_path, "run", max_steps=1))
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~UMASK}, modes  # not mkstemp's owner-only 0600


def test_a_stopped_run_says_which_step_its_validation_loss_is_from(tmp_path):
    stopped = train(tiny(tmp_path, "run"), stop_after(5))  # evaluated at steps 0 and 3
    assert (stopped["steps"], stopped["final_val_step"]) == (5, 3)
    run = tmp_path / "run"
    assert RunInfo(run, read_manifest(run)).label().endswith(f"val loss {stopped['final_val_loss']:.3f} at step 3)")
    # The checkpoint's clock is read before its save; the manifest's wall time, after. Made 100 s longer here (a slow
    # disk), the resumed clock goes on from it: it never reads less than the run showed when it stopped.
    manifest = {**read_manifest(run), "wall_time_s": stopped["wall_time_s"] + 100}
    (run / "manifest.json").write_text(json.dumps(manifest))
    resumed = resume_run(run, Hooks())
    assert (resumed["steps"], resumed["final_val_step"]) == (8, 8)  # the last step is always evaluated
    assert resumed["wall_time_s"] > stopped["wall_time_s"] + 100
    assert RunInfo(run, read_manifest(run)).label().endswith(f"val loss {resumed['final_val_loss']:.3f})")


def test_resume_refuses_done_runs_runs_without_checkpoint_and_changed_settings(tmp_path):
    train(tiny(tmp_path, "done", max_steps=2))
    with pytest.raises(ResumeError, match="done .* nothing to resume"):
        resume_run(tmp_path / "done")
    train(tiny(tmp_path, "stopped", max_steps=4), stop_after(1))
    with pytest.raises(ResumeError, match="lr cannot change"):
        resume_run(tmp_path / "stopped", lr=0.5)
    with pytest.raises(ResumeError, match="seed was 123, not 7"):
        train(TrainConfig(**{**resume_config(tmp_path / "stopped").to_dict(), "seed": 7}), resume=tmp_path / "stopped")
    assert resume_config(tmp_path / "stopped", checkpoint_every=1).checkpoint_every == 1
    same = resume_config(tmp_path / "stopped", model="tiny", random_init=True, lr=1e-3, epochs=2)  # the run's own flags
    assert same == resume_config(tmp_path / "stopped")
    (tmp_path / "stopped" / CHECKPOINT).write_bytes(b"")  # a disk that filled up
    with pytest.raises(ResumeError, match="stopped: its checkpoint is an empty file"):
        resume_run(tmp_path / "stopped")
    (tmp_path / "stopped" / CHECKPOINT).unlink()
    with pytest.raises(ResumeError, match="has no checkpoint"):
        resume_run(tmp_path / "stopped")
    with pytest.raises(ResumeError, match="not a run"):
        resume_run(tmp_path)
    (tmp_path / "stopped" / "manifest.json").write_text("")
    with pytest.raises(ResumeError, match="stopped: its manifest.json cannot be read"):
        resume_run(tmp_path / "stopped")


# Failures and limits


@pytest.mark.parametrize("what", ["weights", "checkpoint"])
def test_a_failed_save_marks_the_run_failed_and_raises(tmp_path, monkeypatch, what):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def torch_disk_full(state, f):  # torch.save on a full disk: its own words, the file's OSError as their context
        try:
            f.write(b"x" * 2**20)
            disk_full()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 29696 vs 29584") from None

    monkeypatch.setattr("training.loop.save_pretrained" if what == "weights" else "training.checkpoint.torch.save",
                        disk_full if what == "weights" else torch_disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        train(tiny(tmp_path, "run", max_steps=3, checkpoint_every=2))
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "failed" and "No space left on device" in manifest["error"]
    assert manifest["steps"] == (3 if what == "weights" else 2) and manifest["ended"]
    assert not list((tmp_path / "run").glob(".*tmp"))
    run = RunInfo(tmp_path / "run", manifest)
    assert run.resumable == (what == "weights")  # the step-2 checkpoint was written before the failed final save


def test_the_phase_goes_back_to_training_once_a_checkpoint_is_written(tmp_path):
    events = []
    train(tiny(tmp_path, "run", max_steps=5, eval_every=50, checkpoint_every=2), Hooks(on_event=events.append))
    phases = [(e.status, e.step) for e in events if isinstance(e, Status)]
    saving = [i for i, (status, _) in enumerate(phases) if status == "saving"]
    assert [phases[i] for i in saving[:2]] == [("saving", 2), ("saving", 4)]
    assert [phases[i + 1][0] for i in saving[:2]] == ["training", "training"]


def test_wall_time_limit_stops_saves_and_leaves_a_resumable_run(tmp_path, monkeypatch):
    late = {"now": 0.0}
    monkeypatch.setattr(Clock, "session", property(lambda self: late["now"]))

    def on_event(event):
        if isinstance(event, Logged) and event.step == 3:
            late["now"] = 61.0

    events = []
    summary = train(tiny(tmp_path, "run", max_wall_s=60), Hooks(on_event=lambda e: (events.append(e), on_event(e))))
    assert summary["status"] == "stopped" and summary["steps"] == 3
    assert summary["stop_reason"] == "wall time limit (60 s)"
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "stopped" and manifest["stop_reason"] == "wall time limit (60 s)"
    assert manifest["checkpoint_step"] == 3 and (tmp_path / "run" / "model.safetensors").is_file()
    assert RunInfo(tmp_path / "run", manifest).resumable
    assert isinstance(events[-1], Finished)


def test_data_too_small_fails_before_the_run_starts(tmp_path, monkeypatch):
    assert records_needed(8) == 10 and records_needed(16) == 19
    with pytest.raises(DatasetError, match=r"has 5 records: its training split \(85 %\) has 4, fewer than one step of batch 8; "
                                           r"use more records \(a smaller batch leaves the test split empty\): .* needs at least 10 records"):
        check_data(tiny(tmp_path, "x", data=small_data(tmp_path, 5), batch_size=8))
    with pytest.raises(DatasetError, match=r"has 12 records: its training split \(85 %\) has 10, fewer than one step of batch 16; "
                                           r"use a smaller batch, or more records: .* needs at least 19 records"):
        check_data(tiny(tmp_path, "x", data=small_data(tmp_path, 12), batch_size=16))
    monkeypatch.setattr("training.distributed.context", lambda: Context(0, 2))  # torchrun: each process its own batches
    with pytest.raises(DatasetError, match=r"has 12 records: its training split \(85 %\) has 10, fewer than one step of batch 8 "
                                           r"x 2 processes; use a smaller batch, or more records: .* needs at least 19 records"):
        check_data(tiny(tmp_path, "x", data=small_data(tmp_path, 12), batch_size=8))
    monkeypatch.undo()
    with pytest.raises(DatasetError, match=r"data-9.json has 9 records: its test \(10 %\) split is empty; .* at least 10 records"):
        check_data(tiny(tmp_path, "x", data=small_data(tmp_path, 9), batch_size=2))
    records, split = check_data(tiny(tmp_path, "x", data=small_data(tmp_path, 10), batch_size=8))
    assert len(records) == 10 and (len(split.train), len(split.test), len(split.val)) == (8, 1, 1)
    events = []
    with pytest.raises(DatasetError, match=r"test \(10 %\) split is empty"):
        train(tiny(tmp_path, "never", data=small_data(tmp_path, 9), batch_size=2), Hooks(on_event=events.append))
    assert not any(isinstance(e, Started) for e in events) and not (tmp_path / "never").exists()


# Recovery


def write_running(path: Path, owner: dict | None) -> None:
    path.mkdir(parents=True)
    writer = RunWriter(path)
    writer.update_manifest(status="running", owner=owner, config={})
    for step in range(4):
        writer.log({"step": step, "train_loss": 1.0})
    writer.close()


def test_recovery_marks_only_runs_whose_process_is_gone(tmp_path):
    me = process_owner()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {**me, "pid": sleeper.pid, "process_started": psutil.Process(sleeper.pid).create_time()}
        write_running(tmp_path / "other-live-process", alive)
        write_running(tmp_path / "pid-reused", {**alive, "process_started": alive["process_started"] - 100})
        write_running(tmp_path / "other-host", {**alive, "host": socket.gethostname() + "-old"})
        write_running(tmp_path / "no-owner", None)
        write_running(tmp_path / "this-process-not-writing", me)
        write_running(tmp_path / "this-process-writing", me)
        writer = RunWriter(tmp_path / "this-process-writing", resume_step=3)  # open: a run this process is training
        done = tmp_path / "done"
        done.mkdir()
        done_writer = RunWriter(done)
        done_writer.update_manifest(status="done", steps=9)
        done_writer.close()

        recovered = recover_runs(tmp_path)
        assert sorted(r.name for r in recovered) == ["no-owner", "other-host", "pid-reused", "this-process-not-writing"]
        for run in recovered:
            manifest = read_manifest(run.path)
            assert manifest["status"] == "interrupted" and manifest["steps"] == 3 and manifest["ended"]
            assert run.last_step == 3 and not run.resumable  # no checkpoint
        statuses = {r.name: r.status for r in list_runs(tmp_path)}
        assert statuses["other-live-process"] == statuses["this-process-writing"] == "running"
        assert statuses["done"] == "done" and find_run("done", tmp_path).last_step == 9
        writer.close()
        assert [r.name for r in recover_runs(tmp_path)] == ["this-process-writing"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [r.name for r in recover_runs(tmp_path)] == ["other-live-process"]
    assert recover_runs(tmp_path) == []


def test_kill_9_mid_run_then_recover_gives_an_interrupted_run_that_resumes(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "GPT2_INSTRUCT_RUNS": str(runs)}
    cli = [sys.executable, "-m", "training", "--model", "tiny", "--random-init", "--data", "sample", "--batch-size", "2",
           "--max-steps", "6", "--checkpoint-every", "2", "--eval-every", "100", "--eval-batches", "1", "--sample-tokens", "0",
           "--out", str(runs / "killed")]
    proc = subprocess.Popen(cli, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (runs / "killed" / CHECKPOINT).exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest(runs / "killed")["status"] == "running"  # what a killed process leaves

    recovered = recover_runs(runs)
    assert [r.name for r in recovered] == ["killed"]
    run = recovered[0]
    last = read_metrics(runs / "killed")[-1]["step"]
    assert run.status == "interrupted" and run.last_step == last >= 2 and run.resumable
    assert read_manifest(runs / "killed")["steps"] == last

    out = subprocess.run([sys.executable, "-m", "training", "--resume", "killed"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "done: 6 steps" in out.stdout
    manifest = read_manifest(runs / "killed")
    assert manifest["status"] == "done" and manifest["steps"] == 6 and len(manifest["resumed_from_step"]) == 1
    assert manifest["resumed_from_step"][0] % 2 == 0 and manifest["resumed_from_step"][0] <= last
    assert [r["step"] for r in read_metrics(runs / "killed")] == list(range(7))

    again = subprocess.run([sys.executable, "-m", "training", "--resume", str(runs / "killed")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "killed is done (6 steps): there is nothing to resume" in again.stderr


def test_a_run_another_process_uses_is_neither_resumed_nor_deleted_until_it_has_ended(tmp_path):
    """Two processes on one runs folder (two apps, the app and a command line): both resumed one stopped run at once,
    each writing over the other, and the app's runs budget deleted a run a command line was evaluating."""
    from evaluation.evaluate import evaluate_run
    from runstore import RunBusy
    from runstore.export import export_zip

    train(tiny(tmp_path, "stopped", max_steps=4), stop_after(1))
    run = tmp_path / "stopped"
    config = resume_config(run)  # checked just before another process took the run
    with held_elsewhere(run):
        with pytest.raises(ResumeError, match="stopped is in use by another process or job right now"):
            resume_config(run)  # what the app and the command lines check before they start
        with pytest.raises(ResumeError, match="stopped is in use by another process or job right now"):
            train(config, resume=run)  # the resume itself, under the run's lock from before its checks
        with pytest.raises(RunBusy, match="stopped is trained or resumed by another process or job right now: .* evaluate it"):
            evaluate_run(run, limit=1)
        with pytest.raises(RunBusy, match="export it"):
            export_zip(run, tmp_path / "stopped.zip")
        assert prune_runs(tmp_path, 0) == []
    assert read_manifest(run)["status"] == "stopped" and not (run / "eval_summary.json").exists()
    with held_elsewhere(run, shared=True):  # an evaluation in another process
        with pytest.raises(ResumeError, match="in use by another process"):
            resume_config(run)
        assert prune_runs(tmp_path, 0) == []
        assert export_zip(run, tmp_path / "stopped.zip").is_file()  # readers share the run
    with held_elsewhere(run):  # torchrun's ranks other than 0 check the run rank 0 has already taken
        assert resume_config(run, held=True) == config
    assert resume_run(run)["status"] == "done"  # the other process has ended: its lock went with it
    assert prune_runs(tmp_path, 0) == ["stopped"]


def test_a_run_that_fails_before_its_loop_lets_go_of_its_lock(tmp_path, monkeypatch):
    from runstore import in_use, store

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "write_atomic", disk_full)  # the first manifest write, before the loop's own try
    with pytest.raises(OSError, match="No space left on device"):
        train(tiny(tmp_path, "run", max_steps=1))
    assert not in_use(tmp_path / "run")


def test_a_file_system_without_locks_locks_nothing_and_refuses_nothing(tmp_path, monkeypatch):
    import errno
    import fcntl

    from runstore import hold_run, in_use

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with hold_run(tmp_path):
        assert not in_use(tmp_path)


def test_the_app_sees_a_run_whose_process_died_and_starts_beside_runs_it_cannot_write(tmp_path, monkeypatch):
    """A command line killed while the app is up: its run showed "running", not resumable, until the app restarted;
    a stale run in a read-only runs folder, or a manifest that is JSON but not an object, stopped the app starting."""
    from engine import Engine
    from runstore import store

    engine = Engine(root=tmp_path)
    write_running(tmp_path / "killed", {**process_owner(), "host": socket.gethostname() + "-gone"})
    write_running(tmp_path / "elsewhere", {**process_owner(), "host": "another-container"})  # on the same volume
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "manifest.json").write_text("[]")

    def read_only(*args):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(store, "write_atomic", read_only)
    assert Engine(root=tmp_path).recovered == []
    assert {r.name: r.status for r in engine.runs()} == {"killed": "running", "elsewhere": "running", "damaged": "unknown"}
    monkeypatch.undo()
    with held_elsewhere(tmp_path / "elsewhere"):  # its process is alive, whatever host name it recorded
        assert {r.name: r.status for r in engine.runs()} == {"killed": "interrupted", "elsewhere": "running",
                                                             "damaged": "unknown"}
    assert read_manifest(tmp_path / "killed")["status"] == "interrupted"
    assert {r.name: r.status for r in engine.runs()}["elsewhere"] == "interrupted"  # once it has gone


def test_metrics_grow_a_line_a_step_and_a_half_written_last_line_is_left_out(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.update_manifest(status="running")
    for step in range(3):
        writer.log({"step": step, "train_loss": 1.0})
    path = tmp_path / "run" / "metrics.jsonl"
    inode = path.stat().st_ino
    writer.log({"step": 3, "train_loss": 1.0})
    assert path.stat().st_ino == inode  # appended to, not written anew each step
    with open(path, "a") as f:
        f.write('{"step": 4, "train_lo')  # a reader between the two halves of a write, or a crash
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2, 3]
    writer.close()  # its process has ended
    resumed = RunWriter(tmp_path / "run", resume_step=2)
    resumed.log({"step": 3, "train_loss": 0.5})
    assert read_metrics(tmp_path / "run") == [{"step": 0, "train_loss": 1.0}, {"step": 1, "train_loss": 1.0},
                                              {"step": 2, "train_loss": 1.0}, {"step": 3, "train_loss": 0.5}]


def test_a_run_that_ends_while_it_is_checked_for_recovery_stays_done(tmp_path, monkeypatch):
    """recover_run reads "running", then asks whether the owner is alive: a run of this process ending in between
    (manifest "done", writer closed) must not be overwritten as interrupted."""
    import threading

    from runstore import store

    writer = RunWriter(tmp_path / "run")
    writer.update_manifest(status="running", owner=process_owner())
    writer.log({"step": 1})
    checking, alive = threading.Event(), store.owner_alive

    def slow_owner_alive(owner, run_dir):
        checking.set()
        time.sleep(0.3)  # the job thread ends meanwhile, if it can
        return alive(owner, run_dir)

    monkeypatch.setattr(store, "owner_alive", slow_owner_alive)
    monkeypatch.setattr(store, "in_use", lambda path: False)  # as where there are no locks: the owner's liveness decides
    recovering = threading.Thread(target=store.recover_run, args=(tmp_path / "run",))
    recovering.start()
    assert checking.wait(10)
    writer.update_manifest(status="done", steps=1, final_val_loss=0.5)
    writer.close()
    recovering.join(10)
    assert read_manifest(tmp_path / "run")["status"] == "done"


def test_a_damaged_metrics_file_loses_its_bad_rows_not_the_app(tmp_path):
    """A disk or copy error in one run's metrics.jsonl kept the app from starting (recovery read every row)."""
    run = tmp_path / "runs" / "20260101-000000-tiny"
    writer = RunWriter(run)
    writer.update_manifest(status="running", owner={"pid": 2**22 + 7, "host": socket.gethostname()})
    for step in range(4):
        writer.log({"step": step, "train_loss": 1.0})
    writer.close()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:9] + "\x00\x00garbage"
    (run / "metrics.jsonl").write_text("\n".join(lines + ["[1, 2]", '{"step": "x"}']) + "\n")
    assert [r["step"] for r in read_metrics(run)] == [0, 2, 3]
    assert [r.name for r in recover_runs(tmp_path / "runs")] == [run.name]
    assert read_manifest(run)["status"] == "interrupted" and read_manifest(run)["steps"] == 3


# Disk


def test_runs_are_listed_newest_started_first_whatever_their_names(tmp_path):
    """A run named on the command line (``--out x``) sorts after timestamped names, but is listed by when it started;
    one whose manifest is damaged, by when that file was written."""
    def run(name: str, manifest: str, mtime: float) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(manifest)
        os.utime(tmp_path / name / "manifest.json", (mtime, mtime))

    noon = datetime(2026, 12, 1, 12, tzinfo=timezone.utc).timestamp()
    run("x", json.dumps({"status": "done", "started": "2026-12-01T11:33:17+00:00"}), noon)
    run("20261201-120955-tiny", json.dumps({"status": "done", "started": "2026-12-01T12:09:55+00:00"}), noon)
    run("20261201-121502-tiny", json.dumps({"status": "done", "started": "2026-12-01T12:15:02+00:00"}), noon)
    run("damaged", "{not json", noon - 3600)  # written at 11:00
    assert [r.name for r in list_runs(tmp_path)] == ["20261201-121502-tiny", "20261201-120955-tiny", "x", "damaged"]
    assert prune_runs(tmp_path, 0) == ["damaged", "x", "20261201-120955-tiny", "20261201-121502-tiny"]


def test_pruning_drops_the_oldest_ended_runs_and_keeps_what_is_in_use(tmp_path):
    """Runs of 1 MB each under a 3.5 MB budget: the oldest ended ones go first; a running run, a kept one and the parent
    of a kept preference-tuning run stay, and a parent goes once its last aligned child has gone."""
    def run(name: str, started: str, status: str = "done", **manifest) -> None:
        path = tmp_path / name
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"w" * 1_000_000)
        (path / "manifest.json").write_text(json.dumps({"status": status, "started": started, **manifest}))

    run("a-parent", "2026-01-01T00:00:00")
    run("b-running", "2026-01-02T00:00:00", "running")
    run("c-kept", "2026-01-03T00:00:00", "stopped")
    run("d-aligned", "2026-01-04T00:00:00", parent_run="a-parent")
    run("e-old", "2026-01-05T00:00:00", "failed")
    run("f-new", "2026-01-06T00:00:00")
    assert prune_runs(tmp_path, 10e6, keep={"c-kept"}) == []  # within the budget: nothing goes
    assert prune_runs(tmp_path, 3.5e6, keep={"c-kept"}) == ["d-aligned", "a-parent", "e-old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-running", "c-kept", "f-new"]
    assert prune_runs(tmp_path, 0, keep={"c-kept"}) == ["f-new"]  # even the newest, when the budget says so
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-running", "c-kept"]
