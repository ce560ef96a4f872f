"""The GPU path: CUDA picked, bf16 with fp32 master weights, fused AdamW, SDPA flash, NCCL; and ZeroGPU's CPU fallback.

The ``cuda``-marked tests run where a CUDA GPU is (``bench/gpu_check.sh`` runs them) and skip elsewhere.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from data import InstructionDataset, load_instructions, make_loader, split_instructions
from model import load_pretrained, pick_device, pick_dtype
from model.device import DEVICE_ENV, hardware_note
from runstore import read_manifest
from training import TrainConfig, train
from training.loop import evaluate
from training.optim import MasterWeightAdamW

from .test_distributed import TINY, losses, torchrun

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_run(tmp_path, name: str, **overrides) -> dict:
    values = dict(model="tiny", random_init=True, data="canonical", max_steps=8, eval_every=4, eval_batches=2,
                  sample_tokens=8, lr=1e-3, device="cuda", out=str(tmp_path / name))
    return train(TrainConfig(**{**values, **overrides}))


def val_batches(config: TrainConfig, context: int = 1024) -> list:
    """The validation batches that the loop evaluates on."""
    split = split_instructions(load_instructions(config.data))
    loader = make_loader(InstructionDataset(split.val, style=config.style, max_length=context), config.batch_size,
                         shuffle=False, drop_last=False)
    return list(itertools.islice(loader, config.eval_batches))


@pytest.mark.cuda
@needs_gpu
def test_cuda_is_picked_with_bf16_where_the_card_has_it(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV)
    device = pick_device()
    assert device.type == "cuda"
    native = torch.cuda.get_device_capability(device)[0] >= 8
    assert pick_dtype(device) == (torch.bfloat16 if native else torch.float32)
    assert torch.cuda.get_device_name(device) in hardware_note()


@pytest.mark.cuda
@needs_gpu
def test_bf16_and_fp32_losses_agree_on_the_same_batches(tmp_path):
    fp32 = cuda_run(tmp_path, "fp32", precision="fp32")
    bf16 = cuda_run(tmp_path, "bf16", precision="bf16")
    assert read_manifest(tmp_path / "bf16")["device"].endswith("bfloat16")
    a, b = losses(tmp_path / "bf16", "train_loss"), losses(tmp_path / "fp32", "train_loss")
    assert len(a) == len(b) == 9
    assert a == pytest.approx(b, rel=2e-2)
    assert a[-1] < a[0] - 0.5
    assert bf16["final_val_loss"] == pytest.approx(fp32["final_val_loss"], rel=2e-2)


@pytest.mark.cuda
@needs_gpu
def test_a_random_init_with_lora_trains_on_the_gpu_from_its_cpu_generator(tmp_path):
    """The init's generator is a CPU one: the weights and LoRA's A are drawn on the CPU, then moved."""
    summary = cuda_run(tmp_path, "lora", lora_rank=4, max_steps=2, eval_every=2)
    assert summary["status"] == "done" and summary["steps"] == 2


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_saved_model_loads_and_gives_the_runs_validation_loss(tmp_path, precision):
    """Saved from the GPU (exact fp32 master weights), reloaded on the CPU: the loss the run logged last."""
    summary = cuda_run(tmp_path, "run", precision=precision)
    config = TrainConfig.from_dict(read_manifest(tmp_path / "run")["config"])
    model = load_pretrained(tmp_path / "run")
    assert next(model.parameters()).dtype == torch.float32
    reloaded = evaluate(model, val_batches(config), torch.device("cpu"))
    assert reloaded == pytest.approx(summary["final_val_loss"], rel=1e-4 if precision == "fp32" else 1e-2)


@pytest.mark.cuda
@needs_gpu
def test_fused_adamw_keeps_fp32_master_weights_on_cuda():
    """One bf16 step with the fused optimizer equals torch's fp32 AdamW on the same gradient, to fp32 rounding."""
    torch.manual_seed(0)
    weight = torch.nn.Linear(512, 256, device="cuda")
    reference = torch.nn.Linear(512, 256, device="cuda")
    reference.load_state_dict(weight.state_dict())
    optimizer = MasterWeightAdamW(weight, torch.bfloat16, lr=1e-3, step_in_backward=False)
    assert all(group["fused"] for _, _, opt in optimizer.pieces[weight.weight] for group in opt.param_groups)
    grads = [torch.randn_like(p, dtype=torch.float32) for p in reference.parameters()]
    for p, g in zip(weight.parameters(), grads):
        p.grad = g.to(torch.bfloat16)
    optimizer.step()
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.1)
    for p, g in zip(reference.parameters(), grads):
        p.grad = g.to(torch.bfloat16).float()
    plain.step()
    optimizer.finish()
    for ours, theirs in zip(weight.parameters(), reference.parameters()):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@needs_gpu
def test_flash_attention_runs_the_training_shapes():
    """SDPA's flash kernel takes GPT-2's causal bf16 attention, forward and backward, and agrees with the math path."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("flash attention needs an Ampere or newer GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 12, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    results = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        results.append((out, *grads))
    for flash, math in zip(*results):
        torch.testing.assert_close(flash.float(), math.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_with_nccl_train_like_one_with_the_whole_batch(tmp_path):
    result = torchrun(["-m", "training", *TINY, "--precision", "fp32", "--device", "cuda", "--batch-size", "2",
                       "--out", str(tmp_path / "ddp")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (nccl)" in result.stdout
    cuda_run(tmp_path, "one", data="sample", max_steps=6, eval_every=3, sample_tokens=0, batch_size=4, precision="fp32")
    # GPU kernels sum in an order of their own (atomics in the embedding's backward): agreement to ~1e-4.
    assert losses(tmp_path / "ddp", "train_loss") == pytest.approx(losses(tmp_path / "one", "train_loss"), rel=1e-4)


def test_zero_gpu_spaces_train_on_the_cpu_and_say_so(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert pick_device().type == "cpu"
    note = hardware_note()
    assert "ZeroGPU" in note and "@spaces.GPU" in note and "training runs on the CPU" in note
    monkeypatch.setenv("SPACES_ZERO_GPU", "")
    assert "ZeroGPU" not in hardware_note()
