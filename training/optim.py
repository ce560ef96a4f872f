"""AdamW for a model that computes in bf16 while its weights stay exact fp32.

``MasterWeightAdamW`` gives every fp32 parameter a bf16 compute copy and keeps
the fp32 master weight as two halves: the compute copy is the high half (the
fp32 value rounded to bf16, in bit space) and an int16 tensor holds the
remainder. The pair rebuilds the fp32 value bit for bit, for 2 bytes per
parameter instead of 4, and the forward pass reads a correctly rounded bf16
weight with no copy. Each step joins the halves of a small piece into an fp32
scratch buffer, runs torch's fused AdamW on it, and splits it again.

With ``step_in_backward`` a parameter is updated inside ``backward()`` as soon
as its gradient is complete and the gradient is freed at once, so the whole
model's gradients never exist together. Pieces are half a million elements:
a piece's join, step and split (~13 MB of buffers) run in the L3 cache, and
there are few enough of them that Python's per-step overhead stays small.
"""
from __future__ import annotations

import math

import torch

from model.loss import TiedGradBuffer

PIECE_ELEMENTS = 2**19


def split_(full: torch.Tensor, high: torch.Tensor, low: torch.Tensor, scratch: torch.Tensor) -> None:
    """Write fp32 ``full`` as bf16 ``high`` (nearest, ties away from zero) and int16 ``low``; ``join_`` inverts it exactly.

    ``low`` is the low 16 bits of ``full``'s bits read as a signed int16: with ``high`` rounded up exactly
    when those bits are 0x8000 or more, that is ``bits - high * 2**16``. Only conversions and
    same-dtype arithmetic: ATen's mixed int16 / int32 arithmetic is ~3x slower than either here.
    """
    bits = full.view(torch.int32)
    low.copy_(bits)  # int32 -> int16 keeps the low 16 bits
    torch.add(bits, 0x8000, out=scratch).bitwise_right_shift_(16)
    high.view(torch.int16).copy_(scratch)


def join_(high: torch.Tensor, low: torch.Tensor, full: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Rebuild into ``full`` the fp32 values that ``split_`` cut into ``high`` and ``low``: bits = high * 2**16 + low."""
    bits = full.view(torch.int32)
    bits.copy_(low)
    scratch.copy_(high.view(torch.int16))
    bits.add_(scratch, alpha=0x10000)
    return full


def pieces_of(t: torch.Tensor, mixed: bool) -> list:
    """Row ranges to step one at a time: one for an fp32 tensor, cache-sized ones for a mixed one."""
    if not mixed or t.dim() < 2:
        return [...]
    rows = max(1, PIECE_ELEMENTS // t[0].numel())
    return [slice(start, min(start + rows, len(t))) for start in range(0, len(t), rows)]


class FusedState:
    """One piece's AdamW settings and moments, kept as ``torch.optim.AdamW`` keeps them (``param_groups``, ``state``)
    for ``torch._fused_adamw_``, which is called directly: building a ``torch.optim.Optimizer`` imports
    ``torch._dynamo`` the first time, 1.6 s of every training process's start."""

    def __init__(self, **group):
        self.param_groups = [group]
        self.state = {}


class MasterWeightAdamW:
    def __init__(
        self,
        model: torch.nn.Module,
        compute_dtype: torch.dtype = torch.float32,
        lr: float = 5e-5,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        step_in_backward: bool = True,
        through_torch: bool = False,
    ):
        """``through_torch``: step through ``torch.optim.AdamW`` (its fused kernel where the device has one) instead of
        calling that kernel directly; what devices without a fused kernel do, and what the direct call is tested against."""
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"compute dtype must be float32 or bfloat16, not {compute_dtype}")
        self.model = model
        all_params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in all_params):
            raise ValueError("MasterWeightAdamW takes a model whose parameters are fp32")
        self.params = [p for p in all_params if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.mixed = compute_dtype == torch.bfloat16
        device = self.params[0].device
        largest = max(p.data[rows].numel() for p in all_params for rows in pieces_of(p.data, True)) if self.mixed else 0
        self.master = torch.empty(largest, dtype=torch.float32, device=device)  # one piece's fp32 master
        self.grad32 = torch.empty(largest, dtype=torch.float32, device=device)  # ... and its gradient
        self.bits = torch.empty(largest, dtype=torch.int32, device=device)
        # Low halves of frozen parameters too (LoRA's base): the final weights are then exact fp32.
        self.low = {}
        if self.mixed:
            for p in all_params:
                full = p.data
                p.data = torch.empty_like(full, dtype=torch.bfloat16)
                self.low[p] = torch.empty_like(full, dtype=torch.int16)
                for rows in pieces_of(full, True):
                    split_(full[rows], p.data[rows], self.low[p][rows], self._scratch(full[rows]))
                del full
        fused = device.type in ("cpu", "cuda")
        self.direct = fused and not through_torch
        # One optimizer per piece: a step inside backward then touches a few MB at a time.
        # Their moments are views into two whole-tensor buffers, allocated before any activation:
        # one allocation each, out of the way of every step's short-lived buffers.
        self.pieces = {}
        group = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused)
        for p in self.params:
            self.pieces[p] = []
            moments = [torch.zeros_like(p, dtype=torch.float32) for _ in range(2)]
            for rows in pieces_of(p.data, self.mixed):
                target = self.master[: p.data[rows].numel()].view_as(p.data[rows]) if self.mixed else p
                optimizer = FusedState(**group) if self.direct else torch.optim.AdamW([target], **group)
                optimizer.state[target] = {
                    "step": torch.zeros((), dtype=torch.float32, device=device if fused else "cpu"),
                    "exp_avg": moments[0][rows],
                    "exp_avg_sq": moments[1][rows],
                }
                self.pieces[p].append((rows, target, optimizer))
        self.step_in_backward = step_in_backward
        self.hooks = [p.register_post_accumulate_grad_hook(self._update) for p in self.params] if step_in_backward else []
        # Stepping inside backward, a gradient is dropped as soon as it is applied: the head may reuse its buffer.
        self.grad_buffer = None
        if step_in_backward and getattr(model, "tied_grad_buffer", False) is None:
            self.grad_buffer = model.tied_grad_buffer = TiedGradBuffer(model.lm_head.weight)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """An int32 buffer shaped like one piece, for ``split_`` and ``join_``."""
        return self.bits[: like.numel()].view_as(like)

    def _optimizers(self):
        return (optimizer for pieces in self.pieces.values() for _, _, optimizer in pieces)

    @property
    def lr(self) -> float:
        return next(self._optimizers()).param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for optimizer in self._optimizers():
            optimizer.param_groups[0]["lr"] = value

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        grad = p.grad
        if not self.mixed:
            self._adamw(self.pieces[p][0][2], p, grad)
        else:
            low = self.low[p]
            for rows, master, optimizer in self.pieces[p]:
                scratch = self._scratch(master)
                join_(p.data[rows], low[rows], master, scratch)
                self._adamw(optimizer, master, self.grad32[: master.numel()].view_as(master).copy_(grad[rows]))
                split_(master, p.data[rows], low[rows], scratch)
        p.grad = None
        if self.grad_buffer is not None:
            self.grad_buffer.give_back(p, grad)

    def _adamw(self, optimizer: FusedState | torch.optim.AdamW, param: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW's step for one tensor. Where it is fused, torch's fused kernel is called as torch's step calls it (the
        step count, then the update), without the ~70 µs of Python around it: a bf16 step updates hundreds of pieces,
        and tiny's whole step is ~40 ms. Elsewhere (e.g. Apple's MPS) ``torch.optim.AdamW`` steps (``through_torch``)."""
        if not self.direct:
            param.grad = grad
            optimizer.step()
            param.grad = None
            return
        group, state = optimizer.param_groups[0], optimizer.state[param]
        state["step"].add_(1)
        torch._fused_adamw_([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [], [state["step"]],
                            amsgrad=False, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                            grad_scale=None, found_inf=None)

    @torch.no_grad()
    def step(self, clip_norm: float | None = None) -> float | None:
        """Update every parameter from its accumulated gradient (when not stepping in backward).

        Returns the gradient norm before clipping when ``clip_norm`` is given.
        """
        if self.step_in_backward:
            raise RuntimeError("parameters are updated inside backward(); step() is for step_in_backward=False")
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = None
        if clip_norm is not None and grads:
            norm = float(torch.nn.utils.get_total_norm(grads, foreach=True))
            if math.isfinite(norm) and norm > clip_norm:
                torch._foreach_mul_(grads, clip_norm / (norm + 1e-6))
        for p in self.params:
            if p.grad is not None:
                self._update(p)
        return norm

    @torch.no_grad()
    def finish(self) -> torch.nn.Module:
        """Stop training: drop hooks and optimizer state, and put the exact fp32 weights back into the model."""
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.pieces.clear()
        if self.grad_buffer is not None and getattr(self.model, "tied_grad_buffer", None) is self.grad_buffer:
            self.model.tied_grad_buffer = None
        self.grad_buffer = None
        for p in self.model.parameters():
            p.grad = None
            if p in self.low:
                full, low = torch.empty_like(p.data, dtype=torch.float32), self.low.pop(p)
                for rows in pieces_of(full, True):
                    join_(p.data[rows], low[rows], full[rows], self._scratch(full[rows]))
                p.data = full
        self.master = self.grad32 = self.bits = None
        return self.model


    def state_dict(self) -> dict:
        """What a checkpoint needs to continue bit for bit, by parameter name: each trained parameter's
        master weight (``weight`` in fp32, or its bf16 high half with ``low`` its int16 low half), its
        AdamW moments and step count (one entry per piece).

        The tensors are the optimizer's own, not copies, so saving costs no memory; frozen parameters
        are left out because the model they come from rebuilds them.
        """
        names = {p: name for name, p in self.model.named_parameters()}
        state = {}
        for p, pieces in self.pieces.items():
            moments = [optimizer.state[target] for _, target, optimizer in pieces]
            state[names[p]] = {
                "weight": p.data, "low": self.low.get(p),
                "exp_avg": [m["exp_avg"] for m in moments], "exp_avg_sq": [m["exp_avg_sq"] for m in moments],
                "step": [m["step"] for m in moments],
            }
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Put back what ``state_dict`` returned, for the same model and compute dtype."""
        names = {p: name for name, p in self.model.named_parameters()}
        wanted = {names[p] for p in self.pieces}
        if set(state) != wanted:
            raise ValueError(f"the checkpoint trains other parameters: {sorted(set(state) ^ wanted)[:5]}")
        for p, pieces in self.pieces.items():
            saved = state[names[p]]
            if (saved["low"] is not None) != self.mixed or saved["weight"].shape != p.shape:
                raise ValueError(f"{names[p]}: the checkpoint was saved with another precision or shape")
            p.data.copy_(saved["weight"])
            if self.mixed:
                self.low[p].copy_(saved["low"])
            exp_avg, exp_avg_sq = (torch.cat(saved[key]) if len(saved[key]) > 1 else saved[key][0] for key in ("exp_avg", "exp_avg_sq"))
            for rows, target, optimizer in pieces:
                moments = optimizer.state[target]
                moments["exp_avg"].copy_(exp_avg[rows])
                moments["exp_avg_sq"].copy_(exp_avg_sq[rows])
                moments["step"].copy_(saved["step"][0])
