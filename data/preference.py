"""Preference data for DPO: records with a chosen and a rejected answer, and their batches.

A record is an instruction record (``instruction``, ``input``, ``output``) plus
non-empty strings ``chosen`` and ``rejected``. ``"preference"`` is the book's
file (downloaded once, sha256-checked, cached like the canonical one); any
other source is a JSON / JSON Lines / CSV path, read and checked with the same
parser and the same named errors as instruction data. The split is the
book's (``split_instructions``: 85 / 10 / 5 % in file order).

Batches put both answers of a pair through one forward pass. The default
layout packs a pair into one row, ``prompt + chosen`` then ``rejected``
behind a mask that hides the chosen answer from it, and with positions that
restart after the prompt: the prompt is computed once instead of twice and
every figure equals that of two separate sequences. ``packed=False`` stacks
``prompt + chosen`` and ``prompt + rejected`` as 2B plain rows instead.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from model.tokenizer import EOT_ID, get_tokenizer

from . import cache
from .batching import LengthGroupedSampler, too_long
from .browse import PAGE_SIZE, Page, page_of, split_names
from .errors import DatasetError
from .prompts import check_style, encode_prompt
from .records import FIELDS, check_characters, check_columns, check_filled, folded, json_type, read_items, split_instructions, validate_records

PREFERENCE_FIELDS = ("chosen", "rejected")


def preference_path(source) -> Path:
    """The file behind a source: the cached book file for ``"preference"`` (downloaded on first use), else the path."""
    if isinstance(source, str) and source == "preference":
        return cache.preference_path()
    if isinstance(source, str) and source in ("canonical", "sample"):
        raise DatasetError(f"{source} is instruction data: preference tuning takes pairs with a chosen and a rejected "
                           "answer, 'preference' (the book's 1,100) or a JSON / JSON Lines / CSV file of them")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path or 'preference', got {type(source).__name__}")
    return Path(source)


def load_preferences(source) -> list[dict]:
    """Records from ``"preference"`` (the book's 1,100) or a JSON / JSON Lines / CSV file; ``DatasetError``
    names any problem."""
    items, name, label = read_items(preference_path(source))
    return validate_preferences(items, name, label)


def load_preferences_if_any(source) -> list[dict] | None:
    """The records with their chosen and rejected answers when ``source`` is preference data (a record names one of
    them: then every record is checked as such, and ``DatasetError`` names a bad one), else None (instruction data)."""
    if source in ("canonical", "sample"):
        return None
    items, name, label = read_items(preference_path(source))
    if source != "preference" and not any(isinstance(value, dict) and any(
            isinstance(key, str) and key.strip().lower() in PREFERENCE_FIELDS for key in value) for _, value in items):
        return None
    return validate_preferences(items, name, label)


def validate_preferences(items: list, name: str = "data", label: str = "record") -> list[dict]:
    """Check ``(number, value)`` pairs and return five-field records.

    ``chosen`` and ``rejected`` are required non-empty strings; ``output`` may be
    left out (it becomes the chosen answer); the rest is checked as for instruction data.
    """
    check_columns(items, name, ("instruction", *PREFERENCE_FIELDS))
    filled = []
    for number, value in items:
        if isinstance(value, dict):
            where = f"{name}, {label} {number}"
            value = folded(value, FIELDS + PREFERENCE_FIELDS, where)
            for field in PREFERENCE_FIELDS:
                if field not in value:
                    raise DatasetError(f'{where}: field "{field}" is missing (preference data needs "chosen" and "rejected")')
                if not isinstance(value[field], str):
                    raise DatasetError(f'{where}: field "{field}" must be a string, got {json_type(value[field])}')
                check_filled(value[field], f'{where}: field "{field}"')
                check_characters(value[field], f'{where}: field "{field}"')
            if value.get("output") in (None, ""):  # a spreadsheet's empty cell leaves it out too
                value = {**value, "output": value["chosen"]}
        filled.append((number, value))
    records = validate_records(filled, name, label)
    return [{**record, "chosen": value["chosen"], "rejected": value["rejected"]}
            for record, (_, value) in zip(records, filled)]


def split_preferences(records: list):
    """The book's split: ``split_instructions`` (85 % train, 10 % test, 5 % validation, file order)."""
    return split_instructions(records)


class PreferenceDataset(Dataset):
    """Pairs tokenized once: ``ds[i]`` is ``{"prompt", "chosen", "rejected", "index"}``.

    ``chosen`` and ``rejected`` end with the end token, as fine-tuning's targets
    do. Pairs whose prompt plus longer answer exceed ``max_length`` are skipped
    and counted in ``.skipped``; ``index`` is the pair's position in ``records``.
    """

    def __init__(self, records, tokenizer=None, style: str = "alpaca", max_length: int = 1024):
        tokenizer = tokenizer or get_tokenizer()
        self.style = check_style(style)
        self.items = []
        self.skipped = 0
        for index, record in enumerate(records):
            prompt = encode_prompt(record, tokenizer, style)
            chosen = tokenizer.encode(record["chosen"], disallowed_special=()) + [EOT_ID]
            rejected = tokenizer.encode(record["rejected"], disallowed_special=()) + [EOT_ID]
            if too_long(len(prompt) + max(len(chosen), len(rejected)) - 1, max_length):
                self.skipped += 1
                continue
            self.items.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "index": index})
        self.lengths = [len(i["prompt"]) + len(i["chosen"]) + len(i["rejected"]) - 1 for i in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@dataclass
class PreferenceBatch:
    """Rows for one forward pass over the chosen and rejected answers of ``len(index)`` pairs.

    ``sequence`` says which answer each target belongs to: ``2 * i`` for pair i's
    chosen, ``2 * i + 1`` for its rejected, -1 where ``targets`` is ignored (-100).
    """

    inputs: torch.Tensor  # (rows, T)
    targets: torch.Tensor  # (rows, T)
    sequence: torch.Tensor  # (rows, T)
    positions: torch.Tensor | None  # (rows, T); None: 0..T-1 in every row
    mask: torch.Tensor | None  # (rows, 1, T, T) attention allowed; None: causal
    index: list[int]  # the pairs' dataset indices

    @property
    def pairs(self) -> int:
        return len(self.index)

    def to(self, device) -> "PreferenceBatch":
        move = lambda t: None if t is None else t.to(device)
        return PreferenceBatch(move(self.inputs), move(self.targets), move(self.sequence), move(self.positions),
                               move(self.mask), self.index)


def collate_preferences(items, packed: bool = True, pad_token_id: int = EOT_ID, ignore_index: int = -100) -> PreferenceBatch:
    """One batch of pairs: one packed row per pair, or (``packed=False``) 2B rows, chosen then rejected.

    Only the answers' tokens and their end tokens are targets: prompt and padding are ignored.
    """
    rows, segments, positions, targets, sequence = [], [], [], [], []
    for i, item in enumerate(items):
        prompt, chosen, rejected = item["prompt"], item["chosen"], item["rejected"]
        P, C, R = len(prompt), len(chosen), len(rejected)
        ignored = [ignore_index] * (P - 1)
        if packed:
            # prompt + chosen, then the prompt's last token again (it predicts rejected[0]) + rejected, end tokens dropped
            rows.append(prompt + chosen[:-1] + prompt[-1:] + rejected[:-1])
            segments.append([0] * (P - 1) + [1] * C + [2] * R)
            positions.append(list(range(P - 1 + C)) + list(range(P - 1, P - 1 + R)))
            targets.append(ignored + chosen + rejected)
            sequence.append([-1] * (P - 1) + [2 * i] * C + [2 * i + 1] * R)
        else:
            for answer, seq in ((chosen, 2 * i), (rejected, 2 * i + 1)):
                rows.append(prompt + answer[:-1])
                targets.append(ignored + answer)
                sequence.append([-1] * (P - 1) + [seq] * len(answer))
    width = max(len(r) for r in rows)

    def pad(lists, value):
        return torch.tensor([x + [value] * (width - len(x)) for x in lists], dtype=torch.long)

    batch = PreferenceBatch(pad(rows, pad_token_id), pad(targets, ignore_index), pad(sequence, -1), None, None,
                            [item["index"] for item in items])
    if packed:
        seg = pad(segments, 3)  # 3: padding
        batch.positions = pad(positions, 0)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = seg[:, :, None] == seg[:, None, :]
        batch.mask = (causal & (same | (seg[:, None, :] == 0)))[:, None]
    return batch


def epoch_batches(dataset: PreferenceDataset, batch_size: int, epoch: int, seed: int = 123, grouped: bool = True,
                  drop_last: bool = True) -> list[list[int]]:
    """The dataset positions of each training batch of one epoch: length-grouped or plainly shuffled, seeded."""
    if grouped:
        return LengthGroupedSampler(dataset.lengths, batch_size, seed=seed, drop_last=drop_last).batches(epoch)
    order = list(range(len(dataset)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def in_order_batches(positions, batch_size: int) -> list[list[int]]:
    """Fixed batches for evaluation and the reference pass: ``positions`` cut in order."""
    positions = list(positions)
    return [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]


def browse_preferences(records: list[dict], query: str = "", page: int = 1,
                       page_size: int = PAGE_SIZE) -> tuple[list[dict], Page]:
    """One page of pairs for a table with chosen and rejected side by side, and the page's position.

    Each row: ``index`` (in the file), ``split`` (train / val / test), ``instruction``,
    ``input``, ``chosen``, ``rejected``, ``output``.
    """
    shown = page_of(records, query, page, page_size, fields=FIELDS + PREFERENCE_FIELDS)
    names = split_names(len(records))
    rows = [{"index": i, "split": names[i], **{f: record[f] for f in ("instruction", "input", "chosen", "rejected", "output")}}
            for i, record in shown.rows]
    return rows, shown
