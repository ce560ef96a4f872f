"""Generation speed at batch 1 and side by side, against transformers, and the exactness of the default.

GPT-2 124M with random weights (seeded: the same compute as the real ones),
greedy, fp32, KV cache; prompts are the book's test split formatted as the app
does. Ours and transformers run interleaved in the same process at the same
thread count (the app's unless ``--threads`` says otherwise); each figure is
the median over rounds, prompt processing included. Then the greedy output of the default (exact) mode and of the
opt-in int8 mode is compared with our plain fp32 loop on the test prompts, and
that loop's with transformers' greedy output. The exact mode's speed depends on
how many of the int8 draft's tokens the model keeps: the tokens per pass of
the model are printed (random weights may draft better or worse than trained
ones).

    python -m bench.generate [--quick] [--prompts 20] [--tokens 64] [--threads 0] [--data canonical]

``--prompts 110`` compares the whole test split (several minutes more).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from bench.common import at_least, machine, timed
from model import GPT, GPTConfig, generate, get_tokenizer, load_pretrained, save_pretrained, stream_side_by_side
from model.device import configure_runtime, cpu_budget, cpu_has_bf16, peak_rss_mb, pick_device
from model.inference import int8_supported


def cpu_class(device: torch.device) -> tuple[str, str]:
    """(class, the precision path with its reason)."""
    if device.type != "cpu":
        return str(device), "fp32 weights, one token per pass (the int8 draft and oneDNN are CPU paths); int8 mode unavailable"
    capability = torch.backends.cpu.get_cpu_capability()
    native = cpu_has_bf16()
    name = f"native bf16 (AVX512-BF16), PyTorch kernels {capability}" if native else f"fp32-only (no native bf16 matmul), PyTorch kernels {capability}"
    path = ("fp32 weights; exact mode: an int8 copy drafts up to 8 tokens, one fp32 pass (oneDNN) keeps those the model "
            "itself picks, so the greedy output is fp32's; bf16 is not used for generation since its greedy output differs "
            "from fp32" + ("" if native else ", and this CPU only emulates it") + "; int8 alone is opt-in (mode='int8')")
    return name, path


def test_prompts(source: str, count: int) -> list[list[int]]:
    from data import DatasetError, encode_prompt, load_instructions, split_instructions

    try:
        records = split_instructions(load_instructions(source)).test[:count]
    except DatasetError as e:
        sys.exit(f"bench.generate: {e}")
    tokenizer = get_tokenizer()
    return [encode_prompt(r, tokenizer) for r in records]


def random_gpt2(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("gpt2"))


def hf_greedy(model, prompt: list[int], n: int) -> None:
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256)
    assert out.shape[1] == len(prompt) + n


def hf_tokens(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy new tokens, up to its end token (left out, as ours leaves it out)."""
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        new = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=50256)[0, len(prompt):].tolist()
    return new[:new.index(50256)] if 50256 in new else new


@contextmanager
def counting_passes(model):
    """A list whose length is the number of passes of ``model`` (not of its int8 draft) while inside."""
    passes, hidden_states = [], model.hidden_states
    model.hidden_states = lambda *a, **k: passes.append(1) or hidden_states(*a, **k)
    try:
        yield passes
    finally:
        del model.hidden_states


def hf_side_by_side(models, prompt: list[int], n: int) -> None:
    """transformers' models with their own KV cache, stepped in turn one token each, as the playground does."""
    states = [(torch.tensor([prompt], device=models[0].device), None)] * len(models)
    with torch.inference_mode():
        for _ in range(n):
            for i, model in enumerate(models):
                ids, past = states[i]
                out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
                states[i] = (out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values)


def ours_side_by_side(models, prompt: list[int], n: int) -> None:
    for _ in stream_side_by_side(models, get_tokenizer(), prompt, n, eos_id=None):
        pass


def agreement(model, prompts, n: int, mode: str, reference: list[list[int]]) -> float:
    same = sum(generate(model, p, n, mode=mode) == ref for p, ref in zip(prompts, reference))
    return same / len(prompts)


def finite(figures: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else round(v, 3) if isinstance(v, float) else v)
            for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=at_least(1), default=64, help="new tokens per timed generation")
    parser.add_argument("--rounds", type=at_least(1), default=3, help="interleaved timing rounds (median)")
    parser.add_argument("--prompts", type=at_least(1), default=20, help="test prompts whose greedy output is compared (110: all)")
    parser.add_argument("--check-tokens", type=at_least(1), default=24, help="new tokens per compared prompt")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for ours and transformers alike; 0 (default): the app's, PyTorch's default capped to this process's cores")
    parser.add_argument("--data", default="canonical", help="canonical, sample or a path (the prompts come from its test split)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 8 prompts")
    parser.add_argument("--skip-nocache", action="store_true", help=argparse.SUPPRESS)  # the textbook loop is no longer timed
    args = parser.parse_args()
    configure_runtime()
    if args.quick:
        args.rounds, args.prompts = 2, min(args.prompts, 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    prompts = test_prompts(args.data, args.prompts)
    speed_prompt = prompts[0]
    device = pick_device()
    name, path = cpu_class(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {machine()}; load average {load:.1f} on {cpu_budget()} cores to use")
    print(f"CPU class: {name}")
    print(f"precision path: {path}")
    print(f"threads: {torch.get_num_threads()} for both ({'--threads' if args.threads else 'as the app runs its Playground'}); "
          "--threads 1 never waits for a core that another process holds")
    from transformers import GPT2LMHeadModel

    ours, hf = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (0, 1):  # the playground's two models: base and fine-tuned
            save_pretrained(random_gpt2(seed), f"{tmp}/{seed}")
            ours.append(load_pretrained(f"{tmp}/{seed}", device=device).eval().requires_grad_(False))
            hf.append(GPT2LMHeadModel.from_pretrained(f"{tmp}/{seed}").to(device).eval())
    int8 = int8_supported(ours[0])

    for model in ours:  # warm-up: the int8 copies, oneDNN's kernels
        generate(model, speed_prompt, 4, eos_id=None)
    hf_greedy(hf[0], speed_prompt, 4)
    _, t_ours = timed(generate, ours[0], speed_prompt, 16, eos_id=None)  # calibrates the time estimate
    _, t_hf = timed(hf_greedy, hf[0], speed_prompt, 16)
    per_token = {"ours": t_ours / 16, "hf": t_hf / 16}
    mean_len = sum(map(len, prompts)) / len(prompts)
    prefill = per_token["hf"] * 0.15 * mean_len  # prompt tokens go through together, several times cheaper each
    estimate = (args.rounds * 3 * args.tokens * (per_token["ours"] + per_token["hf"])
                + len(prompts) * (4 * prefill + args.check_tokens * (2 * per_token["hf"] + 2 * per_token["ours"])))
    print(f"this takes about {estimate / 60:.1f} min (timing {args.rounds} rounds of {args.tokens} tokens, then "
          f"{len(prompts)} prompts x {args.check_tokens} tokens in 3 modes and in transformers); --quick for less", flush=True)

    cases = {
        "batch1_ours": lambda: generate(ours[0], speed_prompt, args.tokens, eos_id=None),
        "batch1_transformers": lambda: hf_greedy(hf[0], speed_prompt, args.tokens),
        "side_by_side_ours": lambda: ours_side_by_side(ours, speed_prompt, args.tokens),
        "side_by_side_transformers": lambda: hf_side_by_side(hf, speed_prompt, args.tokens),
    }
    if int8:
        cases["int8_ours"] = lambda: generate(ours[0], speed_prompt, args.tokens, eos_id=None, mode="int8")
    seconds = {k: [] for k in cases}
    for r in range(args.rounds):
        for key, run in cases.items():
            seconds[key].append(timed(run)[1])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {args.tokens * (2 if 'side' in k else 1) / v[-1]:.1f}"
                                                          for k, v in seconds.items()) + " tokens/s", flush=True)
    rate = {k: args.tokens * (2 if "side" in k else 1) / statistics.median(v) for k, v in seconds.items()}
    figures = dict(cpu_class=name, native_bf16=cpu_has_bf16(), threads=torch.get_num_threads(), tokens=args.tokens,
                   prompt_tokens=len(speed_prompt), rounds=args.rounds)
    for case in ("batch1", "side_by_side"):
        ours_rate, hf_rate = rate[f"{case}_ours"], rate[f"{case}_transformers"]
        print(f"{case.replace('_', ' ')}: ours {ours_rate:.1f} tokens/s, transformers {hf_rate:.1f}: {ours_rate / hf_rate:.2f}x")
        figures.update({f"{case}_ours_tokens_per_s": ours_rate, f"{case}_transformers_tokens_per_s": hf_rate,
                        f"{case}_ratio": ours_rate / hf_rate})

    figures.update(ours_tokens_per_s=rate["batch1_ours"], transformers_tokens_per_s=rate["batch1_transformers"])
    with counting_passes(ours[0]) as passes:
        generate(ours[0], speed_prompt, args.tokens, eos_id=None)
    per_pass = args.tokens / len(passes)  # the plain loop: one pass a token, the prompt's first
    print(f"exact mode kept {per_pass:.2f} new tokens per pass of the model on the timed prompt (1.00: no draft kept)")

    print(f"comparing greedy output on {len(prompts)} test prompts: plain fp32 loop (the reference)...", flush=True)
    reference = [generate(ours[0], p, args.check_tokens, mode="plain") for p in prompts]
    print("  exact mode (the default)...", flush=True)
    with counting_passes(ours[0]) as passes:
        exact = agreement(ours[0], prompts, args.check_tokens, "exact", reference)
    produced = sum(len(r) + (len(r) < args.check_tokens) for r in reference)  # the end token, where one came, too
    kept_per_pass = produced / len(passes)
    print(f"exact (default): greedy output identical to our plain fp32 loop on {exact:.0%} of {len(prompts)} test prompts "
          f"({args.check_tokens} new tokens each, {kept_per_pass:.2f} per pass of the model)", flush=True)
    print("  transformers' greedy output...", flush=True)
    hf_agree = sum(hf_tokens(hf[0], p, args.check_tokens) == ref for p, ref in zip(prompts, reference)) / len(prompts)
    print(f"transformers: greedy output identical to our plain fp32 loop on {hf_agree:.0%} of the prompts", flush=True)
    int8_rate = int8_ratio = int8_agree = float("nan")
    if int8:
        int8_agree = agreement(ours[0], prompts, args.check_tokens, "int8", reference)
        int8_rate = rate["int8_ours"]
        int8_ratio = int8_rate / rate["batch1_transformers"]
        print(f"int8 (opt-in, approximate): {int8_rate:.1f} tokens/s, {int8_ratio:.2f}x transformers; "
              f"identical to fp32 on {int8_agree:.0%} of the prompts")
    figures.update(exact_agreement=exact, transformers_agreement=hf_agree, exact_tokens_per_pass=per_pass,
                   exact_tokens_per_pass_on_prompts=kept_per_pass, int8_tokens_per_s=int8_rate, int8_ratio=int8_ratio, int8_agreement=int8_agree,
                   agreement_prompts=len(prompts), agreement_tokens=args.check_tokens,
                   seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    print(json.dumps(finite(figures)))


if __name__ == "__main__":
    main()
