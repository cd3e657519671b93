"""Reading a dataset reference's rows, whole or in pieces a Ray task reads.

A reference is a JSONL file, a parquet file, a ``datasets.save_to_disk`` directory (read with
pyarrow, so the ``datasets`` package is not needed), or a hub dataset ``hub:ORG/NAME[:SPLIT]``
(read with ``datasets.load_dataset``: the optional extra ``kdray[hub]``). Its rows are plain
dicts, in file order.

A :class:`Unit` is a piece of a reference: a byte range of a JSONL file (the lines that start in
it), a run of a parquet file's row groups, one arrow file of a saved dataset, or a row range of
a hub dataset. :func:`source_units` cuts a reference into units from file sizes and the saved
dataset's ``state.json`` only; :func:`count_unit` (in a task) reads one and says how many rows
it holds; :func:`unit_rows` yields its rows. The driver path (:func:`read_rows`) and the Ray
Data path (:mod:`kdray.data.split`) read through the same functions, so both raise the same
:class:`DataError` naming the file and the line for a file that cannot be read (not UTF-8
JSONL, not JSON, cut short).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from kdray.errors import DataError, first_line, utf8_fault
from kdray.spec import HUB_PREFIX, TOY_PREFIX, parse_hub_ref

#: Bytes of a JSONL file one read task reads (the lines that start in its range).
JSONL_CHUNK_BYTES = 16 * 2**20
#: Rows one read task reads, about, of a parquet file (whole row groups), a saved dataset's
#: arrow file (whole record batches) or a hub dataset.
CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class Unit:
    """A piece of a dataset reference one task reads.

    Attributes:
        kind: ``jsonl``, ``parquet``, ``arrow`` (a file of a save_to_disk directory) or ``hub``.
        source: the file's absolute path, or the hub reference.
        start, stop: JSONL: byte range (lines starting in it); parquet: row groups; arrow:
            record batches; hub: rows; ``stop`` None: to the end.
        saved: for ``arrow``, the save_to_disk directory (named in errors).
    """

    kind: str
    source: str
    start: int = 0
    stop: int | None = None
    saved: str = ""


def resolve_data(ref: str) -> Path:
    """The absolute path of a file or ``toy:`` reference (the toy world is built if needed)."""
    if ref.startswith(TOY_PREFIX):
        from kdray import toy

        return Path(toy.resolve(ref)).resolve()
    return Path(ref).expanduser().resolve()


def source_units(ref: str, jsonl_chunk_bytes: int | None = None) -> list[Unit]:
    """The units of ``ref``, in file order, from file sizes and ``state.json`` only; a JSONL
    file is cut every ``jsonl_chunk_bytes`` (None: one unit).

    Raises:
        DataError: the file does not exist, or the directory is not a save_to_disk directory.
    """
    if ref.startswith(HUB_PREFIX):
        return [Unit("hub", ref)]
    path = resolve_data(ref)
    if not path.exists():
        raise DataError(f"dataset {ref!r} does not exist ({path}); give an existing .jsonl or .parquet file or "
                        "save_to_disk directory")
    if path.is_dir():
        return [Unit("arrow", str(f), saved=str(path)) for f in _saved_files(path)]
    if path.suffix.lower() == ".parquet":  # .PARQUET too, as the spec takes it
        return [Unit("parquet", str(path))]
    size = path.stat().st_size if jsonl_chunk_bytes else 0
    step = jsonl_chunk_bytes or 1
    return [Unit("jsonl", str(path), a, a + step if a + step < size else None) for a in range(0, size, step)] or [
        Unit("jsonl", str(path))]


def first_fields(ref: str) -> list[str] | None:
    """The field names of local dataset ``ref`` as its first rows show them, read cheaply (a
    parquet or arrow file's schema, a JSONL file's first row), or None for a hub or toy
    dataset, or a file without rows: for checks before a job reads every row.

    Raises:
        DataError: as :func:`source_units` and :func:`unit_rows`.
    """
    if ref.startswith((HUB_PREFIX, TOY_PREFIX)):
        return None
    units = source_units(ref)
    if not units:
        return None
    unit = units[0]
    if unit.kind == "parquet":
        return list(_parquet_file(unit.source).schema_arrow.names)
    if unit.kind == "arrow":
        import pyarrow as pa

        try:
            with pa.memory_map(unit.source) as src:
                return list(pa.ipc.open_stream(src).schema.names)
        except (OSError, pa.ArrowException) as exc:
            raise _arrow_error(Path(unit.source), Path(unit.saved), exc) from None
    row = next(_read_jsonl(Path(unit.source)), None)
    return None if row is None else [str(k) for k in row]


def count_unit(unit: Unit) -> list[tuple[Unit, int, list[str]]]:
    """Read ``unit`` (in a task) and cut it further where its format says where (a parquet
    file's row groups, an arrow file's record batches, a hub dataset's rows; about
    :data:`CHUNK_ROWS` each): ``(unit, rows, fields of its first row)`` each. A JSONL unit is
    parsed whole here, which is what makes an unreadable line anywhere fail the split.

    Raises:
        DataError: as :func:`unit_rows`.
    """
    if unit.kind == "parquet":
        meta = _parquet_file(unit.source).metadata
        counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return _cut(unit, counts, meta.schema.to_arrow_schema().names)
    if unit.kind == "arrow":
        counts, fields = _arrow_batches(Path(unit.source), Path(unit.saved))
        return _cut(unit, counts, fields)
    if unit.kind == "hub":
        ds = _load_hub(unit.source)
        n = ds.num_rows
        return [(replace(unit, start=a, stop=min(a + CHUNK_ROWS, n)), min(CHUNK_ROWS, n - a), ds.column_names)
                for a in range(0, n, CHUNK_ROWS)] or [(unit, 0, ds.column_names)]
    n, fields = 0, []
    for row in unit_rows(unit):
        fields = fields if n else [str(k) for k in row]
        n += 1
    return [(unit, n, fields)]


def _cut(unit: Unit, counts: list[int], fields: list[str]) -> list[tuple[Unit, int, list[str]]]:
    """``unit`` as runs of its parts (``counts``: rows per part) of about :data:`CHUNK_ROWS` rows."""
    out, start, rows = [], 0, 0
    for i, n in enumerate(counts):
        rows += n
        if rows >= CHUNK_ROWS or i == len(counts) - 1:
            out.append((replace(unit, start=start, stop=i + 1), rows, fields))
            start, rows = i + 1, 0
    return out or [(unit, 0, fields)]


def unit_rows(unit: Unit) -> Iterator[dict[str, Any]]:
    """The rows of ``unit`` as dicts, in file order.

    Raises:
        DataError: the file cannot be read (not UTF-8, not JSON, cut short, not parquet),
            naming the file and, for JSONL, the line.
    """
    if unit.kind == "jsonl":
        yield from _read_jsonl(Path(unit.source), unit.start, unit.stop)
    elif unit.kind == "parquet":
        yield from _read_parquet(Path(unit.source), unit.start, unit.stop)
    elif unit.kind == "arrow":
        yield from _read_arrow_file(Path(unit.source), Path(unit.saved), unit.start, unit.stop)
    else:
        yield from _read_hub(unit.source, unit.start, unit.stop)


def read_rows(ref: str) -> list[dict[str, Any]]:
    """All rows of a dataset reference, as dicts, read here (the driver path: the held-out
    split, tools).

    Raises:
        DataError: as :func:`source_units` and :func:`unit_rows`.
    """
    return [row for unit in source_units(ref) for row in unit_rows(unit)]


def _line_number(path: Path, pos: int) -> int:
    """The number of the line starting at byte ``pos`` (counted only when a line is bad)."""
    with path.open("rb") as fh:
        return 1 + sum(block.count(b"\n") for block in iter(lambda: fh.read(min(2**20, pos - fh.tell())), b""))


def _read_jsonl(path: Path, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """One JSON object per line, for the lines starting in bytes ``[start, stop)``; a line that is
    not one is a :class:`DataError` naming it."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}; check the path and its permissions") from None
    with fh:
        if start:
            fh.seek(start - 1)
            fh.readline()  # the line under way at ``start`` belongs to the range before
        pos = fh.tell()
        while stop is None or pos < stop:
            raw = fh.readline()
            if not raw:
                break
            here, pos = pos, pos + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                cut = (" (the line ends inside a character: the file may be cut short)"
                       if exc.end >= len(raw) and not raw.endswith(b"\n") else "")
                raise DataError(f"{path}: line {_line_number(path, here)} is not UTF-8 text (byte {exc.start + 1} of "
                                f"the line, 0x{raw[exc.start]:02X}){cut}; save the file as UTF-8") from None
            if here == 0:
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
                if here == 0 and line.lstrip().startswith("["):
                    raise DataError(f"{path} is one JSON array, not JSON lines: write one object per line (JSONL), "
                                    'e.g. {"id": "1", "prompt": "...", "response": "..."}') from None
                raise DataError(f"{path}: line {_line_number(path, here)} is not valid JSON ({why}); fix or remove "
                                "it") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {_line_number(path, here)} is a {type(row).__name__}, not a JSON "
                                'object; write one object per line (JSONL), e.g. {"id": "1", "prompt": "...", '
                                '"response": "..."}')
            yield row


def _saved_files(path: Path) -> list[Path]:
    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{path} is a directory but not a datasets save_to_disk directory (no state.json); give "
                        "the directory save_to_disk wrote, or a .jsonl / .parquet file")
    try:
        raw = state.read_bytes()
        return [path / f["filename"] for f in json.loads(raw.decode("utf-8"))["_data_files"]]
    except UnicodeDecodeError as exc:
        raise DataError(f"{state} is not UTF-8 text ({utf8_fault(raw, exc)}); save the dataset again with "
                        "save_to_disk") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state} is not a datasets state file ({first_line(exc)}); save the dataset again "
                        "with save_to_disk") from None


def _arrow_error(f: Path, saved: Path, exc: BaseException) -> DataError:
    return DataError(f"cannot read {f}, a data file of the saved dataset {saved} ({first_line(exc)}); "
                     "save the dataset again with save_to_disk")


def _arrow_batches(f: Path, saved: Path) -> tuple[list[int], list[str]]:
    """The rows of each record batch of a saved dataset's arrow file, and its columns."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(f)) as src:
            reader = pa.ipc.open_stream(src)
            return [batch.num_rows for batch in reader], reader.schema.names
    except (OSError, pa.ArrowException) as exc:
        raise _arrow_error(f, saved, exc) from None


def _read_arrow_file(f: Path, saved: Path, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    """The rows of record batches ``[start, stop)`` of a saved dataset's arrow file."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(f)) as src:
            reader = pa.ipc.open_stream(src)
            batches = [b for i, b in enumerate(reader) if i >= start and (stop is None or i < stop)]
            return arrow_rows(pa.Table.from_batches(batches, schema=reader.schema), f)
    except (OSError, pa.ArrowException) as exc:
        raise _arrow_error(f, saved, exc) from None


def arrow_rows(table: Any, source: Any) -> list[dict[str, Any]]:
    """The rows of a pyarrow Table as dicts. A text cell whose bytes are not UTF-8 (Arrow does not
    check them on read) keeps them as lone surrogates (``surrogateescape``), so the row checks
    count its row as bad when the spec uses that field; in a nested column it is a
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


def _parquet_error(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path} is not a readable parquet file ({first_line(exc)}); it may be cut short or "
                     "another format: write it again (e.g. pandas.DataFrame.to_parquet)")


def _parquet_file(path: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise _parquet_error(Path(path), exc) from None


def _read_parquet(path: Path, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    import pyarrow as pa

    pf = _parquet_file(str(path))
    try:
        groups = list(range(start, pf.metadata.num_row_groups if stop is None else stop))
        table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
        return arrow_rows(table, path)
    except (OSError, pa.ArrowException) as exc:
        raise _parquet_error(path, exc) from None


def _load_hub(ref: str) -> Any:
    """``datasets.load_dataset`` of a hub reference (``kdray[hub]``), on the host that runs it."""
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
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 -- no network, unknown dataset, gated, bad split: all end here
        text = str(exc).strip().splitlines()
        raise DataError(
            f"cannot load hub dataset {name!r} split {split!r} ({type(exc).__name__}: "
            f"{text[0] if text else exc!r}); check the name and split, the network and HF_TOKEN "
            "for gated datasets, or download it and give a local .jsonl / .parquet file"
        ) from None


def _read_hub(ref: str, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
    """Rows ``[start, stop)`` of a hub dataset ``hub:ORG/NAME[:SPLIT]``."""
    ds = _load_hub(ref)
    if start or stop is not None:
        ds = ds.select(range(start, ds.num_rows if stop is None else stop))
    try:
        return ds.to_list()
    except UnicodeDecodeError:  # a text column with bytes that are not UTF-8: those rows are bad rows
        name, split = parse_hub_ref(ref)
        return arrow_rows(ds.with_format("arrow")[:], f"hub dataset {name!r} split {split!r}")
