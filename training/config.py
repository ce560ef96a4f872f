"""What one fine-tuning run is: every setting, declared once, with the book's defaults.

Each field carries its help text and its limits (``setting(...)``); from that one
declaration come the CLI's flags (``add_arguments``), the checks that run
before any work starts (``validate``), and the app's form defaults and ranges.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from data.prompts import STYLES


class ConfigError(ValueError):
    """A setting out of range; the message names the setting and its limit."""


def setting(default, help: str, low=None, high=None, choices=None, low_open: bool = False, flag: str | None = None,
            needs: str | None = None):
    """A config field with its help text and limits: ``low``/``high`` bound numbers (``low_open``: ``low`` excluded),
    ``choices`` bounds strings, ``None`` defaults mean "off"; ``needs``: the setting without which it does nothing."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices,
                                             "low_open": low_open, "flag": flag, "needs": needs})


def check_field(f, value) -> None:
    """Raise ``ConfigError`` when ``value`` breaks the limits declared on field ``f``."""
    meta, name = f.metadata, f.name
    if value is None:
        if "None" not in str(f.type):
            raise ConfigError(f"{name}: enter a value")
        return
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name} must be {', '.join(meta['choices'][:-1])} or {meta['choices'][-1]}, got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if "int" in str(f.type).replace(" ", "").split("|") and value != int(value):
        raise ConfigError(f"{name} must be a whole number, got {value}")
    too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    if too_low or (high is not None and value > high):
        if low is not None and high is not None:
            bounds = f"in ({low:g}, {high:g}]" if meta.get("low_open") else f"between {low:g} and {high:g}"
        elif low is not None:
            bounds = f"> {low:g}" if meta.get("low_open") else f"at least {low:g}"
        else:
            bounds = f"at most {high:g}"
        raise ConfigError(f"{name} must be {bounds}, got {value:g}")


def check_device(device: str) -> None:
    """``ConfigError`` for a device this machine's PyTorch cannot use, before anything is loaded."""
    if device in ("auto", "cpu"):
        return
    kind, _, index = device.partition(":")
    if kind not in ("cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    import torch

    if kind == "cuda" and torch.cuda.device_count() <= int(index or 0):
        raise ConfigError(f"device {device}: this PyTorch sees {torch.cuda.device_count()} CUDA GPU(s); use auto or cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device mps: not available here; use auto or cpu")


class Settings:
    """What every settings dataclass shares: its declared limits checked, and plain dicts in and out."""

    def check_fields(self) -> None:
        for f in fields(self):
            check_field(f, getattr(self, f.name))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")
        return cls(**values)


@dataclass
class TrainConfig(Settings):
    model: str = setting("gpt2", "preset (tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl), Hub repo id, or local directory / .safetensors file")
    random_init: bool = setting(False, "random weights instead of pretrained ones: offline demos and tests")
    data: str = setting("canonical", "canonical (the book's 1,100), sample (bundled, offline), or a JSON / JSON Lines / CSV file")
    style: str = setting("alpaca", "prompt format: the book's Alpaca, or Phi-3 (exercise 7.1)", choices=STYLES)
    epochs: int = setting(1, "passes over the training split", 1, 100)
    max_steps: int | None = setting(None, "stop after this many steps (quick checks)", 1)
    batch_size: int = setting(8, "records per batch", 1, 512)
    lr: float = setting(5e-5, "AdamW learning rate", 0, 1.0, low_open=True)
    weight_decay: float = setting(0.1, "AdamW weight decay", 0, 1.0)
    seed: int = setting(123, "seed for the weights of a random init, the batch order and dropout", 0, 2**63 - 1)
    warmup_steps: int = setting(0, "linear learning-rate warmup steps", 0)
    cosine: bool = setting(False, "cosine decay to min_lr_ratio x lr after the warmup")
    min_lr_ratio: float = setting(0.1, "where the cosine decay ends, as a share of lr", 0, 1, needs="cosine")
    grad_clip: float | None = setting(None, "clip the gradient norm to this", 0, low_open=True)
    grad_accum: int = setting(1, "batches accumulated into one optimizer step", 1, 1024)
    eval_every: int = setting(20, "steps between validation evaluations", 1)
    eval_batches: int | None = setting(3, "validation batches per evaluation (0 or none: all)", 1)
    sample_tokens: int = setting(40, "new tokens of the validation instruction's answer at each evaluation", 0, 512)
    mask_prompt: bool = setting(False, "learn only the response tokens")
    grouped: bool = setting(False, "length-grouped batches instead of the book's random ones (padding is skipped either way)")
    lora_rank: int = setting(0, "LoRA rank; 0: full fine-tuning", 0, 1024)
    lora_alpha: float = setting(16.0, "LoRA alpha (the update is scaled by alpha / rank)", 0, 4096, low_open=True,
                                 needs="lora_rank")
    precision: str = setting("auto", "auto: bf16 where the hardware multiplies it natively, else fp32", choices=("auto", "bf16", "fp32"))
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    max_length: int | None = setting(None, "truncate sequences to this many tokens (none: the model's context window)", 8)
    out: str | None = setting(None, "run directory (default runs/<timestamp>-<model>)")
    checkpoint_every: int = setting(0, "steps between resumable checkpoints (a stopped run always saves one); "
                                       "0: only when stopped", 0)
    max_wall_s: float | None = setting(None, "stop and save once the run has gone on this many seconds (loading and evaluations "
                                              "included)", 0, low_open=True)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        from model import PRESETS

        if not self.model:
            raise ConfigError("model: name a preset, a Hub repo id or a local path")
        if self.random_init and self.model not in PRESETS:
            raise ConfigError(f"random init builds one of the presets ({', '.join(PRESETS)}), not {self.model!r}")
        if not self.random_init and self.model == "tiny":
            raise ConfigError("the tiny preset has no pretrained weights: use random init (--random-init)")
        self.check_fields()
        check_device(self.device)
        return self


def defaults(cls=TrainConfig) -> dict[str, Any]:
    """Each setting's default, for forms."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def add_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting, from the dataclass: ``--batch-size``, ``--no-grouped`` for a boolean that defaults on."""
    for f in fields(cls):
        if f.name in skip:
            continue
        meta, flag = f.metadata, flag_of(f)
        help_text = meta.get("help", "") + ("" if f.default is None else f" (default {f.default})")
        if isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action,
                                help=f"turn off (on by default): {meta.get('help')}" if f.default else meta.get("help"))
            continue
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
        if "None" in str(f.type) and kind in (int, float):
            kind = optional(kind)
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=meta.get("choices"), help=help_text)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def optional(kind):
    """An argparse type for a number that may be off: ``none`` is None (the setting's default)."""
    def parse(text: str):
        return None if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid int value: 'x'"
    return parse


def idle_settings(config: Settings, given) -> list[str]:
    """Notes for the ``given`` settings that do nothing as ``config`` stands, e.g. a LoRA alpha without a LoRA rank."""
    by_name = {f.name: f for f in fields(config)}
    notes = []
    for name in given:
        needs = by_name[name].metadata.get("needs") if name in by_name else None
        if needs and not getattr(config, needs):
            notes.append(f"{flag_of(by_name[name])} does nothing without {flag_of(by_name[needs])}")
    return notes


# The offline demo: the tiny preset from random weights on the bundled sample. The book's settings
# (1 epoch at lr 5e-5, loss on the whole prompt) teach such a model only the template's line breaks, and a
# higher lr without prompt masking only the template ("### Response:" again and again): the answers come
# out empty. Masked, at lr 1e-3, 20 epochs (140 steps of 8) give answers in the sample's words.
DEMO = dict(model="tiny", random_init=True, data="sample", epochs=20, lr=1e-3, mask_prompt=True)

def demo_text(max_epochs: int = 100, local_paths: bool = True) -> tuple[str, str]:
    """What the offline demo is (one sentence), and what it can show and what shows more, within a server's epoch
    limit and whether it takes local paths."""
    epochs = min(DEMO["epochs"], max_epochs)

    def seconds(at_demo_epochs: int) -> int:  # the demo's 20 epochs took 7 s (native bf16) to 15 s (a slow fp32-only host)
        return max(1, round(at_demo_epochs * epochs / DEMO["epochs"]))

    what = ("The offline demo fine-tunes tiny, a 7-million-parameter GPT-2 that starts from random weights, on the 74 "
            f"records of the bundled sample: nothing is downloaded, and a run ({7 * epochs} short steps) takes "
            f"{seconds(7)}-{seconds(15)} seconds on two cores.")
    shows = (
        "Before training it repeats one word. After it, its answers take the words and the shape of the sample's "
        "answers (\"The capital of …\", \"A synonym for …\")"
        + ("; at 30 epochs it repeats its training answers word for word" if max_epochs >= 30 else "")
        + ". It cannot follow instructions: a model that has never read English cannot learn it from 74 "
        "examples, so expect wrong answers on new instructions and a ROUGE-L near zero. To see real instruction "
        "following, fine-tune OpenAI's pretrained GPT-2: pick a GPT-2 preset with random init unticked (its "
        "weights, 0.5 GB for the 124M model, come once from the Hugging Face Hub as openai-community/gpt2)"
        + (", or, offline, type the path of a local folder holding its model.safetensors and config.json in the path box."
           if local_paths else ".")
    )
    return what, shows
