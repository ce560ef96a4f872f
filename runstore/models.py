"""The models that the playground and the evaluation compare: a run's base model and its fine-tuned one.

Loaded once, in the precision generation runs fastest in, and kept in one
small cache (``model.ModelRegistry``) shared by every visitor.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch

from model import GPT, GPTConfig, ModelRegistry, init_generator, load_pretrained, pick_device, pick_dtype
from model.device import release_free_memory
from model.weights import ProgressFn
from .store import WEIGHTS, read_manifest
from training.config import TrainConfig
from training.estimate import GB


def inference_setup() -> tuple[torch.device, torch.dtype]:
    """fp32 on the CPU, where exact greedy decoding runs fastest (an int8 draft checked by one fp32 pass); else the
    device's fast precision."""
    device = pick_device()
    return device, torch.float32 if device.type == "cpu" else pick_dtype(device)


def run_config(run_dir: str | Path) -> TrainConfig:
    """The settings a run was trained with."""
    manifest = read_manifest(Path(run_dir))
    config = manifest.get("config") or {}
    if not config:
        raise FileNotFoundError(f"{Path(run_dir).name} is not a run directory (no manifest.json)")
    known = set(TrainConfig.__dataclass_fields__)
    return TrainConfig.from_dict({k: v for k, v in config.items() if k in known})


class Models:
    """Base and fine-tuned models by run, loaded on first use and shared."""

    def __init__(self, capacity: int = 3):
        self.registry = ModelRegistry(capacity=capacity)

    def base(self, model: str, random_init: bool = False, seed: int = 123, progress: ProgressFn | None = None) -> GPT:
        """The model a run starts from: pretrained weights, or the same random init the run drew from its seed."""
        device, dtype = inference_setup()

        def load() -> GPT:
            if random_init:
                return GPT(GPTConfig.from_name(model), init_generator(seed)).to(device=device, dtype=dtype)
            return load_pretrained(model, device=device, dtype=dtype, progress=progress)

        return self.registry.get(f"base:{model}:{random_init}:{seed if random_init else ''}", load)

    def base_of_run(self, run_dir: str | Path, progress: ProgressFn | None = None) -> GPT:
        config = run_config(run_dir)
        return self.base(config.model, config.random_init, config.seed, progress)

    def held_gb(self) -> float:
        """GB the loaded models hold, their int8 drafts included."""
        return self.registry.nbytes() / GB

    def release(self) -> None:
        """Drop every loaded model, to make room for a run: the next compare or evaluation loads them again. A model
        in use (a generation, an evaluation) is freed when that ends."""
        self.registry.clear()
        gc.collect()
        release_free_memory(force=True)

    def tuned(self, run_dir: str | Path) -> GPT:
        """A run's weights; a run saved again (a newer file) is loaded afresh."""
        path = Path(run_dir)
        weights = path / WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(f"{path.name} has no {WEIGHTS} yet: the run has not finished")
        device, dtype = inference_setup()
        key = f"run:{path.resolve()}:{weights.stat().st_mtime_ns}"
        return self.registry.get(key, lambda: load_pretrained(path, device=device, dtype=dtype))
