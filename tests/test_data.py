"""Tests of the data package: loading and validation, prompts, batching, samplers and statistics."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from data import (
    DatasetError, InstructionDataset, LengthGroupedSampler, custom_collate_fn, extract_response,
    format_prompt, load_instructions, longest_row, make_loader, padding_stats, skip_reason, split_instructions, split_sizes,
    split_warnings, token_stats, token_view,
)
from data import cache
from data.prompts import encode_record, format_input
from data.records import MAX_FILE_BYTES, MAX_RECORDS, split_counts
from model.tokenizer import EOT_ID, get_tokenizer

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


@pytest.fixture(scope="module")
def canonical(needs_canonical):
    return load_instructions("canonical")


@pytest.fixture(scope="module")
def canonical_train(canonical):
    return InstructionDataset(split_instructions(canonical).train)


def write(tmp_path, text, name="data.json"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def rec(instruction="Name a color.", input="", output="Red."):
    return {"instruction": instruction, "input": input, "output": output}


# --- sources ---------------------------------------------------------------------------------

def test_canonical_loads_and_splits_like_the_book(canonical):
    assert len(canonical) == 1100
    assert all(set(r) == {"instruction", "input", "output"} for r in canonical)
    split = split_instructions(canonical)
    assert split_sizes(split) == {"train": 935, "val": 55, "test": 110}
    assert split.train == canonical[:935]
    assert split.test == canonical[935:1045]
    assert split.val == canonical[1045:]


def test_seeded_split_shuffles_a_copy():
    sample = load_instructions("sample")
    first, again = split_instructions(sample, seed=1), split_instructions(sample, seed=1)
    assert first == again
    assert first.train != sample[:62]
    assert sorted(map(str, first.train + first.val + first.test)) == sorted(map(str, sample))
    assert split_instructions(sample, seed=2).train != first.train
    with pytest.raises(ValueError):
        split_instructions(sample, train_frac=0.9, test_frac=0.2)


def test_sample_is_valid_fresh_and_splits():
    sample = load_instructions("sample")
    assert len(sample) >= 60
    assert any(r["input"] for r in sample) and any(not r["input"] for r in sample)
    assert len({json.dumps(r, sort_keys=True) for r in sample}) == len(sample)
    split = split_instructions(sample)
    n = len(sample)
    assert split_sizes(split) == {
        "train": int(n * 0.85), "test": int(n * 0.1), "val": n - int(n * 0.85) - int(n * 0.1)}
    assert min(split_sizes(split).values()) > 0


def test_sample_shares_no_record_with_the_book(canonical):
    canonical_set = {json.dumps(r, sort_keys=True) for r in canonical}
    sample = load_instructions("sample")
    assert not [r for r in sample if json.dumps(r, sort_keys=True) in canonical_set]


def test_user_file_json_list_and_jsonl(tmp_path):
    records = [{"instruction": "A", "input": None, "output": "B", "extra": 1},
               {"instruction": "C", "output": "D"},
               {"instruction": "E", "input": "F", "output": "G"}]
    expected = [rec("A", "", "B"), rec("C", "", "D"), rec("E", "F", "G")]
    assert load_instructions(write(tmp_path, json.dumps(records))) == expected
    jsonl = "\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n"
    assert load_instructions(str(write(tmp_path, jsonl, "data.jsonl"))) == expected
    assert load_instructions(write(tmp_path, jsonl, "data.txt")) == expected
    assert load_instructions(write(tmp_path, "\ufeff" + json.dumps(records))) == expected
    joined = [rec("Code.", "", "\U0001F469\u200d\U0001F4BB"), rec("Co\u00adde.", "", "ok"), rec("A", "Co\u200bde", "B")]
    assert load_instructions(write(tmp_path, json.dumps(joined))) == joined  # invisible characters beside visible ones


def test_json_lines_break_lines_at_line_feeds_only_and_a_list_is_json_whatever_the_name(tmp_path):
    records = [{"instruction": "Split\u2028here\u0085and\u000bhere", "input": "", "output": "No\u2029split."}, rec("A", "", "B")]
    jsonl = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    assert load_instructions(write(tmp_path, jsonl, "data.jsonl")) == [rec(**records[0]), rec("A", "", "B")]
    one_line = json.dumps(records[0], ensure_ascii=False)  # one record alone on its line is JSON Lines in a .json file
    assert load_instructions(write(tmp_path, one_line)) == [rec(**records[0])]
    assert load_instructions(write(tmp_path, json.dumps(records, indent=2), "list.jsonl")) == [rec(**records[0]), rec("A", "", "B")]


def test_user_file_csv_and_tsv(tmp_path):
    """A spreadsheet's export: a header row names the fields, in any order; quoted cells keep commas and newlines."""
    csv_text = 'output, instruction ,input,notes\r\nB,A,,x\r\n"G, and\nmore",E,F,\r\n'
    expected = [rec("A", "", "B"), rec("E", "F", "G, and\nmore")]
    assert load_instructions(write(tmp_path, "\ufeff" + csv_text, "data.csv")) == expected
    tsv_text = "instruction\toutput\nA\tB\nE\tG, and more\n"
    assert load_instructions(write(tmp_path, tsv_text, "data.TSV")) == [rec("A", "", "B"), rec("E", "", "G, and more")]
    windows = 'instruction,output\r\nA,"line one\r\nline two"\r\n'  # a CSV writer's line ends inside a quoted cell too
    assert load_instructions(write(tmp_path, windows, "windows.csv")) == [rec("A", "", "line one\nline two")]
    titled = "Instruction,Input,OUTPUT\nA,C,B\n"  # a spreadsheet's header: the inputs must not vanish as unknown columns
    assert load_instructions(write(tmp_path, titled, "titled.csv")) == [rec("A", "C", "B")]
    assert load_instructions(write(tmp_path, json.dumps([{"Instruction": "A", " input": "C", "output": "B"}]))) == [
        rec("A", "C", "B")]


def test_what_spreadsheets_and_pandas_add_to_a_csv_is_left_out(tmp_path):
    """pandas' unnamed index column, a trailing comma on every line, Excel's cleared rows (",,") at the bottom and its
    semicolons where the comma is the decimal mark: the records load as they are."""
    expected = [rec("A", "", "B"), rec("C", "x; y", "D")]
    files = {
        "pandas.csv": ',instruction,input,output\n0,A,,B\n1,C,"x; y",D\n',
        "trailing.csv": 'instruction,input,output,\r\nA,,B,\r\nC,"x; y",D,\r\n,,,\r\n',
        "cells.csv": 'instruction,input,output\nA,,B,,\nC,"x; y",D\n,,\n  ,,\n',
        "semicolons.csv": 'instruction;input;output\nA;;B\nC;"x; y";D\n',
    }
    for name, text in files.items():
        assert load_instructions(write(tmp_path, text, name)) == expected, name
    with pytest.raises(DatasetError, match=r"row 2: 1 more cell than the header's 4 columns \(\(unnamed\), instruction, input, "
                                           r"output\)"):
        load_instructions(write(tmp_path, ",instruction,input,output\n0,A,,B,x\n", "data.csv"))


BAD_CSV = [
    ("missing output", "instruction,input\nA,\n", 'data.csv, row 1: the header has no "output" column (its columns: '
                                                   'instruction, input)'),
    ("misnamed output", "Instruction,response\nA,B\n", 'data.csv, row 1: the header has no "output" column'),
    ("short row", "instruction,input,output\nA,,B\nC,D\n", 'data.csv, row 3: field "output" is missing'),
    ("long row", "instruction,output\nA,B\nC,D,E,F\n",
     "data.csv, row 3: 2 more cells than the header's 2 columns (instruction, output)"),
    ("blank output", "instruction,output\nA,B\nC,  \n", 'data.csv, row 3: field "output" is empty'),
    ("unclosed quote", 'instruction,output\nA,B\nC,"D\n', "data.csv, row 3: not valid CSV (unexpected end of data)"),
    ("no header", "\ninstruction,output\nA,B\n", "data.csv, row 1: the first row must name each column once"),
    ("after a blank row", "instruction,input,output\na,,b\n\nc,,\n", 'data.csv, row 4: field "output" is empty'),
    ("long row after a quoted line break", 'instruction,output\n"a\nb",c\nd,e,f\n', "data.csv, row 3: 1 more cell than"),
    ("twice a column", "instruction,output,output\nA,B,C\n", "row 1: the first row must name each column once"),
    ("header only", "instruction,input,output\n", "data.csv: contains no records"),
    ("two spellings", "instruction,input,Input,output\nA,B,C,D\n", 'data.csv, row 2: field "input" is given 2 times ("input", "Input")'),
    ("empty", " \n", "data.csv: the file is empty"),
]


@pytest.mark.parametrize("text, message", [case[1:] for case in BAD_CSV], ids=[c[0] for c in BAD_CSV])
def test_bad_csv_names_the_row(tmp_path, text, message):
    with pytest.raises(DatasetError) as info:
        load_instructions(write(tmp_path, text, "data.csv"))
    assert message in str(info.value)


# --- validation ------------------------------------------------------------------------------

def many(n, **bad):
    """n good records where record n is replaced by ``bad`` fields."""
    records = [rec() for _ in range(n)]
    records[-1] = {**rec(), **bad}
    return records


BAD_FILES = [
    ("missing output", json.dumps([rec(), rec(), {"instruction": "x", "input": ""}]),
     'record 3: field "output" is missing'),
    ("missing instruction", json.dumps([{"output": "y"}]), 'record 1: field "instruction" is missing'),
    ("int instruction", json.dumps(many(7, instruction=5)), 'record 7: field "instruction" must be a string, got a number'),
    ("null output", json.dumps(many(2, output=None)), 'record 2: field "output" must be a string, got null'),
    ("list input", json.dumps(many(1, input=["a"])), 'record 1: field "input" must be a string, got a list'),
    ("blank instruction", json.dumps(many(4, instruction="  \n ")), 'record 4: field "instruction" is empty'),
    ("empty output", json.dumps(many(2, output="")), 'record 2: field "output" is empty'),
    ("invisible output", json.dumps(many(2, output="\u00a0\u200b \ufeff")),
     'record 2: field "output" is empty: it holds only invisible characters (U+200B, U+FEFF)'),
    ("invisible input", json.dumps(many(3, input="\u200b\u2060 ")),
     'record 3: field "input" holds only invisible characters (U+200B, U+2060): leave it empty for a record without input'),
    ("record not an object", json.dumps([rec(), [1, 2]]), "record 2: expected an object"),
    ("top level string", '"hello"', "expected a JSON list of records"),
    ("top level object", json.dumps({"data": [rec()]}, indent=2), "got an object with the keys 'data'"),
    ("one-line wrapper", json.dumps({"data": [rec(), rec()], "version": 1}), "got an object with the keys 'data', 'version'"),
    ("bad indented object", '{\n  "instruction": "a",\n  "input": "",\n  "output": "b"\n  "extra": 1\n}',
     "data.json, line 5: not valid JSON (Expecting ',' delimiter, column 3)"),
    ("objects not in a list", json.dumps(rec(), indent=2) + "\n" + json.dumps(rec(), indent=2),
     "line 6: not valid JSON (Extra data, column 1; more than one JSON value: put the records in one list, [ ... ])"),
    ("zero records", "[]", "contains no records"),
    ("empty file", "", "the file is empty"),
    ("blank file", "  \n\n ", "the file is empty"),
    ("bad JSON", '[\n  {"instruction": "a",\n   "input": "" "output": "b"}\n]',
     "line 3: not valid JSON (Expecting ',' delimiter, column 16)"),
    ("bad JSON Lines", json.dumps(rec()) + "\n" + json.dumps(rec()) + '\n{"instruction": "a" "output": "b"}\n',
     "line 3: not valid JSON (Expecting ',' delimiter, column 21)"),
    ("pretty-printed JSON Lines", json.dumps(rec()) + "\n" + json.dumps(rec(), indent=2) + "\n",
     "lines 2-6: one record spread over several lines; JSON Lines needs each on a line of its own"),
    ("JSON Lines record", json.dumps(rec()) + "\n\n" + json.dumps({"instruction": "a"}),
     'line 3: field "output" is missing'),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("a number of 5,000 digits", '[{"instruction": "a", "output": ' + "9" * 5000 + "}]",
     "not valid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits)"),
    ("the same in JSON Lines", json.dumps(rec()) + '\n{"instruction": "a", "output": ' + "9" * 5000 + "}",
     "line 2: not valid JSON (Exceeds the limit"),
    ("half an emoji", json.dumps(many(3, output="Hi \ud83d there")),
     'record 3: field "output": character 4 is half of a UTF-16 pair (\\ud83d), not a character; was an emoji cut in two?'),
]


@pytest.mark.parametrize("text, message", [case[1:] for case in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_files_raise_dataset_error(tmp_path, text, message):
    with pytest.raises(DatasetError) as info:
        load_instructions(write(tmp_path, text))
    assert message in str(info.value)
    assert "data.json" in str(info.value)


def test_not_utf8_names_the_byte_offset(tmp_path):
    raw = b'[{"instruction": "caf\xe9", "output": "x"}]'
    with pytest.raises(DatasetError, match=r"not UTF-8 text \(byte 0xe9 at byte offset 21, line 1\)"):
        load_instructions(write(tmp_path, raw))


def test_file_too_large_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(DatasetError, match=f"larger than the {MAX_FILE_BYTES // 2**20} MB limit"):
        load_instructions(path)


def test_too_many_records(tmp_path):
    path = write(tmp_path, "[" + ",".join(["{}"] * (MAX_RECORDS + 1)) + "]")
    with pytest.raises(DatasetError, match="100,001 records, more than the 100,000 limit"):
        load_instructions(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_instructions(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="is a folder"):
        load_instructions(tmp_path)


# --- cache -----------------------------------------------------------------------------------

def test_offline_without_cache_fails_fast_with_help(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "CANONICAL_URL", "http://127.0.0.1:9/x.json")
    start = time.monotonic()
    with pytest.raises(DatasetError) as info:
        load_instructions("canonical")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "http://127.0.0.1:9/x.json" in message
    assert f"by hand in the dataset cache folder {tmp_path / 'cache'} (GPT2_INSTRUCT_CACHE sets it)" in message
    assert "'sample'" in message
    from engine.public import scrub

    assert "by hand in the dataset cache folder cache (GPT2_INSTRUCT_CACHE sets it)" in scrub(message)  # what a visitor reads


def test_a_hand_placed_copy_with_another_sha256_is_kept_and_named_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "CANONICAL_URL", "http://127.0.0.1:9/x.json")
    (tmp_path / "cache").mkdir()
    placed = write(tmp_path / "cache", json.dumps([rec()]) + "\n", "instruction-data.json")
    before = placed.read_bytes()
    with pytest.raises(DatasetError, match=f"The instruction-data.json there has sha256 {cache.sha256_of(before)}: another"):
        load_instructions("canonical")
    assert placed.read_bytes() == before  # not deleted: it may be the user's only copy


def test_corrupt_cached_copy_is_fetched_again(tmp_path, monkeypatch):
    good = write(tmp_path, json.dumps([rec(), rec("Name a fruit.", "", "Apple.")]), "published.json")
    monkeypatch.setattr(cache, "CANONICAL_SHA256", cache.sha256_of(good.read_bytes()))
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "CANONICAL_URL", good.as_uri())
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "instruction-data.json").write_text("[]")
    assert not cache.is_cached()
    assert cache.canonical_path() == tmp_path / "cache" / "instruction-data.json"
    assert cache.is_cached()
    assert load_instructions("canonical") == [rec(), rec("Name a fruit.", "", "Apple.")]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["instruction-data.json"]


def test_download_with_wrong_checksum_is_not_kept(tmp_path, monkeypatch):
    fake = write(tmp_path, json.dumps([rec()]), "fake.json")
    monkeypatch.setenv("GPT2_INSTRUCT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "CANONICAL_URL", fake.as_uri())
    with pytest.raises(DatasetError, match="integrity check"):
        load_instructions("canonical")
    assert list(tmp_path.glob("cache/*")) == []


# --- prompts ---------------------------------------------------------------------------------

def test_alpaca_prompt_without_and_with_input():
    assert format_prompt(rec("Name a color.", "", "Red.")) == (
        PREAMBLE + "\n\n### Instruction:\nName a color.\n\n### Response:\n")
    assert format_prompt(rec("Rewrite in passive voice.", "Sam baked a cake.", "x")) == (
        PREAMBLE + "\n\n### Instruction:\nRewrite in passive voice."
        "\n\n### Input:\nSam baked a cake.\n\n### Response:\n")
    assert format_prompt(rec("Hi.", "  \n", "x")) == PREAMBLE + "\n\n### Instruction:\nHi.\n\n### Response:\n"
    assert format_input(rec("A", "B")) == PREAMBLE + "\n\n### Instruction:\nA\n\n### Input:\nB"


def test_phi3_prompt_and_unknown_style():
    assert format_prompt(rec("Name a color."), "phi3") == "<|user|>\nName a color.\n<|assistant|>\n"
    assert format_prompt(rec("Translate.", "cat"), "phi3") == "<|user|>\nTranslate.\ncat\n<|assistant|>\n"
    with pytest.raises(ValueError, match="alpaca, phi3"):
        format_prompt(rec(), "chatml")


def test_extract_response():
    record = rec("Name the capital of France.")
    prompt = format_prompt(record)
    assert extract_response(prompt + "Paris.<|endoftext|>Below is") == "Paris."
    assert extract_response(prompt + "Paris.\n\n### Instruction:\nMore\n\n### Response:\nLyon") == "Paris."
    assert extract_response(prompt + "Paris.\n\nBelow is an instruction that describes a task. W") == "Paris."
    assert extract_response("  Paris is the capital.\n") == "Paris is the capital."
    assert extract_response(" Paris.\n\n### Input:\nx") == "Paris."
    tricky = format_prompt(rec("What does ### Response: mean?"))
    assert extract_response(tricky + " A header.") == "A header."
    phi3 = format_prompt(record, "phi3")
    assert extract_response(phi3 + "Paris.\n<|user|>\nAnd Italy?", "phi3") == "Paris."
    assert extract_response(phi3 + "Paris.<|endoftext|>", "phi3") == "Paris."


# --- dataset ---------------------------------------------------------------------------------

def test_separate_encoding_equals_the_books_whole_text_encoding(canonical):
    tokenizer = get_tokenizer()
    ds = InstructionDataset(canonical)
    assert len(ds) == 1100 and ds.skipped == 0
    for item, record in zip(ds, canonical):
        whole = tokenizer.encode(format_prompt(record) + record["output"])
        assert item["ids"] == whole
        assert item["prompt_len"] == len(tokenizer.encode(format_prompt(record)))
    assert ds.lengths == [len(item["ids"]) for item in ds]


def test_a_prompt_encoded_field_by_field_equals_the_whole_prompt_encoded():
    """encode_prompt encodes the template's fixed text once and the fields alone where no token can cross a field's
    edge; fields of every kind of edge (spaces of every Unicode kind, line breaks, contractions, digits, marks, emoji,
    special-token text, empty) must give the ids of the whole prompt."""
    import random

    from data import STYLES, encode_prompt
    from data.prompts import template_ids

    pieces = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\u2028", "\u0085", "\x1f", "'s", "'ll", "'", "s",
              "Word", "é", "1", "23", "!", ":", "###", "### Response:", "<|endoftext|>", "<|user|>", "\u0301", "🙂", "日本"]
    rng, tokenizer = random.Random(0), get_tokenizer()
    template_ids.cache_clear()
    for style in STYLES:
        for _ in range(2000):
            record = {field: "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))) for field in ("instruction", "input")}
            assert encode_prompt(record, tokenizer, style) == tokenizer.encode(format_prompt(record, style), disallowed_special=()), record
    assert template_ids.cache_info().hits > 1000  # most records took the field-by-field path


def test_literal_end_of_text_in_user_text_is_plain_text():
    ids, _ = encode_record(rec("Say <|endoftext|> please.", "", "<|endoftext|>"))
    assert EOT_ID not in ids


def test_too_long_records_are_skipped_and_counted():
    short, long_ = rec("Short.", "", "Yes."), rec("Long.", "", "word " * 2000)
    n = len(encode_record(short)[0])
    ds = InstructionDataset([short, long_, short])
    assert (len(ds), ds.skipped, [item["index"] for item in ds]) == (2, 1, [0, 2])
    assert len(InstructionDataset([short], max_length=n)) == 1  # its end token is a target, never an input
    tight = InstructionDataset([short], max_length=n - 1)
    assert (len(tight), tight.skipped) == (0, 1)


# --- collate ---------------------------------------------------------------------------------

IGN = -100
EOT = 50256


def test_collate_matches_the_books_example():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert targets.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, IGN, IGN, IGN], [8, 9, EOT, IGN, IGN]]


def test_collate_with_prompt_masking_and_truncation():
    batch = [{"ids": [0, 1, 2, 3, 4], "prompt_len": 3, "index": 0},
             {"ids": [5, 6], "prompt_len": 1, "index": 1},
             {"ids": [7, 8, 9], "prompt_len": 2, "index": 2}]
    _, targets = custom_collate_fn(batch)
    assert targets.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, IGN, IGN, IGN], [8, 9, EOT, IGN, IGN]]
    inputs, targets = custom_collate_fn(batch, mask_prompt=True)
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert targets.tolist() == [[IGN, IGN, 3, 4, EOT], [6, EOT, IGN, IGN, IGN], [IGN, 9, EOT, IGN, IGN]]
    inputs, targets = custom_collate_fn(batch, mask_prompt=True, allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, EOT], [7, 8, 9]]
    assert targets.tolist() == [[IGN, IGN, 3], [6, EOT, IGN], [IGN, 9, EOT]]
    with pytest.raises(ValueError):
        custom_collate_fn([[1, 2]], mask_prompt=True)


def books_collate(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None):
    """The book's custom_collate_fn (chapter 7), as the reference."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy() + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs, targets = torch.tensor(padded[:-1]), torch.tensor(padded[1:])
        indices = torch.nonzero(targets == pad_token_id).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def test_collate_equals_the_books_on_canonical_batches(canonical_train):
    loader = make_loader(canonical_train, allowed_max_length=1024)
    loader.collate_fn = lambda items: items
    for items, _ in zip(loader, range(10)):
        ours = custom_collate_fn(items, allowed_max_length=1024)
        book = books_collate([item["ids"] for item in items], allowed_max_length=1024)
        assert torch.equal(ours[0], book[0]) and torch.equal(ours[1], book[1])


# --- loaders and samplers --------------------------------------------------------------------

def test_train_loader_yields_the_books_batches_without_touching_global_rng(canonical_train):
    with torch.random.fork_rng():
        torch.manual_seed(123)
        book = DataLoader(range(len(canonical_train)), batch_size=8, shuffle=True, drop_last=True)
        book_epochs = [[b.tolist() for b in book] for _ in range(2)]
    state = torch.get_rng_state()
    loader = make_loader(canonical_train)
    loader.collate_fn = lambda items: [item["index"] for item in items]
    ours = [list(loader) for _ in range(2)]
    assert torch.equal(state, torch.get_rng_state())
    assert ours == book_epochs
    assert len(ours[0]) == len(loader) == 116


def test_eval_loader_keeps_order_and_last_batch(canonical):
    ds = InstructionDataset(split_instructions(canonical).val)
    loader = make_loader(ds, shuffle=False, drop_last=False)
    batches = list(loader)
    assert len(batches) == 7 and batches[-1][0].shape[0] == 55 - 48
    assert batches[0][0][0, : ds.lengths[0]].tolist() == ds[0]["ids"]


def test_length_grouped_sampler():
    lengths = [(i * 37) % 101 for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=5, mega_batch_mult=4)
    first = list(sampler)
    assert len(first) == len(sampler) == 125
    assert first == list(LengthGroupedSampler(lengths, batch_size=8, seed=5, mega_batch_mult=4))
    flat = [i for batch in first for i in batch]
    assert len(flat) == len(set(flat)) == 1000
    second = list(sampler)
    assert second != first and sorted(map(sorted, second)) != sorted(map(sorted, first))
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(LengthGroupedSampler(lengths, batch_size=8, seed=6, mega_batch_mult=4)) != first
    for batch in first:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)

    odd = LengthGroupedSampler(lengths[:21], batch_size=8, seed=1, drop_last=True)
    assert len(odd) == 2 and all(len(b) == 8 for b in odd)
    keep = list(LengthGroupedSampler(lengths[:21], batch_size=8, seed=1, drop_last=False))
    assert len(keep) == 3 and sorted(i for b in keep for i in b) == list(range(21))


def test_padding_stats_on_canonical(canonical_train):
    random_ = padding_stats(canonical_train, batch_size=8)
    assert (random_["batches"], random_["real_tokens"], random_["padded_tokens"]) == (116, 52_335, 65_080)
    assert random_["padding_fraction"] == pytest.approx(1 - 52_335 / 65_080)
    grouped = padding_stats(canonical_train, batch_size=8, grouped=True)
    assert (grouped["batches"], grouped["real_tokens"], grouped["padded_tokens"]) == (116, 52_436, 53_872)
    assert grouped["padding_fraction"] < random_["padding_fraction"] / 5


# --- statistics and views --------------------------------------------------------------------

def test_token_stats():
    records = [rec("Name a color.", "", "Red."), rec("Translate.", "cat", "chat")]
    stats = token_stats(records)
    encoded = [encode_record(r) for r in records]
    assert stats["prompt_tokens"] == [p for _, p in encoded]
    assert stats["response_tokens"] == [2 + 1, 1 + 1]
    assert stats["total_tokens"] == [len(ids) + 1 for ids, _ in encoded]


def test_longest_row_reads_few_records_and_matches_the_token_counts(monkeypatch):
    """The longest row that fits the context, as token_stats counts it (total less the end token), for every format;
    non-ASCII text (more tokens than characters) included, and only the few records that could be longest tokenized."""
    import data.stats

    records = load_instructions("sample") + [rec("Écris.", "", "日本語のテキスト " * 30), rec("Long.", "", "word " * 2000)]
    for style in ("alpaca", "phi3"):
        rows = [total - 1 for total in token_stats(records, style=style)["total_tokens"]]
        assert longest_row(records, style) == max(n for n in rows if n <= 1024)
        assert longest_row(records, style, context=60) == max(n for n in rows if n <= 60)
    assert longest_row(records[-1:]) is None
    seen = []
    monkeypatch.setattr(data.stats, "encode_record", lambda r, *a: seen.append(r) or encode_record(r, *a))
    longest_row(records)
    assert len(seen) < 5


def test_token_view_without_and_with_masking():
    record = rec("Say hi.", "", "Hi!")
    plain = token_view(record)
    assert "".join(text for text, _ in plain) == format_prompt(record) + "Hi!<|endoftext|>"
    assert [trained for _, trained in plain] == [False] + [True] * (len(plain) - 1)
    masked = token_view(record, mask_prompt=True)
    assert [text for text, _ in masked] == [text for text, _ in plain]
    assert masked[-4:] == [("\n", False), ("Hi", True), ("!", True), ("<|endoftext|>", True)]
    assert sum(trained for _, trained in masked) == 3
    assert token_view(record, style="phi3")[:2] == [("<", False), ("|", True)]
    emoji = token_view(rec("Smile 🙂, 日本語.", "", "ok 👍"))  # characters split over byte-level tokens, shown whole
    assert "".join(text for text, _ in emoji) == format_prompt(rec("Smile 🙂, 日本語.", "", "")) + "ok 👍<|endoftext|>"
    assert not any("\ufffd" in text for text, _ in emoji) and len(emoji) == len(encode_record(rec("Smile 🙂, 日本語.", "", "ok 👍"))[0]) + 1


def test_a_record_training_skips_is_shown_as_skipped_not_trained_on():
    short, long_ = rec("Short.", "", "Yes."), rec("Long.", "", "word " * 2000)
    assert skip_reason(short) is None
    view = token_view(long_)
    assert len(view) > 1024 and not any(trained for _, trained in view)
    assert not any(trained for _, trained in token_view(long_, mask_prompt=True))
    reason = skip_reason(long_)
    assert reason == f"skipped in training: {len(view) - 1:,} tokens, longer than the model's 1,024-token context window"
    # The same rule as training's: a record of exactly max_length tokens is trained on, since its end token is only
    # predicted; the model reads max_length tokens of it.
    n = len(token_view(short)) - 1
    assert custom_collate_fn(list(InstructionDataset([short], max_length=n)))[0].shape == (1, n)
    for limit in (n - 1, n, n + 1):
        skipped = InstructionDataset([short], max_length=limit).skipped == 1
        assert (skip_reason(short, max_length=limit) is not None) == skipped
        assert any(trained for _, trained in token_view(short, max_length=limit)) != skipped


def test_split_warnings_name_the_counts_of_a_dataset_too_small_to_split():
    assert split_warnings(74) == [] and split_warnings(10) == []
    one, two = split_warnings(1), split_warnings(2)
    assert one == ["Only 0 of the 1 records go to training (85 %): fewer than one batch of 8, so training cannot start.",
                   "No test records (10 % of 1): training cannot start, and the Evaluate tab would have nothing to score. "
                   "Use at least 10 records."]
    assert two[0].startswith("Only 1 of the 2 records go to training") and "batch size" not in two[0]  # none would do
    assert split_warnings(9) and split_warnings(9)[0].startswith("Only 7 of the 9 records")
    assert split_warnings(74, batch_size=64)[0].startswith("Only 62 of the 74 records")
    assert "at least 76 records, or a batch size of 62 or less." in split_warnings(74, batch_size=64)[0]
    for n in range(1, 200):  # the counts are split_instructions' own
        sizes = split_sizes(split_instructions(list(range(n))))
        assert split_counts(n) == (sizes["train"], sizes["test"], sizes["val"])
        assert bool(split_warnings(n)) == (sizes["train"] < 8 or sizes["test"] == 0)
        for batch in (8, 64):  # advice that is taken makes a dataset training accepts
            advice = " ".join(split_warnings(n, batch))
            if smaller := re.search(r"a batch size of (\d+) or less", advice):
                assert not split_warnings(n, int(smaller.group(1)))
            if enough := re.search(r"at least (\d+) records", advice):
                assert not split_warnings(int(enough.group(1)), batch)


def test_data_package_never_imports_gradio():
    code = "import sys, data; assert 'gradio' not in sys.modules, 'gradio imported'"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
