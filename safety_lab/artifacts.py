"""Content-addressed store of trained things (base models, adapters, masks), named by their recipe.

`store.get_or_build(kind, recipe, build)` returns `<root>/<kind>/<hash>` where the hash covers the recipe (the
resolved config that produces the artifact, including the hashes of its inputs). When the entry is missing it is
built into a temporary folder, given a `manifest.json` (recipe, package versions, the build's own metrics) and
renamed into place, so a crash never leaves a half-written entry; a file lock makes concurrent processes that need
the same recipe build it once. Training checkpoints of an entry live beside it (`.ckpt-<hash>`) until it is
published, so re-running a crashed command resumes. In a multi-process run only rank 0 publishes (distributed.py).

The manifest lists every file with its size and sha256. Reuse checks them (sizes every time, content once per
process); a damaged entry is moved to `<root>/.quarantine` with a warning and rebuilt. Entries published before
manifests listed files get the list on first use. A build whose safetensors hold a NaN or inf is not published.
`python -m safety_lab.store verify|gc` checks and cleans a whole store (store.py).
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
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from filelock import FileLock

from safety_lab.distributed import is_rank_zero
from safety_lab.errors import SafetyLabError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
QUARANTINE = ".quarantine"
TRACKED_PACKAGES = ("safety_lab", "torch", "transformers", "peft", "lightning")
_VERIFIED: set[Path] = set()  # entries whose content this process has checked against their manifest


class CorruptEntry(Exception):
    """What is wrong with a published entry, in a few words."""


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file in `folder` but its manifest."""
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p != folder / MANIFEST
    }


def _refuse_non_finite(kind: str, name: str, folder: Path) -> None:
    """Raises if a floating tensor in `folder`'s safetensors holds a NaN or inf: every later run would reuse it."""
    import torch  # heavy: imported at the first publish, not when the entry point (which imports us) starts
    from safetensors import safe_open

    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            for key in tensors.keys():
                tensor = tensors.get_tensor(key)
                if tensor.is_floating_point() and (bad := int((~torch.isfinite(tensor)).sum())):
                    raise SafetyLabError(
                        f"refusing to publish {kind} {name}: {key} in {file.relative_to(folder)} "
                        f"has {bad} non-finite values"
                    )


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "is a file, not a folder" if self.root.is_file() else f"cannot be created ({e.strerror})"
            raise SafetyLabError(f"the store {self.root} {why}: set paths.artifacts= or SAFETY_LAB_STORE") from e
        self._building: list[Path] = []  # entries under construction, innermost last

    def path(self, kind: str, recipe: dict[str, Any]) -> Path:
        return self.root / kind / recipe_hash(recipe)

    def manifest(self, entry: Path) -> dict[str, Any]:
        return json.loads((entry / MANIFEST).read_text())

    def lock(self, entry: Path, timeout: float = -1) -> FileLock:
        return FileLock(f"{entry}.lock", timeout=timeout)

    def check(self, entry: Path, hashes: bool = True) -> bool:
        """Whether the manifest of published `entry` lists its files (False: published before manifests did, so
        nothing to check); raises CorruptEntry naming the first listed file that is missing, or differs in size or
        (with `hashes`) in content, or if the manifest is unreadable."""
        try:
            listed = self.manifest(entry).get("files")
            records = {name: (int(r["bytes"]), r["sha256"]) for name, r in (listed or {}).items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise CorruptEntry(f"{MANIFEST} is unreadable or malformed ({type(e).__name__}: {e})") from e
        for name, (size, sha256) in records.items():
            path = entry / name
            if not path.is_file():
                raise CorruptEntry(f"{name} is missing")
            if (actual := path.stat().st_size) != size:
                raise CorruptEntry(f"{name}: {actual} bytes, manifest says {size}")
            if hashes and _sha256(path) != sha256:
                raise CorruptEntry(f"{name}: its sha256 differs from the manifest's")
        return listed is not None

    def quarantine(self, entry: Path) -> Path:
        """Moves `entry` (whose lock the caller holds) to `<root>/.quarantine/<kind>-<hash>-<time>`; returns that."""
        aside = self.root / QUARANTINE / f"{entry.parent.name}-{entry.name}-{datetime.now():%Y%m%d-%H%M%S.%f}"
        aside.parent.mkdir(exist_ok=True)
        os.replace(entry, aside)
        _VERIFIED.discard(entry)
        return aside

    def _published(self, entry: Path) -> bool:
        """Whether `entry` is published (raises CorruptEntry if it is damaged). Its files are checked against its
        manifest, sizes every time and content the first time in this process; an entry published before manifests
        listed files gets the list now and is trusted from then on."""
        if not (entry / MANIFEST).exists():
            return False
        if not self.check(entry, hashes=entry not in _VERIFIED):
            try:
                write_json_atomic(entry / MANIFEST, {**self.manifest(entry), "files": file_records(entry)})
            except OSError as e:  # a read-only shared store: checked again next time
                log.warning("store: could not record the files of %s in its manifest (%s)", entry, e)
        _VERIFIED.add(entry)
        return True

    def checkpoints(self) -> Path | None:
        """Where training checkpoints of the entry being built go: beside it, named by the same recipe hash, so
        re-running a crashed command finds them and resumes (removed once the entry is published)."""
        return self._building[-1].parent / f".ckpt-{self._building[-1].name}" if self._building else None

    def get_or_build(self, kind: str, recipe: dict[str, Any], build: Callable[[Path], dict | None]) -> Path:
        """The entry for `recipe`, built by `build(tmp_folder) -> metrics` on first use."""
        final = self.path(kind, recipe)
        with suppress(CorruptEntry):  # a damaged entry is quarantined and rebuilt under its lock (_build)
            if self._published(final):
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
        with self.lock(final):
            if not (final / MANIFEST).exists():
                raise SafetyLabError(f"rank 0 did not publish {kind} {final.name} in {final.parent}")
        return final

    def _build(self, kind: str, recipe: dict[str, Any], build: Callable[[Path], dict | None], final: Path) -> Path:
        with self.lock(final):
            try:
                if self._published(final):  # another process built (or healed) it while we waited
                    log.info("reusing %s %s from the store (built concurrently)", kind, final.name)
                    return final
            except CorruptEntry as e:
                aside = self.quarantine(final)
                log.warning("store: %s %s is corrupt (%s); quarantined to %s, rebuilding", kind, final.name, e, aside)
            for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed builder (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            log.info("training %s %s (not in the store yet)", kind, final.name)
            start = time.time()
            try:
                metrics = build(tmp) or {}
                _refuse_non_finite(kind, final.name, tmp)
                import torch  # loaded by the build; threads are recorded, not part of the recipe

                write_json_atomic(
                    tmp / MANIFEST,
                    {
                        "kind": kind,
                        "hash": final.name,
                        "recipe": recipe,
                        "metrics": metrics,
                        "seconds": round(time.time() - start, 1),
                        "versions": _versions(),
                        "threads": torch.get_num_threads(),
                        "files": file_records(tmp),
                    },
                )
                if final.exists():  # a stale, manifest-less folder (a crash of an older layout): replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _VERIFIED.add(final)
                shutil.rmtree(self.checkpoints(), ignore_errors=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final
