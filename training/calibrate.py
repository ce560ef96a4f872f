"""How long one epoch of the book's data will take on this machine, measured before training starts.

``calibrate(model, lora_rank)`` builds the preset with random weights (the
same compute as the pretrained ones), times the real training step (the
loop's optimizer, stepping inside backward, and its memory clean-up) on four
batches of the canonical data (one of median length, one long, half of the
median one, and the median one with its prompt masked; offline with an empty
cache, of the bundled sample), and fits
seconds = cost per FLOP x the step's FLOPs + a fixed cost per step (the
optimizer), counting the FLOPs ours computes (``step_flops``: the blocks skip the
padding after each row's last target, attention grows with the square of the
length). Summed over the epoch's batches, plus the evaluations the loop
runs at its default settings, that is the expected epoch. The result is cached
in the app's cache directory, keyed by everything that changes it (preset,
method, precision, CPU, threads, torch), so the measurement runs once. It keeps
the fitted costs, so ``projection`` gives the time of any other run (a
visitor's own data, epochs and batch size) without measuring again.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from data import DatasetError, cache, load_instructions, split_instructions
from model import GPT, GPTConfig, generate, get_tokenizer, init_generator, pick_device, pick_dtype
from model.device import DTYPES, configure_precision, cpu_class, precision_reason, release_free_memory
from model.loss import Packing
from model.files import atomic_write

from .config import ConfigError, TrainConfig
from .distributed import Context
from .lora import add_lora
from .loop import make_batches
from .optim import MasterWeightAdamW

CACHE_NAME = "calibration.json"
PRECISION_NAMES = {dtype: name for name, dtype in DTYPES.items()}
VERSION = 12  # bumped when training gets faster (or the cached fields change), so that estimates are measured again


@dataclass
class Calibration:
    model: str
    method: str  # "full" or "lora-<rank>"
    data: str  # what was timed and what epoch_s covers: "canonical" (the book's), or "sample" where that cannot be had
    epoch_s: float  # expected wall time of one epoch of ``data``, evaluations included
    train_s: float  # ... of which training steps
    eval_s: float  # ... and evaluations
    steps: int  # optimizer steps in the epoch
    tokens_per_s: float  # padded tokens per second over the epoch's batches
    precision: str  # "bf16" or "fp32"
    reason: str  # why that precision, e.g. "fp32: this CPU has no native bf16 matmul (no AVX512-BF16/AMX)"
    cpu_class: str
    flop_s: float  # the fitted step: seconds per FLOP (``step_flops``) ...
    step_s: float  # ... plus seconds per step
    forward_flop_s: float  # an evaluation's forward pass, per FLOP
    new_token_s: float  # a generated token of the evaluation's sample answer
    measured_s: float  # how long the measurement took
    measured_at: float  # time.time() of the measurement
    cached: bool = False

    @property
    def timed_on(self) -> str:
        """What ``epoch_s`` covers, in words."""
        if self.data == "canonical":
            return "the book's data"
        return "the bundled sample (the book's data is not cached and could not be downloaded)"


def cache_file() -> Path:
    return cache.cache_dir() / CACHE_NAME


def cache_key(config: TrainConfig, device: torch.device, dtype: torch.dtype) -> str:
    """Everything the measured time depends on, as one string."""
    method = f"lora-{config.lora_rank}" if config.lora_rank else "full"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return "|".join([
        f"v{VERSION}", config.model, method, str(dtype).removeprefix("torch."), str(device), cpu, cpu_class(),
        f"{torch.get_num_threads()} threads", f"torch {torch.__version__}", f"batch {config.batch_size}",
    ])


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(entries: dict) -> None:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(entries, indent=1)))


@dataclass(frozen=True)
class Projection:
    """The expected time of a run: one epoch at the loop's defaults, or the epochs and steps a config asks for."""
    total_s: float  # training and evaluations
    train_s: float
    eval_s: float
    steps: int
    tokens: int  # padded tokens of the training batches


class BatchCost(NamedTuple):
    flops: float  # ``step_flops``: forward and backward; a forward pass alone is a third of it
    padded: int  # B x T


@dataclass(frozen=True)
class EpochShape:
    """What an epoch's time depends on: each training batch's cost, each evaluation batch's forward FLOPs, and the
    length of the reference answer to the instruction the loop answers at each evaluation (its tokens and end token)."""
    train: tuple[BatchCost, ...]
    val: tuple[float, ...]
    answer: int

    @classmethod
    def of(cls, config: GPTConfig, train: list, val: list, sample_record: dict) -> "EpochShape":
        costs = tuple(BatchCost(step_flops(config, x, y), x.numel()) for x, y in train)
        answer = len(get_tokenizer().encode(sample_record["output"], disallowed_special=())) + 1
        return cls(costs, tuple(step_flops(config, x, y) / 3 for x, y in val), answer)


def step_flops(config: GPTConfig, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward FLOPs that ours computes for one batch: 6 x params x the tokens the blocks run on
    (each row up to its last target, ``Packing``), the LM head only where targets are, attention over (B, T)."""
    d = config.n_embd
    block_params = config.n_layer * 12 * d * d
    targets = int((y != -100).sum())
    return 6 * block_params * Packing.tokens(y) + 6 * config.vocab_size * d * targets + attention_flops(config, *x.shape)


def attention_flops(config: GPTConfig, B: int, T: int) -> float:
    """Forward + backward FLOPs of attention's two products over a (B, T) batch, every layer (padding included)."""
    return 12 * config.n_layer * B * T * T * config.n_embd


def epoch_batches(config: TrainConfig, context: int, records: list[dict]) -> tuple[list, list, dict]:
    """The first-epoch training batches of ``records``, as the loop makes them (``loop.make_batches``), its
    evaluation batches, and the record whose answer it generates at each evaluation."""
    split = split_instructions(records)
    if not split.train:
        raise ValueError(f"too few records ({len(records)}) for a training split")
    data = make_batches(config, split, context, Context())
    return list(data.loader), data.val, split.val[0]


def fit(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds per unit, fixed seconds per step): the least-squares line through (units, seconds) samples,
    proportional instead if that line is odd (falling, or below zero at no units)."""
    units, seconds = zip(*samples)
    try:
        per_unit, fixed = statistics.linear_regression(units, seconds)
    except statistics.StatisticsError:  # fewer than two samples, or all of one size
        per_unit, fixed = 0.0, -1.0
    if per_unit > 0 and fixed >= 0:
        return per_unit, fixed
    return sum(seconds) / sum(units), 0.0


@torch.no_grad()
def time_evaluation(model: GPT, val: list, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(seconds per FLOP of a validation forward pass, seconds per generated token), in the compute dtype."""
    model.eval().to(dtype)
    x, y = val[0]
    # Warm-ups of the same shapes: the loop evaluates the same batches every time, so after its first evaluation
    # their kernels are made (a cold pass read the epoch's evaluations ~40 % slow).
    model.loss(x.to(device), y.to(device))
    t0 = time.perf_counter()
    model.loss(x.to(device), y.to(device))
    forward_per_flop = (time.perf_counter() - t0) / (step_flops(model.config, x, y) / 3)
    prompt = x[0, :32].tolist()
    generate(model, prompt, 2, eos_id=None)
    t0 = time.perf_counter()
    generate(model, prompt, 8, eos_id=None)
    per_new_token = (time.perf_counter() - t0) / 8
    model.float()
    return forward_per_flop, per_new_token


def measure(config: TrainConfig) -> Calibration:
    """Time the training step of ``config.model`` (random weights) on this machine; see the module docstring."""
    started = time.perf_counter()
    device = pick_device(config.device)
    dtype = pick_dtype(device, config.precision)
    configure_precision(device, dtype)
    gpt_config = GPTConfig.from_name(config.model)
    try:
        records, data = load_instructions("canonical"), "canonical"
    except DatasetError:  # offline with an empty cache: the bundled sample times the same step
        records, data = load_instructions("sample"), "sample"
    train, val, sample_record = epoch_batches(config, gpt_config.block_size, records)
    masked = epoch_batches(replace(config, mask_prompt=True), gpt_config.block_size, records)[0]  # the same batches
    by_length = sorted(range(len(train)), key=lambda i: Packing.tokens(train[i][1]))

    def at(tenths: int) -> int:
        """The index of the batch ``tenths`` / 10 of the way up the lengths."""
        return by_length[len(by_length) * tenths // 10]

    median, long = train[at(5)], train[at(9)]

    init = init_generator(config.seed)
    model = GPT(gpt_config, init).to(device)
    forward_per_flop, per_new_token = time_evaluation(model, val, dtype, device)
    if config.lora_rank:
        add_lora(model, config.lora_rank, config.lora_alpha, init)
    optimizer = MasterWeightAdamW(model, dtype, lr=config.lr, weight_decay=config.weight_decay, step_in_backward=True)
    model.train()

    def step(x, y) -> float:
        t0 = time.perf_counter()
        x, y = x.to(device), y.to(device)
        model.loss(x, y).backward()
        if device.type == "cpu":
            release_free_memory()
        return time.perf_counter() - t0

    # Warm-up on two other batches: the first step of any shape creates its kernels, and nearly every step of
    # an epoch has new shapes (``Packing``), so timing the warm-up's own batches again read ~10 % fast in bf16.
    for x, y in (train[at(4)], train[at(8)]):
        step(x, y)
    # Half of the median batch as a third point: the FLOPs then span ~3x, so the slope and the fixed part separate
    # (two batches of similar size left the fixed part to absorb most of a small model's cost). The median batch
    # with its prompt masked as a fourth: fewer head FLOPs for the same blocks, which a masked run has (tiny, whose
    # FLOPs are mostly its head: a masked epoch read 14 % short without it, 7 % with it; 124M the same either way).
    half = median[0][: len(median[0]) // 2], median[1][: len(median[1]) // 2]
    samples = [(step_flops(gpt_config, x, y), step(x, y)) for x, y in (median, long, half, masked[at(5)])]
    per_flop, fixed = fit(samples)

    optimizer.finish()

    epoch = project(EpochShape.of(gpt_config, train, val, sample_record), config, per_flop, fixed, forward_per_flop,
                    per_new_token)
    return Calibration(
        model=config.model, method=f"lora-{config.lora_rank}" if config.lora_rank else "full", data=data,
        epoch_s=epoch.total_s, train_s=epoch.train_s, eval_s=epoch.eval_s, steps=epoch.steps,
        tokens_per_s=epoch.tokens / epoch.train_s, precision=PRECISION_NAMES[dtype],
        reason=precision_reason(device, config.precision), cpu_class=cpu_class(),
        flop_s=per_flop, step_s=fixed, forward_flop_s=forward_per_flop, new_token_s=per_new_token,
        measured_s=time.perf_counter() - started, measured_at=time.time(),
    )


def project(shape: EpochShape, config: TrainConfig, per_flop: float, fixed: float, forward_per_flop: float,
            per_new_token: float) -> Projection:
    """The run ``config`` asks for (its epochs, up to ``max_steps``) over batches of this shape, at the fitted costs:
    the steps, the step-0 baseline and every evaluation the loop runs.

    The first evaluation's answer (the starting model's) is taken to run to ``sample_tokens``; later ones to stop
    with the reference answer's length, as a fine-tuned model does (GPT-2 124M, fp32, after one epoch of the book's
    data: 2 tokens and 0.07 s, where 40 tokens took 0.64 s).
    """
    per_epoch = len(shape.train) // config.grad_accum
    steps = config.epochs * per_epoch if not config.max_steps else min(config.epochs * per_epoch, config.max_steps)
    epochs = steps / per_epoch  # every epoch has the same batches' FLOPs, in another order
    train_s = per_flop * sum(batch.flops for batch in shape.train) * epochs + fixed * steps
    evals = steps // config.eval_every + 1 + (steps % config.eval_every != 0)
    baseline = sum(batch.flops / 3 for batch in shape.train[: config.eval_batches or 3]) * forward_per_flop
    answers = config.sample_tokens + (evals - 1) * min(config.sample_tokens, shape.answer)
    eval_s = baseline + evals * sum(shape.val) * forward_per_flop + answers * per_new_token
    return Projection(total_s=train_s + eval_s, train_s=train_s, eval_s=eval_s, steps=steps,
                      tokens=round(sum(batch.padded for batch in shape.train) * epochs))


def data_shape(records: list[dict], config: TrainConfig) -> EpochShape:
    """The epoch of ``records`` (a visitor's data, split and batched as ``config``'s run does) for its model's context.
    ``DatasetError`` or ``ValueError`` (the loop's own message) when the records cannot make a training step."""
    gpt_config = GPTConfig.from_name(config.model)
    return EpochShape.of(gpt_config, *epoch_batches(config, gpt_config.block_size, records))


def projection(calibration: Calibration, shape: EpochShape, config: TrainConfig | None = None) -> Projection:
    """A run over ``shape`` at a calibration's measured costs: one epoch at the loop's defaults, or ``config``'s run."""
    config = config or TrainConfig(model=calibration.model, random_init=True)
    return project(shape, config, calibration.flop_s, calibration.step_s, calibration.forward_flop_s,
                   calibration.new_token_s)


def cached(model: str = "gpt2", lora_rank: int = 0, precision: str = "auto") -> Calibration | None:
    """The cached expected epoch for a preset and method on this machine, or None when it was never measured here."""
    config = TrainConfig(model=model, random_init=True, lora_rank=lora_rank, precision=precision)
    device = pick_device(config.device)
    entry = _read_cache().get(cache_key(config, device, pick_dtype(device, precision)))
    try:
        return Calibration(**{**entry, "cached": True}) if entry else None
    except TypeError:
        return None


def calibrate(model: str = "gpt2", lora_rank: int = 0, precision: str = "auto", refresh: bool = False) -> Calibration:
    """The expected epoch on the canonical data for a preset and method: cached, else measured (seconds) and cached."""
    found = None if refresh else cached(model, lora_rank, precision)
    if found is not None:
        return found
    config = TrainConfig(model=model, random_init=True, lora_rank=lora_rank, precision=precision)
    result = measure(config)
    entries = {key: entry for key, entry in _read_cache().items() if key.startswith(f"v{VERSION}|")}  # older ones are stale
    device = pick_device(config.device)
    entries[cache_key(config, device, pick_dtype(device, precision))] = {k: v for k, v in asdict(result).items() if k != "cached"}
    _write_cache(entries)
    return result


def main(argv=None) -> int:
    """``python -m training.calibrate [--model gpt2] [--lora-rank 0] [--precision auto] [--refresh]``: print the expected epoch."""
    import argparse

    from model.device import configure_runtime

    configure_runtime()
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=main.__doc__)
    p.add_argument("--model", default="gpt2", help="the preset to time (default: gpt2; tiny with random weights too)")
    p.add_argument("--lora-rank", type=int, default=0, help="time LoRA at this rank (default: 0, full fine-tuning)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 where the hardware multiplies it natively, else fp32 (default auto)")
    p.add_argument("--refresh", action="store_true", help="measure again even if a cached result exists")
    args = p.parse_args(argv)
    try:
        c = calibrate(args.model, args.lora_rank, args.precision, refresh=args.refresh)
    except ConfigError as e:  # an unknown preset
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{c.model} ({c.method}), {c.reason}: one epoch of {c.timed_on} ~{c.epoch_s / 60:.1f} min "
          f"({c.train_s:.0f} s training at {c.tokens_per_s:.0f} tokens/s, {c.eval_s:.0f} s evaluating); "
          f"{'cached' if c.cached else f'measured in {c.measured_s:.1f} s'}")
    print(json.dumps({k: v for k, v in asdict(c).items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
