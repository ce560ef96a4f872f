"""A run's fine-tuned model in the Hugging Face GPT-2 layout: a zip to download, or a Hub repo.

The run folder already holds ``model.safetensors`` and ``config.json`` as
``transformers`` writes them. The export adds GPT-2's tokenizer files (the
official ``encoder.json`` as ``vocab.json``, ``vocab.bpe`` as ``merges.txt``)
and a short model card with the prompt format, so that
``GPT2LMHeadModel.from_pretrained(folder)`` and
``GPT2Tokenizer.from_pretrained(folder)`` load it as it is. The zip holds
one folder named after the run: plain ``unzip`` makes that folder and
nothing else.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from data import format_prompt
from data.cache import file_label
from model.files import atomic_write
from model.tokenizer import EOT_ID, EOT_TOKEN, bpe_files
from model.weights import CONFIG_NAME, HUB_PRESETS, WeightsError, hub_unreachable, open_weights

from .locks import hold_run
from .store import WEIGHTS, read_manifest


class ExportError(RuntimeError):
    """A run that cannot be exported, or an upload that did not happen."""


def export_files(run_dir) -> dict[str, Path | str]:
    """Name in the export -> the file to copy, or the text to write."""
    run_dir = Path(run_dir)
    for name in (WEIGHTS, CONFIG_NAME):
        if not (run_dir / name).is_file():
            raise ExportError(f"{run_dir} has no {name}: not a finished run")
    try:
        with open_weights(run_dir / WEIGHTS):
            pass
    except WeightsError as e:
        raise ExportError(f"{e}: nothing to export") from None
    vocab_bpe, encoder_json = bpe_files()
    context = json.loads((run_dir / CONFIG_NAME).read_text()).get("n_positions", 1024)
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    return {
        WEIGHTS: run_dir / WEIGHTS,
        CONFIG_NAME: run_dir / CONFIG_NAME,
        "vocab.json": Path(encoder_json),
        "merges.txt": Path(vocab_bpe),
        "tokenizer_config.json": dumps({**special, "add_prefix_space": False, "model_max_length": context,
                                        "tokenizer_class": "GPT2Tokenizer"}),
        "special_tokens_map.json": dumps(special),
        "generation_config.json": dumps({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID}),
        "README.md": model_card(run_dir),
    }


def dumps(value: dict) -> str:
    return json.dumps(value, indent=2) + "\n"


def model_card(run_dir: Path) -> str:
    """A short README: where the model comes from and the prompt format it was tuned on (and, for an aligned run, how)."""
    manifest = read_manifest(run_dir)
    config, dpo = manifest.get("config", {}), manifest.get("dpo") if manifest.get("method") == "dpo" else None
    model, style = public_model(config.get("model", "gpt2")), config.get("style", "alpaca")
    base = f"base_model: {HUB_PRESETS[model]}\n" if model in HUB_PRESETS else ""
    template = format_prompt({"instruction": "{instruction}", "input": "{input}"}, style)
    example = format_prompt({"instruction": "Rewrite the sentence in passive voice.", "input": "The chef cooked the meal."}, style)
    settings = card_settings(config, ("data", "epochs", "lr", "batch_size", "lora_rank", "mask_prompt"))
    aligned = ""
    if dpo is not None:
        dpo_settings = card_settings(dpo, ("data", "beta", "epochs", "lr", "batch_size", "lora_rank"))
        aligned = (f" Then aligned with preference pairs by DPO, the book's next stage, from the fine-tuned run "
                   f"{manifest.get('parent_run')}; {dpo_settings}.")
    tags = "[gpt2, instruction-tuning, dpo]" if dpo is not None else "[gpt2, instruction-tuning]"
    return (
        f"---\n{base}library_name: transformers\npipeline_tag: text-generation\ntags: {tags}\n---\n\n"
        f"# {run_dir.name}\n\n"
        f"GPT-2 ({model}) instruction fine-tuned as in chapter 7 of *Build a Large Language Model (From Scratch)*"
        f"{f'; {settings}' if settings else ''}.{aligned}\n\n"
        f"Prompt format ({style}; leave out the input part when there is none), greedy decoding, "
        f"the response ends at `{EOT_TOKEN}`:\n\n```\n{template}\n```\n\n"
        "```python\nfrom transformers import GPT2LMHeadModel, GPT2Tokenizer\n\n"
        f"path = \"{run_dir.name}\"  # the folder that {run_dir.name}-hf.zip unzips into, or the Hub repo id\n"
        "tokenizer = GPT2Tokenizer.from_pretrained(path)\nmodel = GPT2LMHeadModel.from_pretrained(path)\n"
        f"prompt = {example!r}\n"
        "ids = tokenizer(prompt, return_tensors=\"pt\").input_ids\n"
        "out = model.generate(ids, max_new_tokens=128, do_sample=False)\n"
        "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n```\n"
    )


def public_model(model: str) -> str:
    """A model as the card names it: a preset or Hub id as it is, a local folder or file by its name alone (where it
    lies is the machine's business)."""
    return Path(model).name if model.startswith(("/", "~", ".")) or os.path.isabs(model) else model


def card_settings(config: dict, keys) -> str:
    """``data sample, epochs 1, …``; a data file by its name alone (an upload's path is the server's business)."""
    return ", ".join(f"{k} {file_label(str(config[k])) if k == 'data' else config[k]}" for k in keys if k in config)


def load_hint(run_name: str) -> str:
    """What to do with the zip, in words: the folder it unzips into and how to load it."""
    return (f"unzip it and load the folder {run_name} with GPT2LMHeadModel.from_pretrained(\"{run_name}\") "
            f"and GPT2Tokenizer.from_pretrained(\"{run_name}\")")


def check_destination(dest) -> Path:
    """``dest`` with its folder made; ``ExportError`` naming it when no file can be written there.

    The CLI asks before it evaluates, so that a bad ``--export`` path fails in a
    second, not after minutes of generation.
    """
    dest = Path(dest)
    if blocker := next((p for p in reversed(dest.parents) if p.exists() and not p.is_dir()), None):
        raise ExportError(f"cannot write {dest}: {blocker} is a file, not a folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}-").close()
    except OSError as e:
        raise ExportError(f"cannot write {dest}: {e.strerror or e}") from None
    return dest


def export_zip(run_dir, dest=None) -> Path:
    """Write the run's model as a zip of the Hugging Face files inside one folder ``<run name>/``; returns its path.

    Default ``dest``: ``<run>/<run name>-hf.zip``. The weights are stored
    uncompressed (they barely compress); the zip appears whole or not at all.
    """
    run_dir = Path(run_dir).resolve()  # "." has no name to give the folder
    dest = check_destination(dest or run_dir / f"{run_dir.name}-hf.zip")

    def write_zip(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, content in files.items():
                arcname = f"{run_dir.name}/{name}"
                if isinstance(content, Path):
                    zf.write(content, arcname, compress_type=zipfile.ZIP_STORED if name == WEIGHTS else zipfile.ZIP_DEFLATED)
                else:
                    zf.writestr(arcname, content)

    with hold_run(run_dir, shared=True, doing="export it"):  # a resume in another process rewrites the weights
        files = export_files(run_dir)
        atomic_write(dest, write_zip)
    return dest


def push_to_hub(run_dir, repo_id: str, token: str | None = None, private: bool = True) -> tuple[str, bool | None]:
    """Upload the same files to a Hub model repo (created ``private`` if needed); returns the repo's URL and whether
    it is private (a repo that existed keeps its visibility; None when the Hub does not say).

    Checks first that the Hub answers at all, so that offline it fails in a
    few seconds with nothing uploaded, not after the client's long retries.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        why = str(e).replace(" Use `repo_type` argument if needed.", "")  # not an option of ours
        raise ExportError(f"{repo_id!r} is not a Hub repo id (your-name/model-name): {why}") from None
    run_dir = Path(run_dir)
    files = export_files(run_dir)
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_unreachable()
    if reason:
        raise ExportError(f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({reason}); nothing was uploaded")
    api = HfApi(token=token)
    with hold_run(run_dir, shared=True, doing="push it"), tempfile.TemporaryDirectory(dir=run_dir, prefix=".hub-") as folder:
        for name, content in files.items():
            target = Path(folder) / name
            if isinstance(content, Path):
                try:
                    os.link(content, target)
                except OSError:
                    shutil.copyfile(content, target)
            else:
                target.write_text(content)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                              commit_message=f"Upload {run_dir.name}, instruction fine-tuned GPT-2")
        except Exception as e:  # the Hub client raises many kinds: auth, name, network
            raise ExportError(f"upload of {run_dir.name} to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    try:
        is_private = api.repo_info(repo_id, repo_type="model").private
    except Exception:  # uploaded: only its visibility is unknown
        is_private = None
    return str(url), is_private
