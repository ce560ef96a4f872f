"""Two trainings at once on one small CPU: what each gets, with OpenMP's default waiting and with it passive.

    python -m bench.together [--model tiny] [--steps 40] [--runs 2]

Runs ``python -m training`` (random weights, the bundled sample, evaluation
only at the start and the end) alone, then ``--runs`` of them side by side,
first as they start by default and then with ``OMP_WAIT_POLICY=PASSIVE``, and
alone once more with it. Throughput is each run's own tokens / training
seconds from its manifest. By default an OpenMP thread that waits for work
spins on its core for a while; with more threads than cores (two processes
of two threads on two cores) a spinning thread takes the core that another
process's thread needed, and every parallel step waits for it. The last line
is one JSON object.
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
from model.device import cpu_class

REPO = Path(__file__).resolve().parents[1]


def trainings(model: str, steps: int, runs: int, env: dict, folder: Path) -> list[float]:
    """Tokens per training second of each of ``runs`` CLI trainings started together."""
    outs = [folder / f"run-{i}" for i in range(runs)]
    command = [sys.executable, "-m", "training", "--model", model, "--random-init", "--data", "sample",
               "--max-steps", str(steps), "--eval-every", str(steps)]
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
    print(f"machine: {machine()}; {os.cpu_count()} CPUs; CPU class: {cpu_class()}; {args.model}, {args.steps} steps each")
    default = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    passive = {**default, "OMP_WAIT_POLICY": "PASSIVE"}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env, runs in (("alone", default, 1), ("together", default, args.runs),
                                ("together_passive", passive, args.runs), ("alone_passive", passive, 1)):
            folder = Path(tmp) / name
            folder.mkdir()
            figures[name] = trainings(args.model, args.steps, runs, env, folder)
            each = ", ".join(f"{t:,.0f}" for t in figures[name])
            print(f"{name.replace('_', ' ', 1).replace('_', ', '):<18} {each} tokens/s")
    alone, together = figures["alone"][0], spread(figures["together"])
    passive_together, alone_passive = spread(figures["together_passive"]), figures["alone_passive"][0]
    print(f"side by side, each run gets {together['median'] / alone:.0%} of its speed alone by default, "
          f"{passive_together['median'] / alone:.0%} with OMP_WAIT_POLICY=PASSIVE; alone, passive waiting costs "
          f"{1 - alone_passive / alone:.0%}")
    print_json(dict(cpu_class=cpu_class(), model=args.model, steps=args.steps, runs=args.runs, cpus=os.cpu_count(),
                    alone_tokens_per_s=alone, together_tokens_per_s=together,
                    together_passive_tokens_per_s=passive_together, alone_passive_tokens_per_s=alone_passive))
    return 0


if __name__ == "__main__":
    sys.exit(main())
