"""LoRA: train two small matrices beside each frozen linear layer, merge them in on save.

``W x`` becomes ``W x + (alpha / rank) * B (A x)`` with ``A`` (rank x in) and
``B`` (out x rank); ``B`` starts at zero so training starts from the
pretrained model exactly. The scale is the LoRA paper's (and PEFT's)
``alpha / rank``; the book's appendix E multiplies by ``alpha`` alone, so its
alpha 16 at rank 16 is this alpha 256.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)  # drawn on the CPU, where ``generator`` lives, then moved
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with ``scale * B @ A`` added to its weight."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, generator: torch.Generator | None = None) -> nn.Module:
    """Freeze every parameter and wrap the linear layers of each block with LoRA adapters (``A`` drawn from ``generator``)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for target in TARGETS:
            parent_name, _, child = target.rpartition(".")
            if name.endswith(parent_name) and isinstance(getattr(module, child, None), nn.Linear):
                setattr(module, child, LoRALinear(getattr(module, child), rank, alpha, generator))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` with its merged plain layer: the model is plain GPT-2 again."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
