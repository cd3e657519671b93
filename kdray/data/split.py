"""A job's splits through Ray Data: read and checked by tasks, written as committed datasets
(``datasets/prompts/``, ``datasets/heldout/``); the driver sees units, counts and the first few ids.

1. The driver cuts the reference into units (:func:`kdray.data.sources.source_units`: file
   sizes and ``state.json`` only). One Ray task per unit reads it and returns its row count
   (:func:`kdray.data.sources.count_unit`), so an unreadable line anywhere fails the split
   with the file and line, as the driver path does, and every row gets its number in file
   order. ``data.max_train_samples`` (``max_heldout_samples``) keeps the units' first N rows.
2. Ray Data reads the units again in tasks (our readers, not ``ray.data.read_json``: pyarrow's
   JSON reader infers one type per column and names no line, and our rows may hold any JSON
   value) and checks each row with :func:`kdray.data.datasets.check_row`, the check
   :func:`kdray.data.datasets.load_split` makes in a tool's process.
3. Duplicate ids, across units and files: each row gets a bucket from its id's CRC-32 (all rows
   of an id share one), a group-by on the bucket brings each bucket's rows to one task, which
   keeps the first row of each id in file order; a sort on the row number puts the rows back in
   file order. (A group per id would cost Ray Data a UDF call per id: ~0.7 ms each.)
4. Tasks count the prompts' tokens with the student's tokenizer (``data.max_prompt_tokens``),
   drop the bad rows, and send a small report per batch (counts per reason, the first ids) to
   an actor; the kept rows are written (:func:`kdray.data.artifacts.write_dataset`).
5. Before the dataset is committed, the driver merges the reports: ``on_bad_rows: fail`` with a
   bad row (or no usable row) raises the :class:`DataError` the driver path raises, and the
   partial dataset is removed.

The committed rows: ``_row`` (row number in the split, from 0, file order), ``id``, ``prompt``,
and ``response`` when the job trains on the dataset's responses; the report is in the marker's
``meta``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.data.artifacts import Artifact, parquet_rows, write_dataset
from kdray.data.datasets import DUPLICATE, RowReport, bad_rows_error, check_row, too_long
from kdray.data.sources import JSONL_CHUNK_BYTES, Unit, count_unit, source_units, unit_rows
from kdray.errors import DataError, user_error
from kdray.spec import DataSpec

#: The committed dataset's kind (:func:`kdray.data.artifacts.committed`).
PROMPTS_KIND = "prompts"
#: Rows per batch of the token-count-and-report tasks (one report per batch).
CHECK_BATCH_ROWS = 1024
#: Rows per duplicate-id bucket, about (the split's rows set the number of buckets).
BUCKET_ROWS = 20_000
_SHOW_IDS = 5
_tokenizers: dict[tuple[str, Any], Any] = {}


def write_checked_split(spec: DataSpec, split: str, path: Path, *, need_response: bool, tokenizer_ref: str,
                        encoding: Any, row_bytes: int | None = None,
                        jsonl_chunk_bytes: int = JSONL_CHUNK_BYTES) -> Artifact:
    """Read and check the split ``split`` of ``spec`` in Ray tasks and write its kept rows to the
    committed dataset ``path`` (Ray must be up). Prompts are counted with ``tokenizer_ref``'s
    tokenizer under ``encoding`` (a :class:`kdray.data.tokenize.PromptEncoding`).

    Returns:
        The artifact; ``meta["report"]`` is the split's :meth:`RowReport.as_dict`.

    Raises:
        DataError: the split cannot be read (naming the file and line), has no rows, or has bad
            rows it must fail on (the message of :func:`kdray.data.datasets.bad_rows_error`);
            nothing is left at ``path``.
    """
    import ray
    import ray.data
    from ray.data.context import ShuffleStrategy

    ref = getattr(spec, split)
    limit = spec.max_train_samples if split == "train" else spec.max_heldout_samples
    units, total, fields = _counted_units(ref, split, limit, jsonl_chunk_bytes)
    if not total:
        raise DataError(f"data.{split}: {ref!r} has no rows")
    items = [{"kind": u.kind, "source": u.source, "start": u.start, "stop": -1 if u.stop is None else u.stop,
              "saved": u.saved, "first_row": first, "rows": n} for u, first, n in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.execution_options.preserve_order = True
    # the sort-based shuffle: Ray's hash shuffle starts aggregator actors (seconds at any size)
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    buckets = -(-total // BUCKET_ROWS)
    ds = ds.map_batches(_read_and_check, batch_size=1, batch_format="pyarrow",
                        fn_kwargs=dict(spec=spec, need_response=need_response, buckets=buckets))
    if spec.id_field:  # numbered rows (id_field null) have no duplicates
        ds = ds.groupby("bucket", num_partitions=buckets).map_groups(
            _mark_duplicates, batch_format="pyarrow").sort("_row")
    box = _report_box()
    ds = ds.map_batches(_count_and_keep, batch_size=CHECK_BATCH_ROWS, batch_format="pyarrow",
                        fn_kwargs=dict(spec=spec, need_response=need_response, tokenizer_ref=tokenizer_ref,
                                       encoding=encoding, box=box))
    meta: dict[str, Any] = {"split": split, "source": ref, "need_response": need_response, "limit": limit}

    def verify(files: list[Path]) -> None:
        report, example = merge_reports(ray.get(box.take.remote()), split, spec)
        report.total, report.kept = total, parquet_rows(files) if files else 0
        bad_rows_error(report, spec, fields, example)
        meta["report"] = report.as_dict()

    try:
        return write_dataset(ds, path, PROMPTS_KIND, meta, verify=verify, row_bytes=row_bytes)
    except DataError:
        raise
    except Exception as exc:  # a unit that could not be read the second time, on a worker
        err = user_error(exc)
        if isinstance(err, DataError):
            raise DataError(f"data.{split}: {err}") from None
        raise
    finally:
        ray.kill(box)


def _counted_units(ref: str, split: str, limit: int | None,
                   chunk: int) -> tuple[list[tuple[Unit, int, int]], int, list[str]]:
    """``(unit, first row number, rows to read)`` for each unit holding one of the first
    ``limit`` rows, the number of rows, and the fields of the first row; counted in tasks."""
    import ray

    try:
        units = source_units(ref, chunk)
    except DataError as exc:
        raise DataError(f"data.{split}: {exc}") from None
    count = ray.remote(count_unit)
    refs = [count.remote(u) for u in units]
    out: list[tuple[Unit, int, int]] = []
    first, fields = 0, None
    for r in refs:  # in file order: the first unreadable unit is the one named
        try:
            parts = ray.get(r)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, DataError):
                raise DataError(f"data.{split}: {exc.cause}") from None
            raise
        for unit, n, names in parts:
            take = n if limit is None else max(0, min(n, limit - first))
            if take:
                fields = names if fields is None else fields
                out.append((unit, first, take))
            first += take
    return out, first, fields or []


def _read_and_check(batch: Any, *, spec: DataSpec, need_response: bool, buckets: int) -> Any:
    """Read one unit's rows (``batch``: one unit) and check each (:func:`check_row`): a table of
    ``_row``, ``id``, ``keyed``, ``reason``, ``example``, ``prompt`` [, ``response``], and
    ``bucket`` (from the id's CRC-32, out of ``buckets``)."""
    import zlib

    import pyarrow as pa

    item = batch.to_pylist()[0]
    unit = Unit(item["kind"], item["source"], item["start"], None if item["stop"] < 0 else item["stop"],
                item["saved"])
    cols: dict[str, list[Any]] = {k: [] for k in ("_row", "id", "keyed", "reason", "example", "prompt", "response")}
    for i, row in enumerate(unit_rows(unit)):
        if i >= item["rows"]:
            break
        c = check_row(row, item["first_row"] + i, spec, need_response=need_response)
        for k, v in (("_row", item["first_row"] + i), ("id", c.id), ("keyed", c.keyed), ("reason", c.reason),
                     ("example", c.example), ("prompt", c.prompt), ("response", c.response)):
            cols[k].append(v)
    if not need_response:
        del cols["response"]
    cols["bucket"] = [zlib.crc32(rid.encode("utf-8")) % buckets for rid in cols["id"]]
    types = {"_row": pa.int64(), "keyed": pa.bool_(), "bucket": pa.int64()}
    return pa.table({k: pa.array(v, type=types.get(k, pa.string())) for k, v in cols.items()})


def _mark_duplicates(group: Any) -> Any:
    """The rows of one bucket: every keyed row whose id an earlier keyed row (in file order) has
    is a duplicate (``dup``)."""
    import numpy as np
    import pyarrow as pa

    keyed = group.column("keyed").to_pylist()
    ids = group.column("id").to_pylist()
    rows = group.column("_row").to_numpy()
    dup = np.zeros(len(ids), dtype=bool)
    seen: set[str] = set()
    for j in np.argsort(rows, kind="stable"):
        if keyed[j]:
            dup[j] = ids[j] in seen
            seen.add(ids[j])
    return group.append_column("dup", pa.array(dup, type=pa.bool_()))


def _count_and_keep(batch: Any, *, spec: DataSpec, need_response: bool, tokenizer_ref: str, encoding: Any,
                    box: Any) -> Any:
    """Decide each row's final reason (a duplicate, its own, or a prompt over
    ``data.max_prompt_tokens``), send the batch's report to ``box``, and keep the good rows."""
    import pyarrow as pa
    import ray

    rows = batch.column("_row").to_pylist()
    ids = batch.column("id").to_pylist()
    prompts = batch.column("prompt").to_pylist()
    reasons = batch.column("reason").to_pylist()
    examples = batch.column("example").to_pylist()
    if "dup" in batch.column_names:
        for j, dup in enumerate(batch.column("dup").to_pylist()):
            if dup:
                reasons[j], examples[j] = DUPLICATE, ""
    ok = [j for j, r in enumerate(reasons) if not r]
    for j, n in zip(ok, _counter(tokenizer_ref, encoding)([prompts[j] for j in ok])):
        if n > spec.max_prompt_tokens:
            reasons[j] = too_long(spec)
    report: dict[str, Any] = {"counts": {}, "first": {}, "example": None}
    for j, reason in enumerate(reasons):
        if reason:
            report["counts"][reason] = report["counts"].get(reason, 0) + 1
            shown = report["first"].setdefault(reason, [])
            if len(shown) < _SHOW_IDS:
                shown.append((rows[j], ids[j]))
            if examples[j] and report["example"] is None:
                report["example"] = (rows[j], examples[j])
    if rows:
        ray.get(box.add.remote(min(rows), report))  # keyed by the batch's first row: a retry replaces it
    keep = pa.array([not r for r in reasons], type=pa.bool_())
    return batch.select(["_row", "id", "prompt"] + (["response"] if need_response else [])).filter(keep)


def _counter(tokenizer_ref: str, encoding: Any) -> Any:
    """The prompts' token counter, loaded once per worker process."""
    key = (tokenizer_ref, encoding)
    if key not in _tokenizers:
        from kdray.data.tokenize import prompt_token_counter
        from kdray.models import load_tokenizer

        _tokenizers[key] = prompt_token_counter(load_tokenizer(tokenizer_ref), encoding)
    return _tokenizers[key]


def merge_reports(reports: dict[int, dict[str, Any]], split: str, spec: DataSpec) -> tuple[RowReport, str]:
    """One report (without ``total`` / ``kept``) and the first invalid-unicode example from the
    per-batch ones: counts summed, the first ids in file order, reasons in the order their first
    row comes (a prompt over the token limit last, as the driver path finds them)."""
    counts: dict[str, int] = {}
    first: dict[str, list[tuple[int, str]]] = {}
    examples: list[tuple[int, str]] = []
    for part in reports.values():
        for reason, n in part["counts"].items():
            counts[reason] = counts.get(reason, 0) + n
            first.setdefault(reason, []).extend(tuple(x) for x in part["first"][reason])
        if part["example"] is not None:
            examples.append(tuple(part["example"]))
    report = RowReport(split=split)
    last = too_long(spec)
    for reason in sorted(counts, key=lambda r: (r == last, min(first[r])[0])):
        shown = [rid for _, rid in sorted(first[reason])[:_SHOW_IDS]]
        report.counts[reason], report.first_ids[reason] = counts[reason], shown
    return report, min(examples)[1] if examples else ""


def _report_box() -> Any:
    """An actor (no CPU) holding the per-batch reports until the driver takes them."""
    import ray

    @ray.remote(num_cpus=0)
    class ReportBox:
        def __init__(self) -> None:
            self.reports: dict[int, dict[str, Any]] = {}

        def add(self, key: int, report: dict[str, Any]) -> None:
            self.reports[key] = report

        def take(self) -> dict[int, dict[str, Any]]:
            return self.reports

    return ReportBox.remote()
