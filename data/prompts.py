"""The prompt formats: one place that training, generation and response extraction share.

``format_prompt(record)`` is what the model sees before its response;
the training text is ``format_prompt(record) + record["output"]``.
"""
from __future__ import annotations

import functools

from model.tokenizer import EOT_TOKEN, get_tokenizer

STYLES = ("alpaca", "phi3")
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADERS = {"alpaca": "### Response:", "phi3": "<|assistant|>"}
RUN_ON_MARKERS = {
    "alpaca": ("### Instruction:", "### Input:", "Below is an instruction that describes a task."),
    "phi3": ("<|user|>", "<|end|>"),
}


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; valid styles: {', '.join(STYLES)}")
    return style


def has_input(record: dict) -> bool:
    return bool((record.get("input") or "").strip())


def prompt_parts(record: dict, style: str = "alpaca") -> list[str]:
    """The prompt as the template's fixed text (even places) around the record's fields (odd places)."""
    check_style(style)
    if style == "phi3":
        fields = ["<|user|>\n", record["instruction"]] + (["\n", record["input"]] if has_input(record) else [])
        return fields + ["\n<|assistant|>\n"]
    fields = [f"{ALPACA_PREAMBLE}\n\n### Instruction:\n", record["instruction"]]
    if has_input(record):
        fields += ["\n\n### Input:\n", record["input"]]
    return fields + ["\n\n### Response:\n"]


def format_prompt(record: dict, style: str = "alpaca") -> str:
    """The text before the response: the book's Alpaca format, or the Phi-3 format of exercise 7.1."""
    return "".join(prompt_parts(record, style))


def format_input(record: dict) -> str:
    """The book's ``format_input``: the Alpaca prompt without the response header."""
    return format_prompt(record).removesuffix("\n\n### Response:\n")


def extract_response(text: str, style: str = "alpaca") -> str:
    """The model's answer inside a generated text (prompt + continuation, or the continuation alone).

    The answer starts after the last response header that comes before the model
    runs on, and ends at ``<|endoftext|>`` or at the next turn's header.
    """
    header = RESPONSE_HEADERS[check_style(style)]
    markers = (EOT_TOKEN,) + RUN_ON_MARKERS[style]
    first = text.find(header)
    search_from = 0 if first < 0 else first + len(header)
    end = min((i for i in (text.find(m, search_from) for m in markers) if i >= 0), default=len(text))
    start = text.rfind(header, 0, end)
    start = 0 if start < 0 else start + len(header)
    return text[start:end].strip()


def encode_prompt(record: dict, tokenizer=None, style: str = "alpaca") -> list[int]:
    """Token ids of ``format_prompt(record, style)``; special-token text such as a literal ``<|endoftext|>`` in user
    data is encoded as plain text.

    In both templates a line break comes before and after every field, so where each field starts and ends with a
    character other than whitespace, no piece of GPT-2's pre-tokenizer crosses a field's edge: the prompt's ids are the
    fields' ids between the template's, which are encoded once (the Alpaca template is 30 to 36 of a prompt's 40-odd
    tokens). Other fields are encoded with the whole prompt; a test checks both paths against the whole prompt.
    """
    tokenizer = tokenizer or get_tokenizer()
    parts = prompt_parts(record, style)
    if not all(field and not field[0].isspace() and not field[-1].isspace() for field in parts[1::2]):
        return tokenizer.encode_ordinary("".join(parts))
    ids = []
    for i, part in enumerate(parts):
        ids += template_ids(tokenizer, part) if i % 2 == 0 else tokenizer.encode_ordinary(part)
    return ids


@functools.lru_cache(maxsize=16)
def template_ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode_ordinary(text))


def encode_record(record: dict, tokenizer=None, style: str = "alpaca") -> tuple[list[int], int]:
    """Token ids of prompt + output, and the prompt's length in tokens.

    The two parts are encoded separately so ``prompt_len`` is exact.
    """
    tokenizer = tokenizer or get_tokenizer()
    prompt_ids = encode_prompt(record, tokenizer, style)
    return prompt_ids + tokenizer.encode_ordinary(record["output"]), len(prompt_ids)
