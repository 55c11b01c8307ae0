"""The content-addressed artifact store: recipe hashing, build-once reuse, manifests, atomicity, concurrency.

These are the guarantees a λ sweep relies on (DESIGN.md §3): the same recipe always names the same folder, a
recipe is built once and reused after, a crashed build leaves nothing that looks like an entry, and two processes
that need the same recipe at the same time build it once between them.
"""
from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from safety_lab.artifacts import MANIFEST, ArtifactStore, recipe_hash, write_json_atomic

RECIPE = {"model": {"hidden_size": 96, "num_layers": 3}, "lr": 3e-3, "seed": 0, "views": ["a", "b"]}


def test_recipe_hash_is_stable_and_order_independent():
    h = recipe_hash(RECIPE)
    assert len(h) == 16 and int(h, 16) >= 0
    reordered = {"views": ["a", "b"], "seed": 0, "lr": 3e-3, "model": {"num_layers": 3, "hidden_size": 96}}
    assert recipe_hash(reordered) == h
    assert recipe_hash(json.loads(json.dumps(RECIPE))) == h  # survives a JSON round trip (manifests)
    # a literal of the canonical form pins the hash across processes and releases (no Python hash() salt)
    assert h == recipe_hash({"lr": 0.003, "model": {"hidden_size": 96, "num_layers": 3}, "seed": 0,
                             "views": ["a", "b"]})


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"lr": 3e-4}, {"model": {"hidden_size": 96, "num_layers": 4}}, {"views": ["b", "a"]},
])
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
    procs = [ctx.Process(target=_slow_build_worker, args=(str(tmp_path / "store"), str(counter), barrier, queue))
             for _ in range(2)]
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
