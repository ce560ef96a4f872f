"""The fine-tuning loop: data, model, AdamW, evaluation, and the run on disk.

``train(config, hooks)`` is the one engine behind the CLI, the background job
and the tests. It reports through ``hooks.on_event(kind, payload)`` and asks
``hooks.should_stop()`` at every step boundary; it never touches the UI.

Where the speed comes from (see bench/train.py for the figures): the model
computes in bf16 where the CPU or GPU multiplies it natively, with fp32 master
weights; the LM head runs only on positions that have a target and makes its
own gradients; AdamW is fused and, at the book's settings, steps each tensor
inside backward; batches are grouped by length so that little is padding.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from data import InstructionDataset, extract_response, format_prompt, load_instructions, make_loader, source_path, split_instructions
from model import GPT, GPTConfig, generate, get_tokenizer, load_pretrained, pick_device, pick_dtype, save_pretrained
from model.device import describe, peak_rss_mb, release_free_memory

from . import distributed
from .config import TrainConfig
from .events import Download, Finished, Logged, Started, Status
from .lora import add_lora, count_trainable, merge_lora
from .optim import MasterWeightAdamW
from runstore import RunWriter, new_run_dir


class StopTraining(Exception):
    """Raised inside the loop when a stop was requested; the run is still saved."""


@dataclass
class Hooks:
    on_event: Callable[[object], None] = lambda event: None
    should_stop: Callable[[], bool] = lambda: False


@dataclass
class Clock:
    """Training time apart from evaluation time, for tokens/s and the ETA."""

    start: float = field(default_factory=time.perf_counter)
    train_s: float = 0.0
    eval_s: float = 0.0
    evals: int = 0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then constant or cosine decay to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if not config.cosine:
        return config.lr
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model: GPT, batches, device) -> float:
    """Mean of the batch losses, as the book's ``calc_loss_loader``."""
    was_training = model.training
    model.eval()
    losses = [model.loss(x.to(device), y.to(device)).item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses) if losses else float("nan")


def respond(model: GPT, record: dict, style: str, max_new_tokens: int) -> str:
    """The model's greedy response to one instruction, as the playground would show it."""
    if max_new_tokens == 0:
        return ""
    tokenizer = get_tokenizer()
    was_training = model.training
    model.eval()
    ids = generate(model, tokenizer.encode(format_prompt(record, style), disallowed_special=()), max_new_tokens)
    model.train(was_training)
    return extract_response(tokenizer.decode(ids), style)


def build_model(config: TrainConfig, device, progress=None) -> GPT:
    torch.manual_seed(config.seed)
    if config.random_init:
        return GPT(GPTConfig.from_name(config.model)).to(device)
    return load_pretrained(config.model, device=device, progress=progress)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "tiktoken", "safetensors", "huggingface-hub", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def finite(value: float | None) -> float | None:
    """JSON has no NaN: an empty validation split logs null."""
    return value if value is not None and math.isfinite(value) else None


def data_label(source: str) -> str:
    """A data source as a visitor may see it: the preset's name or the file's name, never a server path."""
    return source if source in ("canonical", "sample") else Path(str(source)).name


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_data(config: TrainConfig):
    """The run's records and split, or a ``ValueError`` naming the counts when they cannot make a run.

    Called before a job is started, so that such a run fails before "Started" is shown.
    """
    records = load_instructions(config.data)
    split = split_instructions(records)
    name = data_label(config.data)
    per_step = config.batch_size * config.grad_accum
    if len(split.train) < per_step:
        raise ValueError(f"{name} has {len(records)} records: its training split (85 %) has {len(split.train)}, fewer than "
                         f"one step of batch {config.batch_size} x {config.grad_accum} accumulation; use a smaller batch "
                         f"or at least {math.ceil(per_step / 0.85)} records")
    for part in ("val", "test"):
        if not getattr(split, part):
            need = 2 if part == "val" else 10
            raise ValueError(f"{name} has {len(records)} records: its {'validation (5 %)' if part == 'val' else 'test (10 %)'} "
                             f"split is empty; the book's 85/10/5 split needs at least {need} records")
    return records, split


def train(config: TrainConfig, hooks: Hooks | None = None, root: Path | None = None) -> dict:
    """Fine-tune one model on one dataset into a new run under ``root``; returns its summary (also in its manifest)."""
    hooks = hooks or Hooks()
    emit = hooks.on_event
    config.validate()
    clock = Clock()
    ctx = distributed.context()

    emit(Status("loading", f"Loading the {data_label(config.data)} data"))
    data_file = source_path(config.data)
    records, split = check_data(config)
    sample_record = (split.val or split.train)[0]

    device = ctx.place(pick_device(config.device))
    dtype = pick_dtype(device, config.precision)
    if device.type == "cpu" and dtype == torch.bfloat16:
        # Attention's math path on CPU (see CausalSelfAttention) then keeps bf16 instead of fp32 copies: faster, less memory.
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    emit(Status("loading", f"Loading {config.model}"))
    model = build_model(config, device, progress=lambda desc, done, total: emit(Download(desc, done, total)))
    context = model.config.block_size
    train_ds = InstructionDataset(split.train, style=config.style, max_length=context)
    val_ds = InstructionDataset(split.val, style=config.style, max_length=context)
    max_length = min(config.max_length or context, context)
    loader = make_loader(train_ds, config.batch_size, grouped=config.grouped, seed=config.seed,
                         mask_prompt=config.mask_prompt, allowed_max_length=max_length, rank=ctx.rank, world_size=ctx.world_size)
    steps_per_epoch = len(loader) // config.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training split has {len(train_ds)} usable records: fewer than one step of "
            f"batch {config.batch_size} x {config.grad_accum} accumulation; use a smaller batch or more data"
        )
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    eval_loader = make_loader(val_ds, config.batch_size * ctx.world_size, shuffle=False, drop_last=False,
                              mask_prompt=config.mask_prompt, allowed_max_length=max_length)
    val_batches = list(itertools.islice(eval_loader, config.eval_batches))
    train_eval_loader = make_loader(train_ds, config.batch_size * ctx.world_size, shuffle=False, drop_last=False,
                                    mask_prompt=config.mask_prompt, allowed_max_length=max_length)
    baseline_train_batches = list(itertools.islice(train_eval_loader, config.eval_batches or 3))

    if config.lora_rank:
        add_lora(model, config.lora_rank, config.lora_alpha)
    trainable, total_params = count_trainable(model)
    step_in_backward = config.grad_clip is None and config.grad_accum == 1 and not ctx.enabled  # DDP reduces after backward
    optimizer = MasterWeightAdamW(model, dtype, lr=config.lr, weight_decay=config.weight_decay, step_in_backward=step_in_backward)
    loss_of = ctx.loss_fn(model, config.grad_accum)
    model.train()

    run_dir = ctx.on_main(lambda: Path(config.out) if config.out else new_run_dir(config.model, root))
    writer = RunWriter(run_dir) if ctx.is_main else distributed.NullWriter()
    writer.update_manifest(
        status="running",
        pid=os.getpid(),
        config=config.to_dict(),
        model={"name": config.model, "parameters": total_params, "trainable_parameters": trainable,
               "n_layer": model.config.n_layer, "n_embd": model.config.n_embd, "random_init": config.random_init},
        data={"source": config.data, "file": str(data_file), "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest(),
              "records": len(records), "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
              "skipped_too_long": train_ds.skipped + val_ds.skipped},
        seed=config.seed,
        versions=versions(),
        device=describe(device, dtype),
        total_steps=total_steps,
        processes=ctx.world_size,
        global_batch=config.batch_size * ctx.world_size * config.grad_accum,
        started=now(),
    )
    emit(Started(run_name=run_dir.name, run_dir=str(run_dir), total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                 epochs=config.epochs, device=describe(device, dtype), parameters=total_params, trainable_parameters=trainable,
                 sample_instruction=sample_record, train_records=len(train_ds), val_records=len(val_ds)))

    step = tokens_seen = 0
    last_val = last_train = float("nan")

    def log_eval(train_loss: float) -> None:
        nonlocal last_val
        emit(Status("evaluating", f"Evaluating at step {step}", step))
        t0 = time.perf_counter()
        last_val = evaluate(model, val_batches, device)
        sample = respond(model, sample_record, config.style, config.sample_tokens)
        clock.eval_s += time.perf_counter() - t0
        clock.evals += 1
        record = metrics(train_loss, last_val)
        writer.log(record)
        emit(Logged(record, response=sample))
        emit(Status("training"))

    def metrics(train_loss: float, val_loss: float | None) -> dict:
        evals_left = max(0, (total_steps - step) // config.eval_every) + 1
        per_step = clock.train_s / step if step else 0.0
        per_eval = clock.eval_s / clock.evals if clock.evals else 0.0
        return {
            "step": step, "epoch": round(step / steps_per_epoch, 4), "tokens_seen": tokens_seen,
            "train_loss": finite(train_loss), "val_loss": finite(val_loss), "lr": optimizer.lr,
            "tokens_per_s": tokens_seen / clock.train_s if clock.train_s else 0.0,
            "elapsed_s": clock.elapsed, "eta_s": (total_steps - step) * per_step + evals_left * per_eval,
        }

    status = "done"
    try:
        last_train = evaluate(model, baseline_train_batches, device)
        log_eval(last_train)
        for epoch in range(config.epochs):
            micro = iter(loader)
            while step < total_steps and step < (epoch + 1) * steps_per_epoch:
                if ctx.any(hooks.should_stop()):
                    raise StopTraining
                t0 = time.perf_counter()
                optimizer.lr = lr_at(step, config, total_steps)
                step_loss = step_tokens = 0.0
                for x, y in itertools.islice(micro, config.grad_accum):
                    x, y = x.to(device), y.to(device)
                    loss = loss_of(x, y)
                    (loss / config.grad_accum).backward()
                    step_loss += loss.item() / config.grad_accum
                    step_tokens += x.numel()
                step_loss, step_tokens = ctx.all_sum(step_loss / ctx.world_size, step_tokens)
                tokens_seen += int(step_tokens)
                if not step_in_backward:
                    optimizer.step(config.grad_clip)
                if device.type == "cpu":
                    release_free_memory()
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"the training loss became {step_loss} at step {step + 1}; lower the learning rate")
                step += 1
                clock.train_s += time.perf_counter() - t0
                last_train = step_loss
                if step % config.eval_every == 0 or step == total_steps:
                    log_eval(step_loss)
                else:
                    record = metrics(step_loss, None)
                    writer.log(record)
                    emit(Logged(record))
            if step >= total_steps:
                break
    except StopTraining:
        status = "stopped"
        emit(Status("stopping", f"Stopped at step {step}; saving"))
    except BaseException as e:
        writer.update_manifest(status="failed", error=ctx.reason(e), ended=now(), wall_time_s=clock.elapsed)
        raise

    emit(Status("saving", f"Saving {run_dir.name}"))
    model = optimizer.finish()
    if config.lora_rank:
        merge_lora(model)
    if ctx.is_main:
        save_pretrained(model, run_dir)
    summary = {
        "status": status, "steps": step, "tokens_seen": tokens_seen, "final_train_loss": finite(last_train),
        "final_val_loss": finite(last_val), "ended": now(), "wall_time_s": clock.elapsed, "train_time_s": clock.train_s,
        "eval_time_s": clock.eval_s, "run_dir": str(run_dir), "peak_rss_mb": peak_rss_mb(),
    }
    writer.update_manifest(**summary)
    emit(Finished(summary))
    return summary
