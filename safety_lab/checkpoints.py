"""Checks that a weights file can be loaded safely, made before anything loads it, and which checkpoint a fit resumes.

Torch files (Lightning checkpoints, `pytorch_model.bin`) are pickles: they are tried with
`torch.load(weights_only=True)`, which refuses any object other than tensors and plain containers without running
it, memory-mapped so the check reads little. Safetensors files are checked by their header, which must be readable
and cover the whole file (a cut-short download or copy does not). Either problem is one `SafetyLabError` line naming
the file.
"""

from __future__ import annotations

import contextlib
import logging
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from safety_lab.errors import SafetyLabError

log = logging.getLogger(__name__)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_torch_file(path: Path) -> None:
    """Raise unless `path` loads with `torch.load(weights_only=True)`."""
    try:  # only the zip format can be memory-mapped; older files are read in full
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # nothing runs under weights_only, so any failure only means the file cannot be loaded
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = (
            f"it pickles {refused[1]}, which torch.load(weights_only=True) refuses"
            if refused
            else f"truncated or not a torch file ({_first_line(e)})"
        )
        raise SafetyLabError(f"{path}: cannot be loaded safely: {why}") from None


def check_safetensors(path: Path) -> None:
    """Raise unless `path` has a readable safetensors header whose tensors cover the file exactly."""
    try:
        with safe_open(path, "pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise SafetyLabError(f"{path}: cannot be loaded safely: truncated or not safetensors ({e})") from None


def resume_path(last: Path, ckpt_path: str | None) -> str | None:
    """The checkpoint a fit resumes from, checked. `ckpt_path=last` (the default) is the stage's own `last.ckpt` if
    there is one; one that cannot be loaded (most likely cut short by a crash while it was written) is set aside as
    `last.ckpt.corrupt` with a warning and the stage trains from the start, since the store's own checkpoint is only
    a shortcut. Any other `ckpt_path` is the user's explicit choice, so a missing or unloadable file is an error."""
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise SafetyLabError(f"ckpt_path: {path} does not exist")
        check_torch_file(path)
        return str(path)
    if not last.exists():
        return None
    try:
        check_torch_file(last)
    except SafetyLabError as e:
        aside = last.with_name(last.name + ".corrupt")
        with contextlib.suppress(FileNotFoundError):  # another rank of this run set it aside first
            last.replace(aside)
        log.warning("%s; set aside as %s, training from the start", e, aside.name)
        return None
    return str(last)
