"""Preference tuning against fine-tuning: epoch time and peak memory of the same model on the same machine.

Each side takes the steps of its loop (bf16 compute + fp32 masters where
native, AdamW inside backward, batches of 8, random init of ``--model``):

- fine-tuning: the canonical train split, ``model.loss`` per batch (the defaults of ``python -m training``);
- DPO: the preference train split, one forward/backward over chosen + rejected per batch, the
  pairs packed one row each (the default) and, for comparison, stacked as 2B rows (the ``dpo-stacked`` side of ``--sides``;
  ``python -m training.dpo --no-packed`` trains that way).

Peak memory: each side in its own process runs its epoch's longest batch
(and, for DPO, the reference pass over it), so that each peak RSS is its own.
Time: one process holds every side and interleaves their steps, so that all
see the same load on a shared machine; ``--steps`` batches spread evenly over
each epoch (longest to shortest) after one warm-up step. The epoch is
projected as mean step time x steps, plus, for DPO, the reference pass over
every pair (forward only, timed on the same batches). Evaluation is left out.

    python -m bench.dpo --model gpt2 --steps 6
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from bench.common import at_least, machine, preset, print_json
from model import GPT, GPTConfig, pick_device, pick_dtype
from model.device import configure_precision, configure_runtime, describe, peak_rss_mb, release_free_memory
from training.optim import MasterWeightAdamW

SIDES = ("sft", "dpo", "dpo-stacked")


def build_side(side: str, model_name: str):
    """(step, reference_step or None, the epoch's batches, pair/record count, device label) of one side."""
    from data import InstructionDataset, load_instructions, split_instructions
    from data.batching import custom_collate_fn
    from data.preference import PreferenceDataset, collate_preferences, epoch_batches, load_preferences, split_preferences
    from training.dpo_loss import dpo_loss, sequence_logprobs

    device = pick_device()
    dtype = pick_dtype(device)
    configure_precision(device, dtype)
    torch.manual_seed(123)
    model = GPT(GPTConfig.from_name(model_name)).to(device)
    if side == "sft":
        ds = InstructionDataset(split_instructions(load_instructions("canonical")).train)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(123)).tolist()
        epoch = [order[i : i + 8] for i in range(0, len(order) - 7, 8)]  # the book's random batches, as the loop trains
        make = lambda positions: custom_collate_fn([ds[i] for i in positions])
        size = lambda positions: max(ds.lengths[i] for i in positions) * len(positions)
        lr, wd = 5e-5, 0.1
    else:
        packed = side == "dpo"
        ds = PreferenceDataset(split_preferences(load_preferences("preference")).train)
        epoch = epoch_batches(ds, 8, 0)
        make = lambda positions: collate_preferences([ds[i] for i in positions], packed=packed)
        size = lambda positions: make(positions).inputs.numel()
        lr, wd = 5e-6, 0.01
    optimizer = MasterWeightAdamW(model, dtype, lr=lr, weight_decay=wd)
    model.train()
    reference = torch.zeros(len(ds), 2)

    def sft_step(positions):
        x, y = make(positions)
        model.loss(x.to(device), y.to(device)).backward()
        if device.type == "cpu":
            release_free_memory()

    def dpo_step(positions):
        batch = make(positions).to(device)
        logp = sequence_logprobs(model, batch)
        ref = reference[positions].to(device)
        dpo_loss(logp[0::2], logp[1::2], ref[:, 0], ref[:, 1])[0].backward()
        if device.type == "cpu":
            release_free_memory()

    @torch.no_grad()
    def reference_step(positions):
        reference[positions] = sequence_logprobs(model, make(positions).to(device)).view(-1, 2).cpu()

    epoch.sort(key=size, reverse=True)  # the longest first
    if side == "sft":
        return sft_step, None, epoch, len(ds), describe(device, dtype), optimizer
    return dpo_step, reference_step, epoch, len(ds), describe(device, dtype), optimizer


def peak_of(side: str, model_name: str) -> dict:
    """Peak RSS of one side in this process: its reference pass and step over the epoch's longest batch, twice."""
    step, reference_step, epoch, _, device, _ = build_side(side, model_name)
    for _ in range(2):
        if reference_step is not None:
            reference_step(epoch[0])
        step(epoch[0])
    return {"side": side, "peak_rss_mb": peak_rss_mb(), "device": device}


def timing(sides: list[str], model_name: str, steps: int) -> dict:
    """Seconds per step (and per reference batch) of every side, their steps interleaved so that all see the same load."""
    built = {side: build_side(side, model_name) for side in sides}
    times = {side: {"step": [], "reference": []} for side in sides}
    for i in range(-1, steps):  # -1: warm-up, untimed
        for side, (step, reference_step, epoch, _, _, _) in built.items():
            positions = epoch[round(i * (len(epoch) - 1) / max(1, steps - 1))] if i >= 0 else epoch[len(epoch) // 2]
            if reference_step is not None:
                start = time.perf_counter()
                reference_step(positions)
                times[side]["reference"].append(time.perf_counter() - start)
            start = time.perf_counter()
            step(positions)
            times[side]["step"].append(time.perf_counter() - start)
    out = {}
    for side, (_, reference_step, epoch, n, device, _) in built.items():
        step_s = statistics.mean(times[side]["step"][1:])
        epoch_s = step_s * len(epoch)
        if reference_step is not None:
            ref_s = statistics.mean(times[side]["reference"][1:])
            epoch_s += ref_s * -(-n // 8)
            out[f"{side}_reference_batch_s"] = ref_s
        out.update({f"{side}_step_s": step_s, f"{side}_epoch_s": epoch_s, f"{side}_steps": len(epoch), "device": device})
    return out


def child(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.dpo", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench.dpo {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def data_error(sides: list[str]) -> str | None:
    """Why the sides' data cannot be loaded (not cached, and no network), before any child starts; None when it can."""
    from data import DatasetError, load_instructions
    from data.preference import load_preferences

    try:
        if "sft" in sides:
            load_instructions("canonical")
        if any(side != "sft" for side in sides):
            load_preferences("preference")
    except DatasetError as e:
        return str(e)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dpo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", type=preset, help="preset: tiny, gpt2, gpt2-medium, ...")
    parser.add_argument("--steps", type=at_least(1), default=6, help="timed steps per side, spread over the epoch")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, fine-tuning first: {', '.join(SIDES)}")
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # a child: one side's peak memory
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)  # a child: interleaved timing
    args = parser.parse_args()
    sides = args.sides.split(",")
    unknown = [side for side in sides if side not in SIDES]
    if unknown:
        parser.error(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    configure_runtime()
    if args.peak_of:
        print(json.dumps(peak_of(args.peak_of, args.model)))
        return
    if args.timing:
        print(json.dumps(timing(sides, args.model, args.steps)))
        return

    missing = data_error(sides)
    if missing:
        sys.exit(f"error: {missing}")
    print(f"machine: {machine()}; {args.model} random init; {args.steps} timed steps per side, interleaved")
    peaks = {side: child(["--peak-of", side, "--model", args.model])["peak_rss_mb"] for side in sides}
    t = child(["--timing", "--sides", args.sides, "--model", args.model, "--steps", str(args.steps)])
    print(f"device: {t['device']}")
    figures = {}
    for side in sides:
        ref = f" + reference pass {t[side + '_reference_batch_s']:.2f} s/batch" if side + "_reference_batch_s" in t else ""
        print(f"{side:12} {t[side + '_step_s']:6.2f} s/step x {t[side + '_steps']} steps{ref} = epoch "
              f"{t[side + '_epoch_s'] / 60:5.1f} min; peak RSS {peaks[side]:,.0f} MB (own process)")
        key = side.replace("-", "_")
        figures.update({f"{key}_epoch_s": t[side + "_epoch_s"], f"{key}_peak_mb": peaks[side]})
    base = sides[0]
    for side in sides[1:]:
        key = side.replace("-", "_")
        epoch_ratio, peak_ratio = t[side + "_epoch_s"] / t[base + "_epoch_s"], peaks[side] / peaks[base]
        print(f"{side}: epoch {epoch_ratio:.2f}x {base}'s (target <= 2.2x), peak memory {peak_ratio:.2f}x (target <= 1.10x)")
        figures.update({f"{key}_epoch_ratio": epoch_ratio, f"{key}_peak_ratio": peak_ratio})
    print_json(figures)


if __name__ == "__main__":
    main()
