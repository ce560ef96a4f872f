"""What one fine-tuning run is: every setting, with the book's defaults, checked before any work starts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class ConfigError(ValueError):
    """A setting out of range; the message names the setting and its limit."""


@dataclass
class TrainConfig:
    model: str = "gpt2"  # preset, Hub repo id, or local directory / .safetensors file
    random_init: bool = False  # build the preset with random weights: offline demos and tests
    data: str = "canonical"  # "canonical", "sample" or a path
    style: str = "alpaca"
    epochs: int = 1
    max_steps: int | None = None  # stop early, for quick checks
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    seed: int = 123
    warmup_steps: int = 0
    cosine: bool = False  # cosine decay to min_lr_ratio * lr after warmup
    min_lr_ratio: float = 0.1
    grad_clip: float | None = None
    grad_accum: int = 1
    eval_every: int = 20  # steps between validation evaluations
    eval_batches: int | None = 3  # validation batches per evaluation (None: all)
    sample_tokens: int = 40  # new tokens of the validation instruction's response at each evaluation
    mask_prompt: bool = False  # learn only the response tokens
    grouped: bool = True  # length-grouped batches: ~3 % padding instead of ~20 %
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    precision: str = "auto"  # auto (bf16 where faster), bf16, fp32
    device: str = "auto"
    max_length: int | None = None  # truncate sequences; None: the model's context window
    out: str | None = None  # run directory; default runs/<timestamp>-<model>

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        need(bool(self.model), "model: name a preset, a Hub repo id or a local path")
        from model import PRESETS

        need(not self.random_init or self.model in PRESETS,
             f"random init builds one of the presets ({', '.join(PRESETS)}), not {self.model!r}")
        need(self.random_init or self.model != "tiny", "the tiny preset has no pretrained weights: use random init")
        need(1 <= self.epochs <= 100, f"epochs must be between 1 and 100, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be at least 1, got {self.max_steps}")
        need(1 <= self.batch_size <= 512, f"batch_size must be between 1 and 512, got {self.batch_size}")
        need(0 < self.lr <= 1.0, f"lr must be in (0, 1], got {self.lr}")
        need(0 <= self.weight_decay <= 1.0, f"weight_decay must be in [0, 1], got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0, got {self.grad_clip}")
        need(1 <= self.grad_accum <= 1024, f"grad_accum must be between 1 and 1024, got {self.grad_accum}")
        need(self.eval_every >= 1, f"eval_every must be at least 1, got {self.eval_every}")
        need(self.eval_batches is None or self.eval_batches >= 1, f"eval_batches must be at least 1, got {self.eval_batches}")
        need(0 <= self.sample_tokens <= 512, f"sample_tokens must be between 0 and 512, got {self.sample_tokens}")
        need(0 <= self.lora_rank <= 1024, f"lora_rank must be between 0 and 1024, got {self.lora_rank}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(self.precision in ("auto", "bf16", "fp32"), f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        need(self.style in ("alpaca", "phi3"), f"style must be alpaca or phi3, got {self.style!r}")
        need(self.max_length is None or self.max_length >= 8, f"max_length must be at least 8, got {self.max_length}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}")
        return cls(**values)
