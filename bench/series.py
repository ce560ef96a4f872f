"""Consecutive runs of the training benchmark summed up: is ours as fast in every run, or as fast as the machine is?

    python -m bench.series [--runs 5] [bench.train's options, e.g. --model gpt2 --steps 10 --data canonical]

Runs ``python -m bench.train`` ``--runs`` times, one process after another as a
person would, and reads each run's last line. Prints each run's figures, then
min / median / max of each, with the slowest run over the fastest of ours'
tokens/s, transformers', the machine's matmul peak that each run measured
between its steps, ours against transformers on the same batches, and ours
against that peak (MFU). A slow mode of ours' own (one run at half speed)
shows as a drop against transformers and the peak in that run; the machine
slowing down slows both sides (ours, nearly all matmuls, the more).
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import at_least, print_json, spread

REPO = Path(__file__).resolve().parents[1]
FIGURES = {  # the key in bench.train's JSON: its name here, its format
    "ours_tokens_per_s": ("ours tokens/s", ",.1f"),
    "transformers_tokens_per_s": ("transformers tokens/s", ",.1f"),
    "matmul_peak_gflops": ("matmul peak GFLOP/s", ",.0f"),
    "ratio": ("ours / transformers", ".2f"),
    "mfu": ("MFU", ".3f"),
    "epoch_ratio": ("epoch ratio", ".2f"),
    "epoch_ratio_grouped": ("grouped epoch ratio", ".2f"),  # ours length-grouped, against transformers' random epoch
    "peak_rss_mb": ("peak RSS MiB", ",.0f"),
}
# slowest over fastest: each side, the machine, and ours against each of them (a slow mode of ours moves the last two)
STEADY = ("ours_tokens_per_s", "transformers_tokens_per_s", "matmul_peak_gflops", "ratio", "mfu")


def run_once(options: list[str]) -> dict:
    """One ``python -m bench.train`` with ``options``: its JSON line."""
    done = subprocess.run([sys.executable, "-m", "bench.train", *options], cwd=REPO, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        err = done.stderr.strip().splitlines()
        raise SystemExit(err[-1] if err and err[-1].startswith("error: ") else
                         f"error: python -m bench.train failed ({done.returncode}): {err[-1] if err else 'no output'}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.series", description=__doc__.split("\n\n")[0],
                                     epilog="Other options go to python -m bench.train as they are.")
    parser.add_argument("--runs", type=at_least(2), default=5, help="consecutive runs of bench.train")
    args, options = parser.parse_known_args(argv)
    runs = []
    for i in range(args.runs):
        figures = run_once(options)
        runs.append(figures)
        if i == 0:
            print(f"bench.train {' '.join(options)}: {figures['model']}, CPU class {figures['cpu_class']}, {figures['precision']}")
        print(f"run {i + 1}: " + ", ".join(f"{name} {figures[key]:{form}}" for key, (name, form) in FIGURES.items()), flush=True)
    summary = {key: spread(run[key] for run in runs) for key in FIGURES}
    for key, (name, form) in FIGURES.items():
        s = summary[key]
        line = f"{name:<22} min {s['min']:>8{form}}  median {s['median']:>8{form}}  max {s['max']:>8{form}}"
        if key in STEADY:
            s["slowest_over_fastest"] = s["min"] / s["max"]
            line += f"  slowest / fastest {s['slowest_over_fastest']:.3f}"
        print(line)
    print_json(dict(runs=args.runs, options=options, model=runs[0]["model"], cpu_class=runs[0]["cpu_class"],
                    precision=runs[0]["precision"], summary=summary, each=[{key: run[key] for key in FIGURES} for run in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
