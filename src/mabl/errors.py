"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""
from __future__ import annotations


class MablError(Exception):
    """Base class for user-facing errors: the message is the whole story."""


class ConfigError(MablError, ValueError):
    """Bad input: unknown env/map/preset/key, wrong type, bad flag or device."""


class CheckpointError(MablError):
    """A checkpoint that cannot be used (corrupt, truncated, foreign, mismatched)."""


class DivergenceError(MablError):
    """A non-finite loss or gradient stopped training."""


def one_of(kind: str, value: object, accepted) -> ConfigError:
    """``unknown map '2s_vs_1sc'; accepted: 3m, 2s3z, ...`` in one line."""
    acc = ", ".join(str(a) for a in accepted)
    return ConfigError(f"unknown {kind} {value!r}; accepted: {acc}")
