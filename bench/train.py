"""Fine-tuning throughput: ours, trained as ``python -m training`` trains, against transformers on the same batches.

Random weights of the chosen size (the same compute as the pretrained ones),
the book's settings (batch 8, AdamW lr 5e-5, weight decay 0.1). Ours is built,
stepped and cleaned up after each step by the same functions as the training
loop (``build_model``, ``MasterWeightAdamW`` stepping inside backward,
``release_free_memory``), after the same runtime and precision settings
(``configure_runtime``, ``configure_precision``).

1. Ours alone: two warm-up steps, the second on the epoch's longest batch, so
   that the peak memory printed is the epoch's peak for ours alone.
2. Then, batch by batch, interleaved so that a busy machine slows every side
   alike: ours on the book's random batch, transformers (fp32) on the same
   batch, ours on a length-grouped batch, a short fp32/bf16 matmul to measure
   the peak, and with ``--lora-rank`` ours with LoRA on the random batch.
3. Last, one step of ours under torch's profiler: its share in matmuls and
   their rate, AdamW, attention and the rest (``step_breakdown``).

Figures per padded token (B x T, padding included), ratios per batch with
min / median / max, and epochs projected over all of the epoch's batches:
transformers' from its seconds per padded token, ours' from its steps fitted
as a fixed part plus a time per FLOP (``project_epoch``).

    python -m bench.train --model gpt2 --steps 10 [--data canonical] [--lora-rank 16] [--skip-autocast]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

from model.device import configure_runtime

import torch
import torch.nn.functional as F

from bench.common import at_least, machine, precision_line, print_json, spread
from data import DatasetError, InstructionDataset, load_instructions, make_loader, padding_stats, split_instructions
from model import GPTConfig, pick_device, pick_dtype, save_pretrained
from model.device import configure_precision, cpu_class, describe, peak_rss_mb, release_free_memory
from model.fused import linear
from training.calibrate import attention_flops, fit, step_flops
from training.config import ConfigError, TrainConfig
from training.loop import build_model
from training.lora import add_lora
from training.optim import MasterWeightAdamW


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 3, budget_s: float = 2.0) -> dict:
    """Measured FLOP/s of a large square matmul by ``torch.mm`` and by the model's ``linear`` (oneDNN in fp32 on
    x86 CPUs, ~10 % faster than ``torch.mm``'s MKL at 2048 here); the faster is the ceiling for MFU.

    Each is timed at ``n``, or at the largest size below it whose ``reps`` products a product at half that
    size predicts to fit in ``budget_s``: bf16 on a CPU without native bf16 runs ``torch.mm`` at 0.3-2 GFLOP/s,
    up to a minute for one 2048-square product (fp32 there: ~100-160 GFLOP/s, ~0.15 s). Sizes are tried upwards
    from 256, each timed after its first product: that first one includes making the kernel (oneDNN's took
    ~6 ms at 256, which once predicted 2048 to be 20x slower than it is), and the emulated kernel's rate falls
    with size (2.2 GFLOP/s at 256, 0.8 at 1,024).
    """
    peaks = {}
    for name, matmul in (("torch.mm", torch.mm), ("linear", linear)):
        size = 256
        while size < n:
            a = torch.randn(size, size, dtype=dtype)
            matmul(a, a)
            start = time.perf_counter()
            matmul(a, a)
            if 8 * (time.perf_counter() - start) * reps > budget_s:  # twice the size: 8x the FLOPs
                break
            size *= 2
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        matmul(a, b)
        start = time.perf_counter()
        for _ in range(reps):
            matmul(a, b)
        peaks[name] = 2 * size**3 * reps / (time.perf_counter() - start)
    return peaks


MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise"}


@contextlib.contextmanager
def quiet_native_stderr():
    """Standard error's file descriptor pointed at /dev/null: torch's profiler (Kineto) writes "USDT: ...
    profiler_start" lines there from C++, whatever ``KINETO_LOG_LEVEL`` says."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_breakdown(step, config: GPTConfig, x, y) -> dict:
    """Where one step of ours goes, by torch's profiler: shares of its wall time in the matmuls, AdamW's fused
    kernel (in bf16 the master weights' join and split count as the rest), attention (SDPA, with its batched
    matmuls) and everything else, and the matmuls' own rate.

    MFU is the product of the matmuls' share and their rate against the peak; this says which of the two
    falls short. The profiler adds a little to every op, so "other" (many small ops) reads a little high.
    """
    from torch.profiler import profile

    with quiet_native_stderr(), profile() as prof:
        start = time.perf_counter()
        step(x, y)
        wall = time.perf_counter() - start
    seconds = {"matmul": 0.0, "adamw": 0.0, "attention": 0.0}
    for event in prof.key_averages():
        kind = ("matmul" if event.key in MATMULS else "adamw" if "adamw" in event.key
                else "attention" if "scaled_dot_product" in event.key or event.key in ("aten::bmm", "aten::baddbmm") else None)
        if kind:
            seconds[kind] += event.self_cpu_time_total / 1e6
    matmul_flops = step_flops(config, x, y) - attention_flops(config, *x.shape)
    shares = {kind: s / wall for kind, s in seconds.items()}
    return {**shares, "other": 1 - sum(shares.values()),
            "matmul_gflops": matmul_flops / seconds["matmul"] / 1e9 if seconds["matmul"] else None}


def project_epoch(config: GPTConfig, measured, batches) -> float:
    """Seconds of ours for ``batches``, from ``measured`` ((x, y), seconds) steps fitted as seconds = fixed + FLOPs / rate.

    Not per padded token: the blocks skip padding, so a batch with little of it
    (length-grouped) costs more per padded token; projected that way, the grouped
    epoch came out 7 % slower than the random one, which the CLI trains in the
    same time (217 and 216 s, fp32). The fixed part is what every step does
    whatever its length (AdamW over every weight).
    """
    per_flop, fixed = fit([(step_flops(config, x, y), seconds) for (x, y), seconds in measured])
    return sum(fixed + per_flop * step_flops(config, x, y) for x, y in batches)


class Ours:
    """Our model and optimizer as ``training.loop.train`` makes them, and its step."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype, save_to: str | None = None):
        self.device = device
        self.model = build_model(config, device)
        if save_to:
            save_pretrained(self.model, save_to)  # the same initial weights for transformers
        if config.lora_rank:
            add_lora(self.model, config.lora_rank, config.lora_alpha)
        self.optimizer = MasterWeightAdamW(self.model, dtype, lr=config.lr, weight_decay=config.weight_decay,
                                           step_in_backward=True)
        self.model.train()

    def __call__(self, x, y) -> float:
        x, y = x.to(self.device), y.to(self.device)
        loss = self.model.loss(x, y)
        loss.backward()  # AdamW steps inside backward at the book's settings
        value = loss.item()
        if self.device.type == "cpu":
            release_free_memory()
        return value


class Transformers:
    """Hugging Face GPT2LMHeadModel with torch's fused AdamW (what transformers' Trainer takes by default on torch 2.8
    and newer), no KV cache kept while training, the book's loss on full logits."""

    def __init__(self, path: str, device: torch.device):
        from transformers import GPT2LMHeadModel

        self.device = device
        self.model = GPT2LMHeadModel.from_pretrained(path).to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-5, weight_decay=0.1, fused=True)

    def step(self, x, y, autocast: bool = False) -> float:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = self.model(input_ids=x.to(self.device), use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(self.device).flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def timed_step(fn, x, y) -> tuple[float, float]:
    start = time.perf_counter()
    loss = fn(x, y)
    return time.perf_counter() - start, loss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", help="preset: tiny, gpt2, gpt2-medium, ...")
    parser.add_argument("--steps", type=at_least(1), default=10, help="timed steps of each side")
    parser.add_argument("--data", default="canonical", help="canonical, sample, or a JSON / JSON Lines / CSV file")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="ours (auto: bf16 where native)")
    parser.add_argument("--lora-rank", type=int, default=0, help="also time ours with LoRA of this rank on the same batches")
    parser.add_argument("--skip-autocast", action="store_true", help="skip transformers with bf16 autocast")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    configure_runtime()
    args = parse_args(argv)
    try:
        config = TrainConfig(model=args.model, random_init=True, data=args.data, precision=args.precision)
        lora_config = TrainConfig(**{**config.to_dict(), "lora_rank": args.lora_rank}) if args.lora_rank else None
        split = split_instructions(load_instructions(args.data))
    except (DatasetError, ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    device = pick_device()
    dtype = pick_dtype(device, args.precision)
    configure_precision(device, dtype)
    gpt_config = GPTConfig.from_name(args.model)
    train_ds = InstructionDataset(split.train, max_length=gpt_config.block_size)
    n = args.steps
    random_all = list(make_loader(train_ds, config.batch_size, seed=config.seed))
    grouped_all = list(make_loader(train_ds, config.batch_size, grouped=True, seed=config.seed))
    if len(random_all) < n + 1:
        print(f"error: the training split of {args.data!r} has {len(random_all)} batches of {config.batch_size}; "
              f"--steps {n} needs {n + 1}", file=sys.stderr)
        return 1
    random_batches, grouped_batches = random_all[1 : n + 1], grouped_all[1 : n + 1]
    longest = max(random_all, key=lambda b: b[0].shape[1])
    epoch = {kind: padding_stats(train_ds, config.batch_size, grouped=kind == "grouped", seed=config.seed)
             for kind in ("random", "grouped")}
    print(f"machine: {machine()}; {args.model}: {gpt_config.num_params() / 1e6:.0f}M parameters; ours in {describe(device, dtype)}")
    print(precision_line(device, args.precision))
    print(f"epoch: {epoch['random']['batches']} batches; padded tokens {epoch['random']['padded_tokens']:,} random, "
          f"{epoch['grouped']['padded_tokens']:,} grouped; longest batch {tuple(longest[0].shape)}")

    tmp = tempfile.TemporaryDirectory()
    ours = Ours(config, device, dtype, save_to=tmp.name)
    for x, y in (random_all[0], longest):  # warm-up, and the epoch's peak memory for ours alone
        ours(x, y)
    ours_peak = peak_rss_mb()
    lora = None
    if lora_config:
        lora = Ours(lora_config, device, dtype)
        for x, y in (random_all[0], longest):
            lora(x, y)
    hf = Transformers(tmp.name, device)
    autocast = dtype == torch.bfloat16 and not args.skip_autocast
    for x, y in random_all[:2]:
        hf.step(x, y)
        if autocast:
            hf.step(x, y, autocast=True)

    times = {"ours": [], "ours_grouped": [], "transformers": [], "transformers_autocast": [], "ours_lora": []}
    losses = {"ours": [], "transformers": []}
    peaks = []
    for (x, y), (gx, gy) in zip(random_batches, grouped_batches):
        seconds, loss = timed_step(ours, x, y)
        times["ours"].append(seconds)
        losses["ours"].append(loss)
        seconds, loss = timed_step(hf.step, x, y)
        times["transformers"].append(seconds)
        losses["transformers"].append(loss)
        times["ours_grouped"].append(timed_step(ours, gx, gy)[0])
        if lora is not None:
            times["ours_lora"].append(timed_step(lora, x, y)[0])
        if autocast:
            times["transformers_autocast"].append(timed_step(lambda a, b: hf.step(a, b, autocast=True), x, y)[0])
        peaks.append(matmul_peak(dtype))
    tmp.cleanup()
    breakdown = step_breakdown(ours, gpt_config, *random_batches[0])

    tokens = [x.numel() for x, _ in random_batches]
    grouped_tokens = sum(x.numel() for x, _ in grouped_batches)

    def tps(name: str, count=sum(tokens)) -> float | None:
        return count / sum(times[name]) if times[name] else None

    def ratios(slow: str, fast: str) -> dict:
        return spread(s / f for s, f in zip(times[slow], times[fast]))

    ours_tps, hf_tps, grouped_tps = tps("ours"), tps("transformers"), tps("ours_grouped", grouped_tokens)
    vs_hf = ratios("transformers", "ours")
    mm_peak = max(p["torch.mm"] for p in peaks)
    peaks = [max(p.values()) for p in peaks]
    peak = max(peaks)  # the ceiling: the best this machine showed, not a moment when something else ran
    mfus = [step_flops(gpt_config, x, y) / s / peak for (x, y), s in zip(random_batches, times["ours"])]
    mfu = spread(mfus)
    measured = [*zip(random_batches, times["ours"]), *zip(grouped_batches, times["ours_grouped"])]
    projected = {
        "ours_grouped_s": project_epoch(gpt_config, measured, grouped_all),
        "ours_random_s": project_epoch(gpt_config, measured, random_all),
        "transformers_random_s": epoch["random"]["padded_tokens"] / hf_tps,
        "transformers_grouped_s": epoch["grouped"]["padded_tokens"] / hf_tps,  # at its rate per padded token
    }
    if lora is not None:
        projected["ours_lora_random_s"] = epoch["random"]["padded_tokens"] / tps("ours_lora")
    name = str(dtype).removeprefix("torch.")
    print(f"ours:         {ours_tps:7.1f} tokens/s, {statistics.mean(times['ours']):.2f} s/step, loss {statistics.mean(losses['ours']):.3f} (random batches)")
    print(f"ours:         {grouped_tps:7.1f} tokens/s on length-grouped batches")
    print(f"transformers: {hf_tps:7.1f} tokens/s, {statistics.mean(times['transformers']):.2f} s/step, "
          f"loss {statistics.mean(losses['transformers']):.3f} (fp32)")
    print("  (mean losses of the timed steps, from weights that differ: the two warm up on other batches, ours also "
          "steps on the length-grouped ones, transformers in bf16 on its autocast ones; equal weights give equal logits)")
    print(f"ours / transformers fp32, per padded token on the same batch: {ours_tps / hf_tps:.2f}x overall; "
          f"per batch min {vs_hf['min']:.2f}x, median {vs_hf['median']:.2f}x, max {vs_hf['max']:.2f}x")
    autocast_ratio = None
    if times["transformers_autocast"]:
        autocast_ratio = ratios("transformers_autocast", "ours")
        print(f"transformers: {tps('transformers_autocast'):7.1f} tokens/s (bf16 autocast); ours is {autocast_ratio['median']:.2f}x (median per batch)")
    lora_ratio = None
    if lora is not None:
        lora_ratio = ratios("ours", "ours_lora")
        print(f"ours LoRA r={args.lora_rank}: {tps('ours_lora'):7.1f} tokens/s; full fine-tuning takes {lora_ratio['median']:.2f}x "
              f"LoRA's time per batch (median; min {lora_ratio['min']:.2f}x, max {lora_ratio['max']:.2f}x)")
    print(f"MFU: median {mfu['median']:.0%} (min {mfu['min']:.0%}, max {mfu['max']:.0%}) of the {name} matmul peak "
          f"measured between the steps (best {peak / 1e9:.0f} GFLOP/s, median {statistics.median(peaks) / 1e9:.0f}; "
          f"torch.mm alone: best {mm_peak / 1e9:.0f}, of which ours is {mfu['median'] * peak / mm_peak:.0%})")
    if breakdown["matmul_gflops"]:
        print(f"ours' step, profiled once (random batch): matmuls {breakdown['matmul']:.0%} of it at "
              f"{breakdown['matmul_gflops']:.0f} GFLOP/s ({breakdown['matmul_gflops'] * 1e9 / peak:.0%} of the best peak), "
              f"AdamW {breakdown['adamw']:.0%}, attention {breakdown['attention']:.0%}, everything else {breakdown['other']:.0%}")
    print(f"projected epoch (training steps only): ours {projected['ours_random_s'] / 60:.1f} min on the book's random batches "
          f"(the default), {projected['ours_grouped_s'] / 60:.1f} min length-grouped; transformers {projected['transformers_random_s'] / 60:.1f} min "
          f"random: ours is {projected['transformers_random_s'] / projected['ours_random_s']:.2f}x "
          f"({projected['transformers_random_s'] / projected['ours_grouped_s']:.2f}x grouped)")
    print(f"grouped against grouped: transformers would take {projected['transformers_grouped_s'] / 60:.1f} min on the "
          f"length-grouped batches (its rate per padded token): ours is {projected['transformers_grouped_s'] / projected['ours_grouped_s']:.2f}x")
    print(f"peak RSS of ours alone (the epoch's longest batch): {ours_peak:.0f} MB")
    print_json(dict(
        model=args.model, cpu_class=cpu_class() if device.type == "cpu" else device.type,
        precision=name, ours_tokens_per_s=ours_tps, ours_grouped_tokens_per_s=grouped_tps, transformers_tokens_per_s=hf_tps,
        transformers_autocast_tokens_per_s=tps("transformers_autocast"), ratio=ours_tps / hf_tps, ratio_per_batch=vs_hf,
        ratio_vs_autocast_per_batch=autocast_ratio, lora_rank=args.lora_rank or None,
        ours_lora_tokens_per_s=tps("ours_lora"), full_over_lora_time_per_batch=lora_ratio,
        mfu=mfu["median"], mfu_per_batch=mfu, matmul_peak_gflops=peak / 1e9, torch_mm_peak_gflops=mm_peak / 1e9,
        mfu_of_torch_mm_peak=mfu["median"] * peak / mm_peak, step_breakdown=breakdown,
        projected_epoch_s=projected["ours_random_s"], projected_epoch_grouped_s=projected["ours_grouped_s"],
        transformers_projected_epoch_s=projected["transformers_random_s"],
        epoch_ratio=projected["transformers_random_s"] / projected["ours_random_s"],
        epoch_ratio_grouped=projected["transformers_random_s"] / projected["ours_grouped_s"],
        transformers_projected_epoch_grouped_s=projected["transformers_grouped_s"],
        epoch_ratio_grouped_vs_grouped=projected["transformers_grouped_s"] / projected["ours_grouped_s"],
        ours_lora_projected_epoch_random_s=projected.get("ours_lora_random_s"), peak_rss_mb=ours_peak,
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
