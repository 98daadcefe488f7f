"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""
from __future__ import annotations

import sys


class MablError(Exception):
    """Base class for user-facing errors: the message is the whole story."""


class ConfigError(MablError, ValueError):
    """Bad input: unknown env/map/preset/key, wrong type, bad flag or device."""


class CheckpointError(MablError):
    """A checkpoint that cannot be used (corrupt, truncated, foreign, mismatched)."""


class CorruptCheckpointError(CheckpointError):
    """The file itself is unreadable (truncated, random bytes, missing buffer shard).

    Unlike a *mismatched* checkpoint (another env, algorithm or config), a corrupt one
    lets a resume fall back to the previous checkpoint of the run.
    """


class DivergenceError(MablError):
    """A non-finite loss or gradient stopped training."""


def one_of(kind: str, value: object, accepted) -> ConfigError:
    """``unknown map '2s_vs_1sc'; accepted: 3m, 2s3z, ...`` in one line."""
    acc = ", ".join(str(a) for a in accepted)
    return ConfigError(f"unknown {kind} {value!r}; accepted: {acc}")


def warn(message: str) -> None:
    """One ``mabl: warning: ...`` line on stderr (resume fallbacks and the like)."""
    print(f"mabl: warning: {message}", file=sys.stderr, flush=True)
