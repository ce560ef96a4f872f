"""Instruction data for fine-tuning GPT-2: loading, prompt formats, batching and statistics.

Never imports gradio, so training and tests can use it without the UI.
"""
from .batching import InstructionDataset, LengthGroupedSampler, custom_collate_fn, make_loader
from .errors import DatasetError
from .prompts import STYLES, encode_prompt, extract_response, format_input, format_prompt
from .records import FILE_KINDS, FILE_SUFFIXES, MAX_FILE_BYTES, MAX_RECORDS, Split, load_instructions, source_path, split_instructions, split_warnings
from .stats import longest_row, padding_stats, skip_reason, split_sizes, token_stats, token_view

__all__ = [
    "load_instructions", "split_instructions", "format_prompt", "encode_prompt", "DatasetError", "InstructionDataset",
    "custom_collate_fn", "make_loader", "LengthGroupedSampler", "padding_stats", "token_stats",
    "token_view", "extract_response", "format_input", "split_sizes", "Split", "STYLES",
    "FILE_KINDS", "FILE_SUFFIXES", "MAX_FILE_BYTES", "MAX_RECORDS", "source_path", "split_warnings", "skip_reason",
    "longest_row",
]
