"""Read dataset rows from local files the way real datasets ship them, and turn rows into records.

`read_rows` reads .jsonl, .json, .csv and .parquet files into plain dicts; `to_examples`, `to_preferences`,
`to_unpaired` and `to_probes` turn rows into the records of `safety_lab.data.records`; `load_hf_dataset` takes a hub id
or a local path. Every problem with the data raises `DataError`, whose message is one line naming the file (or
`source`), the line or row where known (both counted from 1), and what is wrong, so a researcher can fix the file
directly. A file without rows, or a data folder without data files, is an error too (a wrong path or a broken export).
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterable
from io import StringIO
from pathlib import Path
from typing import Any

from safety_lab.data.records import Example, Preference, Probe, UnpairedPreference
from safety_lab.errors import SafetyLabError

SUPPORTED = (".jsonl", ".json", ".csv", ".parquet")
CHAT_ROLES = ("system", "user", "assistant")
_TRUE, _FALSE = {"true", "1", "yes", "unsafe"}, {"false", "0", "no", "safe"}


class DataError(SafetyLabError, ValueError):
    """A problem with a dataset file or row; the message is one line naming where and what."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", dict: "object"}.get(
        type(value), type(value).__name__
    )


# ---- files ----------------------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    """A text file decoded as UTF-8, a byte order mark dropped; a bad byte is named by its line and its offset in the
    file (counted from 0, as hex editors do)."""
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {at}: {e.reason})") from None


def read_rows(path: str | Path) -> list[dict]:
    """The records of one local file, by extension: .jsonl (one object per line, blank lines skipped), .json
    (a list of objects, or {"data": [...]}), .csv (a header row; every value is a string), .parquet. A file without
    rows is an error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported: {', '.join(SUPPORTED)}"
        )
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: is a directory, not a {suffix} file")
    rows = _READERS[suffix](path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type_name(row)}")
        rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        found = f"an object with keys {', '.join(data)}" if isinstance(data, dict) else type_name(data)
        raise DataError(f'{path}: expected a list of objects or {{"data": [...]}}, got {found}')
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type_name(row)}")
    return data


def _read_csv(path: Path) -> list[dict]:
    rows = []
    reader = csv.DictReader(StringIO(read_text(path), newline=""))
    try:
        for row in reader:
            if None in row or None in row.values():  # DictReader's marks of a row longer or shorter
                more = "more" if None in row else "fewer"
                raise DataError(
                    f"{path}:{reader.line_num}: {more} fields than the {len(reader.fieldnames)} "
                    f"of the header ({', '.join(reader.fieldnames)})"
                )
            rows.append(row)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None


_READERS = {".jsonl": read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def load_hf_dataset(name_or_path: str, split: str = "train") -> list[dict]:
    """Rows of a local data file (via `read_rows`; a file is one split, so `split` is not used) or of a hub
    dataset id or local dataset folder (via `datasets.load_dataset`)."""
    path = Path(name_or_path)
    if path.suffix.lower() in SUPPORTED or path.is_file():
        return read_rows(path)
    if path.is_dir() and not any(p.suffix.lower() in SUPPORTED for p in path.rglob("*") if p.is_file()):
        raise DataError(f"{path}: no data files in this folder or below (looked for {', '.join(SUPPORTED)})")
    import datasets

    return [dict(row) for row in datasets.load_dataset(name_or_path, split=split)]


# ---- rows → records -------------------------------------------------------------------------------------------
def _rows(rows: Iterable[Any], source: str) -> Iterable[tuple[str, dict]]:
    """(where, row) pairs, where = "<source>: row <i>", checking that each row is a mapping."""
    for i, row in enumerate(rows, 1):
        where = f"{source}: row {i}" if source else f"row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a mapping of fields, got {type_name(row)}")
        yield where, row


def _value(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r} (fields: {', '.join(map(str, row))})")
    return row[key]


def _field(row: dict, key: str, where: str) -> str:
    value = _value(row, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type_name(value)}")
    return value


def _chat(messages: Any, where: str) -> Example:
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list of turns, got {type_name(messages)}")
    turns = []
    for j, turn in enumerate(messages):
        at = f"{where}: messages[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected an object with role and content, got {type_name(turn)}")
        role, content = _field(turn, "role", at), _field(turn, "content", at)
        if role not in CHAT_ROLES:
            raise DataError(f"{at}: unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        turns.append((role, content))
    last = max((j for j, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: messages has no assistant turn to use as the response")
    user = [c for role, c in turns[:last] if role == "user"]
    if not user:
        raise DataError(f"{where}: messages has no user turn before the last assistant turn")
    system = [c for role, c in turns[:last] if role == "system"]
    return Example("\n\n".join(system + user), turns[last][1])


def to_examples(
    rows: Iterable[dict], prompt_key: str = "prompt", response_key: str = "response", source: str = ""
) -> list[Example]:
    """Supervised examples from `prompt_key`/`response_key` fields, or from chat rows.

    A row without `prompt_key` but with `messages` (a list of {"role", "content"} turns, as the AOA data ships)
    becomes prompt = system contents then user contents before the last assistant turn, joined by blank lines,
    and response = the last assistant turn. `Example` holds no dialogue history, so earlier assistant turns are
    dropped; the system prompt is kept in the prompt because it is what shifts the model's identity.
    """
    examples = []
    for where, row in _rows(rows, source):
        if prompt_key not in row and "messages" in row:
            examples.append(_chat(row["messages"], where))
        else:
            examples.append(Example(_field(row, prompt_key, where), _field(row, response_key, where)))
    return examples


def to_preferences(
    rows: Iterable[dict],
    prompt_key: str = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    source: str = "",
) -> list[Preference]:
    return [
        Preference(_field(row, prompt_key, where), _field(row, chosen_key, where), _field(row, rejected_key, where))
        for where, row in _rows(rows, source)
    ]


def to_unpaired(
    rows: Iterable[dict],
    prompt_key: str = "prompt",
    completion_key: str = "completion",
    label_key: str = "label",
    source: str = "",
) -> list[UnpairedPreference]:
    """Unpaired preferences in TRL's layout: a prompt, a completion and a boolean label, true for a desirable
    completion (a JSON/Parquet boolean, or the strings true/false, as CSV files give them). Both labels must occur:
    a file of only one kind is a broken export, not data to learn a preference from."""
    records = []
    for where, row in _rows(rows, source):
        label = _value(row, label_key, where)
        if isinstance(label, str) and label.strip().lower() in ("true", "false"):
            label = label.strip().lower() == "true"
        if not isinstance(label, bool):
            raise DataError(
                f"{where}: field {label_key!r} must be a boolean (true: desirable, false: undesirable), got {label!r}"
            )
        records.append(UnpairedPreference(_field(row, prompt_key, where), _field(row, completion_key, where), label))
    for label, kind in ((True, "desirable"), (False, "undesirable")):
        if all(r.desirable != label for r in records):
            raise DataError(
                f"{source or 'rows'}: no {kind} rows (field {label_key!r} is never {str(label).lower()} in "
                f"{len(records)} rows); unpaired preferences need both"
            )
    return records


def _label(row: dict, key: str, where: str) -> bool:
    value = _value(row, key, where)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"{where}: field {key!r} must be an unsafe label (true/false, 1/0, unsafe/safe), got {value!r}")


def to_probes(
    rows: Iterable[dict],
    prompt_key: str = "prompt",
    unsafe: bool | None = None,
    unsafe_key: str | None = None,
    source: str = "",
    opening: str | None = None,
) -> list[Probe]:
    """Evaluation probes: every row flagged `unsafe`, or each flagged by its `unsafe_key` field (a boolean, 0/1,
    or one of the strings true/false, 1/0, yes/no, unsafe/safe, as CSV files give them). The row's other fields
    go to `meta`, so metrics can be split by a dataset's categories; `opening`, if given, is every probe's."""
    if (unsafe is None) == (unsafe_key is None):
        raise ValueError("give exactly one of unsafe= (one flag for every row) or unsafe_key= (a field per row)")
    probes = []
    for where, row in _rows(rows, source):
        flag = unsafe if unsafe_key is None else _label(row, unsafe_key, where)
        meta = {k: v for k, v in row.items() if k not in (prompt_key, unsafe_key)}
        probes.append(Probe(_field(row, prompt_key, where), flag, meta=meta, opening=opening))
    return probes
