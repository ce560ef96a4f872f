"""The prompt formats: one place that training, generation and response extraction share.

``format_prompt(record)`` is what the model sees before its response;
the training text is ``format_prompt(record) + record["output"]``.
"""
from __future__ import annotations

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


def format_prompt(record: dict, style: str = "alpaca") -> str:
    """The text before the response: the book's Alpaca format, or the Phi-3 format of exercise 7.1."""
    check_style(style)
    if style == "phi3":
        text = f"<|user|>\n{record['instruction']}"
        if has_input(record):
            text += f"\n{record['input']}"
        return text + "\n<|assistant|>\n"
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if has_input(record):
        text += f"\n\n### Input:\n{record['input']}"
    return text + "\n\n### Response:\n"


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


def encode_record(record: dict, tokenizer=None, style: str = "alpaca") -> tuple[list[int], int]:
    """Token ids of prompt + output, and the prompt's length in tokens.

    The two parts are encoded separately so ``prompt_len`` is exact; special-token
    text such as a literal ``<|endoftext|>`` in user data is encoded as plain text.
    """
    tokenizer = tokenizer or get_tokenizer()
    prompt_ids = tokenizer.encode(format_prompt(record, style), disallowed_special=())
    response_ids = tokenizer.encode(record["output"], disallowed_special=())
    return prompt_ids + response_ids, len(prompt_ids)
