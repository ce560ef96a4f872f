"""The engine-side helpers of the UI: dataset search and pages (data.browse), model sizes (training.estimate)."""
import pytest

from data import load_instructions, split_instructions
from data.browse import PAGE_SIZE, matches, page_of, split_names, split_of
from model import PRESETS, GPTConfig
from training.estimate import all_presets, estimate

RECORDS = [
    {"instruction": "Rewrite in the PASSIVE voice.", "input": "The cat ate.", "output": "It was eaten."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate.", "input": "Passive aggressive", "output": "Passiv-aggressiv"},
    {"instruction": "Add 2 and 2.", "input": "", "output": "4, or passively, four."},
]


def test_search_is_case_insensitive_over_all_three_fields():
    assert matches(RECORDS, "passive") == [0, 2, 3]
    assert matches(RECORDS, "  BLUE ") == [1]
    assert matches(RECORDS, "no such text") == []
    assert matches(RECORDS, "") == [0, 1, 2, 3]


def test_pages_count_and_clamp():
    records = [{"instruction": f"task {i}", "input": "", "output": "x"} for i in range(60)]
    first = page_of(records)
    assert [i for i, _ in first.rows] == list(range(PAGE_SIZE))
    assert (first.total, first.page, first.pages) == (60, 1, 3)
    assert first.summary() == "60 records, page 1 / 3"
    last = page_of(records, page=99)
    assert last.page == 3 and [i for i, _ in last.rows] == list(range(50, 60))
    assert page_of(records, page=0).page == 1
    found = page_of(records, "task 1")  # task 1, 10..19
    assert found.total == 11 and found.summary() == "11 records, page 1 / 1"
    none = page_of(records, "zzz")
    assert (none.rows, none.total, none.pages) == ([], 0, 1)
    assert page_of(records[:1], "task 0").summary() == "1 record, page 1 / 1"


def test_split_names_follow_split_instructions():
    records = load_instructions("sample")
    split = split_instructions(records)
    names = split_names(len(records))
    assert [r for r, n in zip(records, names) if n == "train"] == split.train
    assert [r for r, n in zip(records, names) if n == "val"] == split.val
    assert [r for r, n in zip(records, names) if n == "test"] == split.test
    assert split_of(0, 1100) == "train" and split_of(935, 1100) == "test" and split_of(1099, 1100) == "val"
    with pytest.raises(IndexError, match="1100 records"):
        split_of(1100, 1100)


def test_estimates_follow_the_bytes_per_parameter_rules():
    gpt2 = estimate("gpt2")
    assert gpt2.parameters == GPTConfig.from_name("gpt2").num_params() == 124_439_808
    assert gpt2.full_gb == pytest.approx(124_439_808 * 14 / 1e9 + 0.8)
    assert gpt2.lora_gb == pytest.approx(124_439_808 * 8 / 1e9 + 0.8)
    assert gpt2.inference_gb == pytest.approx(124_439_808 * 4 / 1e9)
    assert gpt2.params_label() == "124M"
    assert estimate("tiny").params_label() == "7.4M"
    assert estimate("gpt2-xl").params_label() == "1.56B"
    sizes = all_presets()
    assert [e.name for e in sizes] == list(PRESETS)
    assert [e.parameters for e in sizes] == sorted(e.parameters for e in sizes)
    assert all(e.inference_gb < e.lora_gb < e.full_gb for e in sizes)
    with pytest.raises(ValueError, match="unknown model preset"):
        estimate("gpt5")
