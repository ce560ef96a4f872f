"""Load instruction records from a file, check them, and split them the book's way.

A record is a dict with string ``instruction``, ``input`` and ``output``.
Every problem with a user's file becomes a ``DatasetError`` whose message
says what is wrong and where (record N for a JSON list, line N for JSON Lines,
row N for CSV, counted as a spreadsheet counts them).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import random
import unicodedata
from pathlib import Path
from typing import NamedTuple

from . import cache
from .errors import DatasetError

FIELDS = ("instruction", "input", "output")
MAX_FILE_BYTES = 64 * 1024 * 1024  # exercise 7.3's Alpaca data (52,002 records) is about 22 MB
MAX_RECORDS = 100_000
SAMPLE_PATH = Path(__file__).with_name("sample.json")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
FILE_SUFFIXES = (".json", *JSONL_SUFFIXES, *CSV_DELIMITERS)  # what an upload may be
FILE_KINDS = "JSON, JSON Lines or CSV"


class Split(NamedTuple):
    train: list
    val: list
    test: list


def load_instructions(source) -> list[dict]:
    """Records from ``"canonical"`` (the book's 1,100), ``"sample"`` (bundled) or a file path.

    A file is a JSON list of objects, JSON Lines (one object per line), or CSV / TSV
    with a header row naming the fields.
    """
    return read_instruction_file(source_path(source))


def source_path(source) -> Path:
    """The file behind a source: the cached canonical file (downloaded on first use), the sample, or the path."""
    if isinstance(source, str) and source == "canonical":
        return cache.canonical_path()
    if isinstance(source, str) and source == "sample":
        return SAMPLE_PATH
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, 'canonical' or 'sample', got {type(source).__name__}")
    return Path(source)


def read_instruction_file(path: Path) -> list[dict]:
    """Read, parse and check one file; raise ``DatasetError`` on any problem."""
    items, name, label = read_items(path)
    return validate_records(items, name, label)


def read_items(path: Path) -> tuple[list, str, str]:
    """A file's parsed ``(number, value)`` items, its name and the word that locates an item; not yet checked."""
    name = path.name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder, not a file")
    if size > MAX_FILE_BYTES:
        raise DatasetError(
            f"{name}: file is {size / 2**20:.1f} MB, larger than the {MAX_FILE_BYTES // 2**20} MB limit"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    text = decode_utf8(raw, name)
    if not text.strip():
        raise DatasetError(f"{name}: the file is empty")
    suffix = path.suffix.lower()
    if suffix in CSV_DELIMITERS:
        return parse_csv(text, name, CSV_DELIMITERS[suffix]), name, "row"
    items, label = parse_json_or_jsonl(text, name, suffix in JSONL_SUFFIXES)
    return items, name, label


def decode_utf8(raw: bytes, name: str) -> str:
    """The file's text; a leading byte order mark is dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{name}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte offset {exc.start}, line {line}); "
            "save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def parse_json_or_jsonl(text: str, name: str, jsonl: bool) -> tuple[list, str]:
    """Parsed items and the word that locates one of them ("record" or "line").

    Items are ``(number, value)`` pairs: 1-based record index, or line number for JSON Lines.
    """
    if jsonl and not text.lstrip().startswith("["):  # a list is JSON whatever the file's name says
        return parse_jsonl(text, name), "line"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and first_line_is_json(text):  # JSON Lines, its bad line named there
            return parse_jsonl(text, name), "line"
        extra = "; more than one JSON value: put the records in one list, [ ... ]" if exc.msg == "Extra data" else ""
        raise DatasetError(f"{name}, line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}{extra})") from None
    except RecursionError:
        raise DatasetError(f"{name}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:
        raise DatasetError(f"{name}: not valid JSON ({number_too_long(exc)})") from None
    if isinstance(data, dict) and len(text.strip().split("\n")) == 1 and not any(
            isinstance(value, (list, dict)) for value in data.values()):  # one record on one line: JSON Lines
        return [(1, data)], "line"
    if not isinstance(data, list):
        keys = f" with the keys {', '.join(map(repr, list(data)[:5]))}" if isinstance(data, dict) and data else ""
        raise DatasetError(
            f"{name}: expected a JSON list of records (or JSON Lines, one record per line), "
            f"got {json_type(data)}{keys}"
        )
    return list(enumerate(data, start=1)), "record"


def first_line_is_json(text: str) -> bool:
    """Whether the first line that is not blank holds a JSON value of its own: else a file is no JSON Lines."""
    try:
        json.loads(first_line(text))
    except (ValueError, RecursionError):
        return False
    return True


def parse_jsonl(text: str, name: str) -> list:
    """``(line, value)`` items; lines end at a line feed only (JSON strings may hold U+2028 and other breaks)."""
    items, offset = [], 0  # where each line starts in the text
    for number, line in enumerate(text.split("\n"), start=1):
        begins = offset + len(line) - len(line.lstrip())  # its first character that is not blank
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            last = spread_to(text, begins)
            if last > number:
                raise DatasetError(f"{name}, lines {number}-{last}: one record spread over several lines; JSON Lines needs "
                                   "each on a line of its own (or save the records as a .json file, in one list [ ... ])") from None
            raise DatasetError(f"{name}, line {number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        except RecursionError:
            raise DatasetError(f"{name}, line {number}: not valid JSON (nested too deeply)") from None
        except ValueError as exc:
            raise DatasetError(f"{name}, line {number}: not valid JSON ({number_too_long(exc)})") from None
    return items


def spread_to(text: str, start: int) -> int:
    """The line on which a JSON value starting at ``start`` ends (a pretty-printed object's closing brace); 0 if none
    parses there."""
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return 0
    return text.count("\n", 0, end - 1) + 1


def number_too_long(exc: ValueError) -> str:
    """Python's refusal of a number of over 4,300 digits (the one ValueError of json.loads that is not a
    JSONDecodeError), without its advice to programmers."""
    return str(exc).split("; use sys.")[0]


def parse_csv(text: str, name: str, delimiter: str = ",") -> list:
    """``(row, fields)`` items of a table whose header row names the fields; rows as a spreadsheet numbers them
    (the header is row 1). An empty cell is an empty string; a row with fewer cells lacks the last fields.

    What spreadsheets and pandas add is left out: columns without a name (pandas' index, a trailing comma), empty
    cells past the header's last column, rows with every cell empty, and the carriage return of a Windows line end
    inside a quoted cell (the model would learn to write it). A semicolon-separated file (Excel where the comma is
    the decimal mark) is read as such.
    """
    if delimiter == "," and semicolon_separated(text):
        delimiter = ";"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    items, header, number = Rows(), None, 0
    try:
        for number, row in enumerate(reader, start=1):  # a blank line is a row in a spreadsheet too
            if header is None:
                header = [field.strip() for field in row]
                named = [field for field in header if field]
                if not named or len(set(named)) < len(named):
                    raise DatasetError(f"{name}, row 1: the first row must name each column once (instruction, input, "
                                       f"output, ...), got {delimiter.join(header)!r}")
                items.header = named
            elif len(row) > len(header) and any(cell.strip() for cell in row[len(header):]):
                extra = len(row) - len(header)
                raise DatasetError(f"{name}, row {number}: {extra} more cell{'s' * (extra > 1)} than the header's "
                                   f"{len(header)} columns ({', '.join(column or '(unnamed)' for column in header)})")
            elif any(cell.strip() for cell in row):
                items.append((number, {column: cell.replace("\r\n", "\n") for column, cell in zip(header, row) if column}))
    except csv.Error as exc:
        raise DatasetError(f"{name}, row {number + 1}: not valid CSV ({exc})") from None
    if header is None:
        raise DatasetError(f"{name}, row 1: the first row must name each column once (instruction, input, output, "
                           "...), got ''")
    return items


def semicolon_separated(text: str) -> bool:
    """Whether a CSV's header row is one column by its commas and several by its semicolons."""
    first = first_line(text)
    return "," not in first and first.count(";") >= 1


def first_line(text: str) -> str:
    """The first line that is not blank ("" if none), found without splitting the whole file (up to 64 MB) into lines."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        if text[start:end].strip():
            return text[start:end]
        start = end + 1
    return ""


class Rows(list):
    """A table's ``(row, fields)`` items, and its ``header``: the columns every row may have."""
    header: list[str] = []


def check_columns(items: list, name: str, required) -> None:
    """A table whose header lacks a ``required`` field is named as such (row 1), not as its first row missing it."""
    header = getattr(items, "header", None)
    if header is None:
        return
    missing = [field for field in required if field not in {column.lower() for column in header}]
    if missing:
        raise DatasetError(f'{name}, row 1: the header has no "{missing[0]}" column (its columns: {", ".join(header)})')


JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "true or false", int: "a number", float: "a number"}


def json_type(value) -> str:
    """JSON's name for a value's type, as the file's author wrote it: "an object", "a number", "null"."""
    return "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


def folded(value: dict, fields, where: str) -> dict:
    """The record with its field names spelled as the book spells them: a spreadsheet's "Instruction" or " Input " is
    "instruction" or "input" (else its inputs would vanish unseen); two spellings of one field in a record are an error."""
    spelled = {}
    for key in value:
        field = key.strip().lower() if isinstance(key, str) else key
        if field in fields:
            spelled.setdefault(field, []).append(key)
    if all(keys == [field] for field, keys in spelled.items()):
        return value
    for field, keys in spelled.items():
        if len(keys) > 1:
            raise DatasetError(f'{where}: field "{field}" is given {len(keys)} times ({", ".join(json.dumps(k) for k in keys)})')
    names = {keys[0]: field for field, keys in spelled.items()}
    return {names.get(key, key): text for key, text in value.items()}


def check_filled(text: str, where: str) -> None:
    """A field must show something: whitespace alone is empty, and so are invisible format characters alone (a
    zero-width space, a byte-order mark, a soft hyphen), which a copy from a web page or a spreadsheet can leave."""
    if not text.strip():
        raise DatasetError(f"{where} is empty")
    codes = invisible_only(text)
    if codes:
        raise DatasetError(f"{where} is empty: it holds only invisible characters ({codes})")


def check_input(text: str, where: str) -> None:
    """An input may be empty, but not invisible: one of format characters alone would add an "### Input:" section
    that shows nothing, unlike the record without one that its author meant."""
    codes = invisible_only(text)
    if codes:
        raise DatasetError(f"{where} holds only invisible characters ({codes}): leave it empty for a record without input")


def invisible_only(text: str) -> str:
    """The codes of the format characters (Unicode Cf) of a text that holds nothing else but whitespace, else ""."""
    left = text.strip()
    if not left or not all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in left):
        return ""
    return ", ".join(sorted({f"U+{ord(ch):04X}" for ch in left if not ch.isspace()}))


def check_characters(text: str, where: str) -> None:
    """A lone UTF-16 surrogate (half an emoji, escaped in JSON as \\ud83d) cannot be encoded to tokens: named here,
    not as a UnicodeEncodeError when training starts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DatasetError(f"{where}: character {exc.start + 1} is half of a UTF-16 pair (\\u{ord(text[exc.start]):04x}), "
                           "not a character; was an emoji cut in two?") from None


def validate_records(items: list, name: str = "data", label: str = "record") -> list[dict]:
    """Check ``(number, value)`` pairs and return clean three-field records.

    ``input`` may be missing or null (it becomes ""); extra keys are dropped.
    """
    if not items:
        raise DatasetError(f"{name}: contains no records")
    if len(items) > MAX_RECORDS:
        raise DatasetError(f"{name}: {len(items):,} records, more than the {MAX_RECORDS:,} limit")
    check_columns(items, name, ("instruction", "output"))
    records = []
    for number, value in items:
        where = f"{name}, {label} {number}"
        if not isinstance(value, dict):
            raise DatasetError(
                f'{where}: expected an object with "instruction", "input" and "output", got {json_type(value)}'
            )
        value = folded(value, FIELDS, where)
        record = {}
        for field in FIELDS:
            if field not in value and field != "input":
                raise DatasetError(f'{where}: field "{field}" is missing')
            text = value.get(field)
            if text is None and field == "input":
                text = ""
            if not isinstance(text, str):
                raise DatasetError(f'{where}: field "{field}" must be a string, got {json_type(text)}')
            (check_input if field == "input" else check_filled)(text, f'{where}: field "{field}"')
            check_characters(text, f'{where}: field "{field}"')
            record[field] = text
        records.append(record)
    return records


def split_instructions(records: list, train_frac: float = 0.85, test_frac: float = 0.10, seed=None) -> Split:
    """The book's split in file order: first 85 % train, next 10 % test, the rest validation.

    With ``seed`` set, a shuffled copy (``random.Random(seed)``) is split instead.
    """
    if not (0 < train_frac <= 1 and 0 <= test_frac <= 1 and train_frac + test_frac <= 1):
        raise ValueError(
            f"need 0 < train_frac, 0 <= test_frac and train_frac + test_frac <= 1; "
            f"got train_frac={train_frac}, test_frac={test_frac}"
        )
    data = list(records)
    if seed is not None:
        random.Random(seed).shuffle(data)
    train_portion, test_portion, _ = split_counts(len(data), train_frac, test_frac)
    train = data[:train_portion]
    test = data[train_portion:train_portion + test_portion]
    val = data[train_portion + test_portion:]
    return Split(train, val, test)


def split_counts(n: int, train_frac: float = 0.85, test_frac: float = 0.10) -> tuple[int, int, int]:
    """Train, test and validation sizes of ``n`` records as ``split_instructions`` cuts them."""
    train, test = int(n * train_frac), int(n * test_frac)
    return train, test, n - train - test


def split_warnings(n: int, batch_size: int = 8) -> list[str]:
    """Why ``n`` records make a poor dataset for the book's split (85 % train, 10 % test, 5 % validation).

    One sentence per problem, naming the counts; [] when there is none. Training
    needs one full batch of training records and at least one test record (the
    Evaluate tab's); validation, the rest after two round-downs, always gets one.
    """
    train, test, _ = split_counts(n)
    warnings = []
    enough = next(m for m in itertools.count(n + 1) if split_counts(m)[0] >= batch_size and split_counts(m)[1])
    if train < batch_size:
        warnings.append(f"Only {train} of the {n:,} records go to training (85 %): fewer than one batch of {batch_size}, "
                        "so training cannot start.")
    if test == 0:
        warnings.append(f"No test records (10 % of {n:,}): training cannot start, and the Evaluate tab would have "
                        "nothing to score.")
    if warnings:
        smaller = f", or a batch size of {train} or less" if train and test else ""
        warnings[-1] += f" Use at least {enough} records{smaller}."
    return warnings
