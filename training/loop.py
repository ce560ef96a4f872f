"""The fine-tuning loop: data, model, AdamW, evaluation, and the run on disk.

``train(config, hooks)`` is the one engine behind the CLI, the background job
and the tests. It reports through ``hooks.on_event(event)`` and asks
``hooks.should_stop()`` at every step boundary; it never touches the UI.
``resume_run(run_dir, hooks)`` continues a stopped or interrupted run from its
checkpoint (training/checkpoint.py). Every way a run can end leaves its manifest
saying so: done, stopped (with the reason), failed (with the error).

Where the speed comes from (see bench/train.py for the figures): the model
computes in bf16 where the CPU or GPU multiplies it natively, with fp32 master
weights; the LM head runs only on positions that have a target and makes its
own gradients; AdamW is fused and, at the book's settings, steps each tensor
inside backward; the blocks skip each row's padding after its last target, so
the book's random batches train as fast as length-grouped ones.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import platform
import time
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from data import DatasetError, InstructionDataset, extract_response, encode_prompt, load_instructions, make_loader, source_path, split_instructions
from data import cache
from data.batching import loader_state
from model import GPT, GPTConfig, generate, get_tokenizer, init_generator, load_pretrained, pick_device, save_pretrained
from model.device import configure_precision, describe, peak_rss_mb, release_free_memory

from . import distributed
from .checkpoint import (ResumeError, check_resume, checkpoint_run, holding, load_checkpoint, mark_resumed, restore, resume_config,
                         run_precision, start_epoch)
from .config import TrainConfig
from .cores import CoreShare
from .events import Download, Finished, Logged, Started, Status
from .lora import add_lora, count_trainable, merge_lora
from .optim import MasterWeightAdamW
from runstore import CHECKPOINT, RunWriter, claim_run_dir, new_run_dir, process_owner, read_manifest, utc_time


@dataclass
class Hooks:
    """How a run reports (``on_event``) and is asked to stop: ``should_stop`` returns True, or the reason as text."""

    on_event: Callable[[object], None] = lambda event: None
    should_stop: Callable[[], bool | str] = lambda: False


@dataclass
class Clock:
    """Training time apart from evaluation time, for tokens/s and the ETA."""

    start: float = field(default_factory=time.perf_counter)
    train_s: float = 0.0
    eval_s: float = 0.0
    evals: int = 0
    before_s: float = 0.0  # wall time of the run before it was resumed

    @property
    def session(self) -> float:
        """Seconds since this ``train()`` call began: what a wall-time limit bounds."""
        return time.perf_counter() - self.start

    @property
    def elapsed(self) -> float:
        return self.before_s + self.session

    def tokens_per_s(self, tokens: int) -> float:
        return tokens / self.train_s if self.train_s else 0.0

    def eta(self, step: int, total_steps: int, eval_every: int) -> float | None:
        """Seconds to the end after ``step``: the steps left at the mean step so far, and the evaluations left (every
        ``eval_every`` steps and at the last one) at the mean evaluation so far; None before a step has been timed."""
        if not step or not self.train_s:
            return None
        per_step = self.train_s / step
        per_eval = self.eval_s / self.evals if self.evals else 0.0
        evals_left = total_steps // eval_every - step // eval_every + int(step < total_steps and total_steps % eval_every != 0)
        return (total_steps - step) * per_step + evals_left * per_eval


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warmup, then constant or cosine decay to ``min_lr_ratio * lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if not config.cosine:
        return config.lr
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class TrainingStopped(Exception):
    """A stop asked for while the run was loading, before its folder existed: nothing was written."""


@torch.no_grad()
def evaluate(model: GPT, batches, device, should_stop=None) -> float | None:
    """Mean of the batch losses, as the book's ``calc_loss_loader``; None when ``should_stop()`` asks midway."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        if should_stop is not None and should_stop():
            break
        losses.append(model.loss(x.to(device), y.to(device)).item())
    model.train(was_training)
    if should_stop is not None and len(losses) < len(batches):
        return None
    return sum(losses) / len(losses) if losses else float("nan")


def respond(model: GPT, record: dict, style: str, max_new_tokens: int) -> str:
    """The model's greedy response to one instruction, as the playground would show it."""
    if max_new_tokens == 0:
        return ""
    tokenizer = get_tokenizer()
    was_training = model.training
    model.eval()
    ids = generate(model, encode_prompt(record, tokenizer, style), max_new_tokens)
    model.train(was_training)
    return extract_response(tokenizer.decode(ids), style)


def build_model(config: TrainConfig, device, progress=None, generator: torch.Generator | None = None) -> GPT:
    """The run's starting model; a random init draws from ``generator`` (``init_generator(config.seed)`` when None)."""
    torch.manual_seed(config.seed)  # dropout's draws
    if config.random_init:
        return GPT(GPTConfig.from_name(config.model), generator or init_generator(config.seed)).to(device)
    return load_pretrained(config.model, device=device, progress=progress)


def weights_fingerprint(model: GPT) -> str:
    """A short hash of every 4,099th value of each parameter, as loaded: the same weights give the same one, another
    checkpoint (a base model trained further) another, at a few milliseconds for GPT-2 124M."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().reshape(-1)[::4099].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


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
    return source if source in ("canonical", "sample") else cache.file_label(str(source))


def records_needed(per_step: int) -> int:
    """The fewest records whose 85/10/5 split has a step's worth of training records and a test record (validation
    always gets one)."""
    n = per_step
    while True:
        split = split_instructions([{}] * n)
        if len(split.train) >= per_step and split.test:
            return n
        n += 1


SMALLER_BATCH = "use a smaller batch, or more records"  # the remedy for too few records for one step
NO_TEST_SPLIT = "use more records (a smaller batch leaves the test split empty)"  # the remedy when the test split is empty too


def one_step(config: TrainConfig, processes: int = 1) -> str:
    """What one optimizer step takes, for messages: "batch 8", "batch 8 x 4 accumulation", "batch 8 x 2 processes"."""
    return (f"batch {config.batch_size}" + (f" x {config.grad_accum} accumulation" if config.grad_accum > 1 else "")
            + (f" x {processes} processes" if processes > 1 else ""))


def check_data(config: TrainConfig):
    """The run's records and split; ``DatasetError`` naming the counts when they cannot make a run.

    The engine calls it before it starts a job, and ``train`` again, so such a run fails before "Started".
    """
    records = load_instructions(config.data)
    split = split_instructions(records)
    name, n = data_label(config.data), len(records)
    processes = distributed.context().world_size  # under torchrun each process takes its own batches of a step
    per_step = config.batch_size * config.grad_accum * processes
    needed = f"the book's split (85 % train, 10 % test, 5 % validation, in file order) needs at least {records_needed(per_step)} records"
    if len(split.train) < per_step:
        step = one_step(config, processes)
        smaller = SMALLER_BATCH if split.test else NO_TEST_SPLIT
        raise DatasetError(f"{name} has {n} record{'s' * (n != 1)}: its training split (85 %) has {len(split.train)}, fewer than one step "
                           f"of {step}; {smaller}: {needed}")
    if not split.test:
        raise DatasetError(f"{name} has {n} record{'s' * (n != 1)}: its test (10 %) split is empty; {needed}")
    return records, split


def open_run(writer: RunWriter, checkpoint: dict | None, emit, started: Started, **fields) -> None:
    """Write the manifest as running (a resumed run reopened at its checkpoint's step), announce ``started``,
    and replay the history a resumed run has so far, its sample answers with it, for watchers that show them."""
    if checkpoint:
        mark_resumed(writer, checkpoint["step"], **fields)
    else:
        writer.update_manifest(**fields, started=utc_time())
    emit(started)
    for row in writer.metrics:
        emit(Logged.replay(row))


def record_end(writer: RunWriter, run_dir: Path, clock: Clock, status: str, drop_checkpoint: bool = True, **fields) -> dict:
    """Write how the run ended (``fields``: its steps, tokens and last losses) with its times and peak memory; a
    finished run drops its checkpoint. The summary, as written."""
    summary = {"status": status, **fields, "ended": utc_time(), "wall_time_s": clock.elapsed, "train_time_s": clock.train_s,
               "eval_time_s": clock.eval_s, "run_dir": str(run_dir), "peak_rss_mb": peak_rss_mb()}
    writer.update_manifest(**summary)
    if status == "done" and drop_checkpoint:
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return summary


def record_failure(writer: RunWriter, error: BaseException, reason: str, step: int, clock: Clock) -> None:
    """Mark the run failed with ``reason``, or interrupted for Ctrl-C, so that it never stays "running"."""
    ended = {"status": "failed", "error": reason}
    if isinstance(error, KeyboardInterrupt):
        ended = {"status": "interrupted", "stop_reason": "interrupted from the keyboard"}
    with suppress(OSError):  # the disk may be full: the first error is the one to report
        writer.update_manifest(**ended, ended=utc_time(), steps=step, wall_time_s=clock.elapsed)


def save_weights(optimizer: MasterWeightAdamW, lora_rank: int, run_dir: Path, emit, write: bool = True) -> None:
    """The trained model's exact fp32 weights (LoRA merged in) into the run folder, where ``transformers`` loads them."""
    emit(Status("saving", f"Saving {run_dir.name}"))
    model = optimizer.finish()
    if lora_rank:
        merge_lora(model)
    if write:
        save_pretrained(model, run_dir)


def resume_run(run_dir: str | Path, hooks: Hooks | None = None, **changes) -> dict:
    """Continue a stopped, interrupted or failed run from its checkpoint, with its own settings; its summary.

    ``changes`` may set only what does not change the training (``checkpoint.CHANGEABLE``);
    ``ResumeError`` says why a run cannot be resumed.
    """
    return train(resume_config(run_dir, **changes), hooks, resume=run_dir)


@dataclass
class Batches:
    """A run's data as the loop takes it: the training batches, epoch by epoch, and the fixed ones each evaluation scores."""

    train_ds: InstructionDataset
    val_ds: InstructionDataset
    loader: object
    steps_per_epoch: int
    total_steps: int
    val: list  # scored at every evaluation
    baseline_train: list  # scored once before the first step: the chart's first train loss
    context: int
    max_length: int


def make_batches(config: TrainConfig, split, context: int, ctx) -> Batches:
    """The run's datasets, loader and evaluation batches for a model of ``context`` tokens; ``ValueError`` naming
    why when not one step can be made."""
    max_length = min(config.max_length or context, context)
    cut = dict(style=config.style, max_length=context, mask_prompt=config.mask_prompt, allowed_max_length=max_length)
    train_ds, val_ds = InstructionDataset(split.train, **cut), InstructionDataset(split.val, **cut)
    loader = make_loader(train_ds, config.batch_size, grouped=config.grouped, seed=config.seed,
                         mask_prompt=config.mask_prompt, allowed_max_length=max_length, rank=ctx.rank, world_size=ctx.world_size)
    steps_per_epoch = len(loader) // config.grad_accum
    if steps_per_epoch == 0:
        left_out = [f"{count} left out as {why}" for count, why in (
            (train_ds.skipped, f"longer than the model's {context:,}-token context: shorten them"),
            (train_ds.no_answer, f"their prompt alone fills max length {max_length} (mask prompt learns only the answer): "
                                 "raise max length")) if count]
        raise ValueError(
            f"the training split has {len(train_ds)} usable record{'s' * (len(train_ds) != 1)}: fewer than one step of {one_step(config, ctx.world_size)}; "
            + ("; ".join(left_out) if left_out else SMALLER_BATCH if split.test else NO_TEST_SPLIT)
        )
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)

    def in_order(ds: InstructionDataset, batches: int) -> list:
        return list(itertools.islice(make_loader(ds, config.batch_size * ctx.world_size, shuffle=False, drop_last=False,
                                                 mask_prompt=config.mask_prompt, allowed_max_length=max_length), batches))

    return Batches(train_ds, val_ds, loader, steps_per_epoch, total_steps, val=in_order(val_ds, config.eval_batches),
                   baseline_train=in_order(train_ds, config.eval_batches or 3), context=context, max_length=max_length)


def train(config: TrainConfig, hooks: Hooks | None = None, root: Path | None = None, resume: str | Path | None = None) -> dict:
    """Fine-tune one model on one dataset into a new run under ``root`` (or ``config.out``); returns its summary.

    With ``resume`` (a run folder), continue that run from its checkpoint instead, holding its lock; see ``resume_run``.
    """
    with holding(resume, distributed.context().is_main) as lock:
        return train_held(config, hooks, root, resume, lock)


def train_held(config: TrainConfig, hooks: Hooks | None, root: Path | None, resume: str | Path | None, lock) -> dict:
    """``train``, with the resumed run's ``lock`` held."""
    hooks = hooks or Hooks()
    emit = hooks.on_event
    config.validate()
    clock = Clock()
    ctx = distributed.context()
    if resume is not None and ctx.is_main:  # other processes would find the run already marked running by rank 0
        check_resume(Path(resume), config)

    emit(Status("loading", f"Loading the {data_label(config.data)} data"))
    data_file = source_path(config.data)
    records, split = check_data(config)
    sha256 = hashlib.sha256(data_file.read_bytes()).hexdigest()
    saved = read_manifest(resume) if resume is not None else None  # the resumed run's manifest
    if saved is not None and saved.get("data", {}).get("sha256") != sha256:
        raise ResumeError(f"{data_label(config.data)} has changed since the run started: its sha256 differs from the manifest's")
    sample_record = split.val[0]

    processes = saved.get("processes", 1) if saved is not None else ctx.world_size
    if processes != ctx.world_size:
        raise ResumeError(f"the run trained in {processes} process{'es' * (processes > 1)} (torchrun --nproc-per-node "
                          f"{processes}), which split each step's batches: resume it with as many, not {ctx.world_size}")
    device = ctx.place(pick_device(config.device))
    dtype, precision = run_precision(device, config.precision, saved)
    configure_precision(device, dtype)
    def stopped_while_loading(what: str) -> None:
        if not ctx.enabled and hooks.should_stop():
            raise TrainingStopped(f"Stopped {what}: no run was started, nothing was written")

    stopped_while_loading("before loading the model")
    emit(Status("loading", f"Loading {config.model}"))
    init = init_generator(config.seed)
    model = build_model(config, device, progress=lambda desc, done, total: emit(Download(desc, done, total)), generator=init)
    data = make_batches(config, split, model.config.block_size, ctx)
    train_ds, val_ds, loader = data.train_ds, data.val_ds, data.loader
    steps_per_epoch, total_steps = data.steps_per_epoch, data.total_steps

    base = None
    if config.lora_rank:  # its checkpoint holds the adapters alone: a resume needs the same frozen base under them
        base = weights_fingerprint(model)
        if saved is not None and saved.get("base_fingerprint") not in (None, base):
            raise ResumeError(f"the weights of {config.model} have changed since the run started: LoRA trains adapters on "
                              "top of them, so the resumed run would go on from another model")
        add_lora(model, config.lora_rank, config.lora_alpha, init)
    trainable, total_params = count_trainable(model)
    step_in_backward = config.grad_clip is None and config.grad_accum == 1 and not ctx.enabled  # DDP reduces after backward
    optimizer = MasterWeightAdamW(model, dtype, lr=config.lr, weight_decay=config.weight_decay, step_in_backward=step_in_backward)
    loss_of = ctx.loss_fn(model, config.grad_accum)
    model.train()

    stopped_while_loading("while the model loaded")
    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint:
        restore(checkpoint, optimizer, clock)
    run_dir = Path(resume) if resume is not None else ctx.on_main(lambda: claim_run_dir(config.out) if config.out else new_run_dir(config.model, root))
    writer = RunWriter(run_dir, resume_step=checkpoint["step"] if checkpoint else None, lock=lock) if ctx.is_main else distributed.NullWriter()
    try:  # a failure before the loop's own try (the first manifest write on a full disk) closes the writer too
        run_fields = dict(
            status="running",
            owner=process_owner(),
            config=config.to_dict(),
            model={"name": config.model, "parameters": total_params, "trainable_parameters": trainable,
                   "n_layer": model.config.n_layer, "n_embd": model.config.n_embd, "random_init": config.random_init},
            data={"source": config.data, "file": str(data_file), "sha256": sha256,
                  "records": len(records), "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
                  "skipped_too_long": train_ds.skipped + val_ds.skipped, "skipped_no_answer": train_ds.no_answer + val_ds.no_answer},
            seed=config.seed,
            versions=versions(),
            device=describe(device, dtype),
            total_steps=total_steps,
            processes=ctx.world_size,
            global_batch=config.batch_size * ctx.world_size * config.grad_accum,
            **({"base_fingerprint": base} if base else {}),
        )
        open_run(writer, checkpoint, emit, Started(
            run_name=run_dir.name, run_dir=str(run_dir), total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            epochs=config.epochs, device=describe(device, dtype), parameters=total_params, trainable_parameters=trainable,
            sample_instruction=sample_record, train_records=len(train_ds), val_records=len(val_ds),
            start_step=checkpoint["step"] if checkpoint else 0,
            elapsed_before_s=checkpoint["clock"]["elapsed_s"] if checkpoint else 0.0, skipped_records=train_ds.skipped, context=data.context,
            no_answer_records=train_ds.no_answer, max_length=data.max_length,
            precision=precision), **run_fields)

        step = tokens_seen = first_epoch = 0
        last_val = last_train = float("nan")
        val_step = None  # the step last_val was measured at: a stopped run's may be older than its last step
        if checkpoint:
            step, tokens_seen, last_train, last_val = (checkpoint[k] for k in ("step", "tokens_seen", "last_train", "last_val"))
            val_step = checkpoint.get("last_val_step", step)
            first_epoch = start_epoch(loader, checkpoint)
        checkpointed = step if checkpoint else None
        asked = None if ctx.enabled else hooks.should_stop  # a stop midway through an evaluation; every process's at a step

        def log_eval(train_loss: float) -> None:
            nonlocal last_val, val_step
            emit(Status("evaluating", f"Evaluating at step {step}", step))
            t0 = time.perf_counter()
            val = evaluate(model, data.val, device, asked)  # None: stopped midway, the step's row keeps no val loss
            if val is not None:
                last_val, val_step = val, step
            stopped = val is None or (asked and asked())
            sample = None if stopped else respond(model, sample_record, config.style, config.sample_tokens)
            if not stopped:
                clock.eval_s += time.perf_counter() - t0
                clock.evals += 1
            record = metrics(train_loss, val)
            writer.log(record, sample)
            emit(Logged(record, response=sample))
            if not stopped:
                emit(Status("training"))

        def metrics(train_loss: float, val_loss: float | None) -> dict:
            return {
                "step": step, "epoch": round(step / steps_per_epoch, 4), "tokens_seen": tokens_seen,
                "train_loss": finite(train_loss), "val_loss": finite(val_loss), "lr": optimizer.lr,
                "tokens_per_s": clock.tokens_per_s(tokens_seen),
                "elapsed_s": clock.elapsed, "eta_s": clock.eta(step, total_steps, config.eval_every),
            }

        def stop_reason() -> str | None:
            """Why to stop before the next step, the same on every process (a stop on one stops all)."""
            asked = hooks.should_stop()
            late = config.max_wall_s is not None and clock.session > config.max_wall_s
            if not ctx.any(asked or late):
                return None
            if asked:
                return asked if isinstance(asked, str) else "stopped by its owner"
            return f"wall time limit ({config.max_wall_s:g} s)" if late else "stopped by another process"

        def save_resumable() -> None:
            nonlocal checkpointed
            # every process holds the same weights and moments: the main one writes them
            checkpointed = checkpoint_run(writer, emit, optimizer, step=step, write=ctx.is_main, epoch=epoch, epoch_start=epoch_start,
                                          tokens_seen=tokens_seen, clock=clock, last_train=last_train, last_val=last_val,
                                          last_val_step=val_step)
    except BaseException:
        writer.close()  # and lets go of the run's lock
        raise


    status, reason = "done", None
    cores = CoreShare(device)
    try:
        if not checkpoint:
            optimizer.lr = lr_at(0, config, total_steps)  # the row before the first step shows the rate that step takes
            baseline = evaluate(model, data.baseline_train, device, asked)
            if baseline is not None:
                last_train = baseline
                log_eval(last_train)
        else:
            emit(Status("training"))  # a resumed run has no step-0 evaluation to end its loading phase
        for epoch in range(first_epoch, config.epochs):
            epoch_start = loader_state(loader)
            micro = iter(loader)
            for _ in itertools.islice(micro, (step - epoch * steps_per_epoch) * config.grad_accum):
                pass  # batches a resumed run has trained already
            while step < total_steps and step < (epoch + 1) * steps_per_epoch:
                reason = stop_reason()
                if reason:
                    break
                cores.check()
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
                    raise FloatingPointError(f"the training loss became {step_loss} at step {step + 1}; lower the learning rate"
                                             + (" or LoRA alpha" if config.lora_rank else ""))
                step += 1
                clock.train_s += time.perf_counter() - t0
                last_train = step_loss
                if step % config.eval_every == 0 or step == total_steps:
                    log_eval(step_loss)
                else:
                    record = metrics(step_loss, None)
                    writer.log(record)
                    emit(Logged(record))
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                    save_resumable()
                    emit(Status("training"))
            if step >= total_steps or reason:
                break
        trained = step > 0 or checkpoint is not None  # else nothing but the starting model: nothing to save
        if reason:
            status = "stopped"
            emit(Status("stopping", f"Stopped at step {step} ({reason}){'; saving' if trained else ''}"))
            if checkpointed != step and trained:
                save_resumable()
        if trained:
            save_weights(optimizer, config.lora_rank, run_dir, emit, write=ctx.is_main)
        summary = record_end(writer, run_dir, clock, status, drop_checkpoint=ctx.is_main, stop_reason=reason, steps=step,
                             tokens_seen=tokens_seen, final_train_loss=finite(last_train), final_val_loss=finite(last_val),
                             final_val_step=val_step)
    except BaseException as e:
        record_failure(writer, e, ctx.reason(e), step, clock)
        raise
    finally:
        cores.close()
        writer.close()
    emit(Finished(summary))
    return summary
