"""Data-parallel fine-tuning under ``torchrun``: one process per device, DistributedDataParallel.

``torchrun --nproc_per_node N -m training ...`` starts N copies of the CLI; each finds
its place in torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins one
process group: NCCL on CUDA, gloo on CPU. An N-process run is the 1-process run
with N times the batch: each process takes every N-th item of each global batch
(``make_loader(rank=, world_size=)``), the loss is the mean over all the global
batch's target tokens (token counts are summed across processes, not per-process
means averaged), and DDP sums the gradients before AdamW steps on each process.

Only rank 0 writes the run. A stop request on any rank stops all of them at the
same step; a rank that fails records its error in the process group's store, so
that the others, whose next collective then fails, end with that reason.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

IGNORE_INDEX = -100
TIMEOUT_ENV = "GPT2_INSTRUCT_DIST_TIMEOUT_S"  # how long a collective waits for a silent peer (default 600 s)


def launched() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))


@dataclass
class Context:
    """This process's place in the run; with ``world_size == 1`` every method is the 1-process identity."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def place(self, device: torch.device) -> torch.device:
        """This process's own GPU when the run has several processes on CUDA."""
        return torch.device("cuda", self.local_rank) if self.enabled and device.type == "cuda" else device

    def all_sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the processes (float64, so token counts stay exact)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return tuple(t.tolist())

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one: a stop request ends all ranks at the same step."""
        return bool(self.all_sum(float(bool(flag)))[0]) if self.enabled else bool(flag)

    def on_main(self, make):
        """``make()`` run on rank 0 only, its result (picklable) handed to every process."""
        if not self.enabled:
            return make()
        box = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def loss_fn(self, model: nn.Module, grad_accum: int = 1):
        """What the loop calls for each micro-batch's loss: ``model.loss``, or its data-parallel form."""
        return DataParallelLoss(model, self, grad_accum) if self.enabled else model.loss

    def reason(self, error: BaseException) -> str:
        """Why this rank ends: a peer's recorded error when one failed first, else this rank's own (then recorded)."""
        own = f"{type(error).__name__}: {error}"
        if not self.enabled or not dist.is_initialized():
            return own
        try:
            store = dist.distributed_c10d._get_default_store()
            for rank in range(self.world_size):
                key = f"gpt2-instruct/error/{rank}"
                if rank != self.rank and store.check([key]):
                    return f"rank {rank} failed: {store.get(key).decode()}"
            if isinstance(error, dist.DistError) or any(word in str(error).lower() for word in ("gloo", "nccl")):
                return f"another rank ended without an error of its own (killed, or out of memory?); this rank saw {own}"
            store.set(f"gpt2-instruct/error/{self.rank}", own)
        except Exception:  # the store went with its host: this rank's own error is all there is
            pass
        return own


def context() -> Context:
    """This process's Context: from the process group when one is up, else the 1-process one."""
    if not dist.is_available() or not dist.is_initialized():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def init(device: str | None = "auto") -> Context:
    """Join torchrun's process group (NCCL when the run is on CUDA, else gloo); the 1-process Context otherwise."""
    if not launched() or dist.is_initialized():
        return context()
    from model.device import pick_device

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if pick_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=timeout())
    return context()


def shutdown(ok: bool = True) -> None:
    """Leave the process group; after a good run, wait for every rank (rank 0 saves last) so all end alike."""
    if dist.is_available() and dist.is_initialized():
        try:
            if ok:
                dist.barrier()
        finally:
            dist.destroy_process_group()


class _Loss(nn.Module):
    """``model.loss`` as a module's forward, which is what DDP hooks into."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


class DataParallelLoss:
    """One micro-batch's loss under DDP, scaled so that the ranks' averaged gradient is the global token mean's.

    A rank's ``model.loss`` is the mean over its own ``n_r`` target tokens; times
    ``n_r * world_size / sum(n)`` it becomes ``world_size`` times the rank's share of
    the global mean, and DDP's average over ranks leaves the gradient of the mean
    over all ``sum(n)`` target tokens, as one process with the whole batch gets.
    Summed over ranks and divided by ``world_size``, ``loss.item()`` is that mean.

    Gradients are reduced once per optimizer step: the first ``grad_accum - 1``
    micro-batches of each step run under ``no_sync``. DDP must wrap the model after
    MasterWeightAdamW has put its compute copies in place (bf16 buckets for bf16).
    """

    def __init__(self, model: nn.Module, ctx: Context, grad_accum: int = 1):
        device = next(model.parameters()).device
        self.ctx = ctx
        self.grad_accum = grad_accum
        self.calls = 0
        self.ddp = DistributedDataParallel(
            _Loss(model), device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count = int((y != IGNORE_INDEX).sum())
        (total,) = self.ctx.all_sum(count)
        if count == 0:
            # Every parameter must still get a (zero) gradient, or DDP's reduction would wait for it.
            y = y.clone()
            y.view(-1)[0] = 0
        self.calls += 1
        sync = self.calls % self.grad_accum == 0
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            loss = self.ddp(x, y)
        return loss * (count * self.ctx.world_size / total) if total else loss * float("nan")


class NullWriter:
    """What ranks other than 0 write: nothing."""

    manifest: dict = {}
    metrics: list = []

    def close(self) -> None:
        pass

    def update_manifest(self, **fields) -> None:
        pass

    def log(self, record: dict, response: str | None = None) -> None:
        pass
