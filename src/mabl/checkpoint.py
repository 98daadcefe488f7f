"""Checkpoints that survive crashes: atomic writes, keep-last-K, safe loading, buffer shards.

A checkpoint is one ``torch.save`` file of plain containers and tensors (no pickled
objects), so it is read with ``torch.load(weights_only=True)``: loading a checkpoint
never runs code from it. It is written to a temporary file in the same directory,
flushed and fsynced, then renamed over the final name (``os.replace`` is atomic), so a
crash mid-write leaves the previous checkpoints intact and never a half-written one.
Every file carries a CRC32 digest of its content (tensor bytes included), checked on
load, so a truncated *or* bit-flipped file is refused instead of silently loaded.

The model buffer is not rewritten into every checkpoint. The buffer is a ring over a
stream of env steps (rows); each checkpoint appends one *shard* with the rows added since
the previous checkpoint (``checkpoints/buffer/shard_<start>_<end>.pt``) and lists the
shards that together hold the buffer's current rows. A shard no kept checkpoint lists is
deleted. So a checkpoint costs O(new rows), not O(buffer), and the 250k-step SMAX buffer
(330 MB) is never written in one go.

Debug hook: ``MABL_DEBUG_SAVE_DELAY=<seconds>`` sleeps between writing a temporary file
and renaming it, so tests can kill a run while it is writing a checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mabl.errors import CheckpointError, CorruptCheckpointError, warn

FORMAT = "mabl-checkpoint-v1"
BEST_NAME = "best.pt"
SHARD_FORMAT = "mabl-buffer-shard-v1"
BUFFER_DIR = "buffer"
_NAME = re.compile(r"^ckpt_(\d{12})\.pt$")
_SHARD = re.compile(r"^shard_(\d{12})_(\d{12})\.pt$")
_TMP = re.compile(r"^\..*\.tmp$")


# ------------------------------------------------------------------------------------------
# Atomic writes

def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _replace_durably(tmp: str, path: Path) -> None:
    delay = os.environ.get("MABL_DEBUG_SAVE_DELAY")
    if delay:  # test hook: widen the window between write and rename
        time.sleep(float(delay))
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _atomic_write(path: str | Path, mode: str, write: Callable[[Any], None],
                  replace: Callable[[str, Path], None] = _replace_durably) -> Path:
    """Write ``path`` atomically: a temp file in the same directory, fsync, then ``replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (tmp file + fsync + rename)."""
    return _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, "w", lambda f: f.write(text), os.replace)


def remove_stale_temporaries(ckpt_dir: str | Path) -> list[Path]:
    """Delete ``.*.tmp`` files a killed writer left behind (call while holding the run lock)."""
    removed = []
    for d in (Path(ckpt_dir), Path(ckpt_dir) / BUFFER_DIR):
        if d.is_dir():
            for p in d.iterdir():
                if _TMP.match(p.name):
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------
# Content digest: catches truncation *and* bit flips (torch.load checks neither reliably)

def _digest(obj: Any, crc: int = 0) -> int:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().reshape(-1).contiguous()
        crc = zlib.crc32(f"T{t.dtype}{tuple(obj.shape)};".encode(), crc)
        return zlib.crc32(t.view(torch.uint8).numpy().data, crc) if t.numel() else crc
    if isinstance(obj, dict):
        keys = sorted((k for k in obj if k != "digest"), key=lambda k: (type(k).__name__, repr(k)))
        crc = zlib.crc32(b"D%d;" % len(keys), crc)
        for k in keys:
            crc = _digest(obj[k], zlib.crc32(f"K{k!r};".encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(b"L%d;" % len(obj), crc)
        for v in obj:
            crc = _digest(v, crc)
        return crc
    return zlib.crc32(f"P{obj!r};".encode(), crc)


def digest(obj: Any) -> str:
    return f"{_digest(obj):08x}"


def _read(p: Path, what: str, mmap: bool = False, verify: bool = True) -> dict:
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, foreign pickle, random bytes ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpointError(
            f"{what} {str(p)!r} is corrupt or not a mabl file ({type(e).__name__}: {msg[:160]})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{what} {str(p)!r} is not a mabl file (holds a {type(state).__name__})")
    if verify and "digest" in state and digest(state) != state["digest"]:
        raise CorruptCheckpointError(f"{what} {str(p)!r} is corrupt: content digest mismatch "
                                     f"(stored {state['digest']}, computed {digest(state)})")
    return state


# ------------------------------------------------------------------------------------------
# Checkpoint files

def checkpoint_path(ckpt_dir: str | Path, env_steps: int) -> Path:
    return Path(ckpt_dir) / f"ckpt_{env_steps:012d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first (temporary files are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _NAME.match(p.name))


def save_checkpoint(state: dict, ckpt_dir: str | Path, env_steps: int, keep: int) -> Path:
    """Write ``ckpt_<steps>.pt`` atomically, then delete all but the newest ``keep``
    checkpoints and every buffer shard none of the kept ones lists."""
    state = dict(state, format=FORMAT)
    state["digest"] = digest(state)
    path = atomic_save(state, checkpoint_path(ckpt_dir, env_steps))
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    prune_shards(ckpt_dir)
    return path


def save_best(state: dict, run_dir: str | Path) -> Path:
    """Write ``best.pt`` (a checkpoint file outside ``checkpoints/``, so a resume never picks it)
    atomically: the learner at the best evaluation so far, readable by ``mabl eval``."""
    state = dict(state, format=FORMAT, buffer={})  # the shards it would list are pruned over time
    state["digest"] = digest(state)
    return atomic_save(state, Path(run_dir) / BEST_NAME)


def _check_format(state: dict, p: Path) -> dict:
    if state.get("format") != FORMAT:
        raise CorruptCheckpointError(f"checkpoint {str(p)!r} is not a mabl checkpoint (expected format {FORMAT!r})")
    state["_path"] = str(p)
    return state


def load_checkpoint(path: str | Path) -> dict:
    """Read one checkpoint file (or the newest in a directory) safely, no fallback."""
    p = _resolve(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    return _check_format(_read(p, "checkpoint"), p)


def peek_checkpoint(path: str | Path) -> dict:
    """The small parts of a checkpoint (config, spec, shard list) without reading tensors."""
    p = Path(path)
    return _check_format(_read(p, "checkpoint", mmap=True, verify=False), p)


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        found = checkpoint_candidates(p)
        if not found:
            raise CheckpointError(f"no checkpoint (ckpt_*.pt) found in {str(p)!r}")
        return found[-1]
    return p


def checkpoint_candidates(path: str | Path) -> list[Path]:
    """Checkpoints of a run directory (or a checkpoints directory), oldest first."""
    p = Path(path)
    return list_checkpoints(p) or list_checkpoints(p / "checkpoints")


def load_latest(path: str | Path, loader: Callable[[Path], dict] = load_checkpoint,
                quarantine: bool = False) -> dict:
    """The newest *usable* checkpoint of a directory; a file path is loaded as is.

    An unreadable newest checkpoint (truncated, corrupt, missing shard) is skipped with a
    warning line and the previous one is used; ``quarantine`` renames the bad file to
    ``*.corrupt`` so it is neither chosen again nor counted among the kept checkpoints.
    Errors other than corruption (e.g. a config mismatch) are raised at once.
    """
    p = Path(path)
    if not p.is_dir():
        return loader(p) if p.exists() else load_checkpoint(p)
    found = checkpoint_candidates(p)
    if not found:
        raise CheckpointError(f"no checkpoint (ckpt_*.pt) found in {str(p)!r}")
    problems = []
    for cand in reversed(found):
        try:
            state = loader(cand)
        except CorruptCheckpointError as e:
            problems.append(str(e))
            older = [c for c in found if c < cand]
            nxt = f"falling back to {older[-1].name}" if older else "no older checkpoint left"
            warn(f"{e}; {nxt}")
            if quarantine:
                try:
                    os.replace(cand, cand.with_name(cand.name + ".corrupt"))
                except OSError:
                    pass
            continue
        return state
    raise CorruptCheckpointError(f"no usable checkpoint in {str(p)!r}: " + " | ".join(problems))


# ------------------------------------------------------------------------------------------
# Buffer shards

FIELDS = ("obs", "state", "prev_action", "reward", "cont", "avail", "is_first")


def shard_name(start: int, end: int) -> str:
    return f"shard_{start:012d}_{end:012d}.pt"


def _stream_rows(buffer, total: int, start: int, end: int) -> dict[str, torch.Tensor]:
    """Rows ``[start, end)`` of the buffer's stream (``total`` rows were ever added)."""
    if not (total - buffer.size <= start <= end <= total):
        raise ValueError(f"rows [{start}, {end}) are not in the buffer (holds [{total - buffer.size}, {total}))")
    idx = (buffer.ptr - (total - np.arange(start, end))) % buffer.capacity
    return {k: torch.from_numpy(np.take(buffer.data[k], idx, axis=0)) for k in FIELDS}


def save_buffer(buffer, ckpt_dir: str | Path, total: int, prev: dict | None) -> dict:
    """Append the rows added since ``prev`` (the previous checkpoint's buffer entry) as a
    shard; return this checkpoint's buffer entry (the shards covering the buffer)."""
    lo = total - buffer.size
    prev_shards = json.loads(prev["shards"]) if prev else []
    written = int(prev["total"]) if prev else 0
    keep = [s for s in prev_shards if _shard_range(s)[1] > lo]
    start = max(written, lo)
    if start < total:
        rows = _stream_rows(buffer, total, start, total)
        shard = dict(rows, format=SHARD_FORMAT, start=start, end=total)
        shard["digest"] = digest(shard)
        atomic_save(shard, Path(ckpt_dir) / BUFFER_DIR / shard_name(start, total))
        keep.append(shard_name(start, total))
    return {"kind": "shards", "total": int(total), "size": int(buffer.size), "episodes": int(buffer.episodes),
            "shards": json.dumps(keep)}


def _shard_range(name: str) -> tuple[int, int]:
    m = _SHARD.match(name)
    if not m:
        raise ValueError(f"bad shard name {name!r}")
    return int(m.group(1)), int(m.group(2))


def load_buffer(buffer, entry: dict, ckpt_file: str | Path) -> int:
    """Fill ``buffer`` from a checkpoint's buffer entry; returns the stream total.

    Accepts the sharded entry and the older inline one (the whole buffer in the file).
    """
    if not entry:
        return 0
    if entry.get("kind") != "shards":  # inline (mabl-checkpoint-v1 before shards)
        buffer.load_state_dict(entry)
        return len(buffer)
    total, size = int(entry["total"]), int(entry["size"])
    lo = total - size
    bdir = Path(ckpt_file).parent / BUFFER_DIR
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in FIELDS}
    pos = lo
    for name in json.loads(entry["shards"]):
        p = bdir / name
        if not p.is_file():
            raise CorruptCheckpointError(f"checkpoint {str(ckpt_file)!r} needs buffer shard {str(p)!r}, which is missing")
        shard = _read(p, "buffer shard")
        s, e = int(shard["start"]), int(shard["end"])
        if shard.get("format") != SHARD_FORMAT or (s, e) != _shard_range(name) or s > pos or e <= pos:
            raise CorruptCheckpointError(f"buffer shard {str(p)!r} does not continue the buffer at row {pos}")
        for k in FIELDS:
            parts[k].append(shard[k][pos - s:])
        pos = e
    if pos != total:
        raise CorruptCheckpointError(f"checkpoint {str(ckpt_file)!r}: buffer shards end at row {pos}, expected {total}")
    state = {k: torch.cat(v) if v else torch.zeros((0,)) for k, v in parts.items()}
    if size == 0:
        return total
    state["episodes"] = torch.tensor(int(entry["episodes"]))
    buffer.load_state_dict(state)
    return total


def prune_shards(ckpt_dir: str | Path) -> None:
    """Delete buffer shards that no kept checkpoint lists."""
    bdir = Path(ckpt_dir) / BUFFER_DIR
    if not bdir.is_dir():
        return
    needed: set[str] = set()
    for c in list_checkpoints(ckpt_dir):
        try:
            entry = peek_checkpoint(c).get("buffer") or {}
            if entry.get("kind") == "shards":
                needed.update(json.loads(entry["shards"]))
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue  # an unreadable checkpoint needs nothing
    for p in bdir.iterdir():
        if _SHARD.match(p.name) and p.name not in needed:
            p.unlink(missing_ok=True)
