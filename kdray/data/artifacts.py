"""A job's per-row artifacts as committed parquet datasets under ``OUTPUT_DIR``.

Every stage that makes rows (teacher responses, student responses, teacher records, POCL's
measurements) writes them from the Ray Data actors that make them (``Dataset.write_parquet``)
into a directory, and the next stage reads that directory with ``ray.data.read_parquet``. The
driver handles paths, counts and small summaries, never the rows.

A dataset directory is *committed* when it holds :data:`MARKER`, a JSON file written last:

    {"format": 1, "kind": str, "files": [names, in the dataset's order], "rows": int,
     "columns": [names], "bytes": int, "meta": {...what the writer says about the rows...}}

The rows are written into a sibling ``.NAME.partial-<id>`` directory first, the marker is
written there last, and the directory is renamed into place, so a reader sees a whole dataset
or none: a stage killed half-way leaves only a partial directory, which the next run removes
before it writes the dataset again (no duplicated or lost rows). ``files`` fixes the order in
which :func:`read_dataset` reads the rows, so every run of a job (a resumed one too) sees the
same order.

All paths must be on storage every node of the cluster reaches (``output_dir``): the actors
write the shards, the driver writes the marker and renames.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdray.errors import KdrayError, first_line

MARKER = "_kdray_dataset.json"
FORMAT = 1


#: What one parquet file of a dataset should hold at most (from the writer's estimate of a row's
#: size): smaller files make smaller read blocks, so less streams at once (``kdray bench scale``:
#: at 8,000 top-k rows, 16 MiB files halved what the ingest spilled from a 256 MiB store).
FILE_BYTES = 16 * 2**20
#: CPU share of each read task feeding a stage or the training workers (reads are I/O bound).
READ_NUM_CPUS = 0.25


@dataclass(frozen=True)
class Artifact:
    """A committed dataset: where it is and its marker (see the module docstring)."""

    path: Path
    info: dict[str, Any]

    @property
    def rows(self) -> int:
        return int(self.info["rows"])

    @property
    def meta(self) -> dict[str, Any]:
        return self.info.get("meta", {})

    def read(self, columns: list[str] | None = None) -> Any:
        """The rows as a lazy Ray dataset, files in the stored order (:func:`read_dataset`)."""
        return read_dataset(self.path, self.info, columns)

    def column(self, name: str) -> Any:
        """One column, whole, in the driver (:func:`read_column`)."""
        return read_column(self.path, self.info, name)


def open_artifact(path: Path, kind: str) -> Artifact | None:
    """The committed dataset at ``path`` (:func:`committed`), or None."""
    info = committed(path, kind)
    return None if info is None else Artifact(path, info)


def committed(path: Path, kind: str) -> dict[str, Any] | None:
    """The marker of the committed dataset at ``path`` written as ``kind``, or None when there
    is none (never written, or its writer died before committing it).

    Raises:
        KdrayError: ``path`` holds a marker that is damaged, of another kind or format, or
            lists files that are gone, naming the directory and the fix.
    """
    marker = path / MARKER
    if not marker.is_file():
        return None
    fix = f"delete {path} (or run the job with --restart) and kdray writes it again"
    try:
        info = json.loads(marker.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise KdrayError(f"{marker} is not a readable JSON file ({first_line(exc)}); {fix}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("files"), list):
        raise KdrayError(f"{marker} is not a kdray dataset marker of format {FORMAT}; {fix}")
    if info.get("kind") != kind:
        raise KdrayError(f"{path} holds a {info.get('kind')!r} dataset, not {kind!r}; {fix}")
    gone = [name for name in info["files"] if not (path / name).is_file()]
    if gone:
        raise KdrayError(f"{path}: {len(gone)} of its {len(info['files'])} files are missing (first: {gone[0]}); "
                         f"{fix}")
    return info


def write_dataset(ds: Any, path: Path, kind: str, meta: dict[str, Any] | None = None, *,
                  run: Callable[[Callable[[], None]], None] | None = None,
                  summarise: Callable[[list[Path]], dict[str, Any]] | None = None,
                  row_bytes: int | None = None, expect_rows: int | None = None,
                  verify: Callable[[list[Path]], None] | None = None, num_cpus: float | None = None) -> Artifact:
    """Execute the Ray dataset ``ds`` into the committed dataset ``path``; return it. On any
    error the partial directory is removed: nothing half-written is left behind.

    Args:
        ds: the lazy dataset; its actors write the parquet shards (zstd).
        kind: what the rows are (``responses``, ``records``, ...), checked by readers.
        meta: what the rows need to be read correctly (layout, models, settings), stored in the
            marker.
        run: calls the blocking write (default: directly); a stage passes one that reports
            progress while the write goes on.
        summarise: more marker fields computed from the written files (token counts, ...).
        row_bytes: an upper bound of one row's size in memory; files then hold at most
            :data:`FILE_BYTES` of rows each.
        expect_rows: the rows the job planned for (its steps and schedules are sized by them);
            another count is not committed.
        verify: called with the written files (maybe none) before anything is committed; what
            it raises is raised (the prepare stage refuses bad rows this way).
        num_cpus: the CPUs each write task reserves (default: Ray Data's, one unless the write
            fuses into the map before it); a stage writes with a light share
            (:meth:`kdray.stages.context.StageContext.write`), since its pool holds CPUs meanwhile.

    Raises:
        KdrayError: the dataset wrote no file (an empty input), not ``expect_rows`` rows, or
            what ``verify`` raised.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.partial-*"):  # what a killed writer left
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    # Not min_rows_per_file: a write task would then merge blocks, and Arrow refuses to merge a
    # block whose ragged column Ray typed as fixed-shape tensors (all rows one length) with one
    # typed variable-shaped ("Unable to merge: Field input_ids has incompatible types").
    per_file = max(1, FILE_BYTES // row_bytes) if row_bytes else None
    remote = None if num_cpus is None else {"num_cpus": num_cpus}
    write = lambda: ds.write_parquet(str(tmp), compression="zstd", max_rows_per_file=per_file,  # noqa: E731
                                     ray_remote_args=remote)
    try:
        (run or (lambda fn: fn()))(write)
        files = sorted(tmp.glob("*.parquet"), key=file_order) if tmp.is_dir() else []
        if verify is not None:
            verify(files)
        if not files:
            raise KdrayError(f"no rows to write into {path}: the stage's input was empty")
        import pyarrow.parquet as pq

        rows = parquet_rows(files)
        if expect_rows is not None and rows != expect_rows:
            raise KdrayError(
                f"the stage writing {path} made {rows} rows where the job planned {expect_rows}, so nothing was "
                "committed: a pool or Ray lost or repeated rows. Run the job again (it resumes from the last "
                "committed dataset); if the count is off again, report it as a kdray bug with the job's events.jsonl")
        info = {"format": FORMAT, "kind": kind, "files": [p.name for p in files], "rows": rows,
                "columns": pq.read_schema(files[0]).names,
                "bytes": sum(p.stat().st_size for p in files), "meta": meta or {}}
        if summarise is not None:
            info.update(summarise(files))
        (tmp / MARKER).write_text(json.dumps(info, indent=1), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return Artifact(path, info)


def file_order(path: Path) -> list[Any]:
    """The sort key of a written file: its name with each run of digits as a number. Ray Data
    names a write's files ``UUID_TASK-I.parquet``, ``I`` unpadded: by text, a task's eleventh
    file (``-10``) would come before its third (``-2``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def parquet_rows(files: list[Path]) -> int:
    """The number of rows in parquet ``files``, from their footers (no data is read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def files_of(path: Path, info: dict[str, Any]) -> list[str]:
    """The committed dataset's files, in its order."""
    return [str(path / name) for name in info["files"]]


_READER_SWITCH = threading.Lock()


def read_dataset(path: Path, info: dict[str, Any], columns: list[str] | None = None) -> Any:
    """The committed dataset at ``path`` (``info``: its :func:`committed` marker) as a lazy
    Ray dataset reading its files in the stored order; ``columns`` reads only those."""
    import ray.data

    from ray.data import DataContext

    # Ray Data 2.60's parquet reader v2 streams many files from one read task, past the object
    # store budget (``kdray bench scale``: 505 MiB spilled from a 1 GiB store at 32,000 top-k
    # rows); the v1 reader, one task per file, stays within it (nothing spilled, 2x the rows/s).
    context = DataContext.get_current()
    with _READER_SWITCH:  # pools answering together read from threads of one driver
        v2, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(files_of(path, info), columns=columns, shuffle=None, num_cpus=READ_NUM_CPUS)
        finally:
            context.use_datasource_v2 = v2
    ds.context.execution_options.preserve_order = True  # this dataset's context, not the driver's
    return ds


def read_column(path: Path, info: dict[str, Any], column: str) -> Any:
    """One column of a committed dataset as one numpy array in the stored order, read in the
    driver file by file: for per-row scalars the driver needs whole (keys, POCL's two
    measurements), a few bytes per row."""
    import numpy as np
    import pyarrow.parquet as pq

    parts = [pq.read_table(p, columns=[column]).column(column).to_numpy(zero_copy_only=False)
             for p in files_of(path, info)]
    return np.concatenate(parts) if parts else np.empty(0)


def nth_row_number(artifact: Artifact, n: int) -> int:
    """The ``_row`` of the ``n``-th row (from 1) of a committed dataset stored in ``_row`` order
    (a checked split, :mod:`kdray.data.split`), from the footers and one file's ``_row`` column:
    where its first ``n`` rows end.

    Raises:
        ValueError: ``n`` is not in 1..rows.
    """
    import pyarrow.parquet as pq

    if not 1 <= n <= artifact.rows:
        raise ValueError(f"row {n} of {artifact.path}, which has {artifact.rows}")
    for path in files_of(artifact.path, artifact.info):
        count = pq.ParquetFile(path).metadata.num_rows
        if n <= count:
            return int(pq.read_table(path, columns=["_row"]).column("_row")[n - 1].as_py())
        n -= count
    raise ValueError(f"{artifact.path}'s files hold fewer rows than its marker says")
