"""From records to training batches: the dataset, the book's collate function, samplers, loaders."""
from __future__ import annotations

import functools
import random

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from model.tokenizer import EOT_ID, get_tokenizer

from .prompts import check_style, encode_record


def too_long(tokens_read: int, max_length: int) -> bool:
    """Whether a sequence the model reads ``tokens_read`` tokens of is longer than ``max_length``. A record's end
    token (and a preference pair's) is only predicted, never read, so a record of exactly ``max_length`` fits."""
    return tokens_read > max_length


class InstructionDataset(Dataset):
    """Records tokenized once: ``ds[i]`` is ``{"ids", "prompt_len", "index"}``.

    Records longer than ``max_length`` tokens are skipped and counted in
    ``.skipped`` (the end token after them is only predicted, never read, so a
    record of exactly ``max_length`` fits); ``index`` is the record's position in ``records``.
    With ``mask_prompt``, records whose prompt alone fills the ``allowed_max_length``
    that batches are cut to have nothing left to learn: they are skipped too,
    counted in ``.no_answer``.
    """

    def __init__(self, records, tokenizer=None, style: str = "alpaca", max_length: int = 1024,
                 mask_prompt: bool = False, allowed_max_length: int | None = None):
        tokenizer = tokenizer or get_tokenizer()
        self.style = check_style(style)
        self.max_length = max_length
        self.items = []
        self.skipped = self.no_answer = 0
        for index, record in enumerate(records):
            ids, prompt_len = encode_record(record, tokenizer, style)
            if too_long(len(ids), max_length):
                self.skipped += 1
                continue
            if mask_prompt and allowed_max_length is not None and prompt_len > allowed_max_length:
                self.no_answer += 1  # its first target, the answer's first token, is at input position prompt_len - 1
                continue
            self.items.append({"ids": ids, "prompt_len": prompt_len, "index": index})
        self.lengths = [len(item["ids"]) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def custom_collate_fn(batch, pad_token_id: int = EOT_ID, ignore_index: int = -100,
                      allowed_max_length=None, mask_prompt: bool = False):
    """The book's collate: inputs and targets shifted by one, padded to the longest item.

    Each item gets one end token; padding targets after it are ``ignore_index``.
    With ``mask_prompt`` the targets that predict prompt tokens are ignored too,
    so only the response and its end token are learned. Items are dataset dicts
    or plain lists of ids (no prompt masking for those).
    """
    dicts = isinstance(batch[0], dict)
    seqs = [item["ids"] for item in batch] if dicts else [list(item) for item in batch]
    lengths = torch.tensor([len(ids) for ids in seqs])
    width = int(lengths.max()) + 1
    positions = torch.arange(width)
    padded = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    padded[positions < lengths[:, None]] = torch.tensor([t for ids in seqs for t in ids], dtype=torch.long)
    inputs = padded[:, :-1]
    targets = padded[:, 1:].clone()
    ignored = positions[:-1] >= lengths[:, None]
    if mask_prompt:
        if not dicts:
            raise ValueError("mask_prompt needs items with a prompt_len (the dicts InstructionDataset yields)")
        prompt_lens = torch.tensor([item["prompt_len"] for item in batch])
        ignored |= positions[:-1] < (prompt_lens - 1)[:, None]
    targets[ignored] = ignore_index
    if allowed_max_length is not None:
        inputs = inputs[:, :allowed_max_length]
        targets = targets[:, :allowed_max_length]
    return inputs.contiguous(), targets.contiguous()


class BookRandomSampler(Sampler):
    """A random order drawn exactly as the book's shuffled DataLoader draws it, from a private generator.

    With no generator, ``RandomSampler`` seeds a fresh generator from the global RNG,
    after the DataLoader iterator has taken its own base seed from it. Sharing
    ``generator`` with the DataLoader repeats those two draws, so
    ``make_loader(seed=123)`` yields the batches of the book's
    ``torch.manual_seed(123)`` loader without touching the global RNG.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n = n
        self.generator = generator

    def __iter__(self):
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        yield from torch.randperm(self.n, generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        return self.n


class LengthGroupedSampler(Sampler):
    """Batches of similar length, to cut padding: a batch sampler yielding lists of indices.

    Shuffle all indices, cut them into mega-batches of ``batch_size * mega_batch_mult``,
    sort each by length (longest first), cut into batches and shuffle the batch order.
    Each pass moves on to the next epoch; ``set_epoch(e)`` chooses the next pass's epoch.
    The same seed and epoch always give the same batches.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 123, drop_last: bool = True,
                 mega_batch_mult: int = 16):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError("batch_size and mega_batch_mult must be at least 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch."""
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.mega_batch_mult
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        rng.shuffle(batches)
        return batches

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        yield from self.batches(epoch)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class ShardedBatchSampler(Sampler):
    """One process's share of each global batch: its items ``rank, rank + world_size, ...``.

    ``batches`` yields the global batches that one process with the whole batch
    would train on (same seed, same length grouping); every process takes every
    ``world_size``-th item, which spreads the long and short items of a
    length-sorted batch evenly over the processes.
    """

    def __init__(self, batches, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.batches = batches
        self.rank = rank
        self.world_size = world_size

    @property
    def epoch(self) -> int | None:
        """The global batches' next epoch (length-grouped batches; None for the book's random order)."""
        return getattr(self.batches, "epoch", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __iter__(self):
        for batch in self.batches:
            if len(batch) < self.world_size:
                raise ValueError(f"a global batch of {len(batch)} items cannot feed {self.world_size} processes")
            yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset, batch_size: int = 8, shuffle: bool = True, drop_last: bool = True,
                grouped: bool = False, seed: int = 123, mask_prompt: bool = False,
                allowed_max_length=None, num_workers: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over an ``InstructionDataset`` using ``custom_collate_fn``.

    Training: ``shuffle=True, drop_last=True`` (the book's loader; with ``seed=123``
    its very batches), or ``grouped=True`` for length-grouped batches.
    Validation and test: ``shuffle=False, drop_last=False``.

    Data parallel: with ``world_size`` processes, ``batch_size`` is per process; the
    loader draws the global batches of ``batch_size * world_size`` that one process
    would draw and yields process ``rank``'s share of each (``ShardedBatchSampler``).
    """
    if world_size > 1 and not drop_last:
        raise ValueError("a sharded loader drops the last partial global batch (drop_last=True), so that every process has a share")
    collate = functools.partial(custom_collate_fn, mask_prompt=mask_prompt,
                                allowed_max_length=allowed_max_length)
    generator = torch.Generator().manual_seed(seed)
    common = dict(collate_fn=collate, num_workers=num_workers, generator=generator)
    if grouped:
        sampler = LengthGroupedSampler(dataset.lengths, batch_size * world_size, seed=seed, drop_last=drop_last)
        return DataLoader(dataset, batch_sampler=sampler if world_size == 1 else ShardedBatchSampler(sampler, rank, world_size), **common)
    sampler = BookRandomSampler(len(dataset), generator) if shuffle else None
    if world_size > 1:
        batches = BatchSampler(sampler or SequentialSampler(dataset), batch_size * world_size, drop_last)
        return DataLoader(dataset, batch_sampler=ShardedBatchSampler(batches, rank, world_size), **common)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)


def loader_state(loader: DataLoader) -> dict:
    """Where a ``make_loader`` loader stands between passes: its next pass yields the same batches after ``restore_loader``.

    The random order comes from the loader's generator, the length-grouped one from the sampler's epoch.
    """
    return {"generator": loader.generator.get_state(), "epoch": getattr(loader.batch_sampler, "epoch", None)}


def restore_loader(loader: DataLoader, state: dict) -> None:
    loader.generator.set_state(state["generator"])
    if state["epoch"] is not None:
        loader.batch_sampler.set_epoch(state["epoch"])
