"""Does watching a run slow it down? The app's training throughput with 0, 1 and 5 watchers against the CLI's.

    python -m bench.watchers [--model tiny] [--steps 60] [--watchers 0 1 5] [--rounds 1]

Starts ``python app.py`` on a free port with its own runs folder, starts the
same run through the app's API once per watcher count while that many API
clients poll the Train tab once a second (as open browsers do; the browsers'
own drawing is left out), and runs it with ``python -m training`` just before
each of those, while the app sits idle: each app run is compared with the CLI
run next to it, since this machine's speed drifts by more than the effect
measured. ``--rounds`` repeats the whole sequence; the ratios are given as
min / median / max over the rounds.
Throughput is each run's own tokens / training seconds from its manifest;
the end of a run is read from that manifest too, so that only the watchers
call the app. The watchers run on this machine: their own CPU time per poll is
printed, since it is taken from the cores that train. The last line is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from bench.common import at_least, machine, preset, print_json, spread

REPO = Path(__file__).resolve().parents[1]
FORM = dict(custom="", random_init=True, epochs=100, batch_size=8, lr=5e-5, mask_prompt=False, lora=False, rank=8, alpha=16,
            grouped=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(run_dir: Path) -> float:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return manifest["tokens_seen"] / manifest["train_time_s"]


def finished_run(root: Path, before: set[str]) -> Path:
    """Wait for the run started after ``before`` to end, reading its manifest: no API call that would load the app."""
    while True:
        fresh = sorted(p for p in root.iterdir() if p.name not in before and (p / "manifest.json").is_file()) if root.is_dir() else []
        try:
            if fresh and json.loads((fresh[-1] / "manifest.json").read_text())["status"] in ("done", "failed", "stopped"):
                return fresh[-1]
        except (ValueError, KeyError, OSError):
            pass  # caught between writes
        time.sleep(1.0)


def poll_once(url: str, session: str) -> None:
    """One call of the Train tab's timer as a browser makes it: same session each time, so the app
    sends only what changed since this watcher's last poll. Plain HTTP: a few ms of this machine's CPU."""
    body = json.dumps({"data": ["watcher", []], "session_hash": session}).encode()
    request = urllib.request.Request(url + "gradio_api/call/poll_status", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/poll_status/{event_id}", timeout=60) as stream:
        for line in stream:
            if line.startswith(b"event: error"):
                raise RuntimeError(f"poll_status failed: {stream.readline().decode().strip()}")
            if line.startswith(b"event: complete"):
                return


def watch(url: str, stop: threading.Event, polls: list[int]) -> None:
    session, n = uuid.uuid4().hex, 0
    while not stop.is_set():
        poll_once(url, session)
        n += 1
        stop.wait(1.0)
    polls.append(n)


def app_run(url: str, root: Path, model: str, steps: int, watchers: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)  # it downloads nothing: no folder in /tmp
    client.predict("sample", None, False, api_name="/load_dataset")
    before = {p.name for p in root.iterdir()} if root.is_dir() else set()
    stop, polls = threading.Event(), []
    threads = [threading.Thread(target=watch, args=(url, stop, polls)) for _ in range(watchers)]
    for t in threads:
        t.start()
    time.sleep(2.0 if watchers else 0)  # the watchers are connected and polling before the run starts
    client_cpu = time.process_time()
    client.predict("bench", model, *FORM.values(), steps, 1000, 0, api_name="/start_training")
    run = finished_run(root, before)
    stop.set()
    for t in threads:
        t.join()
    client_cpu = time.process_time() - client_cpu  # the watchers' own share of this machine's cores
    return {"watchers": watchers, "tokens_per_s": throughput(run), "polls": sum(polls),
            "client_cpu_ms_per_poll": 1000 * client_cpu / sum(polls) if polls and sum(polls) else None}


def cli_run(out: Path, model: str, steps: int, env: dict) -> float:
    done = subprocess.run([sys.executable, "-m", "training", "--model", model, "--random-init", "--data", "sample", "--epochs",
                           "100", "--max-steps", str(steps), "--eval-every", "1000", "--out", str(out)], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit((done.stderr.strip().splitlines() or ["error: the training CLI failed"])[-1])
    return throughput(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.watchers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", type=preset, help="preset, trained from random weights")
    parser.add_argument("--steps", type=at_least(1), default=60, help="steps of each run")
    parser.add_argument("--watchers", type=int, nargs="+", default=[0, 1, 5])
    parser.add_argument("--rounds", type=at_least(1), default=1, help="times to repeat the CLI / app pairs")
    args = parser.parse_args()
    print(machine())
    hint = "; about 20 s each at 60 steps" if args.model == "tiny" else ""
    print(f"{2 * len(args.watchers) * args.rounds} runs of {args.steps} steps of {args.model}{hint}")
    with tempfile.TemporaryDirectory(prefix="bench-watchers-") as work:  # its runs hold a model each: gone at the end
        compare(args, Path(work))


def compare(args, work: Path) -> None:
    """For each round and number of watchers a CLI run, then the app's, in ``work``; the table and the JSON line."""
    root = work / "runs"
    env = {**os.environ, "GPT2_INSTRUCT_RUNS": str(root), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(work / "gradio")}  # the app's uploads and cache go with ``work``
    port = free_port()
    app = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or app.poll() is not None:
                    sys.exit("error: the app did not start")
                time.sleep(0.5)
        runs = []
        for round_ in range(args.rounds):
            for n in args.watchers:
                cli = cli_run(work / f"cli-{round_}-{n}", args.model, args.steps, env)
                run = app_run(url, root, args.model, args.steps, n)
                runs.append({**run, "round": round_, "cli_tokens_per_s": cli, "vs_cli": run["tokens_per_s"] / cli})
    finally:
        app.terminate()
        app.wait(timeout=30)
    print(f"{'':<14}{'app tokens/s':>13}{'CLI beside it':>15}{'vs CLI':>8}{'polls':>7}{'client CPU ms/poll':>20}")
    for r in runs:
        cpu = f"{r['client_cpu_ms_per_poll']:.1f}" if r["client_cpu_ms_per_poll"] is not None else ""
        print(f"{r['watchers']} watcher(s){'':<3}{r['tokens_per_s']:>13,.0f}{r['cli_tokens_per_s']:>15,.0f}{r['vs_cli']:>8.2f}"
              f"{r['polls']:>7}{cpu:>20}")
    vs_cli = {n: spread(r["vs_cli"] for r in runs if r["watchers"] == n) for n in dict.fromkeys(args.watchers)}
    for n, ratio in vs_cli.items():
        print(f"{n} watcher(s): {ratio['median']:.2f}x the CLI beside it (median of {args.rounds}; min {ratio['min']:.2f}x, "
              f"max {ratio['max']:.2f}x)")
    print_json({"bench": "watchers", "model": args.model, "steps": args.steps, "rounds": args.rounds,
                "vs_cli": {str(n): ratio for n, ratio in vs_cli.items()}, "runs": runs})


if __name__ == "__main__":
    main()
