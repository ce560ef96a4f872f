"""GPT-2 in plain PyTorch: config presets, blocks, the model.

Reads top to bottom like nanoGPT's model.py. Parameter names follow GPT-2's
checkpoints (``transformer.h.0.attn.c_attn``...), with ``nn.Linear`` weights
stored (out, in); ``model.weights`` converts to and from the Hub's layout.
Inference with a KV cache lives in ``model.generation``; here attention only
takes an optional cache object so that the training path stays plain. The
fp32 CPU fast paths of the layers are in ``model.fused``, and the loss's
pieces (skipping padding, the tied head's cross-entropy) in ``model.loss``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fused import GeluLinear, Linear, gelu_tanh, norm_linear
from .loss import Packing, TiedEmbedding, TiedGradBuffer, TiedHeadCrossEntropy


@dataclass
class GPTConfig:
    name: str = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self) -> int:
        """Parameter count with the LM head tied to the token embedding."""
        d, layers = self.n_embd, self.n_layer
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return self.vocab_size * d + self.block_size * d + layers * block + 2 * d

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


# Training on the CPU, SDPA's flash kernel is the default; in bf16 its backward is slower than the math path's
# at instruction lengths (a GPT-2 step of 8 x 96 tokens took ~7 % longer on flash, 8 x 192 ~5 %; about even at 320;
# 6-12 % faster at 512), so shorter bf16 batches take the math path. In fp32 flash was as fast at instruction
# lengths and 16 % faster at 8 x 512, where the math path's T x T attention weights added 1.2 GB to the peak.
MATH_ATTENTION_BELOW = 384


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer: int = 0, mask=None, packing=None, norm=None):
        """``x``: the block's input, normalized here by ``norm`` (the block's ``ln_1``) on the way into ``c_attn``."""
        qkv = norm_linear(norm, self.c_attn, x)
        if packing is not None:
            qkv = packing.unpack(qkv)
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Without an explicit mask: causal over a full sequence, or one new token that sees everything cached.
        causal = mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        math = self.training and x.device.type == "cpu" and q.dtype == torch.bfloat16 and T < MATH_ATTENTION_BELOW
        backend = sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()
        with backend:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(packing.pack(y) if packing is not None else y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x, norm=None):
        """``x``: the residual stream, normalized here by ``norm`` (the block's ``ln_2``) on the way into ``c_fc``."""
        h = norm_linear(norm, self.c_fc, x)
        if torch.is_grad_enabled() and type(self.c_proj) is Linear and self.c_proj.weight.requires_grad:
            return GeluLinear.apply(h, self.c_proj.weight, self.c_proj.bias)
        return self.c_proj(gelu_tanh(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer: int = 0, mask=None, packing=None):
        x = x + self.drop(self.attn(x, cache, layer, mask, packing, norm=self.ln_1))  # attn(ln_1(x))
        return x + self.drop(self.mlp(x, norm=self.ln_2))  # mlp(ln_2(x))


class Embedding(nn.Embedding):
    """``nn.Embedding``, leaving a weight made on the meta device as it is: the model fills or loads it afterwards,
    and ``normal_`` on a meta tensor imports ``torch._dynamo`` the first time, 1.4-2.3 s of every process's start."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def materialize(module: nn.Module, device="cpu") -> nn.Module:
    """``module.to_empty(device=device)`` without torch's meta-tensor ``empty_like``, whose first call imports sympy
    (0.4-0.6 s of every process's start). Shared parameters come out untied, as with ``to_empty``."""
    return module._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def init_generator(seed: int) -> torch.Generator:
    """Where a run's initial weights draw from (a random init, LoRA's ``A``): a generator of its own, seeded,
    so that another thread seeding or drawing from torch's global RNG meanwhile (the app's playground
    building a base model, another job) cannot change them."""
    return torch.Generator().manual_seed(seed)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, generator: torch.Generator | None = None):
        """``generator``: where the random init draws from. With one, the layers are made on the meta device and
        filled from it alone, so torch's global RNG is neither read nor moved; without, they draw from that RNG
        as the book's model does (after ``torch.manual_seed``, the same weights)."""
        super().__init__()
        self.config = config
        with torch.device("meta") if generator is not None else contextlib.nullcontext():
            self.transformer = nn.ModuleDict(
                dict(
                    wte=Embedding(config.vocab_size, config.n_embd),
                    wpe=Embedding(config.block_size, config.n_embd),
                    drop=nn.Dropout(config.dropout),
                    h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                    ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
                )
            )
            self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if generator is not None:
            materialize(self)
        self.lm_head.weight = self.transformer.wte.weight
        self.tied_grad_buffer: TiedGradBuffer | None = None  # lent by the optimizer while the model trains
        if not any(p.is_meta for p in self.parameters()):
            self.apply(lambda module: self._init_weights(module, generator))
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer), generator=generator)

    @staticmethod
    def _init_weights(module, generator=None):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02, generator=generator)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, positions=None, cache=None, mask=None, tied_grad=None, packing=None):
        """Final-LayerNorm hidden states (B, T, C); the LM head is left to the caller.

        ``tied_grad``: the list through which ``loss`` hands the head's weight gradient to the embedding.
        With ``packing``, ``idx`` and ``positions`` are the packed (N,) tokens and the result is (N, C).
        """
        if positions is None:
            T = idx.shape[1]
            start = cache.length if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context window of {self.config.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)
        wte = self.transformer.wte
        tok = TiedEmbedding.apply(idx, wte.weight, tied_grad) if tied_grad is not None else wte(idx)
        x = tok + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, mask, packing)
        return self.transformer.ln_f(x)

    def forward(self, idx):
        """Logits (B, T, vocab) for every position."""
        return self.lm_head(self.hidden_states(idx))

    def loss(self, idx, targets, ignore_index: int = -100):
        """Mean cross-entropy over the targets that count.

        The same value as the book's ``cross_entropy(logits.flatten(0, 1), targets.flatten())``,
        with less work: the 50,257-wide LM head runs only where a target exists,
        not on padding or masked prompt tokens, and when training the head's
        gradients are made in the same pass (``TiedHeadCrossEntropy``). The
        blocks skip each row's end after its last target (``Packing``).
        """
        weight = self.lm_head.weight
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        tied_grad = [] if training and weight.requires_grad else None
        packing = Packing.of(targets, ignore_index)
        if packing is None:
            h = self.hidden_states(idx, tied_grad=tied_grad)
        else:
            idx, targets = packing.pack(idx), packing.pack(targets)
            h = self.hidden_states(idx, packing.index % packing.T, tied_grad=tied_grad, packing=packing)
        keep = targets != ignore_index
        h, targets = h[keep], targets[keep]
        if training:
            return TiedHeadCrossEntropy.apply(h, weight, targets, tied_grad, self.tied_grad_buffer)
        return TiedHeadCrossEntropy.run(h, weight, targets, False, False, self.tied_grad_buffer)[0]
