"""AdamW for a model that computes in bf16 while its weights live in fp32.

``MasterWeightAdamW`` takes over each fp32 parameter's tensor as its master
copy and gives the parameter a compute copy (bf16 on hardware that runs it
fast). The optimizer updates the masters; the compute copy is refreshed from
them. With ``step_in_backward`` a parameter is updated inside ``backward()``
as soon as its gradient is complete, and the gradient is freed at once, so
the gradients of the whole model never exist together: at the book's
settings (no clipping, no accumulation) 124M trains in about 2 GB.
A large tensor (the 50,257-row embedding) is updated in row pieces, so that
its fp32 gradient is never made whole either.
"""
from __future__ import annotations

import math

import torch

PIECE_ELEMENTS = 4 * 2**20


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
    ):
        self.model = model
        self.compute_dtype = compute_dtype
        all_params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in all_params):
            raise ValueError("MasterWeightAdamW takes a model whose parameters are fp32")
        self.params = [p for p in all_params if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        # Masters of frozen parameters too (LoRA's base): the final weights are then exact fp32.
        mixed = compute_dtype != torch.float32
        self.masters = {p: p.detach() if mixed else p for p in all_params}
        if mixed:
            for p in all_params:
                p.data = p.data.to(compute_dtype)
        fused = self.params[0].device.type in ("cpu", "cuda")
        # One optimizer per tensor, or per row piece of a large mixed-precision tensor:
        # a step inside backward then touches only that tensor, a few MB at a time.
        self.pieces = {}
        for p in self.params:
            master = self.masters[p]
            rows = max(1, PIECE_ELEMENTS // master[0].numel()) if self._mixed(p) and master.dim() > 1 else len(master)
            views = master.split(rows) if rows < len(master) else [master]
            self.pieces[p] = [
                (i * rows, view, torch.optim.AdamW([view], lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused))
                for i, view in enumerate(views)
            ]
        self.step_in_backward = step_in_backward
        self.hooks = [p.register_post_accumulate_grad_hook(self._update) for p in self.params] if step_in_backward else []

    def _mixed(self, p) -> bool:
        return self.masters[p] is not p

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
        if not self._mixed(p):
            self.pieces[p][0][2].step()
            p.grad = None
            return
        grad = p.grad
        p.grad = None
        for start, master, optimizer in self.pieces[p]:
            rows = slice(start, start + len(master))
            master.grad = grad[rows].float()
            optimizer.step()
            master.grad = None
            p[rows].copy_(master)

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

    def state_bytes(self) -> int:
        """Bytes held for training beyond the compute weights: master copies and Adam moments."""
        masters = sum(m.numel() * 4 for p, m in self.masters.items() if m is not p)
        return masters + sum(self.masters[p].numel() * 8 for p in self.params)

    @torch.no_grad()
    def finish(self) -> torch.nn.Module:
        """Stop training: drop hooks and optimizer state, and put the fp32 masters back into the model."""
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.pieces.clear()
        for p, master in self.masters.items():
            p.grad = None
            if master is not p:
                p.data = master
        self.masters.clear()
        return self.model
