"""``python -m training.dpo``: align a fine-tuned run with preference data (DPO), headless, with a progress bar;
``--resume RUN`` continues a stopped or interrupted one."""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from data import DatasetError
from model import WeightsError
from model.device import configure_runtime
from runstore import recover_runs, run_folder

from .cli import ProgressBar, settings_given, stop_on_signals, parse_args as parse_settings
from .config import ConfigError, add_arguments
from .dpo import DPOConfig, resume_dpo_config, train_dpo
from .events import Logged, Progress
from .loop import Hooks


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.dpo",
                                     description="Direct Preference Optimization of a fine-tuned run (the book's next stage), headless.")
    add_arguments(parser, DPOConfig)
    parser.add_argument("--resume", metavar="RUN", help="continue a stopped or interrupted DPO run from its checkpoint, with "
                                                        "its own settings: a run name under the runs folder, or a run folder")
    return parser


def parse_args(argv=None) -> DPOConfig:
    return parse_settings(argv, make_parser, DPOConfig,
                          check=lambda args: None if args["parent"] else "--from RUN is required: the fine-tuned run to align")


class DPOProgressBar(ProgressBar):
    """Fine-tuning's bar, with the reward margin beside the loss and the validation rewards at each evaluation."""

    reference = None

    def __call__(self, event) -> None:
        if isinstance(event, Progress) and event.payload.get("phase") == "reference":
            if self.reference is None:
                self.reference = tqdm(total=event.payload["total"], unit="pair", desc="reference", leave=False)
            self.reference.n = event.payload["done"]
            self.reference.refresh()
            return
        if self.reference is not None and not isinstance(event, Progress):
            self.reference.close()
            self.reference = None
        if not (isinstance(event, Logged) and self.bar is not None) or self.replayed(event):
            return super().__call__(event)
        r = event.record
        self.bar.n = r["step"]
        self.bar.set_postfix(loss=f"{r['train_loss']:.3f}", margin=f"{r['reward_margin']:.3f}", tok_s=f"{r['tokens_per_s']:.0f}")
        if event.response is not None:
            tqdm.write(f"step {r['step']:>5}: train loss {r['eval_train_loss']:.3f}, val loss {num(r['val_loss'])}, "
                       f"val reward margin {num(r['val_reward_margin'])}, accuracy {num(r['val_reward_accuracy'], '.0%')}; "
                       f"response: {event.response[:120]!r}")


def num(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv=None) -> int:
    """Align, or with ``--resume RUN`` continue a DPO run; SIGTERM or Ctrl-C asks for a stop at the next step (the run is
    saved as stopped)."""
    configure_runtime()
    resume = make_parser().parse_args(argv).resume
    try:
        run_dir = run_folder(resume) if resume is not None else None
        config = resume_dpo_config(run_dir, **settings_given(argv, make_parser)) if resume is not None else parse_args(argv)
    except ValueError as e:  # a run that cannot be resumed, or changed settings
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = stop_on_signals()
    recover_runs()
    try:
        train_dpo(config, Hooks(on_event=DPOProgressBar(), should_stop=stop.is_set), resume=run_dir)
    except (DatasetError, WeightsError, ConfigError, OSError, ValueError, FloatingPointError) as e:  # OSError: a full disk
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: quit without saving; resume it from its last checkpoint, if any", file=sys.stderr)
        return 130
    return 0
