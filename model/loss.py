"""The training loss's pieces: skipping padding (``Packing``), and the tied LM head's cross-entropy with its gradients.

``GPT.loss`` packs each row up to its last target, runs the 50,257-wide head
only where targets are, and makes the head's gradients in the forward pass
(``TiedHeadCrossEntropy``); the token embedding adds its rows into that same
gradient (``TiedEmbedding``), which the optimizer lends back each step
(``TiedGradBuffer``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fused import linear, right_operand, uses_onednn


@dataclass
class Packing:
    """The positions of a (B, T) batch that can change the loss, packed into one (N, C) matrix.

    Attention is causal, so positions after a row's last target change nothing
    that is scored: padding at the end of a row only costs time. Training runs
    the per-token layers (LayerNorms, projections, MLPs: nearly all the FLOPs)
    on each row's prefix up to its last target, and goes back to (B, T) only
    around attention, where the dropped positions are zeros that no kept
    position can see.
    """

    index: torch.Tensor  # (N,) kept positions, flat in B * T
    B: int
    T: int

    @classmethod
    def of(cls, targets: torch.Tensor, ignore_index: int = -100) -> "Packing | None":
        """The packing for ``targets``, or None when every position counts."""
        B, T = targets.shape
        scored = targets != ignore_index
        lengths = torch.where(scored.any(1), T - scored.flip(1).int().argmax(1), 0)
        kept = torch.arange(T, device=targets.device) < lengths[:, None]
        if kept.all() or not kept.any():
            return None
        return cls(kept.flatten().nonzero().squeeze(1), B, T)

    @classmethod
    def tokens(cls, targets: torch.Tensor, ignore_index: int = -100) -> int:
        """How many positions of the batch the blocks run on."""
        packing = cls.of(targets, ignore_index)
        return targets.numel() if packing is None else len(packing.index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.reshape(self.B * self.T, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at the dropped positions."""
        return x.new_zeros(self.B * self.T, x.shape[-1]).index_copy_(0, self.index, x).view(self.B, self.T, -1)


class TiedHeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ weight.T``, with both gradients computed in the forward pass.

    The loss is the graph's last node, so its gradient is known up to the
    incoming scalar. Making the gradients here skips what autograd would do
    around a (tokens x 50,257) logits tensor: an fp32 copy, its log-softmax, and
    their three backward buffers. Rows go through in blocks, softmax in place
    (fp32 inside), so the largest temporary stays ~50 MB in fp32 however long
    the batch.
    """

    BLOCK_ROWS = 256  # logits of a block: ~50 MB in fp32, ~25 MB in bf16; softmax overwrites them
    LOSS_ROWS = 128  # for a loss alone (evaluation, while training's memory is held): its fp32 log-softmax ~25 MB

    @staticmethod
    def run(h, weight, targets, want_grad_h: bool = True, want_grad_w: bool = True,
            grad_buffer: "TiedGradBuffer | None" = None):
        """(mean loss, gradient of h or None, gradient of weight or None)."""
        n = h.shape[0]
        grad_h = torch.empty_like(h) if want_grad_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        block = TiedHeadCrossEntropy.BLOCK_ROWS if want_grad_h or want_grad_w else TiedHeadCrossEntropy.LOSS_ROWS
        weight_right = right_operand(weight) if want_grad_h else weight
        for start in range(0, n, block):
            hb = h[start : start + block]
            cols = targets[start : start + len(hb)]
            if uses_onednn(hb, weight):
                logits = linear(hb, weight)
            else:
                logits = torch.mm(hb, weight.t(), out=grad_buffer.logits(len(hb)) if grad_buffer else None)
            if not (want_grad_h or want_grad_w):
                logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
                total -= logp[torch.arange(len(cols), device=h.device), cols].sum()
                continue
            # softmax - one_hot is the gradient of the summed loss. One softmax pass (fp32 inside), in place,
            # gives it and the loss; the loss's rounding to the logits' dtype is ~0.002 per token.
            rows = torch.arange(len(cols), device=h.device)
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
            total -= probs[rows, cols].float().clamp_min(torch.finfo(torch.float32).tiny).log().sum()
            probs[rows, cols] -= 1
            if want_grad_h:
                torch.mm(probs, weight_right, out=grad_h[start : start + len(hb)])
            if want_grad_w and grad_w is None:
                grad_w = torch.mm(probs.t(), hb.div(n), out=grad_buffer.take() if grad_buffer else None)
            elif want_grad_w:
                grad_w.addmm_(probs.t(), hb.div(n))
            del logits, probs
        if grad_h is not None:
            grad_h.div_(n)
        return total / n, grad_h, grad_w

    @staticmethod
    def forward(ctx, h, weight, targets, tied_grad=None, grad_buffer=None):
        loss, grad_h, grad_w = TiedHeadCrossEntropy.run(h, weight, targets, h.requires_grad, weight.requires_grad, grad_buffer)
        if tied_grad is not None and grad_w is not None:
            tied_grad.append(grad_w)  # the embedding's backward adds its rows and returns the sum
            grad_w = None
        ctx.grads = (grad_h, grad_w)  # not save_for_backward: autograd may then take them over without a copy
        ctx.tied_grad = tied_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        if grad_loss.item() != 1.0:
            grad_h = None if grad_h is None else grad_h * grad_loss
            grad_w = None if grad_w is None else grad_w * grad_loss
            if ctx.tied_grad:
                ctx.tied_grad[0].mul_(grad_loss)
        return grad_h, grad_w, None, None, None


class TiedGradBuffer:
    """The tied weight's gradient buffer and the head's logits block, kept from one training step to the next.

    glibc takes a block this large (150 MB in fp32 for GPT-2, ~50 MB for 256
    rows of logits) straight from the OS and gives it back when it is freed, so
    a fresh one faults in every page again each step: the head's matmuls wrote
    into them at ~100-180 GFLOP/s instead of ~200, slower on some steps than
    others. The optimizer lends a model one of these while it steps inside
    backward, and hands the gradient back once it has been applied and nothing
    else holds it.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.grad = None
        self.lent = False
        self.block = None

    def take(self) -> torch.Tensor | None:
        """The last gradient, to overwrite, or None (the first step, or none came back)."""
        grad, self.grad = self.grad, None
        self.lent = True
        ok = grad is not None and grad.shape == self.weight.shape and grad.dtype == self.weight.dtype
        return grad if ok else None

    def give_back(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Called by the optimizer once ``grad`` is applied; kept only when the head took the last one."""
        if param is self.weight and self.lent:
            self.grad, self.lent = grad, False

    def logits(self, rows: int) -> torch.Tensor:
        """A (rows x vocab) buffer for one block of the head's logits, in the weight's dtype, where ``torch.mm``
        makes them (bf16, GPUs); oneDNN's matmul (fp32 on the CPU) writes its own, at ~220 GFLOP/s all the same."""
        need = rows * self.weight.shape[0]
        if self.block is None or self.block.numel() < need or self.block.dtype != self.weight.dtype:
            self.block = None
            self.block = torch.empty(need, dtype=self.weight.dtype, device=self.weight.device)
        return self.block[:need].view(rows, -1)


class TiedEmbedding(torch.autograd.Function):
    """Token embedding lookup whose weight gradient joins the tied LM head's, in place.

    Left to autograd, the weight would get two gradients, the head's dense one
    and the lookup's, summed into a third vocab-sized buffer at the end of
    backward. Here the lookup adds its rows into the head's gradient and
    returns it as the one gradient of the shared weight.
    """

    @staticmethod
    def forward(ctx, idx, weight, tied_grad):
        ctx.save_for_backward(idx)
        ctx.tied_grad, ctx.shape = tied_grad, weight.shape
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        grad_w = ctx.tied_grad.pop() if ctx.tied_grad else grad_out.new_zeros(ctx.shape)
        grad_w.index_add_(0, idx.flatten(), grad_out.reshape(-1, ctx.shape[1]).to(grad_w.dtype))
        return None, grad_w, None
