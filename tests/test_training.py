"""The fine-tuning engine: loop, mixed precision, LoRA, the background job, runs on disk, the CLI."""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data import InstructionDataset, load_instructions, make_loader, source_path, split_instructions
from model import GPT, GPTConfig, load_pretrained, pick_device, save_pretrained
from model import fused
from model.loss import Packing, TiedHeadCrossEntropy
from model.device import precision_reason
from runstore import list_runs, load_run, read_manifest, read_metrics
from training import TrainConfig, train
from training.config import ConfigError
from training.events import Logged, Started
from training.loop import Hooks
from training.lora import LoRALinear, add_lora, count_trainable, merge_lora
from training.optim import MasterWeightAdamW, join_, split_

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(model="tiny", random_init=True, data="sample", max_steps=6, eval_every=3, eval_batches=2,
                  sample_tokens=8, out=str(tmp_path / "run"), lr=1e-3)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def batches():
    split = split_instructions(load_instructions("sample"))
    loader = make_loader(InstructionDataset(split.train), batch_size=8)
    return list(loader)


def unpadded(x, y):
    """The batch with every row's last position scored: nothing for ``Packing`` to drop."""
    y = y.clone()
    y[:, -1] = x[:, -1]
    return x, y


def one_row_unscored(x, y):
    y = y.clone()
    y[1] = -100
    return x, y


@pytest.mark.parametrize("variant,block_rows", [(None, 512), (unpadded, 512), (one_row_unscored, 512), (None, 48)])
def test_fused_head_loss_and_gradients_equal_the_books_loss(batches, variant, block_rows, monkeypatch):
    """model.loss (LM head only on targets, gradients made in the forward pass, rows cut after their last
    target) against full logits + cross_entropy; with 48-row blocks the head takes several."""
    monkeypatch.setattr(TiedHeadCrossEntropy, "BLOCK_ROWS", block_rows)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    x, y = variant(*batches[0]) if variant else batches[0]
    packing = Packing.of(y)
    assert (packing is None) == (variant is unpadded)
    if packing is not None:
        prefixes = [int(row.nonzero().max()) + 1 if row.any() else 0 for row in y != -100]
        assert len(packing.index) == sum(prefixes) < y.numel()
    ours = model.loss(x, y)
    ours.backward()
    ours_grads = {n: p.grad.to_dense().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    book = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    book.backward()
    assert abs(ours.item() - book.item()) < 1e-5
    for name, p in model.named_parameters():
        assert torch.allclose(ours_grads[name], p.grad.to_dense(), atol=1e-6, rtol=1e-4), name
    with torch.no_grad():
        assert abs(model.loss(x, y).item() - book.item()) < 1e-5


def twin_tiny_models() -> tuple[GPT, GPT]:
    """Two tiny models with the same weights (seed 0): one for ours, one for torch's AdamW."""
    torch.manual_seed(0)
    a = GPT(GPTConfig.from_name("tiny"))
    b = GPT(GPTConfig.from_name("tiny"))
    b.load_state_dict(a.state_dict())
    return a, b


def give_same_random_grads(a: GPT, b: GPT) -> None:
    """Random gradients on ``a``'s parameters in their dtype (bf16 where they are compute copies), the same
    values on ``b``'s in theirs."""
    for p, q in zip(a.parameters(), b.parameters()):
        p.grad = torch.randn_like(p, dtype=torch.float32).to(p.dtype)
        q.grad = p.grad.to(q.dtype, copy=True)


@pytest.mark.parametrize("onednn", [True, False] if fused.ONEDNN else [False])
def test_step_in_backward_matches_plain_adamw(batches, monkeypatch, onednn):
    """fp32: AdamW stepping each tensor inside backward gives the weights of torch's AdamW after the backward,
    while the tied weight's gradient buffer is kept and overwritten at every step; so is the head's logits block
    where ``torch.mm`` makes the logits (oneDNN's matmul makes its own)."""
    monkeypatch.setattr(fused, "ONEDNN", onednn)
    a, b = twin_tiny_models()
    ours = MasterWeightAdamW(a, torch.float32, lr=1e-3, weight_decay=0.1)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    assert b.tied_grad_buffer is None
    reused = []
    for x, y in batches[:3]:
        a.loss(x, y).backward()
        assert all(p.grad is None for p in a.parameters())  # freed as soon as used
        block = a.tied_grad_buffer.block
        assert (block is None) == onednn
        reused.append((a.tied_grad_buffer.grad.data_ptr(), None if onednn else block.data_ptr()))
        b.loss(x, y).backward()
        plain.step()
        plain.zero_grad()
    assert len(set(reused)) == 1
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    ours.finish()
    assert a.tied_grad_buffer is None


def rows_of(batch, count=2):
    """A batch's first rows: bf16 steps on a CPU without native bf16 take ~0.2 s a row (tiny model)."""
    return tuple(t[:count] for t in batch)


def test_bf16_compute_keeps_fp32_masters(batches):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("tiny"))
    optimizer = MasterWeightAdamW(model, torch.bfloat16, lr=1e-3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    before = {n: p.float().clone() for n, p in model.named_parameters()}
    for x, y in map(rows_of, batches[:2]):
        model.loss(x, y).backward()
    finished = optimizer.finish()
    assert all(p.dtype == torch.float32 for p in finished.parameters())
    moved = [n for n, p in finished.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)


def test_split_master_rebuilds_fp32_exactly():
    """bf16 high half + int16 low half give back every fp32 bit pattern; the high half is the rounded value."""
    torch.manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 3.4e38, -3.4e38, 0.1, -0.1])
    ties = (torch.arange(-1000, 1000, dtype=torch.int32) * 0x10000 + 0x8000).view(torch.float32)
    full = torch.cat([torch.randn(100_000) * 10.0 ** torch.randint(-8, 4, (100_000,)), special, ties])
    high = torch.empty_like(full, dtype=torch.bfloat16)
    low = torch.empty_like(full, dtype=torch.int16)
    scratch = torch.empty_like(full, dtype=torch.int32)
    split_(full, high, low, scratch)
    assert torch.equal(join_(high, low, torch.empty_like(full), scratch).view(torch.int32), full.view(torch.int32))
    assert torch.equal(low.int(), full.view(torch.int32) - high.view(torch.int16).int() * 0x10000)
    not_tie = (full.view(torch.int32) & 0xFFFF) != 0x8000
    assert torch.equal(high[not_tie], full[not_tie].to(torch.bfloat16))


def test_bf16_compute_steps_like_fp32_adamw():
    """Given the same gradients, the split fp32 masters end bit for bit where torch's fp32 AdamW does."""
    a, b = twin_tiny_models()
    ours = MasterWeightAdamW(a, torch.bfloat16, lr=1e-3, weight_decay=0.1, step_in_backward=False)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    for _ in range(3):
        give_same_random_grads(a, b)
        ours.step()
        plain.step()
    ours.finish()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q), name


def test_the_direct_fused_kernel_steps_as_torchs_own_step():
    """``MasterWeightAdamW`` calls torch's fused AdamW kernel itself; through ``torch.optim``'s step (the path of
    devices without a fused kernel) the weights end the same, bit for bit, in bf16 and in fp32, as the lr changes."""
    for dtype in (torch.bfloat16, torch.float32):
        a, b = twin_tiny_models()
        before = a.transformer.h[0].mlp.c_fc.weight.detach().clone()
        direct = MasterWeightAdamW(a, dtype, lr=1e-3, weight_decay=0.1, step_in_backward=False)
        through_torch = MasterWeightAdamW(b, dtype, lr=1e-3, weight_decay=0.1, step_in_backward=False, through_torch=True)
        for step in range(3):
            direct.lr = through_torch.lr = 1e-3 / (step + 1)
            give_same_random_grads(a, b)
            direct.step()
            through_torch.step()
        direct.finish()
        through_torch.finish()
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), (dtype, name)
        assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, before)


def test_making_loading_a_model_and_its_optimizer_imports_no_compiler_and_no_sympy(tmp_path):
    """``torch._dynamo`` costs 1.4-2.3 s of a process's start and sympy 0.4-0.6 s, and nothing here compiles: neither
    the model's meta-device construction (``normal_`` on a meta tensor imports the first, ``to_empty`` the second),
    its loading, nor the optimizer (``torch.optim.Optimizer`` imports the first) brings them in."""
    save_pretrained(GPT(GPTConfig.from_name("tiny")), tmp_path / "m")
    script = f"""
import sys, torch
from model import GPT, GPTConfig, load_pretrained
from model.gpt import init_generator
from training.optim import MasterWeightAdamW
model = GPT(GPTConfig.from_name("tiny"), init_generator(0))
MasterWeightAdamW(model, torch.float32)
load_pretrained({str(tmp_path / "m")!r})
print("torch._dynamo" in sys.modules, "sympy" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_bf16_and_fp32_losses_agree(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        # Batches of 2: bf16 on a CPU without native bf16 takes ~0.2 s a row.
        config = tiny_config(tmp_path, precision=precision, epochs=3, max_steps=10, eval_every=5, batch_size=2,
                             out=str(tmp_path / precision))
        train(config)
        runs[precision] = read_metrics(tmp_path / precision)
    for a, b in zip(runs["fp32"], runs["bf16"]):
        assert a["step"] == b["step"]
        assert abs(a["train_loss"] - b["train_loss"]) / a["train_loss"] < 0.02
    final = [r[-1]["val_loss"] for r in runs.values()]
    assert abs(final[0] - final[1]) / final[0] < 0.02


def test_loss_decreases_on_the_tiny_model(tmp_path):
    summary = train(tiny_config(tmp_path, epochs=6, max_steps=20, eval_every=5, eval_batches=3))
    metrics = read_metrics(tmp_path / "run")
    evals = [m["val_loss"] for m in metrics if m["val_loss"] is not None]
    assert len(evals) == 5  # the baseline, then every 5 steps
    assert evals == sorted(evals, reverse=True) and evals[-1] < evals[0] - 1.5
    assert summary["status"] == "done" and summary["steps"] == 20


def test_run_on_disk(tmp_path):
    config = tiny_config(tmp_path)
    summary = train(config)
    run = tmp_path / "run"
    manifest = read_manifest(run)
    assert manifest["status"] == "done"
    assert manifest["config"]["lr"] == config.lr and manifest["seed"] == 123
    assert manifest["data"]["split"] == {"train": 62, "val": 5, "test": 7}
    assert manifest["data"]["sha256"] == hashlib.sha256(source_path("sample").read_bytes()).hexdigest()
    assert {"torch", "python", "tiktoken"} <= set(manifest["versions"])
    for key in ("device", "started", "ended", "wall_time_s", "final_train_loss", "final_val_loss", "peak_rss_mb"):
        assert manifest[key] is not None, key
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(0, 7))
    for m in metrics:
        assert {"step", "tokens_seen", "train_loss", "val_loss", "lr", "tokens_per_s"} <= set(m)
    assert metrics[-1]["tokens_seen"] == summary["tokens_seen"] > 0
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*"))
    assert [r.path for r in list_runs(tmp_path)] == [run]


def test_saved_run_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import GPT2LMHeadModel

    train(tiny_config(tmp_path))
    ours = load_run(tmp_path / "run")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "run").eval()
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4


def test_lora_trains_only_adapters_and_the_merged_save_gives_its_outputs(tmp_path, batches):
    torch.manual_seed(0)
    model = add_lora(GPT(GPTConfig.from_name("tiny")), rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert count_trainable(model)[0] == 4 * 4 * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = MasterWeightAdamW(model, torch.float32, lr=1e-2)
    for x, y in batches[:3]:
        model.loss(x, y).backward()
    optimizer.finish()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert any(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        adapted = model(idx)

    save_pretrained(merge_lora(model), tmp_path / "merged")
    merged = load_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (merged(idx) - adapted).abs().max().item() < 1e-4


def test_lora_run_through_the_engine(tmp_path):
    summary = train(tiny_config(tmp_path, lora_rank=4))
    assert summary["status"] == "done"
    manifest = read_manifest(tmp_path / "run")
    assert manifest["model"]["trainable_parameters"] < manifest["model"]["parameters"] / 10
    assert load_run(tmp_path / "run").num_params() == manifest["model"]["parameters"] - manifest["model"]["trainable_parameters"]


def test_clipping_and_accumulation_path(tmp_path):
    summary = train(tiny_config(tmp_path, grad_clip=1.0, grad_accum=2, batch_size=4, warmup_steps=2, cosine=True))
    metrics = read_metrics(tmp_path / "run")
    assert summary["steps"] == 6
    assert metrics[0]["lr"] == metrics[1]["lr"] == pytest.approx(1e-3 / 2)  # first warmup step, and the row before it
    assert metrics[0]["eta_s"] is None and metrics[1]["eta_s"] > 0  # not an ETA before one step has been timed
    assert metrics[-1]["lr"] < 1e-3
    assert metrics[-1]["tokens_seen"] > 0


def test_the_offline_demo_settings_are_a_run_on_the_sample_with_the_prompt_masked():
    from training.config import DEMO

    config = TrainConfig(**DEMO)
    assert (config.model, config.random_init, config.data, config.mask_prompt) == ("tiny", True, "sample", True)
    assert config.lr > TrainConfig().lr and config.epochs > 1


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="batch_size must be between 1 and 512, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="lr must be in"):
        TrainConfig(lr=-1)
    with pytest.raises(ConfigError, match="unknown settings: foo"):
        TrainConfig.from_dict({"foo": 1})
    for name in ("max_steps", "max_length", "eval_batches"):  # optional whole numbers, default None or not
        with pytest.raises(ConfigError, match=f"{name} must be a whole number, got 100.5"):
            TrainConfig(**{name: 100.5})
    assert TrainConfig(max_steps=3.0, lr=1e-4).max_steps == 3  # a whole float is fine, a float setting too
    with pytest.raises(ConfigError, match=r"lora_alpha must be in \(0, 4096\], got 1e\+308"):
        TrainConfig(lora_rank=4, lora_alpha=1e308)  # it trained, into "loss became nan: lower the learning rate"
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=f"lora_alpha must be a finite number, got {value}"):
            TrainConfig(lora_alpha=value)  # nan passes every range comparison
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device cuda: this PyTorch sees 0 CUDA GPU"):
            TrainConfig(device="cuda")


# The CLI


def test_cli_runs_headless(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "training", "--model", "tiny", "--random-init", "--data", "sample", "--max-steps", "3",
         "--eval-every", "2", "--out", str(tmp_path / "cli")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "done: 3 steps" in out.stdout
    assert f"precision {precision_reason(pick_device())}\n" in out.stdout
    assert read_manifest(tmp_path / "cli")["data"]["sha256"]
    assert (tmp_path / "cli" / "model.safetensors").is_file()


def test_cli_ctrl_c_stops_saves_and_leaves_a_resumable_run_and_out_never_overwrites(tmp_path):
    import signal
    import time

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "training", "--model", "tiny", "--random-init", "--data", "sample", "--epochs", "100",
           "--eval-every", "1000", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(read_metrics(out)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopping at the next step and saving" in stderr and "stopped (stopped by its owner)" in stdout
    manifest = read_manifest(out)
    assert manifest["status"] == "stopped" and (out / "model.safetensors").is_file() and (out / "checkpoint.pt").is_file()

    again = subprocess.run(cmd[:-6] + ["--max-steps", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.strip() == (f"error: {out} already holds files: --out must name a new or "
                                                               "empty folder (to continue a stopped run, use --resume)")
    assert read_manifest(out) == manifest  # the stopped run is as it was, still resumable
    resumed = subprocess.run([sys.executable, "-m", "training", "--resume", str(out), "--max-wall-s", "1"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    shown = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0 and f"resuming at step {manifest['steps']} of " in shown, shown
    assert not re.search(r" 0/\d+ |-\d[\d.]*step/s", shown)  # the replayed history does not rewind the bar


def test_cli_refuses_a_nan_learning_rate_before_making_the_run_folder(tmp_path, capsys):
    """The parser's refusal, in this process (a process costs 3-4 s of imports): exit 2, nothing on disk."""
    from training import cli

    with pytest.raises(SystemExit) as exited:
        cli.parse_args(["--model", "tiny", "--random-init", "--data", "sample", "--lr", "nan", "--out", str(tmp_path / "nan")])
    assert exited.value.code == 2 and "lr must be a finite number, got nan" in capsys.readouterr().err
    assert not (tmp_path / "nan").exists()


def test_cli_reports_bad_data_clearly(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x", "input": "", "output": 3}]')
    out = subprocess.run(
        [sys.executable, "-m", "training", "--model", "tiny", "--random-init", "--data", str(bad), "--out", str(tmp_path / "r")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1
    assert 'record 1: field "output" must be a string' in out.stderr
    assert source_path("sample").is_file()


def test_cli_says_how_many_records_were_too_long_to_train_on(tmp_path):
    long_ = {"instruction": "Long.", "input": "", "output": "word " * 2000}
    records = [long_, *({"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(18)), long_]  # #20: validation
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = subprocess.run([sys.executable, "-m", "training", "--model", "tiny", "--random-init", "--data", str(data),
                          "--batch-size", "2", "--max-steps", "1", "--out", str(tmp_path / "r")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    context = GPTConfig.from_name("tiny").block_size
    assert f"16 training records (1 left out: longer than the {context:,}-token context)" in out.stdout + out.stderr
    assert "note: no validation example is left once the too-long ones are left out: no validation loss is logged" in out.stdout
    assert read_metrics(tmp_path / "r")[-1]["val_loss"] is None


def test_records_whose_masked_prompt_fills_max_length_are_left_out_not_a_nan_loss(tmp_path):
    records = [{"instruction": "Explain. " + "word " * 40, "input": "", "output": "No."} for _ in range(6)]
    records += [{"instruction": f"Say {i}.", "input": "", "output": f"{i} and {i}."} for i in range(14)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    events = []
    config = dict(model="tiny", random_init=True, data=str(data), batch_size=2, mask_prompt=True, max_length=40)
    summary = train(TrainConfig(**config, max_steps=4, eval_every=2, out=str(tmp_path / "r")), Hooks(on_event=events.append))
    started = next(e for e in events if isinstance(e, Started))
    assert started.no_answer_records > 0 and started.max_length == 40 and started.skipped_records == 0
    assert summary["status"] == "done"
    assert all(math.isfinite(e.record["train_loss"]) for e in events if isinstance(e, Logged))
    assert read_manifest(tmp_path / "r")["data"]["skipped_no_answer"] >= started.no_answer_records
    with pytest.raises(ValueError, match="prompt alone fills max length 8 .*: raise max length"):
        train(TrainConfig(**{**config, "max_length": 8}, out=str(tmp_path / "r8")))
    data.write_text(json.dumps([{"instruction": "Long.", "input": "", "output": "word " * 1100}] * 20))
    with pytest.raises(ValueError, match="0 usable records: .*; 17 left out as longer than the model's 1,024-token context: "
                                         "shorten them$"):
        train(TrainConfig(**config, out=str(tmp_path / "long")))

def test_the_base_model_of_a_random_init_run_is_its_starting_point(tmp_path):
    from runstore.models import Models
    from training.loop import build_model

    config = tiny_config(tmp_path, precision="fp32", max_steps=2)
    start = build_model(config, torch.device("cpu"))
    torch.manual_seed(999)
    train(config)
    state = torch.random.get_rng_state()
    models = Models()
    base = models.base_of_run(tmp_path / "run")
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    for (name, p), q in zip(start.named_parameters(), base.parameters()):
        assert torch.allclose(p.to(q.dtype), q), name
    tuned = models.tuned(tmp_path / "run")
    assert not torch.equal(tuned.transformer.h[0].mlp.c_fc.weight, base.transformer.h[0].mlp.c_fc.weight)


def test_a_random_init_draws_from_its_seed_alone_while_another_thread_uses_the_global_rng(monkeypatch):
    """The app builds a base model for the playground while a job builds its own: neither may shift the other's draws."""
    from runstore.models import Models
    from training.loop import build_model

    from model import init_generator

    init = init_generator(7)
    expected = add_lora(GPT(GPTConfig.from_name("tiny"), init), rank=2, alpha=4, generator=init).state_dict()
    normal_, kaiming_uniform_ = torch.nn.init.normal_, torch.nn.init.kaiming_uniform_

    def busy(init):
        def draw(*args, **kwargs):
            torch.manual_seed(0)  # another thread seeds and draws between any two tensors
            torch.rand(3)
            return init(*args, **kwargs)
        return draw

    monkeypatch.setattr(torch.nn.init, "normal_", busy(normal_))
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", busy(kaiming_uniform_))
    init = init_generator(7)
    job = add_lora(build_model(TrainConfig(model="tiny", random_init=True, seed=7), torch.device("cpu"), generator=init),
                   rank=2, alpha=4, generator=init).state_dict()
    base = Models().base("tiny", random_init=True, seed=7).state_dict()
    for name, value in expected.items():
        assert torch.equal(job[name], value), name
        base_name = name.replace(".base.", ".")
        if "lora_" not in name:
            assert torch.equal(base[base_name], value), name
    state = torch.random.get_rng_state()
    GPT(GPTConfig.from_name("tiny"), init_generator(7))
    assert torch.equal(torch.random.get_rng_state(), state)  # built from its generator alone
    assert expected["transformer.ln_f.weight"].eq(1).all() and expected["transformer.h.0.attn.c_attn.base.bias"].eq(0).all()


def test_native_bf16_override_wins_over_cpuinfo(monkeypatch):
    """GPT2_INSTRUCT_NATIVE_BF16 picks the CPU class, and the precision path names it as the reason."""
    from model.device import NATIVE_BF16_ENV, cpu_class, cpu_has_bf16, pick_dtype, precision_reason

    cpu = torch.device("cpu")
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert not cpu_has_bf16() and cpu_class() == "fp32-only" and pick_dtype(cpu) == torch.float32
    assert precision_reason(cpu) == f"fp32: forced by {NATIVE_BF16_ENV}=0"
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    assert cpu_has_bf16() and pick_dtype(cpu) == torch.bfloat16
    assert precision_reason(cpu).startswith("bf16: forced")
    assert precision_reason(cpu, "fp32") == f"fp32: chosen explicitly (auto takes bf16: forced by {NATIVE_BF16_ENV}=1)"
    assert precision_reason(cpu, "bf16") == f"bf16: chosen explicitly (auto agrees: forced by {NATIVE_BF16_ENV}=1)"
    monkeypatch.setenv(NATIVE_BF16_ENV, "0")
    assert "emulated, many times slower than fp32" in precision_reason(cpu, "bf16")
    monkeypatch.setenv(NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=NATIVE_BF16_ENV):
        cpu_has_bf16()


def test_the_device_setting_picks_what_auto_means(monkeypatch):
    """GPT2_INSTRUCT_DEVICE (the suite sets cpu) keeps a machine's GPU out of "auto"; a named device still wins."""
    from model.device import DEVICE_ENV, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == pick_device("auto") == torch.device("cpu")
    assert pick_device("cuda") == torch.device("cuda")
    monkeypatch.setenv(DEVICE_ENV, "cuda:1")
    assert pick_device() == torch.device("cuda:1") and pick_device("cpu") == torch.device("cpu")
    for unset in ("", "auto"):
        monkeypatch.setenv(DEVICE_ENV, unset)
        assert pick_device() == torch.device("cuda")
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match=f"{DEVICE_ENV} must name a device .* got 'gpu'"):
        pick_device()


def test_precision_reason_follows_the_cpu_flags(monkeypatch):
    import model.device as device

    monkeypatch.delenv(device.NATIVE_BF16_ENV, raising=False)
    monkeypatch.setattr(device, "cpu_bf16_flag", lambda: None)
    assert device.precision_reason(torch.device("cpu")) == "fp32: this CPU has no native bf16 matmul (no AVX512-BF16/AMX)"
    assert device.pick_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(device, "cpu_bf16_flag", lambda: "avx512_bf16")
    assert device.precision_reason(torch.device("cpu")).startswith("bf16: AVX512-BF16 found")
    assert device.pick_dtype(torch.device("cpu")) == torch.bfloat16


def test_configure_runtime_sets_defaults_once_and_keeps_the_users(monkeypatch):
    from model.device import RUNTIME_ENV, configure_runtime

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    configure_runtime()
    configure_runtime()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
    assert os.environ["LRU_CACHE_CAPACITY"] == RUNTIME_ENV["LRU_CACHE_CAPACITY"]
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ  # huge pages stalled steps on compaction (see RUNTIME_ENV)


def test_cpu_quota_reads_cgroup_v1_and_v2_and_takes_the_tightest_on_the_path(tmp_path):
    from model.device import cpu_quota

    def tree(membership: str, files: dict) -> float | None:
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        (root / "self-cgroup").write_text(membership)
        return cpu_quota(root / "fs", root / "self-cgroup")

    assert tree("0::/\n", {"fs/cpu.max": "200000 100000\n"}) == 2.0  # a container's own cgroup (v2)
    assert tree("0::/\n", {"fs/cpu.max": "max 100000\n"}) is None
    assert tree("0::/a/b\n", {"fs/cpu.max": "800000 100000", "fs/a/cpu.max": "max 100000",
                               "fs/a/b/cpu.max": "150000 100000"}) == 1.5  # the tightest on the path
    assert tree("0::/a\n", {"fs/unified/a/cpu.max": "50000 100000"}) == 0.5  # v2 beside v1 (hybrid)
    assert tree("4:cpu,cpuacct:/docker/x\n1:memory:/docker/x\n",  # v1, the container's folder mounted as the root
                {"fs/cpu,cpuacct/cpu.cfs_quota_us": "200000", "fs/cpu,cpuacct/cpu.cfs_period_us": "100000"}) == 2.0
    assert tree("4:cpu:/\n", {"fs/cpu/cpu.cfs_quota_us": "-1", "fs/cpu/cpu.cfs_period_us": "100000"}) is None
    assert tree("4:memory:/\n", {"fs/memory/memory.limit_in_bytes": "1"}) is None
    assert cpu_quota(tmp_path / "none", tmp_path / "no-such-file") is None


def test_configure_runtime_runs_no_more_threads_than_the_cpu_quota_allows_unless_told(monkeypatch):
    import model.device as device

    base = torch.get_num_threads()
    if base < 2:
        pytest.skip("needs 2 threads to see the cap")
    monkeypatch.setattr(device, "cpu_budget", lambda: 1)  # a 1-CPU quota
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        device.configure_runtime()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(base)
        monkeypatch.setenv("OMP_NUM_THREADS", str(base))  # the user's count wins
        device.configure_runtime()
        assert torch.get_num_threads() == base
    finally:
        torch.set_num_threads(base)


KERNEL_CACHE_GROWTH = """
import ctypes
from model.device import configure_runtime
configure_runtime()
import torch
class MallInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo
w = torch.randn(768, 768, dtype=torch.bfloat16)
for m in range(100, 110):
    torch.nn.functional.linear(torch.randn(m, 768, dtype=torch.bfloat16), w)
start = libc.mallinfo2().uordblks
for m in range(200, 500):  # a new shape each time, as packed batches are
    torch.nn.functional.linear(torch.randn(m, 768, dtype=torch.bfloat16), w)
print((libc.mallinfo2().uordblks - start) / 2**20)
"""


def test_bf16_kernel_caches_stay_bounded_over_new_shapes():
    """ideep's kernel cache by shape (1,024 by default) grew ~160 MB over an epoch; configure_runtime caps it."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # the check torch makes before it gives oneDNN a bf16 matmul
        pytest.skip("bf16 matmuls on this CPU do not go through oneDNN, whose kernels the cache holds")
    def growth(env: dict) -> float:
        out = subprocess.run([sys.executable, "-c", KERNEL_CACHE_GROWTH], cwd=REPO, env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    ours = {k: v for k, v in os.environ.items() if k != "LRU_CACHE_CAPACITY"}
    unbounded = growth({**ours, "LRU_CACHE_CAPACITY": "1024"})
    if unbounded < 20:
        pytest.skip(f"bf16 matmuls on this CPU do not go through oneDNN's cached kernels ({unbounded:.0f} MB growth)")
    bounded = growth(ours)
    assert bounded < unbounded / 2, (bounded, unbounded)


def test_importing_training_leaves_the_environment_alone():
    code = "import os, training, model; print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_calibration_measures_once_then_reads_the_cache(tmp_path, monkeypatch, needs_canonical):
    from training import calibrate as cal

    monkeypatch.setattr(cal, "cache_file", lambda: tmp_path / "calibration.json")
    first = cal.calibrate("tiny", precision="fp32")
    assert not first.cached and first.method == "full" and first.precision == "fp32"
    assert first.steps == 116 and first.epoch_s == pytest.approx(first.train_s + first.eval_s) and first.train_s > 0
    assert first.reason.startswith("fp32: chosen explicitly")
    again = cal.calibrate("tiny", precision="fp32")
    assert again.cached and again.epoch_s == first.epoch_s
    lora = cal.calibrate("tiny", lora_rank=4, precision="fp32")
    assert not lora.cached and lora.method == "lora-4"
    assert len(json.loads((tmp_path / "calibration.json").read_text())) == 2
    assert not cal.calibrate("tiny", precision="fp32", refresh=True).cached
    with pytest.raises(ConfigError):
        cal.calibrate("not-a-preset")


def test_a_calibration_projects_an_epoch_of_other_data_without_measuring_again(tmp_path, monkeypatch, needs_canonical):
    from training import calibrate as cal

    monkeypatch.setattr(cal, "cache_file", lambda: tmp_path / "calibration.json")
    (tmp_path / "calibration.json").write_text(json.dumps({"v1|tiny|stale": {"epoch_s": 1.0}}))
    measured = cal.calibrate("tiny", precision="fp32")
    assert list(json.loads((tmp_path / "calibration.json").read_text())) == [cal.cache_key(
        TrainConfig(model="tiny", random_init=True, precision="fp32"), cal.pick_device(), torch.float32)]
    tiny = TrainConfig(model="tiny", random_init=True)
    book = cal.projection(measured, cal.data_shape(load_instructions("canonical"), tiny))
    assert (book.total_s, book.train_s, book.steps) == (measured.epoch_s, measured.train_s, measured.steps)
    sample = load_instructions("sample")
    mine = cal.projection(measured, cal.data_shape(sample, tiny))
    assert mine.steps == len(split_instructions(sample).train) // 8 and 0 < mine.train_s < measured.train_s / 5
    assert mine.total_s == pytest.approx(mine.train_s + mine.eval_s)
    run = TrainConfig(model="tiny", random_init=True, epochs=20, eval_every=6)  # the demo's epochs
    shape = cal.data_shape(sample, tiny)
    twenty = cal.projection(measured, shape, run)
    assert twenty.steps == 20 * mine.steps and twenty.train_s == pytest.approx(20 * mine.train_s)
    per_eval = sum(shape.val) * measured.forward_flop_s + min(40, shape.answer) * measured.new_token_s
    assert twenty.eval_s - mine.eval_s == pytest.approx(23 * per_eval)  # 25 evaluations (step 0, every 6th, the last) against 2
    capped = cal.projection(measured, cal.data_shape(sample, tiny), TrainConfig(model="tiny", random_init=True, epochs=20, max_steps=10))
    assert capped.steps == 10 and capped.train_s == pytest.approx(mine.train_s * 10 / mine.steps)
    with pytest.raises(ValueError, match=re.escape("the training split has 2 usable records: fewer than one step of batch 8; "
                                                  "use more records (a smaller batch leaves the test split empty)")):
        cal.data_shape(sample[:3], tiny)


def test_calibration_fit_separates_the_fixed_cost_per_step():
    from training.calibrate import fit

    per_token, fixed = fit([(400, 0.5 + 400e-3), (800, 0.5 + 800e-3)])
    assert per_token == pytest.approx(1e-3) and fixed == pytest.approx(0.5)
    per_token, fixed = fit([(100, 0.6), (400, 0.85), (800, 1.35)])  # least squares, not the end points alone
    assert per_token == pytest.approx(266.67 / 246667, rel=1e-4) and fixed == pytest.approx(0.46486, rel=1e-4)
    assert fit([(400, 2.0), (800, 1.0)]) == (pytest.approx(3.0 / 1200), 0.0)
    assert fit([(400, 2.0), (400, 1.0)]) == (pytest.approx(3.0 / 800), 0.0)
    assert fit([(400, 2.0)]) == (pytest.approx(2.0 / 400), 0.0)


@pytest.mark.parametrize("args, says", [
    (["bench.train", "--data", "/nonexistent/records.json"], "/nonexistent/records.json"),
    (["training.calibrate", "--model", "gpt9"], "gpt9"),
    (["bench.dataset", "--data", "/nonexistent/records.json"], "/nonexistent/records.json"),
])
def test_clis_refuse_a_missing_file_or_an_unknown_preset_in_one_line(args, says, capsys):
    """Each module's ``main`` in this process (a process each cost 2-3 s of imports), as ``python -m`` runs it."""
    assert importlib.import_module(args[0]).main(args[1:]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and says in err, err


def offline_env(tmp_path) -> dict:
    """An empty dataset cache, and downloads through a proxy on the discard port: offline on any machine."""
    nowhere = "http://127.0.0.1:9"
    return {**os.environ, "GPT2_INSTRUCT_CACHE": str(tmp_path / "empty-cache"), "https_proxy": nowhere, "HTTPS_PROXY": nowhere,
            "no_proxy": "", "NO_PROXY": ""}


def test_the_calibration_cli_times_the_bundled_sample_offline(tmp_path):
    out = subprocess.run([sys.executable, "-m", "training.calibrate", "--model", "tiny"], cwd=REPO, env=offline_env(tmp_path),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "one epoch of the bundled sample (the book's data is not cached and could not be downloaded) ~" in out.stdout
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["data"] == "sample" and figures["steps"] == 7 and figures["train_s"] > 0


@pytest.mark.parametrize("args, says", [
    (["bench.dpo", "--model", "tiny", "--steps", "1"], "instruction-data.json"),
    (["bench.dpo", "--model", "tiny", "--sides", "dpo"], "instruction-data-with-preference.json"),
])
def test_clis_report_missing_data_offline_in_one_line(tmp_path, args, says):
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=offline_env(tmp_path), capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ") and says in out.stderr


def test_bench_dataset_counts_tokens_both_ways_and_ends_with_json(capsys):
    from bench.dataset import main
    from data.records import SAMPLE_PATH

    assert main(["--data", str(SAMPLE_PATH), "--rounds", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("74 records (sample.json)") and "(same counts; median of 1)" in out[1]
    figures = json.loads(out[-1])
    assert figures["records"] == 74 and figures["alpaca"]["ratio"] > 0 and figures["phi3"]["whole_prompt_s"] > 0


def test_bench_train_ends_with_one_json_object_without_nan(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.train", "--model", "tiny", "--steps", "1", "--data", "sample",
                          "--lora-rank", "2"], cwd=REPO, capture_output=True, text=True, env={**os.environ, "GPT2_INSTRUCT_NATIVE_BF16": "0"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[1] == "CPU class: fp32-only; precision fp32: forced by GPT2_INSTRUCT_NATIVE_BF16=0"
    figures = json.loads(lines[-1], parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert figures["cpu_class"] == "fp32-only" and figures["precision"] == "float32"
    assert figures["transformers_autocast_tokens_per_s"] is None and figures["ours_lora_tokens_per_s"] > 0
    assert figures["epoch_ratio_grouped_vs_grouped"] == pytest.approx(  # both sides on the length-grouped batches
        figures["transformers_projected_epoch_grouped_s"] / figures["projected_epoch_grouped_s"], rel=2e-3)
    assert figures["mfu_of_torch_mm_peak"] == pytest.approx(
        figures["mfu"] * figures["matmul_peak_gflops"] / figures["torch_mm_peak_gflops"], abs=2e-3)  # rounded to 3 places
    breakdown = figures["step_breakdown"]
    assert set(breakdown) == {"matmul", "adamw", "attention", "other", "matmul_gflops"} and breakdown["matmul_gflops"] > 0
    assert all(0 < breakdown[kind] < 1 for kind in ("matmul", "adamw", "attention"))
    assert sum(breakdown[kind] for kind in ("matmul", "adamw", "attention", "other")) == pytest.approx(1, abs=5e-3)


def test_bench_series_sums_up_consecutive_runs_of_the_training_benchmark(tmp_path):
    env = {**os.environ, "GPT2_INSTRUCT_NATIVE_BF16": "0"}
    out = subprocess.run([sys.executable, "-m", "bench.series", "--runs", "2", "--model", "tiny", "--steps", "1", "--data",
                          "sample", "--skip-autocast"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].endswith("tiny, CPU class fp32-only, float32") and lines[1].startswith("run 1: ours tokens/s ")
    summed = [line.split("  min ")[0].strip() for line in lines[3:-1]]
    assert summed == ["ours tokens/s", "transformers tokens/s", "matmul peak GFLOP/s", "ours / transformers", "MFU",
                      "epoch ratio", "grouped epoch ratio", "peak RSS MiB"], lines
    assert re.search(r"slowest / fastest [01]\.\d{3}$", lines[3])
    assert "slowest / fastest" in lines[7] and "slowest" not in lines[8]
    figures = json.loads(lines[-1], parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert figures["runs"] == 2 and figures["options"][-1] == "--skip-autocast" and len(figures["each"]) == 2
    for run in figures["each"]:
        assert run["ratio"] == pytest.approx(run["ours_tokens_per_s"] / run["transformers_tokens_per_s"], abs=2e-3)
    ours = figures["summary"]["ours_tokens_per_s"]
    assert ours["min"] == min(run["ours_tokens_per_s"] for run in figures["each"]) <= ours["median"] <= ours["max"]
    assert ours["slowest_over_fastest"] == pytest.approx(ours["min"] / ours["max"], abs=2e-3)
    missing = subprocess.run([sys.executable, "-m", "bench.series", "--data", str(tmp_path / "none.json")], cwd=REPO,
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'none.json'}: file not found"


def test_bench_optim_times_every_side_and_ends_with_json():
    out = subprocess.run([sys.executable, "-m", "bench.optim", "--model", "tiny", "--rounds", "2"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert set(figures["update_ms"]) == {"ours_bf16", "torch_fp32_master_bf16_copy", "ours_fp32", "torch_fp32"}
    assert all(ms > 0 for ms in figures["update_ms"].values()) and figures["bf16_ratio"] > 0
    bad = subprocess.run([sys.executable, "-m", "bench.optim", "--model", "gpt9"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "gpt9" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_together_times_each_run_alone_and_side_by_side():
    out = subprocess.run([sys.executable, "-m", "bench.together", "--steps", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert figures["alone_tokens_per_s"] > 0 and figures["runs"] == 2
    assert 0 < figures["together_tokens_per_s"]["min"] <= figures["together_tokens_per_s"]["max"]
    assert figures["together_unshared_tokens_per_s"]["min"] > 0

@pytest.mark.parametrize("args, says", [
    (["bench.dpo", "--model", "gpt9"], "argument --model: unknown preset 'gpt9'; choose one of tiny, gpt2"),
    (["bench.dpo", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["bench.dpo", "--sides", "sft,bogus"], "--sides: unknown bogus; choose from sft, dpo, dpo-stacked"),
    (["bench.optim", "--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["bench.generate", "--tokens", "0"], "argument --tokens: must be at least 1, got 0"),
    (["bench.train", "--steps", "x"], "argument --steps: 'x' is not a whole number"),
    (["bench.watchers", "--model", "gpt9"], "argument --model: unknown preset 'gpt9'"),
    (["bench.together", "--runs", "1"], "argument --runs: must be at least 2, got 1"),
    (["bench.dataset", "--records", "0"], "argument --records: must be at least 1, got 0"),
    (["bench.series", "--runs", "1"], "argument --runs: must be at least 2, got 1"),
])
def test_benchmarks_refuse_bad_arguments_in_one_usage_line(args, says, monkeypatch, capsys):
    """Each module's ``main`` as ``python -m`` runs it, in this process (a process each cost 2 s of imports):
    argparse's exit 2 before any work, with one usage line."""
    monkeypatch.setattr(sys, "argv", [f"{args[0].replace('.', '/')}.py", *args[1:]])
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(args[0]).main()
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"python -m {args[0]}: error: ") and says in last, last


def test_mlp_recomputing_gelu_gives_autograds_gradients():
    """The training MLP (GELU recomputed in backward) against plain autograd, forward and every gradient."""
    from model.gpt import MLP

    torch.manual_seed(0)
    mlp = MLP(GPTConfig.from_name("tiny"))
    x = torch.randn(3, 5, 128, requires_grad=True)
    out = mlp(x)
    out.square().sum().backward()
    fused = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    plain = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
    torch.testing.assert_close(out, plain)
    plain.square().sum().backward()
    for a, b in zip(fused, [x.grad] + [p.grad for p in mlp.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sigmoid_form_gelu_equals_atens_tanh_gelu():
    """The fp32 CPU GELU (x * sigmoid(2z)) and its backward against ATen's tanh GELU in fp64, over -30..30,
    the same to the bit with and without autograd."""
    from model.fused import gelu_tanh, gelu_tanh_and_backward

    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-30, 30, 20_001), torch.randn(20_000) * 3])
    grad = torch.randn_like(x)
    want = F.gelu(x.double(), approximate="tanh")
    want_grad = torch.ops.aten.gelu_backward(grad.double(), x.double(), approximate="tanh")
    g, grad_x = gelu_tanh_and_backward(x, grad)
    assert g.dtype == grad_x.dtype == torch.float32
    torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gelu_tanh(x), g, rtol=0, atol=0)
    torch.testing.assert_close(grad_x.double(), want_grad, rtol=1e-5, atol=2e-5)
    tracked = x.clone().requires_grad_()
    torch.testing.assert_close(gelu_tanh(tracked), g, rtol=0, atol=0)
    gelu_tanh(tracked).backward(grad)  # as a LoRA model's MLP, through autograd
    torch.testing.assert_close(tracked.grad, grad_x, rtol=0, atol=0)
    # bf16 keeps ATen's fused kernel, which rounds once
    low = x.bfloat16()
    assert torch.equal(gelu_tanh(low), F.gelu(low, approximate="tanh"))


def test_optimizer_state_round_trip_continues_bit_for_bit(tmp_path, batches):
    """state_dict -> file -> load_state_dict into a differently initialised model, then both step alike."""
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        a = GPT(GPTConfig.from_name("tiny"))
        torch.manual_seed(1)
        b = GPT(GPTConfig.from_name("tiny"))
        opt_a = MasterWeightAdamW(a, dtype, lr=1e-3)
        opt_b = MasterWeightAdamW(b, dtype, lr=1e-3)
        a.loss(*rows_of(batches[0])).backward()
        torch.save(opt_a.state_dict(), tmp_path / "state.pt")
        opt_b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        for x, y in map(rows_of, batches[1:3]):
            a.loss(x, y).backward()
            b.loss(x, y).backward()
        for (name, p), q in zip(opt_a.finish().named_parameters(), opt_b.finish().parameters()):
            assert torch.equal(p, q), (dtype, name)
    with pytest.raises(ValueError, match="another precision"):  # the file holds the bf16 run's state
        MasterWeightAdamW(GPT(GPTConfig.from_name("tiny")), torch.float32).load_state_dict(
            torch.load(tmp_path / "state.pt", weights_only=True))


def test_cli_flags_for_checkpoints_wall_time_and_resume():
    from training.cli import parse_args, settings_given

    config = parse_args(["--model", "tiny", "--random-init", "--checkpoint-every", "5", "--max-wall-s", "90"])
    assert config.checkpoint_every == 5 and config.max_wall_s == 90
    assert TrainConfig().checkpoint_every == 0 and TrainConfig().max_wall_s is None
    assert settings_given(["--resume", "run"]) == {}
    assert settings_given(["--resume", "run", "--checkpoint-every", "3", "--grouped"]) == {"checkpoint_every": 3, "grouped": True}
    with pytest.raises(ConfigError, match="max_wall_s must be > 0"):
        TrainConfig(max_wall_s=0)
    with pytest.raises(ConfigError, match="seed"):  # torch takes 64 bits: "Overflow when unpacking long long" before
        TrainConfig(seed=10**20)


def test_cli_keeps_local_files_by_absolute_path_and_refuses_an_empty_resume(tmp_path, monkeypatch, capsys):
    """A run trained on ``--data mine.json`` in one folder must resume and evaluate from any other."""
    from training import cli, dpo_cli

    (tmp_path / "mine.json").write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}] * 12))
    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    config = cli.parse_args(["--model", "weights", "--data", "mine.json"])
    assert (config.model, config.data) == (str(tmp_path / "weights"), str(tmp_path / "mine.json"))
    kept = cli.parse_args(["--model", "tiny", "--random-init", "--data", "sample"])
    assert (kept.model, kept.data) == ("tiny", "sample")
    assert cli.settings_given(["--resume", "run", "--data", "mine.json"]) == {"data": str(tmp_path / "mine.json")}
    for main in (cli.main, dpo_cli.main):  # an empty --resume used to start a new default run
        assert main(["--resume", ""]) == 1
        assert "error: no run given" in capsys.readouterr().err


def test_cli_says_a_full_disk_in_one_error_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    from training import cli

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("GPT2_INSTRUCT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr("training.loop.save_pretrained", disk_full)
    assert cli.main(["--model", "tiny", "--random-init", "--data", "sample", "--max-steps", "1", "--eval-batches", "1",
                     "--sample-tokens", "0"]) == 1
    err = capsys.readouterr().err
    assert "error: [Errno 28] No space left on device\n" in err and "Traceback" not in err


def test_cli_help_shows_every_default_takes_none_and_notes_flags_that_do_nothing(capsys):
    from training.cli import make_parser, parse_args
    from training.dpo_cli import parse_args as parse_dpo_args

    help_text = " ".join(make_parser().format_help().split())
    for shown in ("passes over the training split (default 1)", "full fine-tuning (default 0)",
                  "optimizer step (default 1)"):
        assert shown in help_text
    config = parse_args(["--model", "tiny", "--random-init", "--eval-batches", "none", "--max-length", "None",
                         "--lora-alpha", "32", "--min-lr-ratio", "0.2"])
    assert config.eval_batches is None and config.max_length is None
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: --lora-alpha does nothing without --lora-rank", "note: --min-lr-ratio does nothing without --cosine"]
    parse_args(["--model", "tiny", "--random-init", "--lora-rank", "4", "--lora-alpha", "32", "--cosine", "--min-lr-ratio", "0.2"])
    parse_dpo_args(["--from", "run", "--lora-rank", "4", "--lora-alpha", "8"])
    assert capsys.readouterr().err == ""
    parse_dpo_args(["--from", "run", "--lora-alpha", "8"])
    assert capsys.readouterr().err == "note: --lora-alpha does nothing without --lora-rank\n"
    with pytest.raises(SystemExit):
        parse_args(["--max-steps", "x"])
    assert "invalid int value: 'x'" in capsys.readouterr().err
    for parse, args, says in ((parse_args, ["--model", "tiny", "--random-init", "--batch-size", "0"], "--batch-size must be between 1 and 512, got 0"),
                              (parse_dpo_args, ["--from", "run", "--beta", "-1"], "--beta must be in (0, 100], got -1")):
        with pytest.raises(SystemExit):  # a setting out of range, named by its flag as typed
            parse(args)
        assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {says}")


def _run_cli(tmp_path, request):
    train(TrainConfig(model="tiny", random_init=True, data="sample", precision="bf16", max_steps=1, out=str(tmp_path / "run")))


def _run_calibration(tmp_path, request):
    from training.calibrate import measure

    request.getfixturevalue("needs_canonical")  # the calibration times the book's data

    measure(TrainConfig(model="tiny", random_init=True, data="sample", precision="bf16", batch_size=2))


def _run_bench(tmp_path, request):
    from bench.train import main

    main(["--model", "tiny", "--steps", "1", "--data", "sample", "--precision", "bf16", "--skip-autocast"])


class FirstLoss(BaseException):
    """Ends a trainer at its first loss, through its ``except Exception`` handlers: what the test checks is known by then."""


@pytest.mark.parametrize("run", [_run_cli, _run_calibration, _run_bench], ids=["cli", "calibration", "bench"])
def test_every_trainer_takes_bf16_attention_as_the_cli_does(run, tmp_path, monkeypatch, request):
    """The benchmark and the calibration once trained bf16 without the CLI's attention setting: ~20 % slower steps.
    Each trainer sets it before its first step; the test stops there (bf16 steps on a CPU without native bf16 are slow)."""
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed
    seen = []

    def spy(self, *args, **kwargs):
        seen.append(allowed())
        raise FirstLoss

    monkeypatch.setattr(GPT, "loss", spy)
    before = allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)
    try:
        with pytest.raises(FirstLoss):
            run(tmp_path, request)
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before)
    assert seen == [True]


def test_trainings_on_one_machine_share_its_cores(tmp_path, monkeypatch):
    from training.cores import SHARE_ENV, CoreShare

    base = torch.get_num_threads()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        host = __import__("socket").gethostname()
        (tmp_path / f"{host}-{other.pid}-a1").touch()  # a training in another process
        (tmp_path / f"{host}-{other.pid}-b2").touch()  # and an evaluation of that process: one process, counted once
        (tmp_path / f"{host}-99999999-c3").touch()  # one that died: its file goes
        (tmp_path / f"elsewhere-{other.pid}-d4").touch()  # another machine's (a shared home folder): not counted
        cores = CoreShare(torch.device("cpu"), folder=tmp_path, every_s=0)
        same_process = CoreShare(torch.device("cpu"), folder=tmp_path, every_s=0)  # the app's evaluation beside it
        assert cores.check() == max(1, base // 2) and not (tmp_path / f"{host}-99999999-c3").exists()
        same_process.close()
        other.kill()
        other.wait()
        assert cores.check() == base  # alone again
        cores.close()
        assert torch.get_num_threads() == base and not cores.own.exists()
        monkeypatch.setenv(SHARE_ENV, "0")
        assert not CoreShare(torch.device("cpu"), folder=tmp_path).active
        assert not CoreShare(torch.device("meta"), folder=tmp_path).active
    finally:
        other.kill()
        torch.set_num_threads(base)


def test_core_sharing_keeps_the_threads_its_caller_set(tmp_path):
    """A caller that set fewer threads (torch.set_num_threads, as a notebook might) keeps them: sharing starts from
    the process's threads when its first job begins, not from those it started with."""
    from training.cores import CoreShare

    base = torch.get_num_threads()
    if base < 2:
        pytest.skip("needs 2 threads to tell the caller's count from the one the process started with")
    torch.set_num_threads(base - 1)
    try:
        training = CoreShare(torch.device("cpu"), folder=tmp_path, every_s=0)
        evaluation = CoreShare(torch.device("cpu"), folder=tmp_path, every_s=0)  # a second job of the same process
        assert training.check() == evaluation.check() == base - 1
        evaluation.close()
        assert training.check() == base - 1
        training.close()
        assert torch.get_num_threads() == base - 1
    finally:
        torch.set_num_threads(base)


def test_the_eta_counts_the_steps_and_the_evaluations_left_at_their_mean_times():
    from training.loop import Clock

    clock = Clock(train_s=10.0, eval_s=4.0, evals=2)  # 5 steps of 2 s so far, evaluations of 2 s
    assert clock.eta(5, 20, eval_every=5) == pytest.approx(15 * 2 + 3 * 2)  # evaluations at steps 10, 15 and 20
    assert clock.eta(5, 22, eval_every=5) == pytest.approx(17 * 2 + 4 * 2)  # ... and at the last, 22
    assert clock.eta(20, 20, eval_every=5) == clock.eta(22, 22, eval_every=5) == 0
    assert Clock().eta(0, 20, eval_every=5) is None and Clock().tokens_per_s(100) == 0  # no step timed: no ETA yet
    assert clock.tokens_per_s(500) == 50


def test_the_cli_shows_a_download_bar_a_file():
    """The weights, then config.json: each file its own bar and size, not config.json's bytes on the weights' bar."""
    from training.cli import ProgressBar
    from training.events import Download

    bar = ProgressBar()
    bar(Download("openai-community/gpt2/model.safetensors", 10, 548))
    bar(Download("openai-community/gpt2/model.safetensors", 548, 548))
    weights = bar.download
    bar(Download("openai-community/gpt2/config.json", 665, 665))
    assert (weights.n, weights.total) == (548, 548) and weights.disable  # closed, whole
    assert (bar.download.desc, bar.download.n, bar.download.total) == ("openai-community/gpt2/config.json", 665, 665)
