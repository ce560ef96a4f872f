"""``python -m training``: fine-tune headless, with a progress bar, into a run directory."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from data import DatasetError
from model import WeightsError

from . import distributed
from .config import ConfigError, TrainConfig, add_arguments
from .events import Download, Finished, Logged, Started
from .loop import Hooks


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Instruction fine-tuning of GPT-2 (chapter 7 of the book), headless.")
    add_arguments(parser)
    args = vars(parser.parse_args(argv))
    if args["eval_batches"] == 0:
        args["eval_batches"] = None
    try:
        return TrainConfig(**args)
    except ConfigError as e:
        parser.error(str(e))


class ProgressBar:
    """Turns the engine's events into a tqdm bar and a few printed lines."""

    def __init__(self):
        self.bar = None
        self.download = None

    def __call__(self, event) -> None:
        if isinstance(event, Download):
            if self.download is None:
                self.download = tqdm(total=event.total, unit="B", unit_scale=True, desc=event.file)
            self.download.n = event.done
            self.download.refresh()
        elif isinstance(event, Started):
            if self.download is not None:
                self.download.close()
            tqdm.write(f"{event.parameters:,} parameters ({event.trainable_parameters:,} trained) on {event.device}; "
                       f"{event.train_records} training records; run: {event.run_dir}")
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step")
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
            print(f"{s['status']}: {s['steps']} steps in {s['wall_time_s']:.0f} s "
                  f"({s['train_time_s']:.0f} s training, {s['eval_time_s']:.0f} s evaluating), "
                  f"peak memory {s['peak_rss_mb'] / 1024:.2f} GiB; saved to {s['run_dir']}")


@record
def main(argv=None) -> int:
    """Train; under torchrun each process runs this, and rank 0 alone prints and writes the run.

    SIGTERM asks for a stop at the next step (the run is saved as stopped); under
    torchrun a stop on any rank stops them all.
    """
    config = parse_args(argv)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    ctx = distributed.init(config.device)
    code = 1
    try:
        code = run(config, ctx, stop)
    finally:
        distributed.shutdown(ok=code == 0)
    return code


def run(config: TrainConfig, ctx: distributed.Context, stop: threading.Event) -> int:
    from engine import Engine

    if ctx.enabled and ctx.is_main:
        print(f"{ctx.world_size} processes ({ctx.backend}) x batch {config.batch_size} x {config.grad_accum} accumulation: "
              f"global batch {ctx.world_size * config.batch_size * config.grad_accum}")
    hooks = Hooks(on_event=ProgressBar() if ctx.is_main else (lambda event: None), should_stop=stop.is_set)
    where = f"rank {ctx.rank}: " if ctx.enabled else ""
    try:
        Engine().run_training(config, hooks)
    except (DatasetError, WeightsError, ConfigError, ValueError, FloatingPointError) as e:
        print(f"error: {where}{ctx.reason(e) if ctx.enabled else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if ctx.enabled:
            print(f"error: {where}{ctx.reason(e)}", file=sys.stderr)
        raise
    return 0
