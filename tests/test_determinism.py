"""Same recipe, same weights: an artifact rebuilt in a fresh process, from an empty store or on a base reused from
the store, is bit-identical to the first build, and so are the run's metrics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

from tests.helpers import run_safety_lab

ARGS = ("+experiment=quickstart", "+debug=fast")


def build(store: Path) -> tuple[dict, dict]:
    """(every safetensors tensor of the store by `<kind>/<file>:<name>`, the run's metrics)."""
    result = run_safety_lab(*ARGS, store=store)
    assert result.returncode == 0, result.stderr[-2000:]
    tensors = {}
    for file in sorted(store.glob("*/*/*.safetensors")):
        kind = file.parent.parent.name
        tensors |= {f"{kind}/{file.name}:{name}": t for name, t in load_file(file).items()}
    run_folder = Path(result.stdout.strip().splitlines()[-1])
    return tensors, json.loads((run_folder / "metrics.json").read_text())


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not a[name].equal(b[name])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:2]}"


def test_same_recipe_gives_bit_identical_weights_and_metrics(tmp_path):
    first, metrics = build(tmp_path / "a")
    assert any(k.startswith("adapter/") for k in first) and any(k.startswith("base/") for k in first)
    again, metrics_again = build(tmp_path / "b")  # an empty store: base and adapter built again
    assert_identical(first, again)
    assert metrics_again == metrics
    shutil.rmtree(tmp_path / "a" / "adapter")  # the adapter alone rebuilt, on the base from the store
    warm, metrics_warm = build(tmp_path / "a")
    assert_identical(first, warm)
    assert metrics_warm == metrics
