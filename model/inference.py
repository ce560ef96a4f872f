"""Weight-only int8 copies of a GPT for fast drafting on the CPU, sharing its embeddings, LayerNorms and biases.

At batch 1 a step's time is mostly reading the weights: ``int8_copy`` reads a
quarter of fp32's bytes, one scale per output row. It is approximate; it drafts
the tokens that the model itself checks (``generation.speculative_steps``).
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Callable

import torch
import torch.nn as nn

from .gpt import GPT


def on_cpu(model: GPT) -> bool:
    return model.transformer.wte.weight.device.type == "cpu"


def int8_supported(model: GPT) -> bool:
    """An int8 matmul exists for the model's device: fbgemm or the weight-only kernel, CPU only here."""
    return on_cpu(model) and (_fbgemm() or hasattr(torch, "_weight_int8pack_mm"))


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights, rounded per output row.

    Through fbgemm where PyTorch has it (x86: its kernels multiply int8 by
    int8, the input quantised on the fly, about twice as fast as the next
    option on AVX2), else through the weight-only kernel with a bf16 input.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.nbytes = w.numel() + 4 * len(scale)  # int8 weights and a scale per row, however they are packed
        self.packed = None
        if _fbgemm():
            with warnings.catch_warnings():  # quantised tensors are deprecated; the packed weight is what stays
                warnings.simplefilter("ignore")
                q = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())
        else:
            self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
            self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = bias

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic(rows, self.packed, True).view(*x.shape[:-1], -1)
        y = torch._weight_int8pack_mm(rows.to(torch.bfloat16), self.weight, self.scale)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y.add_(self.bias)


def _fbgemm() -> bool:
    return bool({"fbgemm", "x86"} & set(torch.backends.quantized.supported_engines)) and hasattr(torch.ops.quantized, "linear_dynamic")


def with_linears(model: GPT, make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]) -> GPT:
    """A GPT sharing ``model``'s embeddings and LayerNorms, each matmul (the LM head too) replaced by ``make(weight, bias)``."""
    with torch.device("meta"):
        copy = GPT(model.config)
    src = model.transformer
    for name in ("wte", "wpe", "drop", "ln_f"):
        setattr(copy.transformer, name, getattr(src, name))
    for block, source in zip(copy.transformer.h, src.h):
        block.ln_1, block.ln_2 = source.ln_1, source.ln_2
        for parent, other in ((block.attn, source.attn), (block.mlp, source.mlp)):
            for name, linear in other.named_children():
                setattr(parent, name, make(linear.weight, linear.bias))
    copy.lm_head = make(model.lm_head.weight, None)
    return copy.eval()


def quantize_int8(model: GPT) -> GPT:
    if not int8_supported(model):
        raise RuntimeError("int8 generation needs PyTorch's weight-only int8 kernel, which it has for the CPU only")
    return with_linears(model, Int8Linear)


_COPIES: "weakref.WeakKeyDictionary[GPT, dict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _cached(model: GPT, kind: str, make: Callable[[GPT], GPT]) -> GPT:
    """``make(model)``, made once per model and made again when its weights change."""
    state = tuple((p.data_ptr(), p._version) for p in model.parameters())
    with _LOCK:
        copies = _COPIES.setdefault(model, {})
        if kind not in copies or copies[kind][0] != state:
            copies[kind] = (state, make(model))
        return copies[kind][1]


def int8_copy(model: GPT) -> GPT:
    return _cached(model, "int8", quantize_int8)


def held_bytes(model: GPT) -> int:
    """Bytes ``model`` holds in memory: its weights and buffers (a tied weight once), and the int8 copy made of it
    for drafting, if one was made."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers())}
    with _LOCK:
        copies = [copy for _, copy in _COPIES.get(model, {}).values()]
    return sum(storages.values()) + sum(m.nbytes for copy in copies for m in copy.modules() if isinstance(m, Int8Linear))
