"""Fine-tuning throughput: our engine against Hugging Face transformers on the same batches.

One run, the canonical train split at the book's settings (batch 8, AdamW lr 5e-5,
weight decay 0.1), random weights of the chosen size (the same compute as the
pretrained ones). Each side does ``--steps`` optimizer steps after two warm-up
steps on the book's random batches; ours also on length-grouped batches.

    python -m bench.train --model gpt2 --steps 10 [--skip-autocast]
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time

from training.optim import MasterWeightAdamW  # first: the training package sets the allocator's environment

import torch
import torch.nn.functional as F

from bench.common import machine, print_json
from data import InstructionDataset, load_instructions, make_loader, padding_stats, split_instructions
from model import GPT, GPTConfig, pick_device, pick_dtype, save_pretrained
from model.device import describe, peak_rss_mb


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of a large square matmul: the ceiling for MFU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def step_flops(config: GPTConfig, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward FLOPs of one batch: 6 x params x tokens, the LM head only where targets are, attention."""
    B, T = x.shape
    d = config.n_embd
    block_params = config.n_layer * 12 * d * d
    targets = int((y != -100).sum())
    return 6 * block_params * B * T + 6 * config.vocab_size * d * targets + 12 * config.n_layer * B * T * T * d


def run(step_fn, batches, warmup: int = 2) -> tuple[float, float, float]:
    """(tokens/s, seconds/step, mean loss) over ``batches`` after ``warmup`` untimed steps."""
    for x, y in batches[:warmup]:
        step_fn(x, y)
    tokens, losses = 0, []
    start = time.perf_counter()
    for x, y in batches[warmup:]:
        losses.append(step_fn(x, y))
        tokens += x.numel()
    seconds = time.perf_counter() - start
    return tokens / seconds, seconds / (len(batches) - warmup), sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", help="preset: tiny, gpt2, gpt2-medium, ...")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-autocast", action="store_true", help="skip transformers with bf16 autocast")
    args = parser.parse_args()

    device = pick_device()
    dtype = pick_dtype(device)
    split = split_instructions(load_instructions("canonical"))
    train_ds = InstructionDataset(split.train)
    n = args.steps + 2
    random_batches = list(itertools.islice(make_loader(train_ds, 8), n))
    grouped_batches = list(itertools.islice(make_loader(train_ds, 8, grouped=True), n))
    epoch = {kind: padding_stats(train_ds, 8, grouped=kind == "grouped") for kind in ("random", "grouped")}
    config = GPTConfig.from_name(args.model)
    print(f"machine: {machine()}; {args.model}: {config.num_params() / 1e6:.0f}M parameters; ours in {describe(device, dtype)}")
    print(f"epoch: {epoch['random']['batches']} batches; padded tokens {epoch['random']['padded_tokens']:,} random, "
          f"{epoch['grouped']['padded_tokens']:,} grouped")

    torch.manual_seed(123)
    model = GPT(config)
    tmp = tempfile.TemporaryDirectory()
    save_pretrained(model, tmp.name)  # the same initial weights for transformers
    model.to(device).train()
    optimizer = MasterWeightAdamW(model, dtype, lr=5e-5, weight_decay=0.1)

    def ours(x, y):
        loss = model.loss(x.to(device), y.to(device))
        loss.backward()  # AdamW steps inside backward at these settings
        return loss.item()

    ours_tps, ours_sps, ours_loss = run(ours, random_batches)
    grouped_tps, _, _ = run(ours, grouped_batches)
    flops = sum(step_flops(config, x, y) for x, y in random_batches[2:]) / args.steps
    ours_peak = peak_rss_mb()
    optimizer.finish()
    del model, optimizer

    from transformers import GPT2LMHeadModel

    def hf_step(hf, opt, autocast):
        def step(x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = hf(input_ids=x.to(device)).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    results = {}
    for name, autocast in (("fp32", False), ("bf16 autocast", True)):
        if autocast and (args.skip_autocast or dtype != torch.bfloat16):
            continue
        hf = GPT2LMHeadModel.from_pretrained(tmp.name).to(device).train()
        opt = torch.optim.AdamW(hf.parameters(), lr=5e-5, weight_decay=0.1)
        results[name] = run(hf_step(hf, opt, autocast), random_batches)
        del hf, opt
    tmp.cleanup()

    peak = matmul_peak(dtype)
    hf_tps, hf_sps, hf_loss = results["fp32"]
    print(f"ours:         {ours_tps:7.0f} tokens/s, {ours_sps:.2f} s/step, loss {ours_loss:.3f} (random batches)")
    print(f"ours:         {grouped_tps:7.0f} tokens/s on length-grouped batches")
    for name, (tps, sps, loss) in results.items():
        print(f"transformers: {tps:7.0f} tokens/s, {sps:.2f} s/step, loss {loss:.3f} ({name}); ours is {ours_tps / tps:.2f}x")
    mfu = flops / ours_sps / peak
    print(f"MFU: {mfu:.0%} of the measured {str(dtype).removeprefix('torch.')} matmul peak ({peak / 1e9:.0f} GFLOP/s)")
    projected_random = epoch["random"]["padded_tokens"] / ours_tps
    projected_grouped = epoch["grouped"]["padded_tokens"] / grouped_tps
    print(f"projected epoch (training steps only): {projected_random / 60:.1f} min random, {projected_grouped / 60:.1f} min grouped; "
          f"transformers {epoch['random']['padded_tokens'] / hf_tps / 60:.1f} min")
    print(f"peak RSS of our part: {ours_peak:.0f} MB")
    print_json(dict(
        ours_tokens_per_s=ours_tps, ours_grouped_tokens_per_s=grouped_tps, transformers_tokens_per_s=hf_tps,
        transformers_autocast_tokens_per_s=results.get("bf16 autocast", (float("nan"),))[0],
        ratio=ours_tps / hf_tps, mfu=mfu, projected_epoch_s=projected_grouped, projected_epoch_random_s=projected_random,
        peak_rss_mb=ours_peak,
    ))


if __name__ == "__main__":
    main()
