"""Fine-tuning: the loop, the optimizer, LoRA and the CLI. Never imports gradio."""
import os

# Set before torch allocates: large CPU buffers on 2 MB pages (fewer page faults per step), and a
# bounded oneDNN kernel cache (each new batch length adds ~2 MB of kernels; unbounded, that grows by GBs).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
from .config import ConfigError, TrainConfig
from .loop import Hooks, evaluate, train

__all__ = ["TrainConfig", "ConfigError", "Hooks", "train", "evaluate"]
