"""Errors that kdray reports to users.

A :class:`KdrayError` carries a message written for the person who ran the job: it names
what was wrong (a spec field, a dataset row, a model path) and how to fix it. The CLI and
the HTTP service print it as-is, without a traceback; every other exception is a bug.
"""

from __future__ import annotations


class KdrayError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class SpecError(KdrayError):
    """A job spec failed validation. ``errors`` holds every problem as (field path, message)."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = list(errors)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid job spec{where}: {len(self.errors)} error(s)"]
        lines += [f"  {path}: {msg}" for path, msg in self.errors]
        super().__init__("\n".join(lines))


class DataError(KdrayError):
    """A dataset could not be read, or some of its rows are unusable."""
