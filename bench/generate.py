"""Generation speed: ours with a KV cache, against the textbook loop and transformers.

GPT-2 124M with random weights (the same compute as the real ones), 256 new
tokens from a 60-token prompt, greedy, end token ignored, batch 1.

    python -m bench.generate [--tokens 256] [--skip-nocache]
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from bench.common import machine, precision_line, print_json, timed
from model import GPT, GPTConfig, generate, generate_text_simple, load_pretrained, pick_device, pick_dtype, save_pretrained
from model.device import describe, peak_rss_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=60)
    parser.add_argument("--skip-nocache", action="store_true", help="skip the slow textbook loop")
    args = parser.parse_args()

    device = pick_device()
    dtype = pick_dtype(device)
    torch.manual_seed(0)
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens)).tolist()[0]
    n = args.tokens
    print(f"machine: {machine()}; ours runs in {describe(device, dtype)}")
    print(precision_line(device))

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(GPT(GPTConfig.from_name("gpt2")), tmp)
        ours = load_pretrained(tmp, device=device, dtype=dtype)
        ours32 = load_pretrained(tmp, device=device) if dtype != torch.float32 else ours
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(tmp).to(device).eval()

    results = {}
    generate(ours, prompt[:8], 8, eos_id=None)  # warm-up
    _, seconds = timed(generate, ours, prompt, n, eos_id=None)
    results["ours"] = n / seconds
    print(f"ours ({describe(device, dtype)}), KV cache: {results['ours']:.1f} tokens/s")
    if ours32 is not ours:
        _, seconds = timed(generate, ours32, prompt, n, eos_id=None)
        results["ours_fp32"] = n / seconds
        print(f"ours (fp32), KV cache: {results['ours_fp32']:.1f} tokens/s")

    ids = torch.tensor([prompt], device=device)
    hf_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256)
    with torch.inference_mode():
        hf.generate(ids[:, :8], max_new_tokens=8, do_sample=False, pad_token_id=50256)
        out, seconds = timed(hf.generate, ids, **hf_kwargs)
    assert out.shape[1] == len(prompt) + n
    results["transformers"] = n / seconds
    print(f"transformers generate (fp32), its KV cache: {results['transformers']:.1f} tokens/s")

    if args.skip_nocache:
        results["nocache"] = float("nan")
    else:
        _, seconds = timed(generate_text_simple, ours32, ids, n)
        results["nocache"] = n / seconds
        print(f"textbook loop (fp32), whole sequence every step: {results['nocache']:.1f} tokens/s")

    print(f"ours / transformers: {results['ours'] / results['transformers']:.2f}x; ours / textbook: {results['ours'] / results['nocache']:.1f}x")
    print_json(
        dict(
            ours_tokens_per_s=results["ours"],
            ours_fp32_tokens_per_s=results.get("ours_fp32", results["ours"]),
            nocache_tokens_per_s=results["nocache"],
            transformers_tokens_per_s=results["transformers"],
            peak_rss_mb=peak_rss_mb(),
        )
    )


if __name__ == "__main__":
    main()
