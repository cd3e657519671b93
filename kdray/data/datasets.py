"""Reading prompt datasets and checking their rows.

Rows come from JSONL, parquet, or a ``datasets.save_to_disk`` directory (read with pyarrow,
so the ``datasets`` package is not needed), or from a hub dataset ``hub:ORG/NAME[:SPLIT]``
(read with ``datasets.load_dataset``: the optional extra ``kdray[hub]``). Every row is
checked before any work starts: rows without the prompt field, with an empty prompt, too long
a prompt, a duplicate id, or an id, prompt or response that is not text (a lone surrogate,
from a ``\\ud800`` escape or from bytes that are not UTF-8 in a parquet/arrow column, or a
NUL) are *bad rows*. They are counted and reported; the spec chooses to fail (default) or skip
them. Nothing is dropped silently. A file that cannot be read (not UTF-8 JSONL, not JSON, cut
short) is a :class:`DataError` naming the file and the line.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from kdray.errors import DataError, bad_char, first_line, utf8_fault
from kdray.spec import HUB_PREFIX, TOY_PREFIX, DataSpec, parse_hub_ref

_SHOW_IDS = 5


@dataclass
class RowReport:
    """What happened to the rows of one split."""

    split: str
    total: int = 0
    kept: int = 0
    bad: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def n_bad(self) -> int:
        return sum(len(v) for v in self.bad.values())

    def summary(self) -> str:
        parts = [
            f"{len(ids)} {reason} (first ids: {', '.join(ids[:_SHOW_IDS])})"
            for reason, ids in self.bad.items()
        ]
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "total": self.total,
            "kept": self.kept,
            "bad": {k: {"count": len(v), "first_ids": v[:_SHOW_IDS]} for k, v in self.bad.items()},
        }


def resolve_data(ref: str) -> Path:
    if ref.startswith(TOY_PREFIX):
        from kdray import toy

        return Path(toy.resolve(ref))
    return Path(ref).expanduser()


def _read_jsonl(path: Path) -> Iterable[dict[str, Any]]:
    """One JSON object per line; a line that is not one is a :class:`DataError` naming it."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}; check the path and its permissions") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                cut = (" (the line ends inside a character: the file may be cut short)"
                       if exc.end >= len(raw) and not raw.endswith(b"\n") else "")
                raise DataError(f"{path}: line {lineno} is not UTF-8 text (byte {exc.start + 1} of the line, "
                                f"0x{raw[exc.start]:02X}){cut}; save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                why = (f"{exc.msg.removesuffix(' at')} at column {exc.colno}"
                       if isinstance(exc, json.JSONDecodeError) else "nested too deeply")
                if not raw.endswith(b"\n"):
                    why += "; it is the last line and has no newline: the file may be cut short"
                raise DataError(f"{path}: line {lineno} is not valid JSON ({why}); fix or remove it") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} is a {type(row).__name__}, not a JSON object; write "
                                'one object per line (JSONL), e.g. {"id": "1", "prompt": "...", "response": "..."}')
            yield row


def _read_arrow_dir(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{path} is a directory but not a datasets save_to_disk directory (no state.json); give "
                        "the directory save_to_disk wrote, or a .jsonl / .parquet file")
    try:
        raw = state.read_bytes()
        files = [path / f["filename"] for f in json.loads(raw.decode("utf-8"))["_data_files"]]
    except UnicodeDecodeError as exc:
        raise DataError(f"{state} is not UTF-8 text ({utf8_fault(raw, exc)}); save the dataset again with "
                        "save_to_disk") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state} is not a datasets state file ({first_line(exc)}); save the dataset again "
                        "with save_to_disk") from None
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                rows.extend(_arrow_rows(pa.ipc.open_stream(src).read_all(), f))
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read {f}, a data file of the saved dataset {path} ({first_line(exc)}); "
                            "save the dataset again with save_to_disk") from None
    return rows


def _arrow_rows(table: Any, source: Any) -> list[dict[str, Any]]:
    """The rows of a pyarrow Table as dicts. A text cell whose bytes are not UTF-8 (Arrow does not
    check them on read) keeps them as lone surrogates (``surrogateescape``), so :func:`check_rows`
    counts its row as bad when the spec uses that field; in a nested column it is a
    :class:`DataError` naming ``source`` and the column."""
    import pyarrow as pa

    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    columns: dict[str, list[Any]] = {}
    for name, col in zip(table.column_names, table.columns):
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            raw = col.cast(pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary())
            columns[name] = [None if b is None else b.decode("utf-8", "surrogateescape") for b in raw.to_pylist()]
            continue
        try:
            columns[name] = col.to_pylist()
        except UnicodeDecodeError as exc:
            raise DataError(f"{source}: column {name!r} holds text that is not UTF-8 ({exc.reason}, byte "
                            f"0x{exc.object[exc.start]:02X}); write the data again with its text as UTF-8") from None
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return _arrow_rows(pq.read_table(path), path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path} is not a readable parquet file ({first_line(exc)}); it may be cut short or "
                        "another format: write it again (e.g. pandas.DataFrame.to_parquet)") from None


def _read_hub(ref: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset ``hub:ORG/NAME[:SPLIT]``, read with ``datasets.load_dataset``
    (the optional extra ``kdray[hub]``) on the host that runs the job."""
    name, split = parse_hub_ref(ref)
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"dataset {ref!r} is on the Hugging Face hub, which needs the datasets package: "
            "pip install 'kdray[hub]' (or download the split and point data.train / data.heldout "
            "at a .jsonl or .parquet file)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 -- no network, unknown dataset, gated, bad split: all end here
        text = str(exc).strip().splitlines()
        raise DataError(
            f"cannot load hub dataset {name!r} split {split!r} ({type(exc).__name__}: "
            f"{text[0] if text else exc!r}); check the name and split, the network and HF_TOKEN "
            "for gated datasets, or download it and give a local .jsonl / .parquet file"
        ) from None
    try:
        return ds.to_list()
    except UnicodeDecodeError:  # a text column with bytes that are not UTF-8: those rows are bad rows
        return _arrow_rows(ds.with_format("arrow")[:], f"hub dataset {name!r} split {split!r}")


def read_rows(ref: str) -> list[dict[str, Any]]:
    """All rows of a dataset reference, as dicts."""
    if ref.startswith(HUB_PREFIX):
        return _read_hub(ref)
    path = resolve_data(ref)
    if not path.exists():
        raise DataError(f"dataset {ref!r} does not exist ({path}); give an existing .jsonl or .parquet file or "
                        "save_to_disk directory")
    if path.is_dir():
        return _read_arrow_dir(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    return list(_read_jsonl(path))


def check_rows(
    rows: list[dict[str, Any]],
    spec: DataSpec,
    split: str,
    count_tokens: Callable[[list[str]], list[int]],
    *,
    need_response: bool,
) -> tuple[list[dict[str, Any]], RowReport]:
    """Normalise rows to ``{"id", "prompt", "response"}`` and sort out the bad ones.

    ``count_tokens`` maps prompts to their token counts (the student's tokenizer), so the
    length limit is checked in the unit the models see. An id, prompt or response holding a lone
    surrogate or a NUL (:func:`kdray.errors.bad_char`: a tokenizer cannot encode the former, the
    latter marks a binary or UTF-16 field) makes a bad row; such an id is reported as
    ``#<row number>``.
    """
    report = RowReport(split=split, total=len(rows))
    seen: set[str] = set()
    candidates: list[dict[str, Any]] = []
    unicode_example = ""
    fix = f"Fix the dataset {getattr(spec, split, split)!r}"

    def bad_text(rid: str, name: str, value: Any) -> bool:
        nonlocal unicode_example
        found = bad_char(value) if isinstance(value, str) else None
        if found is not None:
            report.bad[f"rows with invalid unicode in field {name!r}"].append(rid)
            unicode_example = unicode_example or (
                f" (row {rid}: field {name!r} holds {found[1]} at character {found[0] + 1}: write the text as "
                "UTF-8, without NUL characters or \\uXXXX escapes of half a character)")
        return found is not None

    for i, row in enumerate(rows):
        rid = str(row.get(spec.id_field, i)) if spec.id_field else str(i)
        if spec.id_field and spec.id_field not in row:
            report.bad[f"rows without id field {spec.id_field!r}"].append(f"#{i}")
            continue
        if spec.id_field and bad_text(f"#{i}", spec.id_field, row[spec.id_field]):
            continue
        if rid in seen:
            report.bad["rows with a duplicate id"].append(rid)
            continue
        seen.add(rid)
        prompt = row.get(spec.prompt_field)
        if prompt is None:
            report.bad[f"rows without prompt field {spec.prompt_field!r}"].append(rid)
            continue
        if not isinstance(prompt, str) or not prompt.strip():
            report.bad["rows with an empty or non-text prompt"].append(rid)
            continue
        if bad_text(rid, spec.prompt_field, prompt):
            continue
        response = row.get(spec.response_field) if spec.response_field else None
        if need_response and response is None:
            report.bad[f"rows without response field {spec.response_field!r}"].append(rid)
            continue
        if need_response and not isinstance(response, str):
            report.bad[f"rows whose response field {spec.response_field!r} is not text"].append(rid)
            continue
        if spec.response_field and bad_text(rid, spec.response_field, response):
            continue
        candidates.append({"id": rid, "prompt": prompt, "response": response})
    if candidates:
        lengths = count_tokens([r["prompt"] for r in candidates])
        kept = []
        for row, n in zip(candidates, lengths):
            if n > spec.max_prompt_tokens:
                report.bad[f"rows with a prompt over data.max_prompt_tokens={spec.max_prompt_tokens}"].append(row["id"])
            else:
                kept.append(row)
        candidates = kept
    report.kept = len(candidates)
    if report.n_bad and spec.on_bad_rows == "fail":
        raise DataError(
            f"data.{split}: {report.n_bad} of {report.total} rows are bad: {report.summary()}"
            f"{_fields_hint(rows, report)}{unicode_example}. "
            f"{fix}, point data.prompt_field / data.response_field / data.id_field at the right fields, or "
            "set data.on_bad_rows: skip to drop them (they are counted in the report)."
        )
    if not candidates:
        raise DataError(f"data.{split}: none of its {report.total} rows is usable: {report.summary()}"
                        f"{_fields_hint(rows, report)}{unicode_example}. {fix} or point data.prompt_field"
                        " / data.response_field / data.id_field at the right fields")
    return candidates, report


def _fields_hint(rows: list[dict[str, Any]], report: RowReport) -> str:
    """When no row has a field the spec names (a misnamed column), say which fields they have."""
    if not any(reason.startswith("rows without") and len(ids) == report.total for reason, ids in report.bad.items()):
        return ""
    return f" (the rows have the fields {', '.join(sorted(map(str, rows[0]))) or 'none'})"


def load_split(
    spec: DataSpec,
    split: str,
    count_tokens: Callable[[list[str]], list[int]],
    *,
    need_response: bool,
) -> tuple[list[dict[str, Any]], RowReport]:
    """Read, check and cut one split ('train' or 'heldout') as the spec says."""
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
