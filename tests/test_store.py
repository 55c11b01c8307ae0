"""`python -m safety_lab.store verify|gc` on real stores, and healing end to end: a run whose adapter was damaged in
the store quarantines it, retrains it and reports the numbers of the run that first trained it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from filelock import FileLock
from helpers import REPO, run_safety_lab
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from safety_lab.artifacts import MANIFEST, QUARANTINE, ArtifactStore
from safety_lab.config import register
from safety_lab.store import default_store


def store_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "safety_lab.store", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def publish(store: ArtifactStore, kind: str, seed: int) -> Path:
    def build(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(bytes(1024))

    return store.get_or_build(kind, {"seed": seed}, build)


def kilobytes(entry: Path) -> str:
    return f"{sum(f.stat().st_size for f in entry.rglob('*') if f.is_file()) / 1000:.1f} kB"


def test_verify_lists_every_entry_and_fails_on_a_corrupt_one_until_healed(tmp_path):
    store = ArtifactStore(tmp_path)
    ok, legacy, corrupt = publish(store, "adapter", 0), publish(store, "base", 0), publish(store, "mask", 0)
    manifest = store.manifest(legacy)
    del manifest["files"]
    (legacy / MANIFEST).write_text(json.dumps(manifest))
    with open(corrupt / "weights.bin", "r+b") as f:
        f.truncate(1000)
    sizes = {entry: kilobytes(entry) for entry in (ok, legacy, corrupt)}

    result = store_cli("verify", "--store", str(tmp_path))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    for line, entry, status in zip(
        lines, (ok, legacy, corrupt), ("ok", "legacy", "corrupt (weights.bin: 1000 bytes, manifest says 1024)")
    ):
        assert re.fullmatch(rf"{entry.parent.name} +{entry.name} +{sizes[entry]} +\d+s  {re.escape(status)}", line)
    assert re.fullmatch(r"3 entries, \d\.\d kB: 1 corrupt, 1 legacy, 1 ok", lines[3])

    result = store_cli("verify", "--heal", "--store", str(tmp_path))
    assert result.returncode == 1 and not corrupt.exists()
    [aside] = (tmp_path / QUARANTINE).iterdir()
    assert result.stdout.splitlines()[2].endswith(f"manifest says 1024); quarantined to {aside}")
    result = store_cli("verify", "--store", str(tmp_path))
    assert result.returncode == 0 and result.stdout.splitlines()[-1].endswith(": 1 legacy, 1 ok")


def test_gc_frees_what_no_run_needs_but_not_what_a_build_holds(tmp_path):
    store = ArtifactStore(tmp_path)
    entry = publish(store, "adapter", 0)
    adapters = entry.parent
    files = {
        f".quarantine/adapter-{'a' * 16}-20260101-000000.000000/weights.bin": 1000,
        f"adapter/.tmp-{entry.name}-deadbeef/weights.bin": 100,  # a killed build of a published entry
        f"adapter/.ckpt-{entry.name}/sft/last.ckpt": 10,  # published: no longer needed
        f"adapter/.ckpt-{'b' * 16}/sft/last.ckpt": 20,
        f"adapter/{'b' * 16}.lock": 0,  # resumable: kept
        f"adapter/{'c' * 16}.lock": 0,  # a failed build's lock: orphan
        f"adapter/.rank-{'d' * 16}-x1y2/weights.bin": 50,
        f"adapter/{'d' * 16}.lock": 0,
    }  # building: kept
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(bytes(size))
    before = sorted(p for p in tmp_path.rglob("*"))
    removed = [
        f".quarantine/adapter-{'a' * 16}-20260101-000000.000000 (1.0 kB)",
        f"adapter/.ckpt-{entry.name} (10 B)",
        f"adapter/.tmp-{entry.name}-deadbeef (100 B)",
        f"adapter/{'c' * 16}.lock (0 B)",
    ]
    with FileLock(f"{adapters / ('d' * 16)}.lock"):
        result = store_cli("gc", "--dry-run", "--store", str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            *(f"would remove {line}" for line in removed),
            f"skipped adapter/{'d' * 16}: a running build holds its lock",
            "would free 1.1 kB (1110 bytes)",
        ]
        assert sorted(p for p in tmp_path.rglob("*")) == before
        result = store_cli("gc", "--store", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        *(f"removed {line}" for line in removed),
        f"skipped adapter/{'d' * 16}: a running build holds its lock",
        "freed 1.1 kB (1110 bytes)",
    ]
    assert sorted(p.name for p in adapters.iterdir()) == sorted(
        [
            f".ckpt-{'b' * 16}",
            f".rank-{'d' * 16}-x1y2",
            entry.name,
            f"{entry.name}.lock",
            f"{'b' * 16}.lock",
            f"{'d' * 16}.lock",
        ]
    )
    assert list((tmp_path / QUARANTINE).iterdir()) == [] and store.check(entry)


def test_cli_refuses_a_missing_store(tmp_path):
    result = store_cli("verify", "--store", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and result.stderr == f"error: no store at {tmp_path / 'nowhere'}\n"


def test_default_store_is_the_frameworks(tmp_path, monkeypatch):
    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        for variable in ("SAFETY_LAB_STORE", "SAFETY_LAB_ROOT"):
            monkeypatch.delenv(variable, raising=False)
        assert default_store() == Path(cfg.paths.artifacts) == Path(os.getcwd()) / "outputs" / "store"
        monkeypatch.setenv("SAFETY_LAB_ROOT", str(tmp_path / "root"))
        assert default_store() == Path(cfg.paths.artifacts) == tmp_path / "root" / "outputs" / "store"
        monkeypatch.setenv("SAFETY_LAB_STORE", str(tmp_path / "shared"))
        assert default_store() == Path(cfg.paths.artifacts) == tmp_path / "shared"
    finally:
        HydraConfig.instance().cfg = None


def test_a_run_heals_a_damaged_adapter_and_reports_the_same_numbers(tmp_path):
    store, runs = tmp_path / "store", [tmp_path / "run0", tmp_path / "run1"]
    first = run_safety_lab("+experiment=quickstart", "+debug=fast", f"hydra.run.dir={runs[0]}", store=store)
    assert first.returncode == 0, first.stderr[-3000:]
    [adapter] = (store / "adapter").glob("[!.]*/")
    weights = adapter / "adapter_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    second = run_safety_lab("+experiment=quickstart", "+debug=fast", f"hydra.run.dir={runs[1]}", store=store)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"store: adapter {adapter.name} is corrupt (adapter_model.safetensors:" in second.stderr
    assert "quarantined to" in second.stderr and f"training adapter {adapter.name}" in second.stderr
    assert "reusing base" in second.stderr and len(list((store / QUARANTINE).iterdir())) == 1
    [metrics0, metrics1] = (json.loads((run / "metrics.json").read_text()) for run in runs)
    assert metrics0 == metrics1
