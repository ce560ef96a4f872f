"""``python -m training``: fine-tune headless, with a progress bar, into a run directory."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from data import DatasetError
from model import WeightsError

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


def main(argv=None) -> int:
    from engine import Engine

    config = parse_args(argv)
    try:
        Engine().run_training(config, Hooks(on_event=ProgressBar()))
    except (DatasetError, WeightsError, ConfigError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
