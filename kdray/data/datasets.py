"""Reading prompt datasets and checking their rows.

Rows come from JSONL, parquet, or a ``datasets.save_to_disk`` directory (read with pyarrow,
so the ``datasets`` package is not needed), or from a hub dataset ``hub:ORG/NAME[:SPLIT]``
(read with ``datasets.load_dataset``: the optional extra ``kdray[hub]``). Every row is
checked before any work starts: rows without the prompt field, with an empty prompt, too long
a prompt, or a duplicate id are *bad rows*. They are counted and reported; the spec chooses
to fail (default) or skip them. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from kdray.errors import DataError, first_line
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
                raise DataError(f"{path}: line {lineno} is not UTF-8 text (byte {exc.start + 1} of the line); "
                                "save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                why = (f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError)
                       else "nested too deeply")
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
        files = [path / f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state} is not a datasets state file ({first_line(exc)}); save the dataset again "
                        "with save_to_disk") from None
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"cannot read {f}, a data file of the saved dataset {path} ({first_line(exc)}); "
                            "save the dataset again with save_to_disk") from None
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
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
    return ds.to_list()


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
    length limit is checked in the unit the models see.
    """
    report = RowReport(split=split, total=len(rows))
    seen: set[str] = set()
    candidates: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        rid = str(row.get(spec.id_field, i)) if spec.id_field else str(i)
        if spec.id_field and spec.id_field not in row:
            report.bad[f"rows without id field {spec.id_field!r}"].append(f"#{i}")
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
        response = row.get(spec.response_field) if spec.response_field else None
        if need_response and not isinstance(response, str):
            report.bad[f"rows without response field {spec.response_field!r}"].append(rid)
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
            f"{_fields_hint(rows, report)}. "
            "Fix the dataset, point data.prompt_field / data.response_field / data.id_field at the "
            "right fields, or set data.on_bad_rows: skip to drop them (they are counted in the report)."
        )
    if not candidates:
        raise DataError(f"data.{split}: none of its {report.total} rows is usable: {report.summary()}"
                        f"{_fields_hint(rows, report)}. Fix the dataset or point data.prompt_field / "
                        "data.response_field / data.id_field at the right fields")
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
