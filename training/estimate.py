"""How big each preset is and roughly how much memory it needs, so a user can pick one that fits.

The figures follow this engine's measured peaks. A full fine-tune holds the
bf16 weights, the int16 low halves that make them exact fp32 masters, and
two fp32 AdamW moments: 12 bytes a parameter, plus activations and the LM
head's blocks, which grow with the model (~2 bytes a parameter at the
book's batch of 8), plus ~0.8 GB of runtime: 2.54 GB for 124M and 5.77 GB
for 355M, between the peaks measured over the book's epoch on native-bf16
and fp32-only CPUs (2.33-2.64 GB for 124M, 5.51-6.18 GB for 355M). LoRA keeps the frozen weights the same way
(4 bytes) and trains adapters only; with activations and the fp32 merge at
the end, 124M measured 1.87 GB. Longer records than the book's need more
(``activations_gb``). Inference holds fp32 weights on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from model import PRESETS, GPTConfig

GB = 1e9
FULL_BYTES_PER_PARAM = 14
LORA_BYTES_PER_PARAM = 8
INFERENCE_BYTES_PER_PARAM = 4
TRAINING_OVERHEAD_GB = 0.8
# A batch's activations: bytes per token, layer and channel, over those of the book's longest batch (8 rows of 91 tokens)
# that the figures above include. GPT-2 124M (fp32-only CPU) peaked at 2.47 GB at batch 8 with rows of 95 tokens, 3.89 GB
# with 496, 5.86 GB with 996, and 3.91 GB at batch 4 with 996: this line is within 4 % above each. Preference tuning
# (a pair is one row: prompt, chosen, rejected) peaked at 2.53 GB with rows of 118 tokens, 5.92 GB with 958: its own
# figure puts both within 5 % above (with fine-tuning's, the second was 3 % below).
ACTIVATION_BYTES = 50
PREFERENCE_ACTIVATION_BYTES = 55
BOOK_BATCH_TOKENS = 8 * 91


@dataclass(frozen=True)
class Estimate:
    name: str
    parameters: int
    full_gb: float  # full fine-tuning
    lora_gb: float  # LoRA fine-tuning
    inference_gb: float  # fp32 weights for generation (CPU)

    def params_label(self) -> str:
        """``7.4M`` or ``1.56B``."""
        p = self.parameters
        return f"{p / 1e9:.2f}B" if p >= 1e9 else f"{p / 1e6:.0f}M" if p >= 1e7 else f"{p / 1e6:.1f}M"


def estimate(name: str) -> Estimate:
    """Parameter count and memory needs of a preset; ``ValueError`` for an unknown name."""
    return estimate_for(GPTConfig.from_name(name))


def estimate_for(config: GPTConfig) -> Estimate:
    """Parameter count and memory needs of any GPT-2 shape."""
    params = config.num_params()
    return Estimate(
        name=config.name,
        parameters=params,
        full_gb=params * FULL_BYTES_PER_PARAM / GB + TRAINING_OVERHEAD_GB,
        lora_gb=params * LORA_BYTES_PER_PARAM / GB + TRAINING_OVERHEAD_GB,
        inference_gb=params * INFERENCE_BYTES_PER_PARAM / GB,
    )


def activations_gb(config: GPTConfig, batch_size: int, longest_row: int, per_token: int = ACTIVATION_BYTES) -> float:
    """Memory a run needs beyond its estimate for batches of ``batch_size`` rows of up to ``longest_row`` tokens:
    none up to the book's batches, about 3.3 GB more for GPT-2 124M at batch 8 with rows of 1,000 tokens.
    ``per_token``: bytes per token, layer and channel (``PREFERENCE_ACTIVATION_BYTES`` for preference tuning)."""
    return per_token * config.n_layer * config.n_embd * max(0, batch_size * longest_row - BOOK_BATCH_TOKENS) / GB


def all_presets() -> list[Estimate]:
    """Every preset, smallest first."""
    return [estimate(name) for name in PRESETS]
