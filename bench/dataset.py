"""Counting a dataset's tokens as the Dataset tab and a Start do: field by field, against the whole prompt encoded.

``data.token_stats`` (the histogram, and ``InstructionDataset`` through the same
``encode_record``) encodes the template's fixed text once and each record's
fields alone; the same-run comparison encodes each whole prompt and the answer,
as before. Both must give the same counts. Then the engine's ``Datasets`` keeps
the counts per file and prompt format: a reload or another visitor finds them.

Exercise 7.3's Alpaca data has 52,002 records. Offline, ``--records`` builds
that many from the book's 1,100 (each instruction numbered, every third answer
longer); ``--data`` times a file of your own instead.

    python -m bench.dataset [--records 52002] [--data FILE] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import at_least, print_json, timed
from data import DatasetError, format_prompt, load_instructions, token_stats
from engine.datasets import Datasets
from model.tokenizer import get_tokenizer


def whole_prompt_stats(records, style: str) -> dict:
    """The counts as the whole prompt's encoding gives them (the comparison)."""
    tokenizer = get_tokenizer()
    prompt, response = [], []
    for r in records:
        prompt.append(len(tokenizer.encode(format_prompt(r, style), disallowed_special=())))
        response.append(len(tokenizer.encode(r["output"], disallowed_special=())) + 1)
    return {"prompt_tokens": prompt, "response_tokens": response, "total_tokens": [p + r for p, r in zip(prompt, response)]}


def alpaca_like(n: int, folder: Path) -> Path:
    """A file of ``n`` records made from the book's: numbered instructions, every third answer twice as long."""
    book, rng = load_instructions("canonical"), random.Random(0)
    records = [{"instruction": f"{r['instruction']} (variant {i})", "input": r["input"],
                "output": r["output"] + (" " + rng.choice(book)["output"] if i % 3 == 0 else "")}
               for i, r in ((i, book[i % len(book)]) for i in range(n))]
    path = folder / f"alpaca-like-{n}.json"
    path.write_text(json.dumps(records))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataset", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=at_least(1), default=52_002, help="records built from the book's (default 52,002)")
    parser.add_argument("--data", default=None, help="a JSON, JSON Lines or CSV file to time instead")
    parser.add_argument("--rounds", type=at_least(1), default=3, help="timed rounds of each side, interleaved")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = Path(args.data) if args.data else alpaca_like(args.records, Path(tmp))
            records, parse_s = timed(load_instructions, path)
        except (DatasetError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    get_tokenizer()
    print(f"{len(records):,} records ({path.name}); parsed and checked in {parse_s:.2f} s")
    figures = {"records": len(records), "parse_s": parse_s}
    for style in ("alpaca", "phi3"):
        ours, whole = [], []
        for _ in range(args.rounds):
            counts, took = timed(token_stats, records, None, style)
            ours.append(took)
            expected, took = timed(whole_prompt_stats, records, style)
            whole.append(took)
            if counts != expected:
                print(f"error: the {style} counts differ from the whole prompt's", file=sys.stderr)
                return 1
        a, b = statistics.median(ours), statistics.median(whole)
        print(f"{style}: token counts field by field {a:.2f} s, whole prompts {b:.2f} s: {b / a:.2f}x "
              f"(same counts; median of {args.rounds})")
        figures[style] = {"field_by_field_s": a, "whole_prompt_s": b, "ratio": b / a}
    datasets = Datasets()
    ref = {"sha256": "these records"}  # the key a loaded file's hash is
    _, first = timed(datasets.token_stats, ref, records, "alpaca")
    _, again = timed(datasets.token_stats, ref, records, "alpaca")
    print(f"the engine's Datasets: counted in {first:.2f} s on first use, {again * 1e3:.2f} ms again (a reload, "
          "another visitor, the format chosen again)")
    figures["datasets_first_s"], figures["datasets_again_s"] = first, again
    print_json(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
