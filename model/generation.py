"""Text generation with a KV cache: greedy or sampled, streamed, or batched.

Each step feeds only the newest token through the model, reads the keys and
values of earlier tokens from the cache, and applies the 50,257-wide LM head to
the last position alone. Batches of prompts of different lengths are left
padded, with an attention mask and per-row positions, so each row gets exactly
what it would get on its own. Greedy at batch 1 on the CPU (the playground),
an int8 copy drafts tokens that one pass of the model checks: the same output,
about twice as fast (``speculative_steps``; ``python -m bench.generate``).
"""
from __future__ import annotations

import codecs
from typing import Iterator, Sequence

import torch

from .gpt import GPT, GPTConfig
from .inference import int8_copy, int8_supported
from .tokenizer import EOT_ID


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # tokens cached before the current forward pass

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys and values of ``layer``; return all of them so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def sample_next(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, generator=None):
    """Next token ids (B,) from last-position logits (B, vocab): greedy when temperature is 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shifted to a maximum of 0 first: divided by a tiny temperature (1e-40) the raw logits overflowed to inf, and the
    # softmax of inf - inf is NaN; this way the largest stays 0 and the others go to -inf: greedy, as a tiny one means.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p
        outside[:, 0] = False  # the most likely token always stays, whatever top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


MODES = ("exact", "plain", "int8")
DRAFT_TOKENS = 4  # first guess; each round adds 1 after a fully accepted draft, removes 1 after a miss
MAX_DRAFT_TOKENS = 8


@torch.inference_mode()
def generate_steps(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = EOT_ID,
    generator: torch.Generator | None = None,
    mode: str = "exact",
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, (B,), until all have emitted ``eos_id`` or the limit.

    A row that has finished keeps yielding ``eos_id``. Prompts are cropped from
    the left so that prompt and new tokens fit the context window.

    ``mode``: "exact" (default) gives the model's own output. Greedy at batch 1
    on a frozen fp32 model (no parameter requiring grad) on the CPU, it drafts tokens
    with an int8 copy of the model and keeps those that the model itself, run
    once over all of them, would have picked (``speculative_steps``). "plain"
    runs the model once per token. "int8" is approximate: the prompt goes
    through the model, every new token through its int8 copy alone.
    """
    if mode not in MODES:
        raise ValueError(f"unknown generation mode {mode!r}; choose one of {', '.join(MODES)}")
    config = model.config
    device = model.transformer.wte.weight.device
    max_new_tokens = max(0, min(max_new_tokens, config.block_size - 1))
    keep = config.block_size - max_new_tokens
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not prompts or max_new_tokens == 0:
        return
    prompts = [list(p)[-keep:] for p in prompts]
    step_model = model
    if mode == "int8":
        step_model = int8_copy(model)
    elif mode == "exact" and len(prompts) == 1 and temperature <= 0 and _speculates(model):
        yield from speculative_steps(model, int8_copy(model), prompts[0], max_new_tokens, eos_id)
        return
    B, L = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, L), EOT_ID, dtype=torch.long)
    valid = torch.ones(B, L + max_new_tokens, dtype=torch.bool)
    for row, p in enumerate(prompts):
        idx[row, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[row, : L - len(p)] = False
    idx, valid = idx.to(device), valid.to(device)
    padded = not bool(valid.all())
    positions = (valid.cumsum(-1) - 1).clamp(min=0) if padded else None
    cache = KVCache(config, B, L + max_new_tokens, device, model.transformer.wte.weight.dtype)

    mask = pos = None
    if padded:  # causal over real keys; a pad row sees itself so that no row is all -inf (NaN)
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        mask = (causal & valid[:, None, None, :L]) | torch.eye(L, dtype=torch.bool, device=device)
        pos = positions[:, :L]
    h = model.hidden_states(idx, pos, cache, mask)
    cache.length = L
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = step_model.lm_head(h[:, -1])
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        yield token
        if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
            return
        if padded:
            mask = valid[:, None, None, : cache.length + 1]
            pos = positions[:, cache.length : cache.length + 1]
        h = step_model.hidden_states(token[:, None], pos, cache, mask)
        cache.length += 1


def _speculates(model: GPT) -> bool:
    """fp32 (so that a pass over several tokens agrees with one token at a time to fp32 rounding), on the CPU,
    and frozen: the int8 copy is made once and kept, not remade for a model whose weights change between calls."""
    return (model.transformer.wte.weight.dtype == torch.float32 and int8_supported(model)
            and not any(p.requires_grad for p in model.parameters()))


def speculative_steps(model: GPT, draft: GPT, prompt: Sequence[int], max_new_tokens: int,
                      eos_id: int | None = EOT_ID) -> Iterator[torch.Tensor]:
    """Greedy tokens of ``model`` for one prompt, (1,) each, several per pass of ``model``.

    ``draft`` (a cheaper model over the same cache) guesses the next few tokens,
    one at a time; ``model`` then runs once over the last token and the guesses,
    which costs about one step, since a step's time is reading the weights.
    Its own choice after each position is kept up to the first guess it
    disagrees with, its choice there included. The cache then holds the model's
    keys and values for every kept token, so the output is the model's own
    greedy output, the draft deciding only how fast it comes.
    """
    device = model.transformer.wte.weight.device
    L = len(prompt)
    cache = KVCache(model.config, 1, L + max_new_tokens, device, model.transformer.wte.weight.dtype)
    h = model.hidden_states(torch.tensor([prompt], device=device), None, cache)
    token = int(model.lm_head(h[0, -1]).argmax())
    n, produced, k = L, 1, DRAFT_TOKENS  # n: tokens whose exact keys and values are cached
    yield torch.tensor([token], device=device)
    while produced < max_new_tokens and token != eos_id:
        guesses, last = [], token
        for i in range(min(k, max_new_tokens - produced - 1)):
            cache.length = n + i
            h = draft.hidden_states(torch.tensor([[last]], device=device), None, cache)
            last = int(draft.lm_head(h[0, -1]).argmax())
            guesses.append(last)
            if last == eos_id:
                break
        cache.length = n
        T = len(guesses) + 1
        mask = None
        if T > 1:  # each new position sees the cache and the new positions up to itself
            mask = torch.arange(n + T, device=device) <= torch.arange(n, n + T, device=device)[:, None]
        h = model.hidden_states(torch.tensor([[token] + guesses], device=device), None, cache, mask)
        exact = model.lm_head(h[0]).argmax(dim=-1).tolist()
        kept = 0
        while kept < len(guesses) and guesses[kept] == exact[kept]:
            kept += 1
        k = min(k + 1, MAX_DRAFT_TOKENS) if kept == len(guesses) else max(1, k - 1)
        n += kept + 1
        for token in exact[: kept + 1]:
            yield torch.tensor([token], device=device)
            produced += 1
            if token == eos_id:
                return


def generate(model: GPT, prompt: Sequence[int], max_new_tokens: int, **kwargs) -> list[int]:
    """The new token ids for one prompt, without the end token."""
    return generate_batch(model, [prompt], max_new_tokens, **kwargs)[0]


def generate_batch(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None = EOT_ID, **kwargs) -> list[list[int]]:
    """The new token ids for each prompt, generated together; each list stops before its end token."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for token in generate_steps(model, prompts, max_new_tokens, eos_id=eos_id, **kwargs):
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                if eos_id is not None and t == eos_id:
                    done[row] = True
                else:
                    out[row].append(t)
    return out


def stream_text(model: GPT, tokenizer, prompt: Sequence[int], max_new_tokens: int, **kwargs) -> Iterator[str]:
    """Yield the response text each time it grows; a multi-byte UTF-8 character is never split."""
    text = ""
    for grown, _ in stream_counted(model, tokenizer, prompt, max_new_tokens, **kwargs):
        if grown != text:
            text = grown
            yield text


def stream_counted(model: GPT, tokenizer, prompt: Sequence[int], max_new_tokens: int, **kwargs) -> Iterator[tuple[str, int]]:
    """(response text, new tokens so far, the end token left out) each time the text grows, and once more at the
    end if tokens came that showed nothing yet (part of a character cut short, shown as U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, count, shown = "", 0, 0
    for token in generate_steps(model, [prompt], max_new_tokens, **kwargs):
        t = int(token[0])
        if t == kwargs.get("eos_id", EOT_ID):
            break
        count += 1
        piece = decoder.decode(tokenizer.decode_single_token_bytes(t))
        if piece:
            text += piece
            shown = count
            yield text, count
    text += decoder.decode(b"", final=True)
    if count != shown:
        yield text, count


class Answers(tuple):
    """The texts of a side-by-side round, and ``tokens``: how many new tokens each model has generated so far."""
    tokens: tuple[int, ...] = ()


def stream_side_by_side(models: Sequence[GPT], tokenizer, prompt: Sequence[int], max_new_tokens: int,
                        seed: int | None = None, **kwargs) -> Iterator[Answers]:
    """Stream several models' responses to one prompt in step: yields every text each round, with the token counts.

    With sampling, each model draws from its own generator seeded alike, so the
    comparison is between the models, not between random draws.
    """
    streams = []
    for model in models:
        generator = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(seed) if seed is not None else None
        streams.append(stream_counted(model, tokenizer, prompt, max_new_tokens, generator=generator, **kwargs))
    texts, counts = [""] * len(streams), [0] * len(streams)
    active = set(range(len(streams)))
    while active:
        for i in sorted(active):
            try:
                texts[i], counts[i] = next(streams[i])
            except StopIteration:
                active.discard(i)
        answers = Answers(texts)
        answers.tokens = tuple(counts)
        yield answers


@torch.inference_mode()
def generate_text_simple(model: GPT, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None) -> torch.Tensor:
    """The book's greedy loop: the whole sequence through the model at every step, no cache.

    Kept as the reference that the cached path is tested and benchmarked against.
    """
    context_size = context_size or model.config.block_size
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]
        idx = torch.cat((idx, logits.argmax(dim=-1, keepdim=True)), dim=1)
    return idx
