"""GPT-2 in plain PyTorch: the model, its weights, the tokenizer and generation."""
from .device import pick_device, pick_dtype
from .generation import (
    KVCache, generate, generate_batch, generate_steps, generate_text_simple, sample_next, stream_side_by_side, stream_text,
)
from .gpt import GPT, PRESETS, GPTConfig, init_generator
from .registry import ModelRegistry
from .tokenizer import EOT_ID, get_tokenizer
from .weights import HUB_PRESETS, WeightsError, load_pretrained, save_pretrained

__all__ = [
    "GPT", "GPTConfig", "PRESETS", "init_generator", "HUB_PRESETS", "KVCache", "WeightsError", "EOT_ID",
    "load_pretrained", "save_pretrained", "get_tokenizer", "pick_device", "pick_dtype",
    "generate", "generate_batch", "generate_steps", "generate_text_simple", "sample_next", "stream_text",
    "stream_side_by_side", "ModelRegistry",
]
