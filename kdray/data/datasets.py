"""Checking the rows of prompt datasets.

Rows are read by :mod:`kdray.data.sources` (JSONL, parquet, a ``datasets.save_to_disk``
directory, a hub dataset ``hub:ORG/NAME[:SPLIT]``). Every row is checked before any work
starts: rows without the prompt field, with an empty prompt, too long
a prompt, a duplicate id, or an id, prompt or response that is not text (a lone surrogate,
from a ``\\ud800`` escape or from bytes that are not UTF-8 in a parquet/arrow column, or a
NUL) are *bad rows*. They are counted and reported; the spec chooses to fail (default) or skip
them. Nothing is dropped silently. A file that cannot be read (not UTF-8 JSONL, not JSON, cut
short) is a :class:`DataError` naming the file and the line.

One check per row (:func:`check_row`) serves both paths: :mod:`kdray.data.split` runs it in
Ray Data tasks for a job's splits; :func:`load_split` reads and checks a split in the driver
for tools (``kdray bench train``'s bare loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from kdray.data.sources import read_rows
from kdray.errors import DataError, bad_char
from kdray.spec import DataSpec

__all__ = ["DUPLICATE", "RowCheck", "RowReport", "bad_rows_error", "check_row", "check_rows", "load_split", "read_rows",
           "too_long"]

_SHOW_IDS = 5


@dataclass
class RowReport:
    """What happened to the rows of one split: per reason, how many rows and the first few
    ids (at most :data:`_SHOW_IDS`, in row order), never every id."""

    split: str
    total: int = 0
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    first_ids: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, rid: str, count: int = 1) -> None:
        """Count ``count`` rows bad for ``reason``; ``rid`` is the first of them (kept while
        fewer than :data:`_SHOW_IDS` are shown)."""
        self.counts[reason] = self.counts.get(reason, 0) + count
        shown = self.first_ids.setdefault(reason, [])
        if len(shown) < _SHOW_IDS:
            shown.append(rid)

    @property
    def n_bad(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "; ".join(f"{n} {reason} (first ids: {', '.join(self.first_ids[reason])})"
                         for reason, n in self.counts.items())

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "total": self.total,
            "kept": self.kept,
            "bad": {k: {"count": n, "first_ids": self.first_ids[k]} for k, n in self.counts.items()},
        }


#: The reason of a row whose id an earlier row has (decided after the id's own checks, before
#: the prompt's).
DUPLICATE = "rows with a duplicate id"


def too_long(spec: DataSpec) -> str:
    """The reason of a row whose prompt is over ``data.max_prompt_tokens`` (the last check)."""
    return f"rows with a prompt over data.max_prompt_tokens={spec.max_prompt_tokens}"


@dataclass
class RowCheck:
    """One row, normalised and checked (:func:`check_row`).

    Attributes:
        id: the row's id as text, or ``#<row number>`` when it has none or it is not text.
        keyed: the id passed its checks, so the row takes part in duplicate detection.
        reason: why the row is bad ("" when it is not); when ``keyed``, a duplicate id comes
            first (it is decided across the split).
        example: for invalid unicode, what and where, for the error message.
        prompt, response: the texts ("" and None when the row is bad).
    """

    id: str
    keyed: bool
    reason: str = ""
    example: str = ""
    prompt: str = ""
    response: Any = None


def check_row(row: dict[str, Any], i: int, spec: DataSpec, *, need_response: bool) -> RowCheck:
    """Check row number ``i`` (from 0, in file order) of a split, all but the checks across rows
    (duplicate ids) and the prompt's token count. An id, prompt or response holding a lone
    surrogate or a NUL (:func:`kdray.errors.bad_char`: a tokenizer cannot encode the former, the
    latter marks a binary or UTF-16 field) makes a bad row; such an id is reported as
    ``#<row number>``, as is an id that is null (or NaN), empty, or not a string or a number. A needed
    response must be non-empty text: an empty gold response would score an empty answer as an
    exact match. A prompt or response that is null is told apart from one that is missing (a
    misnamed field, for which the fields the rows have are named)."""

    def bad_text(rid: str, name: str, value: Any) -> str:
        found = bad_char(value) if isinstance(value, str) else None
        return "" if found is None else (
            f" (row {rid}: field {name!r} holds {found[1]} at character {found[0] + 1}: write the text as "
            "UTF-8, without NUL characters or \\uXXXX escapes of half a character)")

    if spec.id_field and spec.id_field not in row:
        return RowCheck(f"#{i}", False, f"rows without id field {spec.id_field!r}")
    if spec.id_field:
        value = row[spec.id_field]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number or isinstance(value, str) and value.strip()):  # a float: a pandas column with a NaN in it
            return RowCheck(f"#{i}", False, f"rows whose id field {spec.id_field!r} is null, empty or not a string "
                            "or a number")
        example = bad_text(f"#{i}", spec.id_field, value)
        if example:
            return RowCheck(f"#{i}", False, f"rows with invalid unicode in field {spec.id_field!r}", example)
    rid = str(row[spec.id_field]) if spec.id_field else str(i)
    prompt = row.get(spec.prompt_field)
    if prompt is None:  # a parquet column has every field: its empty cells are nulls
        return RowCheck(rid, True, f"rows without prompt field {spec.prompt_field!r}" if spec.prompt_field not in row
                        else f"rows whose prompt field {spec.prompt_field!r} is null")
    if not isinstance(prompt, str) or not prompt.strip():
        return RowCheck(rid, True, "rows with an empty or non-text prompt")
    example = bad_text(rid, spec.prompt_field, prompt)
    if example:
        return RowCheck(rid, True, f"rows with invalid unicode in field {spec.prompt_field!r}", example)
    response = row.get(spec.response_field) if spec.response_field else None
    if need_response and response is None:
        return RowCheck(rid, True, f"rows without response field {spec.response_field!r}" if spec.response_field not in row
                        else f"rows whose response field {spec.response_field!r} is null")
    if need_response and not isinstance(response, str):
        return RowCheck(rid, True, f"rows whose response field {spec.response_field!r} is not text")
    if need_response and not response.strip():  # an empty gold: an empty answer would match it exactly
        return RowCheck(rid, True, f"rows with an empty response field {spec.response_field!r}")
    example = bad_text(rid, spec.response_field, response) if spec.response_field else ""
    if example:
        return RowCheck(rid, True, f"rows with invalid unicode in field {spec.response_field!r}", example)
    return RowCheck(rid, True, prompt=prompt, response=response)


def check_rows(
    rows: list[dict[str, Any]],
    spec: DataSpec,
    split: str,
    count_tokens: Callable[[list[str]], list[int]],
    *,
    need_response: bool,
) -> tuple[list[dict[str, Any]], RowReport]:
    """Normalise rows to ``{"id", "prompt", "response"}`` and sort out the bad ones
    (:func:`check_row`, then duplicate ids, then the prompt's length).

    ``count_tokens`` maps prompts to their token counts (the student's tokenizer), so the
    length limit is checked in the unit the models see.

    Raises:
        DataError: as :func:`bad_rows_error`.
    """
    report = RowReport(split=split, total=len(rows))
    seen: set[str] = set()
    candidates: list[dict[str, Any]] = []
    example = ""
    for i, row in enumerate(rows):
        c = check_row(row, i, spec, need_response=need_response)
        if c.keyed and c.id in seen:
            report.add(DUPLICATE, c.id)
            continue
        seen.update([c.id] if c.keyed else [])
        if c.reason:
            report.add(c.reason, c.id)
            example = example or c.example
            continue
        candidates.append({"id": c.id, "prompt": c.prompt, "response": c.response})
    if candidates:
        lengths = count_tokens([r["prompt"] for r in candidates])
        kept = []
        for row, n in zip(candidates, lengths):
            if n > spec.max_prompt_tokens:
                report.add(too_long(spec), row["id"])
            else:
                kept.append(row)
        candidates = kept
    report.kept = len(candidates)
    bad_rows_error(report, spec, [str(k) for k in rows[0]] if rows else [], example)
    return candidates, report


def bad_rows_error(report: RowReport, spec: DataSpec, fields: list[str], example: str) -> None:
    """Raise the split's :class:`DataError` when it must fail: ``data.on_bad_rows: fail`` and a
    bad row, or no usable row. ``fields``: those of the split's first row (named when no row has
    a field the spec names); ``example``: the first invalid unicode, if any.

    Raises:
        DataError: naming the count of bad rows per reason, the first ids, and the fixes.
    """
    split = report.split
    fixes = [f"fix the dataset {getattr(spec, split, split)!r}"]
    hint = _fields_hint(fields, report)
    if any(reason.startswith("rows without") for reason in report.counts):  # a field the spec names may be wrong
        fixes.append("point data.prompt_field / data.response_field / data.id_field at the right fields")
    if report.n_bad and spec.on_bad_rows == "fail":
        if report.n_bad < report.total:  # skipping every row leaves nothing to train on
            fixes.append("set data.on_bad_rows: skip to drop them (they are counted in the report)")
        raise DataError(f"data.{split}: {report.n_bad} of {report.total} rows are bad: {report.summary()}"
                        f"{hint}{example}. {_sentence(fixes)}.")
    if not report.kept:
        raise DataError(f"data.{split}: none of its {report.total} rows is usable: {report.summary()}"
                        f"{hint}{example}. {_sentence(fixes)}.")


def _sentence(fixes: list[str]) -> str:
    """``fixes`` as one capitalised sentence: "A, B or C"."""
    text = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"
    return text[0].upper() + text[1:]


def _fields_hint(fields: list[str], report: RowReport) -> str:
    """When no row has a field the spec names (a misnamed column), say which fields they have."""
    if not any(reason.startswith("rows without") and n == report.total for reason, n in report.counts.items()):
        return ""
    return f" (the rows have the fields {', '.join(sorted(fields)) or 'none'})"


def load_split(
    spec: DataSpec,
    split: str,
    count_tokens: Callable[[list[str]], list[int]],
    *,
    need_response: bool,
) -> tuple[list[dict[str, Any]], RowReport]:
    """Read, check and cut one split ('train' or 'heldout') as the spec says, in this process:
    for tools; a job's splits go through Ray Data (:func:`kdray.data.split.write_checked_split`).

    Returns:
        The kept rows (``{"id", "prompt", "response"}``, in file order) and the report.

    Raises:
        DataError: the split cannot be read (naming the file and line), has no rows, or has bad
            rows under ``on_bad_rows: fail`` (:func:`bad_rows_error`).
    """
    ref = getattr(spec, split)
    limit = spec.max_train_samples if split == "train" else spec.max_heldout_samples
    try:
        rows = read_rows(ref)
    except DataError as exc:
        raise DataError(f"data.{split}: {exc}") from None
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise DataError(f"data.{split}: {ref!r} has no rows")
    return check_rows(rows, spec, split, count_tokens, need_response=need_response)


def heldout_note(spec: DataSpec, evaluated: bool) -> str | None:
    """What a job evaluated on its own training prompts (``data.heldout`` the same dataset as
    ``data.train``) says in its plan, or None: its held-out scores are of seen prompts."""
    if not evaluated or spec.heldout != spec.train:
        return None
    return (f"data.heldout is data.train ({spec.train}), so the held-out scores are of prompts the student "
            "trained on, not of unseen ones")
