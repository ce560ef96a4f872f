"""The CPU fast paths of GPT-2's layers: oneDNN's matmul, and autograd functions that keep less for backward.

On an x86 CPU in fp32, ``linear`` runs through oneDNN, faster than the default
BLAS at a training step's shapes; elsewhere (bf16, GPUs) it is ``F.linear``.
``LayerNormLinear`` (fp32 only) and ``GeluLinear`` (whenever the MLP's output
projection trains, on any device) fuse a block's LayerNorm or GELU with the
matmul after it and recompute the cheap part in backward, so a (tokens x d)
or (tokens x 4 d) tensor a layer is not kept. Where bf16 products are
emulated (CPUs without AVX-512), the input gradients' products take the
weight transposed in memory (``right_operand``). The model in ``model.gpt``
reads the same either way.
"""
from __future__ import annotations

import math
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

# x86 only: measured there; on Arm the default BLAS may well be the faster one.
ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on the CPU, where oneDNN's matmul beats the default BLAS (MKL) at ``x @ weight.T``.

    Measured on an AMD EPYC: ~1.2x MKL's speed restricted to AVX2 at a training
    step's shapes, ~2x with AVX-512 (MKL keeps to its AVX2 code on AMD CPUs), ~3.5x
    for one token through the LM head. The backward's two matmuls (``g @ W`` and
    ``g.T @ x``) gain nothing there without a transposed copy of the weight, so
    they stay with MKL.
    """
    return ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32


# torch's own bf16 CPU kernel, taken where oneDNN's bf16 matmul is not (a CPU without AVX-512): on an AVX2 EPYC it
# ran (N x K) @ (K x M) at ~1 GFLOP/s, the same product with the right operand transposed in memory at 10-27.
EMULATED_BF16_MM = (hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
                    and not torch.ops.mkldnn._is_mkldnn_bf16_supported())


def emulated_bf16(t: torch.Tensor) -> bool:
    """A bf16 CPU tensor whose products go through torch's emulated kernel (``EMULATED_BF16_MM``)."""
    return EMULATED_BF16_MM and t.dtype == torch.bfloat16 and t.device.type == "cpu"


def right_operand(b: torch.Tensor) -> torch.Tensor:
    """``b`` for ``a @ b``: the same values, laid out transposed where ``emulated_bf16`` makes that ~10x faster.

    Training's input gradients are such products (``g @ W``); a transposed copy
    of ``W`` costs one pass over it. Elsewhere ``b`` itself.
    """
    return b.t().contiguous().t() if emulated_bf16(b) and b.is_contiguous() else b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN where ``uses_onednn``; no autograd (``Linear`` adds it)."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear``: training, evaluation and generation take the same matmul."""

    def forward(self, x):
        needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))
        if needs_graph and (uses_onednn(x, self.weight) or emulated_bf16(self.weight)):
            return LinearFunction.apply(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


class LinearFunction(torch.autograd.Function):
    """``linear`` for autograd; the gradients are the default BLAS's matmuls, as ``F.linear``'s backward makes them,
    the input's with ``right_operand``'s layout."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ right_operand(weight)).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def norm_linear(norm: nn.LayerNorm | None, lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``lin(norm(x))``; when it trains a plain ``Linear`` in fp32, through ``LayerNormLinear``, which keeps less for
    backward. In bf16 (CPU) the recomputed LayerNorm cost ~3 % of a step for half the saving, so autograd keeps both."""
    if norm is None:
        return lin(x)
    if (type(lin) is Linear and x.dtype == torch.float32 and torch.is_grad_enabled()
            and any(t.requires_grad for t in (x, norm.weight, lin.weight))):
        return LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, lin.weight, lin.bias)
    return lin(norm(x))


class LayerNormLinear(torch.autograd.Function):
    """``linear(layer_norm(x), weight, bias)`` that keeps ``x`` (with its mean and 1/std) alone for backward.

    Left to autograd, both ``x`` (for the LayerNorm's backward) and its output
    (for the weight's gradient) stay alive until backward: two (tokens x d)
    tensors for each of a block's two LayerNorms. Recomputing the LayerNorm in
    backward costs one pass over ``x`` and saves one of them; the gradients are
    the same to the bit.
    """

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, weight, bias):
        y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], ln_weight, ln_bias, eps)
        ctx.save_for_backward(x, mean, rstd, ln_weight, ln_bias, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return linear(y, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
        need_x, need_ln_w, need_ln_b, _, need_w, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        grad_w = grad_b = None
        if need_w:
            y = torch.native_layer_norm(x, [x.shape[-1]], ln_weight, ln_bias, ctx.eps)[0]
            grad_w = g.t() @ y.reshape(-1, y.shape[-1])
            del y
        if ctx.has_bias and need_b:
            grad_b = g.sum(0)
        grad_x = grad_ln_w = grad_ln_b = None
        if need_x or need_ln_w or need_ln_b:
            grad_y = (g @ weight).view(x.shape)
            grad_x, grad_ln_w, grad_ln_b = torch.ops.aten.native_layer_norm_backward(
                grad_y, x, [x.shape[-1]], mean, rstd, ln_weight, ln_bias, [need_x, need_ln_w, need_ln_b])
        return grad_x, grad_ln_w, grad_ln_b, None, grad_w, grad_b


GELU_K = 2 * math.sqrt(2 / math.pi)  # GPT-2's tanh GELU: x * sigmoid(K * (x + A x^3))
GELU_A = 0.044715


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU; on CPU in fp32 as ``x * sigmoid(2z)``, the same function, since 0.5 (1 + tanh z) = sigmoid(2z).

    ATen's vectorized tanh is slow on AVX2: its GELU took 1.7 ms on a (464 x
    3,072) block where this takes 0.6 ms, within ~1e-7 of it, and it is no
    slower on one token's 3,072. Training, evaluation and generation all use it,
    so they agree to the bit. Elsewhere (bf16, GPUs) ATen's fused kernel is the
    faster one and rounds only once.
    """
    if not _sigmoid_form(h):
        return F.gelu(h, approximate="tanh")
    if torch.is_grad_enabled() and h.requires_grad:
        return GeluTanh.apply(h)
    z = h * h
    return z.mul_(GELU_A * GELU_K).add_(GELU_K).mul_(h).sigmoid_().mul_(h)


def gelu_tanh_and_backward(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(h), grad * gelu'(h))`` sharing one sigmoid: gelu' = s + h z' s (1 - s), s = sigmoid(z), z' = K (1 + 3 A h^2)."""
    if not _sigmoid_form(h):
        return F.gelu(h, approximate="tanh"), torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    s = h * h
    d = s.mul(3 * GELU_A * GELU_K).add_(GELU_K)  # z'
    s.mul_(GELU_A * GELU_K).add_(GELU_K).mul_(h).sigmoid_()
    d.mul_(h).mul_(s)
    d.addcmul_(d, s, value=-1).add_(s)  # h z' s (1 - s) + s
    d.mul_(grad)
    return s.mul_(h), d


def _sigmoid_form(h: torch.Tensor) -> bool:
    return h.dtype == torch.float32 and h.device.type == "cpu"


class GeluTanh(torch.autograd.Function):
    """``gelu_tanh`` for autograd (the MLP of a LoRA model), keeping only its input for backward."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return gelu_tanh(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return gelu_tanh_and_backward(h, grad)[1]


class GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` that keeps ``h`` alone for backward and recomputes the GELU there.

    Left to autograd, both ``h`` (for GELU's backward) and ``gelu(h)`` (for the
    weight's gradient) stay alive until backward: two (tokens x 4 d) tensors a
    layer. Recomputing the GELU costs one elementwise pass and saves one of them.
    """

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return linear(gelu_tanh(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_g = grad_out @ right_operand(weight) if ctx.needs_input_grad[0] else None
        if grad_g is not None:
            g, grad_h = gelu_tanh_and_backward(h, grad_g)
            del grad_g
        else:
            g, grad_h = gelu_tanh(h), None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = grad_2d.t() @ g.reshape(-1, g.shape[-1]) if ctx.needs_input_grad[1] else None
        del g
        grad_b = grad_2d.sum(0) if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b
