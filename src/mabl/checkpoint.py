"""Checkpoints that survive crashes: atomic writes, keep-last-K, safe loading.

A checkpoint is one ``torch.save`` file of plain containers and tensors (no pickled
objects), so it is read with ``torch.load(weights_only=True)``: loading a checkpoint
never runs code from it. It is written to a temporary file in the same directory,
flushed and fsynced, then renamed over the final name (``os.replace`` is atomic), so a
crash mid-write leaves the previous checkpoints intact and never a half-written one.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from mabl.errors import CheckpointError

FORMAT = "mabl-checkpoint-v1"
_NAME = re.compile(r"^ckpt_(\d{12})\.pt$")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (tmp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_path(ckpt_dir: str | Path, env_steps: int) -> Path:
    return Path(ckpt_dir) / f"ckpt_{env_steps:012d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first (temporary files are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def save_checkpoint(state: dict, ckpt_dir: str | Path, env_steps: int, keep: int) -> Path:
    """Write ``ckpt_<steps>.pt`` atomically, then delete all but the newest ``keep``."""
    state = dict(state, format=FORMAT)
    path = atomic_save(state, checkpoint_path(ckpt_dir, env_steps))
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely; any problem is one :class:`CheckpointError` line."""
    p = Path(path)
    if p.is_dir():
        found = list_checkpoints(p) or list_checkpoints(p / "checkpoints")
        if not found:
            raise CheckpointError(f"no checkpoint (ckpt_*.pt) found in {str(p)!r}")
        p = found[-1]
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {str(p)!r} is corrupt or not a mabl checkpoint ({type(e).__name__}: {msg[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(p)!r} is not a mabl checkpoint (expected format {FORMAT!r})")
    state["_path"] = str(p)
    return state
