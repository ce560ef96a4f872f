"""Fine-tuning: the loop, the optimizer, LoRA and the CLI. Never imports gradio.

Entry points call ``model.device.configure_runtime()`` before the first tensor is made.
"""
from .config import ConfigError, TrainConfig
from .loop import Hooks, evaluate, train

__all__ = ["TrainConfig", "ConfigError", "Hooks", "train", "evaluate"]
