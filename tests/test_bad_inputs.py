"""Bad inputs: a cut-short or malicious checkpoint or weights file, pickle-only weights, an empty data file or folder,
a file that is not UTF-8. Each is one line naming the file and the cause, found before anything loads it (a
malicious pickle never runs), so nothing reaches the store; only the store's own corrupt `last.ckpt` is set aside.
Bad settings on the command line (a nested group's unknown option, a value of the wrong type, an on-policy
dataset's unknown argument, an analysis's unknown projection) are one line too, before anything loads."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer
from helpers import fit_config, run_safety_lab
from omegaconf import OmegaConf
from safetensors.torch import load_file

from safety_lab.checkpoints import resume_path
from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.io import load_hf_dataset, read_rows
from safety_lab.data.records import Example
from safety_lab.errors import SafetyLabError
from safety_lab.methods.sft import SFTModule
from safety_lab.models.factory import load_pretrained
from safety_lab.stages import Stages

NOT_COVERED = (
    "cannot be loaded safely: truncated or not safetensors "
    "(Error while deserializing header: incomplete metadata, file not fully covered)"
)
TRUNCATED = "cannot be loaded safely: truncated or not a torch file"
REFUSED = (
    f"cannot be loaded safely: it pickles {os.system.__module__}.system, which torch.load(weights_only=True) refuses"
)


class Exploit:
    """Pickles as a call of os.system that would create `marker`, were it ever unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def message_of(call, *args, **kwargs) -> str:
    with pytest.raises(SafetyLabError) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


# ---- training checkpoints -------------------------------------------------------------------------------------
def bad_checkpoint(path, kind: str):
    """A checkpoint file cut in half, of garbage, empty, or carrying an exploit (marker: `<path>.ran`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "malicious":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "loops": Exploit(f"{path}.ran")}, path)
        return path
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    whole = path.read_bytes()
    path.write_bytes({"truncated": whole[: len(whole) // 2], "garbage": b"not a checkpoint", "empty": b""}[kind])
    return path


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "malicious"])
def test_an_explicit_checkpoint_that_cannot_be_loaded_safely_is_an_error(tmp_path, kind):
    path = bad_checkpoint(tmp_path / "my.ckpt", kind)
    cause = REFUSED if kind == "malicious" else TRUNCATED
    assert message_of(resume_path, tmp_path / "last.ckpt", str(path)).startswith(f"{path}: {cause}")
    assert not (tmp_path / "my.ckpt.ran").exists() and path.exists()


def test_a_missing_explicit_checkpoint_is_an_error(tmp_path):
    assert (
        message_of(resume_path, tmp_path / "last.ckpt", str(tmp_path / "no.ckpt"))
        == f"ckpt_path: {tmp_path / 'no.ckpt'} does not exist"
    )


@pytest.mark.parametrize("kind", ["truncated", "malicious"])
def test_the_stores_own_unloadable_last_checkpoint_is_set_aside_with_a_warning(tmp_path, kind, caplog):
    last = bad_checkpoint(tmp_path / "last.ckpt", kind)
    with caplog.at_level(logging.WARNING, logger="safety_lab.checkpoints"):
        assert resume_path(last, "last") is None
    assert not last.exists() and (tmp_path / "last.ckpt.corrupt").exists()
    [record] = caplog.records
    cause = REFUSED if kind == "malicious" else TRUNCATED
    assert record.getMessage().startswith(f"{last}: {cause}")
    assert record.getMessage().endswith("; set aside as last.ckpt.corrupt, training from the start")
    assert not (tmp_path / "last.ckpt.ran").exists()


def test_a_sound_checkpoint_resumes(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "last.ckpt")
    assert resume_path(tmp_path / "last.ckpt", "last") == resume_path(tmp_path / "x", str(tmp_path / "last.ckpt"))
    assert resume_path(tmp_path / "none.ckpt", "last") is resume_path(tmp_path / "last.ckpt", None) is None


def fit_in_store(tmp_path, ckpt_path: str, seen: list):
    """One tiny training step inside a store build whose stage already has a corrupt last.ckpt."""
    tokenizer = build_tiny_tokenizer()
    cfg = OmegaConf.create(fit_config(tmp_path, checkpointing=True, ckpt_path=ckpt_path))
    stages = Stages(cfg)
    store = stages.store
    entry = store.path("adapter", {})
    checkpoints = entry.parent / f".ckpt-{entry.name}" / "sft"
    bad_checkpoint(checkpoints / "last.ckpt", "truncated")

    def build(folder):
        data = TokenizedExamples([Example("a b", "c d")] * 4, tokenizer, max_length=16)
        stages.fit("sft", SFTModule(build_tiny_llama(len(tokenizer)), lr=1e-2, warmup_ratio=0.0), data, 4, 1, 0)
        seen.extend(sorted(p.name for p in checkpoints.iterdir()))

    return store.get_or_build("adapter", {}, build), checkpoints


def test_a_fit_sets_a_corrupt_last_checkpoint_aside_and_trains_afresh(tmp_path):
    seen = []
    entry, checkpoints = fit_in_store(tmp_path, "last", seen)
    assert seen == ["last.ckpt", "last.ckpt.corrupt"]  # a fresh last.ckpt written beside the one set aside
    assert (entry / "manifest.json").exists() and not checkpoints.exists()  # removed once published


def test_a_fit_from_an_unloadable_explicit_checkpoint_fails_and_publishes_nothing(tmp_path):
    bad = bad_checkpoint(tmp_path / "mine.ckpt", "truncated")
    assert message_of(fit_in_store, tmp_path, str(bad), []).startswith(f"{bad}: {TRUNCATED}")
    store = tmp_path / "store" / "adapter"
    assert not list(store.rglob("manifest.json")) and not list(store.glob(".tmp-*"))


# ---- model folders --------------------------------------------------------------------------------------------
@pytest.fixture
def model_folder(tiny_hf_model, tmp_path):
    return shutil.copytree(tiny_hf_model, tmp_path / "model")


def pickle_only(folder, state: dict):
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def cut_short(folder):
    """The folder's model.safetensors without its last 100 bytes, as an interrupted download leaves it."""
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return weights


def test_truncated_safetensors_are_refused(model_folder):
    weights = cut_short(model_folder)
    assert message_of(load_pretrained, model_folder) == f"{weights}: {NOT_COVERED}"


def test_pickle_weights_need_allow_pickle(model_folder, tiny_hf_model):
    state = load_file(model_folder / "model.safetensors")
    pickle_only(model_folder, state)
    assert message_of(load_pretrained, model_folder) == (
        f"model.path: {model_folder} has only pickle weights (pytorch_model.bin), which may run code when loaded; "
        f"convert them to safetensors, or set model.allow_pickle=true if you trust them (loaded with torch's "
        f"weights_only)"
    )
    model, _ = load_pretrained(model_folder, allow_pickle=True)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_malicious_pickle_weights_never_run(model_folder, allow_pickle):
    weights = pickle_only(model_folder, {"model.embed_tokens.weight": Exploit(model_folder / "ran")})
    message = message_of(load_pretrained, model_folder, allow_pickle=allow_pickle)
    assert (
        message == f"{weights}: {REFUSED}"
        if allow_pickle
        else message.startswith(f"model.path: {model_folder} has only pickle weights")
    )
    assert not (model_folder / "ran").exists()


# ---- data files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, text",
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n\n"),
        ("e.json", "[]"),
        ("e.json", '{"data": []}'),
        ("e.csv", ""),
        ("e.csv", "prompt,response\n"),
    ],
)
def test_a_data_file_without_rows_is_an_error(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert message_of(read_rows, tmp_path / name) == f"{tmp_path / name}: no rows"


def test_an_empty_parquet_file_is_an_error(tmp_path):
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert message_of(read_rows, tmp_path / "e.parquet") == f"{tmp_path / 'e.parquet'}: no rows"


def test_a_data_folder_without_data_files_names_the_extensions_looked_for(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "README.md").write_text("rows elsewhere")
    (tmp_path / "sub" / "prompts.txt").write_text("a prompt")
    assert (
        message_of(load_hf_dataset, str(tmp_path))
        == f"{tmp_path}: no data files in this folder or below (looked for .jsonl, .json, .csv, .parquet)"
    )


def lines_of(name: str) -> list[str]:
    """500 rows of a data file in its format, one per line of 20-50 bytes; the file is "\n".join of them."""
    rows = [{"prompt": f"prompt number {i}", "response": "ok"} for i in range(500)]
    if name.endswith(".csv"):
        return ["prompt,response"] + [f"{r['prompt']},{r['response']}" for r in rows]
    if name.endswith(".jsonl"):
        return [json.dumps(r) for r in rows]
    return ["["] + [json.dumps(r) + "," for r in rows[:-1]] + [json.dumps(rows[-1]), "]"]


@pytest.mark.parametrize("name, bom", [("d.jsonl", b""), ("d.jsonl", b"\xef\xbb\xbf"), ("d.csv", b""), ("d.json", b"")])
def test_a_bad_byte_is_named_by_its_line_and_its_offset_in_the_file(tmp_path, name, bom):
    lines = [line.encode() for line in lines_of(name)]
    lines[400] = lines[400].replace(b"number", b"num\xffber")  # line 401
    data = bom + b"\n".join(lines) + b"\n"
    (tmp_path / name).write_bytes(data)
    offset = data.index(b"\xff")
    assert offset > 8192  # past text mode's first decode chunk, whose own offsets were reported before
    assert (
        message_of(read_rows, tmp_path / name)
        == f"{tmp_path / name}:401: not UTF-8 text (byte {offset}: invalid start byte)"
    )


# ---- through the command line: exit 2, one line, an untouched store ---------------------------------------------
def assert_refused(result, store, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result) == [f"error: {expected}"], result.stderr[-3000:]
    assert not store.exists() or not any(store.rglob("*"))


def test_cli_names_a_bad_byte_in_an_eval_file(tmp_path):
    bad = tmp_path / "probes.jsonl"
    bad.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    result = run_safety_lab(
        "+experiment=quickstart",
        "+debug=fast",
        f"hydra.run.dir={tmp_path}/run",
        f"+eval.suites.bad={{source: file, path: '{bad}', unsafe: true}}",
        store=tmp_path / "store",
        timeout=300,
    )
    offset = bad.read_bytes().index(b"\xe9")
    assert_refused(result, tmp_path / "store", f"{bad}:2: not UTF-8 text (byte {offset}: invalid continuation byte)")


def test_cli_refuses_a_model_folder_with_truncated_weights(tmp_path, model_folder):
    weights = cut_short(model_folder)
    result = run_safety_lab(
        "+experiment=quickstart",
        "+debug=fast",
        "model=hf",
        f"model.path={model_folder}",
        f"hydra.run.dir={tmp_path}/run",
        store=tmp_path / "store",
        timeout=300,
    )
    assert_refused(result, tmp_path / "store", f"{weights}: {NOT_COVERED}")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["+experiment=hft_grid", "attack=smollm2/p50"],
            "attack=smollm2/p50: no such option; conf/attack/smollm2/ has benign, none, p20, p5",
        ),
        (
            ["+experiment=mechanistic", "analysis.add_scale=abc"],
            "analysis.add_scale=abc: Value 'abc' of type 'str' could not be converted to Float",
        ),
        (
            ["+experiment=mechanistic", "analysis.energy=abc"],
            "analysis.energy=abc: Value 'abc' of type 'str' could not be converted to Float",
        ),
        (
            ["+experiment=mechanistic", "+debug=fast", "analysis.matrices=[gate_proj,lm_head]"],
            "analysis.matrices: 'lm_head' is not one of "
            "['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']",
        ),
        (
            ["+experiment=quickstart", "+debug=fast", "dataset=onpolicy_safety", "+dataset.args.harmful_fractoin=0.1"],
            "dataset.args.harmful_fractoin=0.1: no such argument; an on-policy dataset takes unsafe, safe, refusals, "
            "max_new_tokens, batch_size, judge, judge_args, policy",
        ),
        (  # the SmolLM2 p-mix attack, refused before its model is looked for
            ["+experiment=hft_grid_smollm2", "attack=smollm2/p20", "+attack.dataset.args.harmful_fractoin=0.1"],
            "attack.dataset.args.harmful_fractoin=0.1: no such argument; a view of args.pairs takes pairs, "
            "harmful_fraction",
        ),
        (
            ["+experiment=hft_grid_smollm2", "attack.dataset.view=harmful"],
            "attack.dataset.view=harmful, n=250: args.pairs takes view null or harmful_mix with an n",
        ),
    ],
)
def test_cli_refuses_a_bad_setting_in_one_line_before_anything_loads(tmp_path, overrides, expected):
    result = run_safety_lab(*overrides, f"hydra.run.dir={tmp_path}/run", store=tmp_path / "store", timeout=300)
    assert_refused(result, tmp_path / "store", expected)
    assert not (tmp_path / "run" / "metrics.json").exists()
