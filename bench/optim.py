"""The optimizer's update of a whole model: ours against torch's fused AdamW, on the same gradients.

Where training computes in bf16 (``MasterWeightAdamW``), each exact fp32 master
weight is kept as its bf16 compute copy plus an int16 low half: 4 bytes a
parameter, where torch's AdamW would keep an fp32 master and a bf16 copy (6
bytes) and copy one into the other after each step. This times, interleaved
round by round, one update of every parameter of the preset (random weights
and gradients, the book's lr and weight decay):

- ours, bf16 compute: join each piece's halves, fused AdamW, split again;
- torch's fused AdamW on fp32 masters, then a copy to the bf16 compute weights
  (the 6-byte design, as autocast trains), given fp32 gradients: the most
  favourable case for it, as no gradient conversion is timed;
- ours and torch's fused AdamW in fp32 (no compute copy): the same kernel.

    python -m bench.optim [--model gpt2] [--rounds 7]

Four models and their optimizer states are resident at once: ~7 GB for GPT-2 124M.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from model.device import configure_runtime

import torch

from bench.common import at_least, machine, precision_line, print_json
from model import GPT, GPTConfig
from training.optim import MasterWeightAdamW


def with_grads(model: GPT, grads: list) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g


def main(argv=None) -> int:
    configure_runtime()
    parser = argparse.ArgumentParser(prog="python -m bench.optim", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt2", help="preset: tiny, gpt2, gpt2-medium, ...")
    parser.add_argument("--rounds", type=at_least(1), default=7, help="timed updates of each side")
    args = parser.parse_args(argv)
    try:
        config = GPTConfig.from_name(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"machine: {machine()}; {args.model}: {config.num_params() / 1e6:.0f}M parameters")
    print(precision_line(torch.device("cpu")))
    ours_bf16, ours_fp32, torch_bf16, torch_fp32 = (GPT(config) for _ in range(4))
    grads = [torch.randn_like(p) * 1e-3 for p in ours_bf16.parameters()]
    grads_bf16 = [g.to(torch.bfloat16) for g in grads]  # what a bf16 backward hands over
    kwargs = dict(lr=5e-5, weight_decay=0.1)
    mixed = MasterWeightAdamW(ours_bf16, torch.bfloat16, step_in_backward=False, **kwargs)
    plain = MasterWeightAdamW(ours_fp32, torch.float32, step_in_backward=False, **kwargs)
    torch_mixed = torch.optim.AdamW(torch_bf16.parameters(), fused=True, **kwargs)
    compute = [p.detach().to(torch.bfloat16) for p in torch_bf16.parameters()]  # the forward pass's weights
    torch_plain = torch.optim.AdamW(torch_fp32.parameters(), fused=True, **kwargs)

    def torch_with_copy():
        with_grads(torch_bf16, grads)
        torch_mixed.step()
        torch._foreach_copy_(compute, list(torch_bf16.parameters()))

    sides = {
        "ours_bf16": lambda: (with_grads(ours_bf16, grads_bf16), mixed.step()),
        "torch_fp32_master_bf16_copy": torch_with_copy,
        "ours_fp32": lambda: (with_grads(ours_fp32, grads), plain.step()),
        "torch_fp32": lambda: (with_grads(torch_fp32, grads), torch_plain.step()),
    }
    times = {name: [] for name in sides}
    for round_ in range(args.rounds + 1):
        for name, update in sides.items():
            start = time.perf_counter()
            update()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    n = config.num_params()
    print(f"one update of {n / 1e6:.0f}M parameters, median of {args.rounds}:")
    print(f"  bf16 compute: ours {ms['ours_bf16']:.1f} ms (4 bytes of weights a parameter); torch fused AdamW on fp32 "
          f"masters + copy to bf16 {ms['torch_fp32_master_bf16_copy']:.1f} ms (6 bytes): ours is "
          f"{ms['torch_fp32_master_bf16_copy'] / ms['ours_bf16']:.2f}x its speed")
    print(f"  fp32 compute: ours {ms['ours_fp32']:.1f} ms; torch fused AdamW {ms['torch_fp32']:.1f} ms "
          f"({ms['torch_fp32'] / ms['ours_fp32']:.2f}x)")
    print_json(dict(model=args.model, parameters=n, update_ms=ms,
                    bf16_ratio=ms["torch_fp32_master_bf16_copy"] / ms["ours_bf16"], fp32_ratio=ms["torch_fp32"] / ms["ours_fp32"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
