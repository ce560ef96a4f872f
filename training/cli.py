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
from .config import ConfigError, TrainConfig
from .events import Download, Finished, Logged, Started
from .loop import Hooks, train


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training", description="Instruction fine-tuning of GPT-2 (chapter 7 of the book), headless.")
    p.add_argument("--model", default=d.model, help="preset (tiny, gpt2, gpt2-medium, ...), Hub repo id, or local directory / .safetensors file")
    p.add_argument("--random-init", action="store_true", help="random weights instead of pretrained ones (offline; with --model tiny for a quick demo)")
    p.add_argument("--data", default=d.data, help="canonical, sample, or a JSON / JSON Lines file")
    p.add_argument("--style", default=d.style, choices=["alpaca", "phi3"])
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--cosine", action="store_true", help="cosine decay after warmup")
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches per evaluation (0: all)")
    p.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    p.add_argument("--mask-prompt", action="store_true", help="learn only the response tokens")
    p.add_argument("--no-grouped", dest="grouped", action="store_false", help="the book's random batches instead of length-grouped ones")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0: full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--out", default=None, help="run directory (default runs/<timestamp>-<model>)")
    args = vars(p.parse_args(argv))
    if args["eval_batches"] == 0:
        args["eval_batches"] = None
    try:
        return TrainConfig(**args)
    except ConfigError as e:
        p.error(str(e))


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
    if ctx.enabled and ctx.is_main:
        print(f"{ctx.world_size} processes ({ctx.backend}) x batch {config.batch_size} x {config.grad_accum} accumulation: "
              f"global batch {ctx.world_size * config.batch_size * config.grad_accum}")
    hooks = Hooks(on_event=ProgressBar() if ctx.is_main else (lambda event: None), should_stop=stop.is_set)
    where = f"rank {ctx.rank}: " if ctx.enabled else ""
    try:
        train(config, hooks)
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
