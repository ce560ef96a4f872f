"""How big each preset is and roughly how much memory it needs, so a user can pick one that fits.

The figures are this engine's, measured rather than textbook: a full
fine-tune keeps fp32 master weights, gradients and two AdamW moments plus a
bf16 copy (~16 bytes a parameter); LoRA trains adapters only (~6 bytes);
inference holds the bf16 weights (2 bytes). Activations and the runtime add
about 0.4 GB to training.
"""
from __future__ import annotations

from dataclasses import dataclass

from model import PRESETS, GPTConfig

GB = 1e9
FULL_BYTES_PER_PARAM = 16
LORA_BYTES_PER_PARAM = 6
INFERENCE_BYTES_PER_PARAM = 2
TRAINING_OVERHEAD_GB = 0.4


@dataclass(frozen=True)
class Estimate:
    name: str
    parameters: int
    full_gb: float  # full fine-tuning
    lora_gb: float  # LoRA fine-tuning
    inference_gb: float  # bf16 weights for generation

    def params_label(self) -> str:
        """``7.4M`` or ``1.56B``."""
        p = self.parameters
        return f"{p / 1e9:.2f}B" if p >= 1e9 else f"{p / 1e6:.0f}M" if p >= 1e7 else f"{p / 1e6:.1f}M"


def estimate(name: str) -> Estimate:
    """Parameter count and memory needs of a preset; ``ValueError`` for an unknown name."""
    params = GPTConfig.from_name(name).num_params()
    return Estimate(
        name=name,
        parameters=params,
        full_gb=params * FULL_BYTES_PER_PARAM / GB + TRAINING_OVERHEAD_GB,
        lora_gb=params * LORA_BYTES_PER_PARAM / GB + TRAINING_OVERHEAD_GB,
        inference_gb=params * INFERENCE_BYTES_PER_PARAM / GB,
    )


def all_presets() -> list[Estimate]:
    """Every preset, smallest first."""
    return [estimate(name) for name in PRESETS]
