"""The content-addressed artifact store: recipe hashing, build-once reuse, manifests, atomicity, concurrency,
verification and healing.

These are the guarantees a λ sweep relies on (docs/architecture.md, "The store contract"): the same recipe always
names the same folder, a recipe is built once and reused after, a crashed build leaves nothing that looks like an
entry, two processes that need the same recipe at the same time build it once between them, a damaged entry is
quarantined and rebuilt rather than loaded, and nothing non-finite is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from safety_lab import artifacts
from safety_lab.artifacts import MANIFEST, QUARANTINE, ArtifactStore, recipe_hash, write_json_atomic
from safety_lab.errors import SafetyLabError

RECIPE = {"model": {"hidden_size": 96, "num_layers": 3}, "lr": 3e-3, "seed": 0, "views": ["a", "b"]}


def test_recipe_hash_is_stable_and_order_independent():
    h = recipe_hash(RECIPE)
    assert len(h) == 16 and int(h, 16) >= 0
    reordered = {"views": ["a", "b"], "seed": 0, "lr": 3e-3, "model": {"num_layers": 3, "hidden_size": 96}}
    assert recipe_hash(reordered) == h
    assert recipe_hash(json.loads(json.dumps(RECIPE))) == h  # survives a JSON round trip (manifests)
    # a literal of the canonical form pins the hash across processes and releases (no Python hash() salt)
    assert h == recipe_hash(
        {"lr": 0.003, "model": {"hidden_size": 96, "num_layers": 3}, "seed": 0, "views": ["a", "b"]}
    )


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"lr": 3e-4},
        {"model": {"hidden_size": 96, "num_layers": 4}},
        {"views": ["b", "a"]},
    ],
)
def test_recipe_hash_changes_with_any_value(change):
    assert recipe_hash({**RECIPE, **change}) != recipe_hash(RECIPE)


def test_get_or_build_builds_once_then_reuses(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    calls = []

    def build(folder: Path) -> dict:
        calls.append(folder)
        (folder / "weights.txt").write_text("42")
        return {"train/loss": 0.5}

    first = store.get_or_build("adapter", RECIPE, build)
    second = store.get_or_build("adapter", dict(reversed(list(RECIPE.items()))), build)
    assert len(calls) == 1
    assert first == second == tmp_path / "store" / "adapter" / recipe_hash(RECIPE)
    assert calls[0] != first and calls[0].parent == first.parent  # built elsewhere, then renamed into place
    assert (first / "weights.txt").read_text() == "42"

    other = store.get_or_build("adapter", {**RECIPE, "seed": 1}, build)
    assert len(calls) == 2 and other != first
    assert store.get_or_build("mask", RECIPE, build).parent.name == "mask" and len(calls) == 3


def test_manifest_records_recipe_metrics_and_versions(tmp_path):
    store = ArtifactStore(tmp_path)
    entry = store.get_or_build("base", RECIPE, lambda folder: {"train/loss": 1.25})
    manifest = store.manifest(entry)
    assert manifest["kind"] == "base" and manifest["hash"] == entry.name == recipe_hash(RECIPE)
    assert manifest["recipe"] == RECIPE
    assert manifest["metrics"] == {"train/loss": 1.25}
    assert {"torch", "transformers", "peft", "lightning"} <= set(manifest["versions"])
    assert manifest["seconds"] >= 0
    # a build that returns nothing still gets a manifest
    entry = store.get_or_build("base", {"other": 1}, lambda folder: None)
    assert store.manifest(entry)["metrics"] == {}


def test_failed_build_leaves_nothing_and_propagates(tmp_path):
    store = ArtifactStore(tmp_path)

    def broken(folder: Path) -> dict:
        (folder / "half-written.safetensors").write_bytes(b"\0" * 100)
        raise RuntimeError("out of memory at step 3")

    with pytest.raises(RuntimeError, match="out of memory at step 3"):
        store.get_or_build("adapter", RECIPE, broken)
    leftovers = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert leftovers in ([], [recipe_hash(RECIPE) + ".lock"])
    # the next attempt builds it properly
    entry = store.get_or_build("adapter", RECIPE, lambda folder: {"ok": 1.0})
    assert store.manifest(entry)["metrics"] == {"ok": 1.0}


def test_stale_folder_without_manifest_is_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    stale = store.path("base", RECIPE)
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a crashed older layout")

    def build(folder: Path) -> None:
        (folder / "fresh").write_text("new")

    entry = store.get_or_build("base", RECIPE, build)
    assert entry == stale and sorted(p.name for p in entry.iterdir()) == ["fresh", MANIFEST]


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"harmful/compliance_rate": 0.25, "path": tmp_path})
    write_json_atomic(target, {"harmful/compliance_rate": 0.5})  # overwrite in place
    assert json.loads(target.read_text()) == {"harmful/compliance_rate": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def _slow_build_worker(root: str, counter: str, barrier, queue) -> None:
    """Runs in a separate process: meet the other worker at the barrier, then ask for the same recipe."""

    def build(folder: Path) -> dict:
        start = time.time()
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(1.0)
        (folder / "weights.txt").write_text("done")
        return {"start": start, "end": time.time()}

    barrier.wait(timeout=60)
    called = time.time()
    queue.put((called, str(ArtifactStore(root).get_or_build("base", RECIPE, build))))


def test_concurrent_processes_build_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    counter = tmp_path / "builds.txt"
    procs = [
        ctx.Process(target=_slow_build_worker, args=(str(tmp_path / "store"), str(counter), barrier, queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert counter.read_text().splitlines() == ["built"]
    paths = [path for _, path in results]
    assert paths[0] == paths[1] == str(tmp_path / "store" / "base" / recipe_hash(RECIPE))
    assert (Path(paths[0]) / "weights.txt").read_text() == "done"
    # both asked while the build was running: the second really waited on the lock rather than arriving late
    build = ArtifactStore(tmp_path / "store").manifest(Path(paths[0]))["metrics"]
    assert all(called < build["end"] for called, _ in results)
    assert not list((tmp_path / "store" / "base").glob(".tmp-*"))


# ---- verification and healing -----------------------------------------------------------------------------------

WEIGHTS = bytes(range(256)) * 4  # 1024 bytes


def counted_build(calls: list) -> Callable[[Path], dict]:
    def build(folder: Path) -> dict:
        calls.append(folder)
        (folder / "weights.bin").write_bytes(WEIGHTS)
        (folder / "sub").mkdir()
        (folder / "sub" / "config.json").write_text("{}")
        return {"loss": 0.5}

    return build


def store_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == artifacts.__name__]


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    store = ArtifactStore(tmp_path)
    entry = store.get_or_build("adapter", RECIPE, counted_build([]))
    assert store.manifest(entry)["files"] == {
        "sub/config.json": {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        "weights.bin": {"bytes": 1024, "sha256": hashlib.sha256(WEIGHTS).hexdigest()},
    }


def test_truncated_entry_is_quarantined_once_and_rebuilt(tmp_path, caplog):
    store, calls = ArtifactStore(tmp_path), []
    entry = store.get_or_build("adapter", RECIPE, counted_build(calls))
    with open(entry / "weights.bin", "r+b") as f:
        f.truncate(1000)
    caplog.set_level(logging.INFO, logger=artifacts.__name__)
    assert store.get_or_build("adapter", RECIPE, counted_build(calls)) == entry
    assert len(calls) == 2 and (entry / "weights.bin").read_bytes() == WEIGHTS
    [aside] = (tmp_path / QUARANTINE).iterdir()
    assert aside.name.startswith(f"adapter-{entry.name}-") and (aside / "weights.bin").stat().st_size == 1000
    assert store_warnings(caplog) == [
        f"store: adapter {entry.name} is corrupt (weights.bin: 1000 bytes, manifest "
        f"says 1024); quarantined to {aside}, rebuilding"
    ]
    assert store.get_or_build("adapter", RECIPE, counted_build(calls)) == entry and len(calls) == 2


def test_flipped_byte_is_caught_by_the_hash_the_first_time_a_process_uses_the_entry(tmp_path, monkeypatch, caplog):
    store, calls = ArtifactStore(tmp_path), []
    entry = store.get_or_build("adapter", RECIPE, counted_build(calls))
    flipped = bytearray(WEIGHTS)
    flipped[500] ^= 0xFF
    (entry / "weights.bin").write_bytes(flipped)
    store.get_or_build("adapter", RECIPE, counted_build(calls))  # this process hashed it at publish: sizes only
    assert len(calls) == 1
    monkeypatch.setattr(artifacts, "_VERIFIED", set())  # as in a new process
    assert store.get_or_build("adapter", RECIPE, counted_build(calls)) == entry
    assert len(calls) == 2 and (entry / "weights.bin").read_bytes() == WEIGHTS
    [warning] = store_warnings(caplog)
    assert "(weights.bin: its sha256 differs from the manifest's); quarantined to" in warning


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda entry: (entry / "sub" / "config.json").unlink(), "sub/config.json is missing"),
        (
            lambda entry: (entry / MANIFEST).write_text("{not json"),
            "manifest.json is unreadable or malformed (JSONDecodeError: Expecting property name",
        ),
        (
            lambda entry: (entry / MANIFEST).write_text('{"files": {"weights.bin": {"bytes": 1024}}}'),
            "manifest.json is unreadable or malformed (KeyError: 'sha256')",
        ),
    ],
)
def test_missing_file_or_malformed_manifest_is_quarantined_and_rebuilt(tmp_path, caplog, damage, why):
    store, calls = ArtifactStore(tmp_path), []
    entry = store.get_or_build("adapter", RECIPE, counted_build(calls))
    damage(entry)
    store.get_or_build("adapter", RECIPE, counted_build(calls))
    assert len(calls) == 2 and store.manifest(entry)["files"]["weights.bin"]["bytes"] == 1024
    [warning] = store_warnings(caplog)
    assert f"adapter {entry.name} is corrupt ({why}" in warning


def test_legacy_entry_is_reused_and_gains_its_file_list(tmp_path, monkeypatch):
    store, calls = ArtifactStore(tmp_path), []
    entry = store.get_or_build("base", RECIPE, counted_build(calls))
    legacy = {k: v for k, v in store.manifest(entry).items() if k != "files"}  # as older code published it
    (entry / MANIFEST).write_text(json.dumps(legacy))
    monkeypatch.setattr(artifacts, "_VERIFIED", set())  # as in a new process
    assert store.check(entry) is False
    assert store.get_or_build("base", RECIPE, counted_build(calls)) == entry and len(calls) == 1
    manifest = store.manifest(entry)
    assert manifest == {**legacy, "files": artifacts.file_records(entry)} and store.check(entry) is True
    (entry / "weights.bin").write_bytes(b"short")  # trusted from then on: checked like any other entry
    store.get_or_build("base", RECIPE, counted_build(calls))
    assert len(calls) == 2


@pytest.mark.parametrize(
    "root, why", [("a_file", "is a file, not a folder"), ("a_file/store", "cannot be created (Not a directory)")]
)
def test_unusable_store_root_is_one_error_line(tmp_path, root, why):
    (tmp_path / "a_file").write_text("not a store")
    with pytest.raises(SafetyLabError) as error:
        ArtifactStore(tmp_path / root)
    assert str(error.value) == f"the store {tmp_path / root} {why}: set paths.artifacts= or SAFETY_LAB_STORE"


def test_non_finite_tensor_is_refused_and_nothing_is_published(tmp_path):
    store = ArtifactStore(tmp_path)
    lora = torch.zeros(4, 8)
    lora[0, :3], lora[1, 0] = float("nan"), float("inf")

    def build(folder: Path) -> dict:
        save_file(
            {"ids": torch.arange(3), "norm.weight": torch.ones(4, dtype=torch.bfloat16)}, str(folder / "a.safetensors")
        )
        save_file({"base_model.model.layers.0.lora_A.weight": lora}, str(folder / "adapter_model.safetensors"))
        return {}

    with pytest.raises(SafetyLabError) as error:
        store.get_or_build("adapter", RECIPE, build)
    assert str(error.value) == (
        f"refusing to publish adapter {recipe_hash(RECIPE)}: base_model.model.layers.0.lora_A"
        f".weight in adapter_model.safetensors has 4 non-finite values"
    )
    assert [p.name for p in (tmp_path / "adapter").iterdir()] == [f"{recipe_hash(RECIPE)}.lock"]
