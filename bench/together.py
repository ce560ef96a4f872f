"""Two trainings at once on one small CPU: what each gets, sharing the cores (the default) and not.

    python -m bench.together [--model tiny] [--steps 40] [--runs 2]

Runs ``python -m training`` (random weights, the bundled sample, evaluation
of one batch only at the start and the end, no sample answer) alone, then
``--runs`` of them side by side as they start by default, sharing the machine's cores (``training.cores``), and
side by side again with ``GPT2_INSTRUCT_SHARE_CORES=0``, each with a thread
per core. Throughput is each run's own tokens / training seconds from its
manifest. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import at_least, machine, preset, print_json, spread
from model.device import cpu_budget, cpu_class
from training.cores import SHARE_ENV

REPO = Path(__file__).resolve().parents[1]


def trainings(model: str, steps: int, runs: int, env: dict, folder: Path) -> list[float]:
    """Tokens per training second of each of ``runs`` CLI trainings started together."""
    outs = [folder / f"run-{i}" for i in range(runs)]
    command = [sys.executable, "-m", "training", "--model", model, "--random-init", "--data", "sample",
               "--max-steps", str(steps), "--eval-every", str(steps), "--eval-batches", "1", "--sample-tokens", "0"]
    procs = [subprocess.Popen([*command, "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for out in outs]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"error: python -m training failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    manifests = [json.loads((out / "manifest.json").read_text()) for out in outs]
    return [m["tokens_seen"] / m["train_time_s"] for m in manifests]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.together", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=preset, default="tiny")
    p.add_argument("--steps", type=at_least(2), default=40)
    p.add_argument("--runs", type=at_least(2), default=2, help="trainings side by side")
    args = p.parse_args(argv)
    print(f"machine: {machine()}; {cpu_budget()} CPUs to use; CPU class: {cpu_class()}; {args.model}, {args.steps} steps each")
    sharing = {k: v for k, v in os.environ.items() if k != SHARE_ENV}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env, runs in (("alone", sharing, 1), ("together", sharing, args.runs),
                                ("together_unshared", {**sharing, SHARE_ENV: "0"}, args.runs)):
            folder = Path(tmp) / name
            folder.mkdir()
            figures[name] = trainings(args.model, args.steps, runs, env, folder)
            each = ", ".join(f"{t:,.0f}" for t in figures[name])
            print(f"{name.replace('_', ', ', 1).replace('together, unshared', 'together, not sharing'):<22} {each} tokens/s")
    alone, together, unshared = figures["alone"][0], spread(figures["together"]), spread(figures["together_unshared"])
    print(f"side by side, each run gets {together['median'] / alone:.0%} of its speed alone sharing the cores, "
          f"{unshared['median'] / alone:.0%} with a thread per core each ({SHARE_ENV}=0)")
    print_json(dict(cpu_class=cpu_class(), model=args.model, steps=args.steps, runs=args.runs, cpus=cpu_budget(),
                    alone_tokens_per_s=alone, together_tokens_per_s=together, together_unshared_tokens_per_s=unshared))
    return 0


if __name__ == "__main__":
    sys.exit(main())
