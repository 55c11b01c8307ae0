"""`python -m safety_lab.store verify|gc [--store PATH]`: check and clean a whole artifact store (artifacts.py).

A run checks an entry only when it reuses it; `verify` checks every entry now, with the store's own check, and prints
its kind, hash, size, age and status: `ok`, `legacy` (published before manifests listed files, so nothing to check;
its first reuse records them) or `corrupt (why)`. It exits 1 if any entry is corrupt; `--heal` also moves those to
`<store>/.quarantine`, so the next run rebuilds them. `gc` frees what no run needs: quarantined entries, build
folders of killed builds (`.tmp-*`, `.rank-*`), checkpoints of published entries (`.ckpt-*`) and lock files of
entries that do not exist, skipping whatever a running build holds the lock of; `--dry-run` only lists. The store
defaults to the framework's (conf/paths/default.yaml): $SAFETY_LAB_STORE, else `outputs/store` in $SAFETY_LAB_ROOT
or the current folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path

from filelock import Timeout

from safety_lab.artifacts import MANIFEST, QUARANTINE, ArtifactStore, CorruptEntry

BUILD_LEFTOVERS = (".tmp-", ".rank-", ".ckpt-")


def default_store() -> Path:
    root = os.environ.get("SAFETY_LAB_ROOT", os.getcwd())
    return Path(os.environ.get("SAFETY_LAB_STORE", Path(root) / "outputs" / "store"))


def _files(path: Path) -> list[os.stat_result]:
    return [path.stat()] if path.is_file() else [f.stat() for f in path.rglob("*") if f.is_file()]


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds // span:.0f}{unit}"
    return f"{seconds:.0f}s"


def verify(store: ArtifactStore, heal: bool) -> int:
    """Prints every entry and its status, then a summary; 1 if any entry is corrupt."""
    found, total = Counter(), 0
    for entry in sorted(m.parent for m in store.root.glob(f"[!.]*/[!.]*/{MANIFEST}")):
        files = _files(entry)
        size = sum(f.st_size for f in files)
        total += size
        age = time.time() - min(f.st_mtime for f in files)
        line = f"{entry.parent.name:<12} {entry.name}  {_size(size):>9}  {_age(age):>4}"
        try:
            with store.lock(entry, timeout=0) if heal else nullcontext():
                try:
                    status = "ok" if store.check(entry) else "legacy"
                except CorruptEntry as e:
                    status = f"corrupt ({e})" + (f"; quarantined to {store.quarantine(entry)}" if heal else "")
        except Timeout:
            status = "busy (a running build holds its lock)"
        found[status.split()[0]] += 1
        print(f"{line}  {status}")
    print(f"{sum(found.values())} entries, {_size(total)}: " + ", ".join(f"{n} {s}" for s, n in sorted(found.items())))
    return 1 if found["corrupt"] else 0


def _garbage(kind: Path) -> dict[Path, list[Path]]:
    """{entry: its leftovers that no run needs} in a kind folder: build folders, checkpoints of a published entry,
    and the lock of an entry that neither exists nor has checkpoints to resume from."""
    leftovers = defaultdict(list)
    for path in kind.iterdir():
        if path.name.startswith(BUILD_LEFTOVERS):
            leftovers[kind / path.name.split("-")[1]].append(path)
        elif path.suffix == ".lock":
            leftovers[kind / path.stem].append(path)
    garbage = {}
    for entry, paths in sorted(leftovers.items()):
        checkpoints = any(p.name.startswith(".ckpt-") for p in paths)
        garbage[entry] = [
            p
            for p in sorted(paths)
            if p.name.startswith((".tmp-", ".rank-"))
            or (p.name.startswith(".ckpt-") and (entry / MANIFEST).exists())
            or (p.suffix == ".lock" and not entry.exists() and not checkpoints)
        ]
    return {entry: paths for entry, paths in garbage.items() if paths}


def gc(store: ArtifactStore, dry_run: bool) -> None:
    """Removes (with `dry_run`, lists) what no run needs; prints every path and the bytes freed."""
    freed = 0

    def remove(paths: list[Path]) -> None:
        nonlocal freed
        for path in paths:
            size = sum(f.st_size for f in _files(path))
            if not dry_run:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            freed += size
            print(f"{'would remove' if dry_run else 'removed'} {path.relative_to(store.root)} ({_size(size)})")

    remove(sorted((store.root / QUARANTINE).glob("*")))
    for kind in sorted(store.root.glob("[!.]*/")):
        for entry, paths in _garbage(kind).items():
            try:
                with store.lock(entry, timeout=0):  # a build holds it from start to publish
                    remove(paths)
            except Timeout:
                print(f"skipped {entry.relative_to(store.root)}: a running build holds its lock")
    print(f"{'would free' if dry_run else 'freed'} {_size(freed)} ({freed} bytes)")


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", type=Path, default=default_store(), help="default: %(default)s")
    parser = argparse.ArgumentParser(
        prog="python -m safety_lab.store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("verify", parents=[common], help="check every entry against its manifest").add_argument(
        "--heal", action="store_true", help="quarantine corrupt entries, so the next run rebuilds them"
    )
    commands.add_parser("gc", parents=[common], help="remove what no run needs").add_argument(
        "--dry-run", action="store_true", help="only list what would be removed"
    )
    args = parser.parse_args(argv)
    if not args.store.is_dir():
        parser.exit(2, f"error: no store at {args.store}\n")
    store = ArtifactStore(args.store)
    if args.command == "verify":
        return verify(store, args.heal)
    gc(store, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
