"""Small random GPT-2 checkpoints in the Hugging Face layouts, made by ``transformers``."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SMALL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)


def hf_model(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**SMALL, **overrides}))
    with torch.no_grad():  # transformers zero-inits biases; random ones catch a missed bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()


def save_transformers_layout(model, directory: Path) -> Path:
    """What ``save_pretrained`` writes: keys with a ``transformer.`` prefix."""
    model.save_pretrained(directory)
    return directory


def save_hub_layout(model, directory: Path) -> Path:
    """The Hub's openai-community/gpt2 file: no prefix, no lm_head, the old ``attn.bias`` mask buffers."""
    directory.mkdir(parents=True, exist_ok=True)
    n = model.config.n_positions
    tensors = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(directory / "config.json"))
    return directory


@torch.no_grad()
def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    return model(idx).logits
