"""The fine-tuning engine: the loop, a background job, runs on disk and a CLI. Never imports gradio."""
import os

# Set before torch allocates: large CPU buffers on 2 MB pages (fewer page faults per step), and a
# bounded oneDNN kernel cache (each new batch length adds ~2 MB of kernels; unbounded, that grows by GBs).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
from .config import ConfigError, TrainConfig
from .loop import Hooks, evaluate, train
from .runs import find_run, list_runs, load_run, read_manifest, read_metrics

__all__ = ["TrainConfig", "ConfigError", "Hooks", "train", "evaluate", "find_run", "list_runs", "load_run", "read_manifest", "read_metrics"]
