"""GPT-2 weights in and out, in the Hugging Face layout.

In: the Hub's ``openai-community/gpt2*`` files (keys ``wte.weight``,
``h.0.attn.c_attn.weight``..., no ``lm_head``, old ``attn.bias`` mask buffers)
and what ``transformers`` ``save_pretrained`` writes (a ``transformer.``
prefix). GPT-2's Conv1D weights are stored (in, out), ours are ``nn.Linear``
(out, in), so they are transposed on the way in and out. Tensors are read one
at a time with ``safe_open`` into a model built on the meta device, so loading
never holds two copies of the model.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_write
from .gpt import GPT, PRESETS, GPTConfig, materialize

HUB_PRESETS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
PRESET_NAMES = ", ".join([*HUB_PRESETS, *(f"{name} with random weights" for name in PRESETS if name not in HUB_PRESETS)])
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
CHUNK_BYTES = 16 * 2**20
VOCAB_SIZE = 50257  # GPT-2's BPE tokenizer, which every model here reads and writes text with
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # old mask buffers
HEAD, WTE = "lm_head.weight", "transformer.wte.weight"  # GPT-2 ties them: a file may hold the head too, the same values

ProgressFn = Callable[[str, int, int], None]


class WeightsError(RuntimeError):
    """A checkpoint that cannot be found, read or matched to GPT-2."""


def load_pretrained(
    source: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
) -> GPT:
    """A GPT with pretrained weights from a preset name, Hub repo id, directory or ``.safetensors`` file.

    ``progress(description, done_bytes, total_bytes)`` is called while a file downloads.
    """
    weights_path, config_path = resolve(source, progress)
    config = read_config(config_path, weights_path, name=_display_name(source))
    if config.vocab_size != VOCAB_SIZE:  # else the first token id past its table fails deep in a forward pass
        raise WeightsError(f"{config_path or weights_path} gives a vocabulary of {config.vocab_size:,} tokens; GPT-2's "
                           f"tokenizer, which this app reads and writes text with, has {VOCAB_SIZE:,}")
    with torch.device("meta"):
        model = GPT(config)
    materialize(model, device or "cpu")
    model.to(dtype)
    model.lm_head.weight = model.transformer.wte.weight  # materialize unties shared parameters
    _fill(model, weights_path, config_path)
    return model.eval()


def save_pretrained(model: GPT, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` that ``transformers.GPT2LMHeadModel`` loads as they are."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight: saved once
        tensor = tensor.detach().to("cpu", dtype or tensor.dtype)
        tensors[name] = (tensor.t() if name.endswith(CONV1D) else tensor).contiguous()
    save_dtype = next(iter(tensors.values())).dtype
    atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    config = hf_config(model.config, save_dtype)
    atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(json.dumps(config, indent=2)))
    return directory


def hf_config(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ``config.json`` of a Hugging Face ``GPT2LMHeadModel`` for this config."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "dtype": str(dtype).removeprefix("torch."),
        "name_or_path": config.name,
    }


def resolve(source: str | os.PathLike, progress: ProgressFn | None = None) -> tuple[Path, Path | None]:
    """Paths of the weights file and its ``config.json`` (None when there is none)."""
    path = Path(source).expanduser()
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise WeightsError(f"{path} holds no {WEIGHTS_NAME}")
        return weights, _existing(path / CONFIG_NAME)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise WeightsError(f"{path} is not a .safetensors file")
        return path, _existing(path.with_name(CONFIG_NAME))
    source = str(source)
    if source in PRESETS and source not in HUB_PRESETS:
        raise WeightsError(f"the {source!r} preset has no pretrained weights; build it with GPT(GPTConfig.from_name({source!r}))")
    if source.startswith((".", "/", "~")) or source.endswith(".safetensors"):
        raise WeightsError(f"no such file or directory: {source}")
    repo = HUB_PRESETS.get(source, source)
    weights = hub_download(repo, WEIGHTS_NAME, progress)
    return weights, hub_download(repo, CONFIG_NAME, progress)


def hub_download(repo: str, filename: str, progress: ProgressFn | None = None) -> Path:
    """A file of a Hub repo, from the local cache when it is there, else downloaded (resumable)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except HFValidationError as e:
        raise WeightsError(f"{repo!r} is neither a model preset ({PRESET_NAMES}), a local path, nor a Hub repo id: {e}") from None
    except LocalEntryNotFoundError:
        pass
    offline = (
        f"cannot download {filename} of {repo} from the Hugging Face Hub ({{why}}), and it is not in the "
        f"cache at {constants.HF_HUB_CACHE}. Connect once to fill the cache, or pass a local path instead: a "
        f"directory holding {WEIGHTS_NAME} and {CONFIG_NAME}, or a .safetensors file."
    )
    if "/" not in repo:  # a typo of a preset reads as a Hub id with no owner
        offline = f"{repo!r} is not a preset ({PRESET_NAMES}) nor a local path; as a Hub id, " + offline
    reason = hub_unreachable()
    if reason:
        raise WeightsError(offline.format(why=reason))
    tqdm_class = _progress_tqdm(progress, f"{repo}/{filename}") if progress else None
    presets = f" (the presets: {', '.join(HUB_PRESETS)})" if "/" not in repo else ""
    try:
        return Path(hf_hub_download(repo, filename, etag_timeout=5, tqdm_class=tqdm_class))
    except GatedRepoError:
        raise WeightsError(f"{repo} is gated on the Hugging Face Hub: accept its terms on its page and log in "
                           "(`hf auth login`), or pass a local path") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"the Hugging Face Hub has no model {repo!r}{presets}, or it is private: check the id, "
                           "e.g. openai-community/gpt2") from None
    except RemoteEntryNotFoundError:  # the Hub said so; a download cut off is a LocalEntryNotFoundError, handled below
        raise WeightsError(f"{repo} on the Hugging Face Hub has no {filename}: this app loads GPT-2 weights saved "
                           f"as {WEIGHTS_NAME} with their {CONFIG_NAME}") from None
    except Exception as e:  # the network and the rest: the cache is the way out
        raise WeightsError(offline.format(why=f"{type(e).__name__}: {e}".split("\n")[0])) from e


def hub_cached(source: str) -> bool:
    """True when a preset's or Hub repo's weights are already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(HUB_PRESETS.get(source, source), WEIGHTS_NAME)
    return isinstance(path, str)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached, or None: one quick connect instead of the client's 20 s of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname} is unreachable: {e.strerror or e}"
    return None


def _progress_tqdm(progress: ProgressFn, description: str):
    from tqdm.auto import tqdm

    class ProgressTqdm(tqdm):
        def update(self, n=1):
            out = super().update(n)
            progress(description, int(self.n), int(self.total or 0))
            return out

    return ProgressTqdm


def read_config(config_path: Path | None, weights_path: Path, name: str = "gpt2") -> GPTConfig:
    """Our config from a Hugging Face ``config.json``, or inferred from the tensor shapes when there is none."""
    if config_path is not None:
        try:
            hf = json.loads(config_path.read_text())
            if hf.get("tie_word_embeddings", True) is False:
                raise WeightsError(f"{config_path} says tie_word_embeddings false: an LM head of its own, where GPT-2 "
                                   "uses the token embedding; this app's GPT-2 cannot hold it")
            return GPTConfig(
                name=name,
                vocab_size=hf["vocab_size"],
                block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                n_layer=hf["n_layer"],
                n_head=hf["n_head"],
                n_embd=hf["n_embd"],
                layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{config_path} is not a GPT-2 config.json: {type(e).__name__}: {e}") from None
    with open_weights(weights_path) as f:
        keys = list(f.keys())
        prefix = "transformer." if "transformer.wte.weight" in keys else ""
        try:
            vocab_size, n_embd = f.get_slice(prefix + "wte.weight").get_shape()
            block_size = f.get_slice(prefix + "wpe.weight").get_shape()[0]
        except SafetensorError:
            raise WeightsError(f"{weights_path} has no wte.weight / wpe.weight: not a GPT-2 checkpoint") from None
    n_layer = len({k[len(prefix):].split(".")[1] for k in keys if k.startswith(prefix + "h.")})
    for preset, shape in PRESETS.items():
        if shape["n_embd"] == n_embd and shape["n_layer"] == n_layer:
            return GPTConfig(name=name, vocab_size=vocab_size, block_size=block_size, **shape)
    raise WeightsError(f"{weights_path} has no {CONFIG_NAME} beside it and its shapes match no preset: add the config.json")


def _fill(model: GPT, weights_path: Path, config_path: Path | None = None) -> None:
    """Copy each tensor of the file into the model, checking every name and shape (those ``config_path`` gives, when
    there is one) before reading data.

    The file is reopened for each chunk of rows: a mapping that stayed open
    would keep every page read so far resident, up to a second copy of the model.
    """
    params = dict(model.named_parameters())  # the tied lm_head appears once, as transformer.wte.weight
    plan, head = {}, None
    with open_weights(weights_path) as f:
        for key in f.keys():
            name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if name not in params and name != HEAD:
                raise WeightsError(f"{weights_path}: unexpected tensor {key!r}, not part of GPT-2 {model.config.name}")
            shape = tuple(f.get_slice(key).get_shape())
            expected = tuple(params[WTE if name == HEAD else name].shape)
            if name.endswith(CONV1D):
                expected = expected[::-1]  # stored (in, out)
            if shape != expected:
                by = f"by {config_path}" if config_path else f"for {model.config.name}"
                raise WeightsError(f"{weights_path}: tensor {key!r} has shape {shape}, expected {expected} {by}")
            if name == HEAD:
                head = key
            else:
                plan[key] = name
    missing = sorted(set(params) - set(plan.values()))
    if missing:
        raise WeightsError(f"{weights_path} lacks {len(missing)} tensor{'s' * (len(missing) > 1)} of GPT-2 {model.config.name}, e.g. {missing[0]!r}")
    with torch.no_grad():
        for key, name in plan.items():
            for part, chunk in _chunks(weights_path, key, params[name].t() if name.endswith(CONV1D) else params[name]):
                part.copy_(chunk)
        for part, chunk in _chunks(weights_path, head, params[WTE]) if head is not None else ():
            if not torch.equal(chunk.to(part.dtype), part):  # another head: loading would silently use wte instead
                raise WeightsError(f"{weights_path}: its {head} differs from its wte.weight (an LM head of its own); this "
                                   "app's GPT-2 ties the head to the token embedding, so it cannot load this model as saved")


def _chunks(weights_path: Path, key: str, target: torch.Tensor):
    """(rows of ``target``, the same rows of tensor ``key`` in the file), ``CHUNK_BYTES`` at a time, reopening the file
    for each chunk (see ``_fill``)."""
    rows = max(1, CHUNK_BYTES // max(1, target[0].numel() * 4)) if target.dim() > 1 else len(target)
    for start in range(0, len(target), rows):
        with open_weights(weights_path) as f:
            try:
                chunk = f.get_slice(key)[start : start + rows]
            except SafetensorError as e:
                raise WeightsError(f"{weights_path}: tensor {key!r} cannot be read ({e}): the file is corrupt") from None
        yield target[start : start + rows], chunk


def open_weights(path: Path):
    """``safe_open`` on a safetensors file; ``WeightsError`` when it is not one, or is cut short (its header names
    more bytes than the file holds)."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _display_name(source) -> str:
    source = str(source)
    return source if source in HUB_PRESETS else Path(source).name or source
