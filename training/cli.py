"""``python -m training``: fine-tune headless, with a progress bar, into a run directory; ``--resume RUN`` continues one."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from data import DatasetError
from model import PRESETS, WeightsError
from model.device import configure_runtime
from runstore import run_folder

from . import distributed
from .checkpoint import resume_config
from .config import ConfigError, TrainConfig, add_arguments, flag_of, idle_settings
from .events import Download, Finished, Logged, Started
from .loop import Hooks, TrainingStopped, train


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Instruction fine-tuning of GPT-2 (chapter 7 of the book), headless.")
    add_arguments(parser)
    parser.add_argument("--resume", metavar="RUN", help="continue a stopped or interrupted run from its checkpoint, with its "
                                                        "own settings: a run name under the runs folder, or a run folder")
    return parser


def parse_args(argv=None, make=None, settings=TrainConfig, check=None):
    """The settings the flags give (``--eval-batches 0``: all), or the parser's one-line error.

    ``make``: the parser factory (fine-tuning's by default); ``check(args)`` returns an error text or None.
    """
    parser = (make or make_parser)()
    args = vars(parser.parse_args(argv))
    args.pop("resume")
    if args["eval_batches"] == 0:
        args["eval_batches"] = None
    absolute_paths(args)
    problem = check(args) if check else None
    if problem:
        parser.error(problem)
    try:
        config = settings(**args)
    except ConfigError as e:  # "batch_size must be ...": the flag's name, as typed
        named = {f.name: flag_of(f) for f in fields(settings)}
        field_name = re.match(r"\w+", str(e))
        parser.error(named[field_name[0]] + str(e)[field_name.end():] if field_name and field_name[0] in named else str(e))
    for note in idle_settings(config, settings_given(argv, make)):
        print(f"note: {note}", file=sys.stderr)
    return config


def settings_given(argv=None, make=None) -> dict:
    """Only the settings typed on the command line (a resumed run keeps the others); ``make``: the CLI's parser factory."""
    parser = (make or make_parser)()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    args = vars(parser.parse_args(argv))
    args.pop("resume", None)
    if args.get("eval_batches") == 0:
        args["eval_batches"] = None
    return absolute_paths(args)


def absolute_paths(args: dict) -> dict:
    """``--data`` and ``--model`` naming local files by their absolute paths, as the run keeps them, so that a resume
    or evaluation from another folder finds them (and a resume typing the same relative path is no change)."""
    for key, names in (("data", ("canonical", "sample", "preference")), ("model", PRESETS)):
        value = args.get(key)
        if isinstance(value, str) and value not in names and Path(value).expanduser().exists():
            args[key] = str(Path(value).expanduser().resolve())
    return args


def stop_on_signals() -> threading.Event:
    """An event that SIGTERM or a first Ctrl-C sets: the run stops at its next step and is saved as stopped, its
    checkpoint with it; a second Ctrl-C quits at once, losing what was not saved. Python lets only the main thread
    install a handler; elsewhere (a test calling ``main``) the event is set by nothing."""
    stop = threading.Event()

    def on_ctrl_c(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping at the next step and saving; Ctrl-C again to quit without saving", file=sys.stderr, flush=True)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        signal.signal(signal.SIGINT, on_ctrl_c)
    return stop


class ProgressBar:
    """Turns the engine's events into a tqdm bar and a few printed lines."""

    def __init__(self):
        self.bar = None
        self.download = None
        self.start = 0  # a resumed run's first step: the rows before it are its history, replayed for watchers

    def replayed(self, event) -> bool:
        return isinstance(event, Logged) and event.record["step"] < self.start

    def __call__(self, event) -> None:
        if isinstance(event, Download):
            if self.download is None or self.download.desc != event.file:  # a bar a file (weights, then config.json)
                if self.download is not None:
                    self.download.close()
                self.download = tqdm(total=event.total, unit="B", unit_scale=True, desc=event.file)
            self.download.n = event.done
            self.download.refresh()
        elif isinstance(event, Started):
            if self.download is not None:
                self.download.close()
            skipped = "".join(f" ({count} left out: {why})" for count, why in (
                (event.skipped_records, f"longer than the {event.context:,}-token context"),
                (event.no_answer_records, f"the prompt alone fills max length {event.max_length}, and mask prompt "
                                          "learns only the answer")) if count)
            tqdm.write(f"{event.parameters:,} parameters ({event.trainable_parameters:,} trained) on {event.device}; "
                       f"{event.train_records} training record{'s' * (event.train_records != 1)}{skipped}; run: {event.run_dir}")
            if not event.val_records:
                tqdm.write("note: no validation example is left once the too-long ones are left out: no validation loss is logged")
            if event.precision:
                tqdm.write(f"precision {event.precision}")
            if event.start_step:
                tqdm.write(f"resuming at step {event.start_step:,} of {event.total_steps:,}")
            self.start = event.start_step
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step")
        elif self.replayed(event):
            return
        elif isinstance(event, Logged) and self.bar is not None:
            record = event.record
            self.bar.n = record["step"]
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if event.response is not None:
                val = record["val_loss"]
                tqdm.write(f"step {record['step']:>5}: train loss {record['train_loss']:.3f}, val loss "
                           f"{'n/a' if val is None else f'{val:.3f}'}; response: {event.response[:120]!r}")
        elif isinstance(event, Finished):
            if self.bar is not None:
                self.bar.close()
            s = event.summary
            reason = f" ({s['stop_reason']})" if s.get("stop_reason") else ""
            print(f"{s['status']}{reason}: {s['steps']} step{'' if s['steps'] == 1 else 's'} in {s['wall_time_s']:.0f} s "
                  f"({s['train_time_s']:.0f} s training, {s['eval_time_s']:.0f} s evaluating), "
                  f"peak memory {s['peak_rss_mb'] / 1024:.2f} GiB; saved to {s['run_dir']}")


@record
def main(argv=None) -> int:
    """Train, or with ``--resume RUN`` continue a run; under torchrun each process runs this, and rank 0 alone prints
    and writes the run.

    SIGTERM or Ctrl-C asks for a stop at the next step (the run is saved as stopped); under
    torchrun a stop on any rank stops them all.
    """
    configure_runtime()
    resume = make_parser().parse_args(argv).resume
    try:
        run_dir = run_folder(resume) if resume is not None else None
        # Under torchrun, rank 0 alone takes the run's lock: the others may check after it has (NCCL starts lazily).
        later_rank = int(os.environ.get("RANK", "0")) > 0
        config = resume_config(run_dir, later_rank, **settings_given(argv)) if resume is not None else parse_args(argv)
    except ValueError as e:  # a run that cannot be resumed, or changed settings
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = stop_on_signals()
    ctx = distributed.init(config.device)
    code = 1
    try:
        code = run(config, ctx, stop, resume=run_dir)
    finally:
        distributed.shutdown(ok=code == 0)
    return code


def run(config: TrainConfig, ctx: distributed.Context, stop: threading.Event, resume: Path | None = None) -> int:
    from engine import Engine

    if ctx.enabled and ctx.is_main:
        print(f"{ctx.world_size} processes ({ctx.backend}) x batch {config.batch_size} x {config.grad_accum} accumulation: "
              f"global batch {ctx.world_size * config.batch_size * config.grad_accum}")
    hooks = Hooks(on_event=ProgressBar() if ctx.is_main else (lambda event: None), should_stop=stop.is_set)
    where = f"rank {ctx.rank}: " if ctx.enabled else ""
    try:
        if resume:
            train(config, hooks, resume=resume)
        else:
            Engine().run_training(config, hooks)
    except (DatasetError, WeightsError, ConfigError, ValueError, FloatingPointError, OSError) as e:  # OSError: a full disk
        print(f"error: {where}{ctx.reason(e) if ctx.enabled else e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:
        print(e, file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted: quit without saving; resume it from its last checkpoint, if any", file=sys.stderr)
        return 130
    except Exception as e:
        if ctx.enabled:
            print(f"error: {where}{ctx.reason(e)}", file=sys.stderr)
        raise
    return 0
