"""Data-parallel training under torchrun (gloo on CPU): the same run as one process, and failures end every rank."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data import InstructionDataset, load_instructions, make_loader, split_instructions
from model.tokenizer import EOT_ID
from runstore import read_manifest, read_metrics
from training import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--random-init", "--data", "sample", "--max-steps", "6", "--eval-every", "3",
        "--eval-batches", "2", "--sample-tokens", "0", "--lr", "1e-3"]

# Runs rank 1 into a fault at step 2 (0-based): FAULT=kill (SIGKILL), raise (an exception), stop (SIGTERM: a stop request).
WORKER = """
import os, signal, sys, time
from training import cli, loop

lr_at = loop.lr_at

def faulty_lr_at(step, config, total_steps):
    if os.environ["RANK"] == "1" and step == 2:
        fault = os.environ["FAULT"]
        if fault == "kill":
            with open(os.environ["FAULT_MARK"], "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "raise":
            raise RuntimeError("injected failure on rank 1")
        if fault == "stop":
            os.kill(os.getpid(), signal.SIGTERM)
    return lr_at(step, config, total_steps)

loop.lr_at = faulty_lr_at
sys.exit(cli.main(sys.argv[1:]))
"""


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def torchrun(args: list[str], nproc: int = 2, timeout: float = 120, **extra_env) -> subprocess.CompletedProcess:
    """``args`` under torchrun; its log folder (``torchelastic_*``, in the temp folder) is removed afterwards."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    with tempfile.TemporaryDirectory(prefix="torchrun-") as tmp:
        return subprocess.run(command, cwd=REPO, env=env(TMPDIR=tmp, **extra_env), capture_output=True, text=True,
                              timeout=timeout)


def one_process(out: Path, **overrides) -> dict:
    """The reference run, in this process, on one thread like each torchrun worker."""
    values = dict(model="tiny", random_init=True, data="sample", max_steps=6, eval_every=3, eval_batches=2,
                  sample_tokens=0, lr=1e-3, out=str(out))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig(**{**values, **overrides}))
    finally:
        torch.set_num_threads(threads)


def losses(run: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run) if r[key] is not None]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_same_weights(run: Path, reference: Path, tolerance: float, overall: float | None = None) -> None:
    """Every tensor within ``tolerance`` (relative norm), the whole model within ``overall``,
    but the key third of each attention bias.

    That third's gradient is zero in exact arithmetic (softmax ignores a constant added to
    every key's score), so AdamW turns rounding noise into updates of ~1e-2 * lr whatever
    the order of the sums; it stays that small in both runs.
    """
    ours, theirs = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    diff = norm = 0.0
    for name in ours:
        a, b = ours[name], theirs[name]
        if name.endswith("attn.c_attn.bias"):
            n = len(a) // 3
            assert a[n:2 * n].abs().max() < 1e-2 and b[n:2 * n].abs().max() < 1e-2, name
            a, b = torch.cat([a[:n], a[2 * n:]]), torch.cat([b[:n], b[2 * n:]])
        assert relative(a, b) < tolerance, (name, relative(a, b))
        diff += float((a - b).norm() ** 2)
        norm += float(b.norm() ** 2)
    assert (diff / norm) ** 0.5 < (overall or tolerance)


@pytest.mark.parametrize("grouped", [True, False])
def test_each_rank_takes_its_share_of_the_global_batches_of_one_process(grouped):
    """2 ranks with batch 3 see exactly the batches of 6 that one process draws, both samplers, two epochs."""
    dataset = InstructionDataset(split_instructions(load_instructions("sample")).train)

    def rows(x):
        return [tuple(row.tolist()) for row in x]

    def strip(row):
        while row and row[-1] == EOT_ID:
            row = row[:-1]
        return row

    whole = make_loader(dataset, 6, grouped=grouped, seed=7)
    shards = [make_loader(dataset, 3, grouped=grouped, seed=7, rank=r, world_size=2) for r in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == len(dataset) // 6
    for _ in range(2):
        for (x, _), (x0, _), (x1, _) in zip(whole, *shards, strict=True):
            interleaved = [row for pair in zip(rows(x0), rows(x1)) for row in pair]
            assert [strip(r) for r in rows(x)] == [strip(r) for r in interleaved]
    if grouped:  # a resumed run puts the shards back at an epoch as it would the whole loader
        assert shards[0].batch_sampler.epoch == whole.batch_sampler.epoch == 2
        for loader in (whole, *shards):
            loader.batch_sampler.set_epoch(0)
        x, _ = next(iter(whole))
        x0, _ = next(iter(shards[0]))
        assert [strip(r) for r in rows(x)[::2]] == [strip(r) for r in rows(x0)]


def test_two_processes_train_like_one_with_the_whole_batch(tmp_path):
    """fp32: 2 gloo ranks with batch 2 against 1 process with batch 4, 6 steps: losses and the weights agree to 1e-5.

    The 1-process run steps AdamW inside backward; under DDP it steps after the reduced gradients.
    """
    started = time.perf_counter()
    result = torchrun(["-m", "training", *TINY, "--precision", "fp32", "--batch-size", "2", "--out", str(tmp_path / "ddp")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (gloo) x batch 2 x 1 accumulation: global batch 4" in result.stdout
    one_process(tmp_path / "one", batch_size=4, precision="fp32")
    assert time.perf_counter() - started < 60

    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one"]  # no other rank wrote a run
    manifest = read_manifest(ddp)
    assert manifest["status"] == "done" and manifest["processes"] == 2 and manifest["global_batch"] == 4
    assert read_manifest(one)["global_batch"] == 4
    for key in ("train_loss", "val_loss"):
        a, b = losses(ddp, key), losses(one, key)
        assert len(a) == len(b) == (7 if key == "train_loss" else 3)
        assert a == pytest.approx(b, rel=1e-5), key
    assert losses(ddp, "train_loss")[-1] < losses(ddp, "train_loss")[0] - 0.5  # it learned
    # The whole model to 1e-5; a tensor alone to 1e-2: AdamW's first steps move an element by about lr whatever
    # its gradient's size, so an element whose gradient is near zero (a LayerNorm bias, which starts at zero, for
    # some initial weights) turns the different order of the two processes' sums into a visible relative
    # difference (1.1e-3 for one such bias on an AVX2 CPU, 2e-6 for the model). A rank that trained on its own
    # half of the batch, as without the all-reduce, differs by ~0.5 in its biases and by 4e-2 as a whole.
    assert_same_weights(ddp, one, 1e-2, overall=1e-5)


def test_bf16_with_accumulation_agrees_with_one_process(tmp_path):
    """bf16 compute with fp32 master weights, 2 micro-batches a step (gradients reduced once a step).

    Three steps, not six: bf16 on a CPU without native bf16 takes ~0.2 s a row.
    """
    result = torchrun(["-m", "training", *TINY, "--precision", "bf16", "--batch-size", "1", "--grad-accum", "2",
                       "--max-steps", "3", "--out", str(tmp_path / "ddp")])
    assert result.returncode == 0, result.stderr[-3000:]
    one_process(tmp_path / "one", batch_size=2, grad_accum=2, precision="bf16", max_steps=3)
    assert read_manifest(tmp_path / "ddp")["global_batch"] == 4
    a, b = losses(tmp_path / "ddp", "train_loss"), losses(tmp_path / "one", "train_loss")
    assert a == pytest.approx(b, rel=2e-3)
    # bf16 gradients (3 significant digits) are summed across ranks in bf16: biases, which start at zero and so
    # are all update, differ by up to 0.07 (emulated bf16) and 0.10 (native AVX512-BF16: one LayerNorm bias), the
    # model as a whole by ~1e-3. Ranks that never reduce their gradients differ by 0.54-0.58 in their biases, 3e-2
    # as a whole.
    assert_same_weights(tmp_path / "ddp", tmp_path / "one", 0.25, overall=5e-3)


def fault_run(tmp_path: Path, fault: str) -> subprocess.CompletedProcess:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    return torchrun([str(worker), *TINY, "--precision", "fp32", "--batch-size", "2", "--out", str(tmp_path / "run")],
                      FAULT=fault, FAULT_MARK=str(tmp_path / "fault"))


def test_a_failing_rank_ends_the_others_with_its_error(tmp_path):
    result = fault_run(tmp_path, "raise")
    assert result.returncode != 0
    assert "error: rank 0: rank 1 failed: RuntimeError: injected failure on rank 1" in result.stderr
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "failed"
    assert manifest["error"] == "rank 1 failed: RuntimeError: injected failure on rank 1"


def test_a_killed_rank_ends_the_others_within_30_s(tmp_path):
    result = fault_run(tmp_path, "kill")
    ended = time.time()
    assert result.returncode != 0
    assert "Signal 9 (SIGKILL)" in result.stderr  # torchrun names the rank that died and how
    assert ended - float((tmp_path / "fault").read_text()) < 30
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "failed" and manifest["error"].startswith("another rank ended without an error of its own")


def test_a_stop_request_on_one_rank_stops_every_rank_and_saves(tmp_path):
    result = fault_run(tmp_path, "stop")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "stopped" and manifest["steps"] == 3
    assert (tmp_path / "run" / "model.safetensors").is_file()
