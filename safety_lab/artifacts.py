"""Content-addressed store of trained things (base models, adapters, masks), named by their recipe.

`store.get_or_build(kind, recipe, build)` returns `<root>/<kind>/<hash>` where the hash covers the recipe (the
resolved config that produces the artifact, including the hashes of its inputs). When the entry is missing it is
built into a temporary folder, given a `manifest.json` (recipe, package versions, the build's own metrics) and
renamed into place, so a crash never leaves a half-written entry; a file lock makes concurrent processes that need
the same recipe build it once. Training checkpoints of an entry live beside it (`.ckpt-<hash>`) until it is
published, so re-running a crashed command resumes. In a multi-process run only rank 0 publishes (distributed.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from safety_lab.distributed import is_rank_zero
from safety_lab.errors import SafetyLabError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
TRACKED_PACKAGES = ("safety_lab", "torch", "transformers", "peft", "lightning")


def recipe_hash(recipe: dict[str, Any]) -> str:
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    found = {}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self._building: list[Path] = []  # entries under construction, innermost last

    def path(self, kind: str, recipe: dict[str, Any]) -> Path:
        return self.root / kind / recipe_hash(recipe)

    def manifest(self, entry: Path) -> dict[str, Any]:
        return json.loads((entry / MANIFEST).read_text())

    def checkpoints(self) -> Path | None:
        """Where training checkpoints of the entry being built go: beside it, named by the same recipe hash, so
        re-running a crashed command finds them and resumes (removed once the entry is published)."""
        return self._building[-1].parent / f".ckpt-{self._building[-1].name}" if self._building else None

    def get_or_build(self, kind: str, recipe: dict[str, Any], build: Callable[[Path], dict | None]) -> Path:
        """The entry for `recipe`, built by `build(tmp_folder) -> metrics` on first use."""
        final = self.path(kind, recipe)
        if (final / MANIFEST).exists():
            log.info("reusing %s %s from the store", kind, final.name)
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        self._building.append(final)
        try:
            return self._build(kind, recipe, build, final) if is_rank_zero() else self._follow(kind, build, final)
        finally:
            self._building.pop()

    def _follow(self, kind: str, build: Callable[[Path], dict | None], final: Path) -> Path:
        """Ranks > 0 of a multi-process run train with rank 0 (`build` is collective) into a scratch folder, then wait
        for rank 0, which holds the lock until its entry is published, and use that entry."""
        with tempfile.TemporaryDirectory(prefix=f".rank-{final.name}-", dir=final.parent) as scratch:
            build(Path(scratch))
        with FileLock(str(final) + ".lock"):
            if not (final / MANIFEST).exists():
                raise SafetyLabError(f"rank 0 did not publish {kind} {final.name} in {final.parent}")
        return final

    def _build(self, kind: str, recipe: dict[str, Any], build: Callable[[Path], dict | None], final: Path) -> Path:
        with FileLock(str(final) + ".lock"):
            if (final / MANIFEST).exists():  # another process built it while we waited
                log.info("reusing %s %s from the store (built concurrently)", kind, final.name)
                return final
            for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed builder (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            log.info("training %s %s (not in the store yet)", kind, final.name)
            start = time.time()
            try:
                metrics = build(tmp) or {}
                write_json_atomic(tmp / MANIFEST, {"kind": kind, "hash": final.name, "recipe": recipe,
                                                   "metrics": metrics, "seconds": round(time.time() - start, 1),
                                                   "versions": _versions()})
                if final.exists():  # a stale, manifest-less folder (a crash of an older layout): replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                shutil.rmtree(self.checkpoints(), ignore_errors=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final
