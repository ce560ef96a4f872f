"""Direct Preference Optimization (Rafailov et al., 2023) after instruction fine-tuning: the book's next stage.

``train_dpo(config, hooks)`` takes a finished fine-tuned run as the policy and
the same model, frozen, as the reference. The reference's log-probabilities of
every pair are computed once, before training, in the very batches training
and evaluation will use, so no second model is resident and the first step's
loss is ln 2 exactly. Each step is then one forward and backward pass of the
policy over the chosen and rejected answers together (see
``data.preference.collate_preferences``), with the fine-tuning machinery:
bf16 compute with exact fp32 masters, AdamW inside backward, LoRA. Runs
checkpoint (every ``checkpoint_every`` steps, and when stopped) and resume
exactly, as fine-tuning runs do (``resume_dpo``).

Loss: ``-log sigmoid(beta * ((log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))))``
over the answers' tokens and their end token, averaged per answer (the
book's notebook) or summed (the paper, ``sum_logprobs``).
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from data.preference import (
    PreferenceDataset, collate_preferences, epoch_batches, in_order_batches, load_preferences, preference_path, split_preferences,
)
from model import GPT, init_generator, pick_device
from model.device import configure_precision, describe, release_free_memory
from runstore import (RunWriter, claim_run_dir, hold_run, find_run, load_run, new_run_dir, parent_folder, process_owner,
                      read_manifest)
from runstore.store import WEIGHTS

from .checkpoint import (
    ResumeError, check_unchanged, checkpoint_run, holding, load_checkpoint, refuse_changes, restore, resumable, run_precision,
)
from .config import ConfigError, Settings, TrainConfig, check_device, setting
from .cores import CoreShare
from .dpo_loss import dpo_loss, evaluate_dpo, figures, reference_logprobs, sequence_logprobs
from .events import Finished, Logged, Progress, Started, Status
from .lora import add_lora, count_trainable
from .loop import Clock, Hooks, data_label, finite, open_run, record_end, record_failure, respond, save_weights, versions
from .optim import MasterWeightAdamW


@dataclass
class DPOConfig(Settings):
    parent: str | None = setting(None, "the fine-tuned run to align: its directory, or its name under runs/", flag="--from")
    data: str = setting("preference", "preference (the book's 1,100 pairs) or a JSON / JSON Lines / CSV file with chosen and rejected")
    beta: float = setting(0.1, "DPO beta: how far the policy may move from the reference", 0, 100, low_open=True)
    sum_logprobs: bool = setting(False, "sum the answers' token log-probabilities (the paper) instead of averaging them (the book)")
    epochs: int = setting(1, "passes over the training pairs", 1, 100)
    max_steps: int | None = setting(None, "stop after this many steps (quick checks)", 1)
    batch_size: int = setting(8, "pairs per batch", 1, 512)
    lr: float = setting(5e-6, "AdamW learning rate", 0, 1.0, low_open=True)
    weight_decay: float = setting(0.01, "AdamW weight decay", 0, 1.0)
    seed: int = setting(123, "seed for the batch order", 0, 2**63 - 1)
    grad_clip: float | None = setting(None, "clip the gradient norm to this", 0, low_open=True)
    eval_every: int = setting(20, "steps between evaluations on train and validation pairs", 1)
    eval_batches: int | None = setting(3, "batches per evaluation, of train and of validation pairs (0 or none: all "
                                          "the validation pairs and 3 batches of train)", 1)
    sample_tokens: int = setting(40, "new tokens of the validation instruction's answer at each evaluation", 0, 512)
    grouped: bool = setting(True, "length-grouped batches; off: plainly shuffled", flag="--no-grouped")
    packed: bool = setting(True, "one row per pair, the prompt computed once; off: chosen and rejected as 2B rows",
                           flag="--no-packed")
    lora_rank: int = setting(0, "LoRA rank; 0: full fine-tuning", 0, 1024)
    lora_alpha: float = setting(16.0, "LoRA alpha (the update is scaled by alpha / rank)", 0, 4096, low_open=True,
                                 needs="lora_rank")
    precision: str = setting("auto", "auto: bf16 where the hardware multiplies it natively, else fp32", choices=("auto", "bf16", "fp32"))
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    max_length: int | None = setting(None, "skip pairs longer than this many tokens (none: the model's context window)", 8)
    out: str | None = setting(None, "run directory (default runs/<timestamp>-<parent>-dpo)")
    checkpoint_every: int = setting(0, "steps between resumable checkpoints (a stopped run always saves one); "
                                       "0: only when stopped", 0)
    max_wall_s: float | None = setting(None, "stop and save once the run has gone on this many seconds (loading and "
                                              "evaluations included)", 0, low_open=True)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "DPOConfig":
        if not self.parent:
            raise ConfigError("parent: name the fine-tuned run to align (--from RUN)")
        self.check_fields()
        check_device(self.device)
        return self


class StopTraining(Exception):
    """Raised inside the loop when a stop was requested; the run is still saved. ``args[0]``: the reason."""


def stop_reason(hooks: Hooks, max_wall_s: float | None = None, clock: Clock | None = None) -> str | None:
    """Why to stop before the next step: ``should_stop()`` returns True or the reason as text, or the wall time is up."""
    asked = hooks.should_stop()
    if asked:
        return asked if isinstance(asked, str) else "stopped by its owner"
    if max_wall_s is not None and clock.session > max_wall_s:
        return f"wall time limit ({max_wall_s:g} s)"
    return None


# The parent run


def parent_run(parent: str | Path, root: Path | None = None) -> tuple[Path, dict]:
    """The fine-tuned run to align: its folder and manifest; a clear error when it is not a finished run."""
    path = Path(parent)
    if not (path / "manifest.json").is_file():
        found = find_run(parent, root)
        if found is None:
            raise FileNotFoundError(f"parent run {parent!r} not found: give a run directory or a run's name under runs/")
        path = found.path
    manifest = read_manifest(path)
    if not manifest.get("config"):
        raise FileNotFoundError(f"{path} is not a run directory (its manifest has no config)")
    if manifest.get("status") not in ("done", "stopped") or not (path / WEIGHTS).is_file():
        raise ValueError(f"parent run {path.name} is {manifest.get('status', 'unfinished')}, not finished: "
                         f"preference tuning starts from a run's saved weights")
    if not manifest.get("steps"):
        raise ValueError(f"parent run {path.name} stopped before its first step: its weights are the base model's, "
                         "with nothing fine-tuned to align")
    return path, manifest


def base_config(manifest: dict) -> TrainConfig:
    """The fine-tuning settings behind a run (a DPO run keeps its parent's): base model, prompt style, data."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in manifest["config"].items() if k in known})


def is_dpo_run(run_dir: str | Path) -> bool:
    return read_manifest(Path(run_dir)).get("method") == "dpo"


def check_dpo(config: DPOConfig, root: Path | None = None):
    """``(parent folder, parent manifest, records, split)``, or an error naming what cannot make a run.

    Cheap (no model is loaded): call it before a job starts, so that a bad parent or
    bad data fails before "Started" is shown.
    """
    config.validate()
    parent_dir, manifest = parent_run(config.parent, root)
    records = load_preferences(config.data)
    split = split_preferences(records)
    name = data_label(config.data)
    if len(split.train) < config.batch_size:
        raise ValueError(f"{name} has {len(records)} pair{'s' * (len(records) != 1)}: its training split (85 %) has {len(split.train)}, fewer than "
                         f"one batch of {config.batch_size}; use a smaller batch or at least "
                         f"{math.ceil(config.batch_size / 0.85)} pairs")
    return parent_dir, manifest, records, split


# Resume

# Settings a resumed run may change: none of them changes what is trained or the cached reference.
RESUME_CHANGEABLE = ("checkpoint_every", "max_wall_s", "eval_every", "sample_tokens")


def resume_dpo_config(run_dir: str | Path, held: bool = False, **changes) -> DPOConfig:
    """The settings of the DPO run in ``run_dir`` (``changes`` only to those in ``RESUME_CHANGEABLE``), if it can be resumed.

    Its parent is looked for beside it first (a runs folder moved whole), then where it was.
    """
    run_dir = Path(run_dir)
    manifest = resumable(run_dir, held, dpo=True)
    refuse_changes(changes, manifest["dpo"], RESUME_CHANGEABLE)
    parent = parent_folder(run_dir, manifest)
    return DPOConfig.from_dict({**manifest["dpo"], **changes, "parent": str(parent), "out": str(run_dir)})


def resume_dpo(run_dir: str | Path, hooks: Hooks | None = None, **changes) -> dict:
    """Continue a stopped or interrupted DPO run from its checkpoint, with its own settings; its summary.

    ``ResumeError`` says why a run cannot be resumed (done, no checkpoint, changed settings, data or parent).
    """
    return train_dpo(resume_dpo_config(run_dir, **changes), hooks, resume=run_dir)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# The loop


def reference_pass(model: GPT, plans, device, packed: bool, average: bool, emit, stop) -> list[torch.Tensor]:
    """The reference log-probabilities of the pairs of each ``(dataset, batches)`` plan, with progress events.

    ``stop()`` is asked after each batch; a reason raises ``StopTraining``.
    """
    t0 = time.perf_counter()
    total = sum(len(b) for _, batches in plans for b in batches)
    emit(Status("reference", f"Reference log-probabilities of {total} pairs"))
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        emit(Progress({"phase": "reference", "done": done, "total": total, "elapsed_s": time.perf_counter() - t0}))
        if reason := stop():
            raise StopTraining(reason)

    return [reference_logprobs(model, ds, batches, device, packed, average, progress) for ds, batches in plans]


def train_dpo(config: DPOConfig, hooks: Hooks | None = None, root: Path | None = None, resume: str | Path | None = None) -> dict:
    """Align a fine-tuned run with preference data into a new run under ``root``; returns its summary (also in its manifest).

    With ``resume`` (a DPO run folder), continue that run from its checkpoint instead, holding its lock; see ``resume_dpo``.
    The checkpoint keeps the reference log-probabilities too (a few bytes a pair): a resumed run skips the
    reference pass, and its figures do not depend on the kernels of the machine it resumes on.
    """
    # The parent's lock too, shared: its weights are the reference model; nobody may resume or delete it meanwhile.
    with holding(resume) as lock, hold_run(parent_run(config.parent, root)[0], shared=True, doing="align from it"):
        return train_dpo_held(config, hooks, root, resume, lock)


def train_dpo_held(config: DPOConfig, hooks: Hooks | None, root: Path | None, resume: str | Path | None, lock) -> dict:
    """``train_dpo``, with the resumed run's ``lock`` held."""
    hooks = hooks or Hooks()
    emit = hooks.on_event
    clock = Clock()
    if resume is not None:
        check_unchanged(resume_dpo_config(resume, held=True).to_dict(), config, RESUME_CHANGEABLE + ("parent",))

    pairs = "the book's preference pairs" if config.data == "preference" else f"the preference pairs in {data_label(config.data)}"
    emit(Status("loading", f"Loading {pairs}"))
    parent_dir, parent_manifest, records, split = check_dpo(config, root)
    sft = base_config(parent_manifest)
    data_file = preference_path(config.data)
    data_sha256, parent_sha256 = file_sha256(data_file), file_sha256(parent_dir / WEIGHTS)
    saved = read_manifest(resume) if resume is not None else None
    if saved is not None:
        if saved["data"]["sha256"] != data_sha256:
            raise ResumeError(f"{data_file.name} has changed since the run started: its sha256 differs from the manifest's")
        if saved.get("parent_sha256") != parent_sha256:
            raise ResumeError(f"the weights of {parent_dir.name} have changed since the run started (was it trained further?): "
                              "the policy's frozen weights and the reference would not be the same")
    sample_record = split.val[0]

    def stop() -> str | None:
        return stop_reason(hooks, config.max_wall_s, clock)

    device = pick_device(config.device)
    dtype, precision = run_precision(device, config.precision, saved)
    configure_precision(device, dtype)
    emit(Status("loading", f"Loading {parent_dir.name}"))
    torch.manual_seed(config.seed)  # dropout's draws
    model = load_run(parent_dir, device=device)
    context = model.config.block_size
    max_length = min(config.max_length or context, context)
    train_ds = PreferenceDataset(split.train, style=sft.style, max_length=max_length)
    val_ds = PreferenceDataset(split.val, style=sft.style, max_length=max_length)
    steps_per_epoch = len(epoch_batches(train_ds, config.batch_size, 0, config.seed, config.grouped))
    if steps_per_epoch == 0:
        remedy = (f"raise max length (at most the model's context, {context:,})" if max_length < context else
                  f"shorten them: {context:,} tokens is the model's context")
        longer = (f"; {train_ds.skipped} pair{' was' if train_ds.skipped == 1 else 's were'} skipped as longer than max length {max_length} tokens: {remedy}"
                  if train_ds.skipped else "")
        raise ValueError(f"the training split has {len(train_ds)} usable pair{'s' * (len(train_ds) != 1)}: fewer than one batch of "
                         f"{config.batch_size}; use a smaller batch, or more pairs{longer}")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    n_eval = config.eval_batches
    val_batches = in_order_batches(range(len(val_ds)), config.batch_size)[:n_eval]
    train_eval_batches = in_order_batches(range(len(train_ds)), config.batch_size)[:n_eval or 3]

    if config.lora_rank:
        add_lora(model, config.lora_rank, config.lora_alpha, init_generator(config.seed))
    trainable, total_params = count_trainable(model)
    step_in_backward = config.grad_clip is None
    optimizer = MasterWeightAdamW(model, dtype, lr=config.lr, weight_decay=config.weight_decay, step_in_backward=step_in_backward)
    model.train()
    average = not config.sum_logprobs

    checkpoint = load_checkpoint(resume) if resume is not None else None
    if checkpoint:
        restore(checkpoint, optimizer, clock)
    run_dir = Path(resume) if resume is not None else claim_run_dir(config.out) if config.out else new_run_dir(f"{parent_dir.name}-dpo", root)
    writer = RunWriter(run_dir, resume_step=checkpoint["step"] if checkpoint else None, lock=lock)
    try:  # a failure before the loop's own try (the first manifest write on a full disk) closes the writer too
        run_fields = dict(
            status="running", owner=process_owner(), method="dpo", parent_run=parent_dir.name, parent_dir=str(parent_dir),
            parent_sha256=parent_sha256, config=sft.to_dict(), dpo=config.to_dict(),
            model={**parent_manifest.get("model", {}), "parameters": total_params, "trainable_parameters": trainable},
            data={"source": config.data, "file": str(data_file), "sha256": data_sha256,
                  "records": len(records), "split": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
                  "skipped_too_long": train_ds.skipped + val_ds.skipped},
            seed=config.seed, versions=versions(), device=describe(device, dtype), total_steps=total_steps,
        )
        open_run(writer, checkpoint, emit, Started(
            run_name=run_dir.name, run_dir=str(run_dir), total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            epochs=config.epochs, device=describe(device, dtype), parameters=total_params, trainable_parameters=trainable,
            sample_instruction=sample_record, train_records=len(train_ds), val_records=len(val_ds), method="dpo",
            start_step=checkpoint["step"] if checkpoint else 0,
            elapsed_before_s=checkpoint["clock"]["elapsed_s"] if checkpoint else 0.0, precision=precision), **run_fields)

        status, reason = "done", None
        step = tokens_seen = pairs_seen = 0
        reference_s = 0.0
        last = {"train": {}, "val": {}}
        reference = None
        if checkpoint:
            step, tokens_seen, pairs_seen, reference_s, last = (
                checkpoint[k] for k in ("step", "tokens_seen", "pairs_seen", "reference_s", "last"))
            if checkpoint["reference"] is not None:  # None: stopped before the reference pass ended
                reference = [r.clone() for r in checkpoint["reference"]]
        checkpointed = step if checkpoint else None

        def metrics(step_figures: dict, evaluation: dict | None = None) -> dict:
            record = {
                "step": step, "epoch": round(step / steps_per_epoch, 4), "pairs_seen": pairs_seen, "tokens_seen": tokens_seen,
                "train_loss": finite(step_figures.get("loss")), "val_loss": None,
                **{k: finite(step_figures.get(k)) for k in ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")},
                "lr": optimizer.lr, "tokens_per_s": clock.tokens_per_s(tokens_seen),
                "elapsed_s": clock.elapsed, "eta_s": clock.eta(step, total_steps, config.eval_every),
            }
            for prefix, values in (evaluation or {}).items():
                for k, v in values.items():
                    record[f"{prefix}_{k}"] = finite(v)
            return record

        def log_eval(step_figures: dict | None = None) -> None:
            emit(Status("evaluating", f"Evaluating at step {step}", step))
            t0 = time.perf_counter()
            last["train"] = evaluate_dpo(model, train_ds, train_eval_batches, ref_train_eval, device, config.beta, config.packed, average)
            last["val"] = evaluate_dpo(model, val_ds, val_batches, ref_val, device, config.beta, config.packed, average)
            last["val_step"] = step
            sample = respond(model, sample_record, sft.style, config.sample_tokens)
            clock.eval_s += time.perf_counter() - t0
            clock.evals += 1
            record = metrics(step_figures or last["train"], {"val": last["val"], "eval_train": last["train"]})
            writer.log(record, sample)
            emit(Logged(record, response=sample))
            emit(Status("training"))

        def save_resumable() -> None:
            nonlocal checkpointed
            checkpointed = checkpoint_run(writer, emit, optimizer, step=step, epoch=step // steps_per_epoch, tokens_seen=tokens_seen,
                                          clock=clock, pairs_seen=pairs_seen, last=last, reference=reference, reference_s=reference_s)
    except BaseException:
        writer.close()  # and lets go of the run's lock
        raise


    cores = CoreShare(device)
    try:
        try:
            if reference is None:
                t0 = time.perf_counter()
                first = epoch_batches(train_ds, config.batch_size, 0, config.seed, config.grouped)
                seen = {i for b in first for i in b}
                rest = [i for i in range(len(train_ds)) if i not in seen]
                plans = [(train_ds, first + in_order_batches(rest, config.batch_size)), (train_ds, train_eval_batches),
                         (val_ds, val_batches)]
                reference = reference_pass(model, plans, device, config.packed, average, emit, stop)
                reference_s = time.perf_counter() - t0
            ref_train, ref_train_eval, ref_val = reference
            if not writer.metrics:
                log_eval()
            else:
                emit(Status("training"))  # a resumed run has no step-0 evaluation to end its loading phase
            for epoch in range(step // steps_per_epoch, config.epochs):
                batches = epoch_batches(train_ds, config.batch_size, epoch, config.seed, config.grouped)
                for positions in batches[step - epoch * steps_per_epoch:]:  # a resumed run skips the batches it has trained
                    if step >= total_steps:
                        break
                    if reason := stop():
                        raise StopTraining(reason)
                    cores.check()
                    t0 = time.perf_counter()
                    batch = collate_preferences([train_ds[i] for i in positions], packed=config.packed).to(device)
                    ref = ref_train[positions].to(device)
                    logp = sequence_logprobs(model, batch, average)
                    loss, chosen, rejected = dpo_loss(logp[0::2], logp[1::2], ref[:, 0], ref[:, 1], config.beta)
                    loss.backward()
                    if not step_in_backward:
                        optimizer.step(config.grad_clip)
                    if device.type == "cpu":
                        release_free_memory()
                    step_figures = figures(loss.detach(), chosen, rejected)
                    if not math.isfinite(step_figures["loss"]):
                        raise FloatingPointError(f"the DPO loss became {step_figures['loss']} at step {step + 1}; lower the learning "
                                                 "rate" + (" or LoRA alpha" if config.lora_rank else ""))
                    step += 1
                    tokens_seen += batch.inputs.numel()
                    pairs_seen += batch.pairs
                    clock.train_s += time.perf_counter() - t0
                    last["step"] = step_figures
                    if step % config.eval_every == 0 or step == total_steps:
                        log_eval(step_figures)
                    else:
                        record = metrics(step_figures)
                        writer.log(record)
                        emit(Logged(record))
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                        save_resumable()
                        emit(Status("training"))
                if step >= total_steps:
                    break
        except StopTraining as stopped:
            status, reason = "stopped", stopped.args[0]
            emit(Status("stopping", f"Stopped at step {step} ({reason}); saving"))
            if checkpointed != step:
                save_resumable()

        save_weights(optimizer, config.lora_rank, run_dir, emit)
        val = last["val"]
        summary = record_end(
            writer, run_dir, clock, status, stop_reason=reason, steps=step, pairs_seen=pairs_seen, tokens_seen=tokens_seen,
            final_train_loss=finite(last.get("step", last["train"]).get("loss")), final_val_loss=finite(val.get("loss")),
            final_val_step=last.get("val_step"), final_val_reward_margin=finite(val.get("reward_margin")),
            final_val_reward_accuracy=finite(val.get("reward_accuracy")), reference_time_s=reference_s)
    except BaseException as e:
        record_failure(writer, e, f"{type(e).__name__}: {e}", step, clock)
        raise
    finally:
        cores.close()
        writer.close()
    emit(Finished(summary))
    return summary


if __name__ == "__main__":
    from training.dpo_cli import main

    sys.exit(main())
