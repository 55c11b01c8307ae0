"""Judge verdicts on disk, so that a rerun, or a run resumed after a failure, asks an API only for the missing ones.

One SQLite table (safe for concurrent processes) maps a key to a verdict. The key is a hash of everything a verdict
depends on; the judges (`llm_judge.py`) put into it the judge, its rubric, every sampling parameter sent to the
model (model, temperature, max tokens) and the judged texts, so changing any of them never reuses an old verdict.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path


class JudgementCache:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success, rolls back on an error, and is closed in any case."""
        with closing(sqlite3.connect(self.path, timeout=60)) as db, db:
            yield db

    @staticmethod
    def key(*fields) -> str:
        """The hash of JSON-serialisable `fields` (dicts in any key order hash alike)."""
        return hashlib.sha256(json.dumps(fields, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def get(self, keys: list[str]) -> dict[str, dict]:
        found = {}
        with self._transaction() as db:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = db.execute(
                    f"SELECT key, value FROM judgements WHERE key IN ({','.join('?' * len(chunk))})", chunk
                )
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put(self, key: str, value: dict) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO judgements VALUES (?, ?)", (key, json.dumps(value)))
