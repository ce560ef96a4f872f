"""The models that the playground and the evaluation compare: a run's base model and its fine-tuned one.

Both are loaded once, in the precision generation runs fastest in, and kept
in one shared cache (``REGISTRY``) for every visitor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from model import GPT, GPTConfig, ModelRegistry, load_pretrained, pick_device, pick_dtype
from model.weights import ProgressFn

from training.config import TrainConfig
from runstore import WEIGHTS, read_manifest

REGISTRY = ModelRegistry(capacity=3)


def inference_setup() -> tuple[torch.device, torch.dtype]:
    device = pick_device()
    return device, pick_dtype(device)


def base_model(model: str, random_init: bool = False, seed: int = 123, progress: ProgressFn | None = None) -> GPT:
    """The model a run starts from: pretrained weights, or the same random init the run drew from its seed."""
    device, dtype = inference_setup()

    def load() -> GPT:
        if random_init:
            with torch.random.fork_rng(devices=[]):  # leave the global RNG (a training run's) alone
                torch.manual_seed(seed)
                return GPT(GPTConfig.from_name(model)).to(device=device, dtype=dtype)
        return load_pretrained(model, device=device, dtype=dtype, progress=progress)

    return REGISTRY.get(f"base:{model}:{random_init}:{seed if random_init else ''}", load)


def run_config(run_dir: str | Path) -> TrainConfig:
    manifest = read_manifest(Path(run_dir))
    if not manifest.get("config"):
        raise FileNotFoundError(f"{run_dir} is not a run directory (no manifest.json)")
    return TrainConfig.from_dict(manifest["config"])


def base_model_of_run(run_dir: str | Path, progress: ProgressFn | None = None) -> GPT:
    config = run_config(run_dir)
    return base_model(config.model, config.random_init, config.seed, progress)


def tuned_model(run_dir: str | Path) -> GPT:
    """A run's fine-tuned weights; a run saved again (a newer file) is loaded afresh."""
    path = Path(run_dir)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS} yet: the run has not finished")
    device, dtype = inference_setup()
    key = f"run:{path.resolve()}:{weights.stat().st_mtime_ns}"
    return REGISTRY.get(key, lambda: load_pretrained(path, device=device, dtype=dtype))
