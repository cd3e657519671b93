"""Stage 3, teacher signal (``teacher_signal.mode`` ``topk`` / ``hidden``): score every training
response with the teacher's scorer pool once, into the dataset ``records/teacher-<mode>/``.

Its rows are the training examples themselves (``key``, ``input_ids``, ``prompt_len``, as the
trainer encodes them) with each row's record in its stored bytes (:mod:`kdray.data.records`),
written by the scorer actors; the trainer reads them with no tokenizer pass and no join.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.data.artifacts import Artifact, open_artifact
from kdray.data.records import SIGNAL_FORMAT, check_layout, record_bytes_per_token, topk_id_dtype
from kdray.errors import RecordsError
from kdray.models import hidden_size, vocab_size
from kdray.pools.run import score_dataset
from kdray.stages.context import StageContext

#: The columns of a records dataset the trainer reads besides the record's own.
EXAMPLE_COLUMNS = ["key", "input_ids", "prompt_len"]


def records_layout(ctx: StageContext) -> dict[str, Any]:
    """The layout the job's records are written in (:mod:`kdray.data.records`)."""
    sig, teacher = ctx.spec.teacher_signal, ctx.spec.teacher
    teacher_vocab = vocab_size(teacher.model)
    meta: dict[str, Any] = {"format": SIGNAL_FORMAT, "mode": sig.mode, "teacher": teacher.model,
                            "vocab_size": teacher_vocab}
    if sig.mode == "topk":
        meta.update(k=sig.k, id_dtype=topk_id_dtype(teacher_vocab))
    else:
        meta.update(hidden_dtype=sig.hidden_dtype, hidden_size=hidden_size(teacher.model))
    return meta


def _row_bytes(ctx: StageContext, layout: dict[str, Any]) -> int:
    """An upper bound of one records row's size: ``max_seq_len`` tokens of ids and record."""
    per_token = record_bytes_per_token(layout["mode"], k=layout.get("k", 0), vocab_size=layout["vocab_size"],
                                       hidden_size=layout.get("hidden_size", 0),
                                       hidden_dtype=layout.get("hidden_dtype", "float32"))
    return (per_token + 4) * ctx.spec.training.max_seq_len


def record_tokens(files: list[Path]) -> dict[str, Any]:
    """``tokens``: the response tokens the records files hold (the marker's summary)."""
    import pyarrow.parquet as pq

    tokens = sum(int(pq.read_table(p, columns=["n_tokens"]).column("n_tokens").to_numpy().sum()) for p in files)
    return {"tokens": tokens}


def score_signal(ctx: StageContext, responses: Artifact) -> tuple[Artifact, dict[str, Any], dict[str, Any]]:
    """The teacher records of the training rows ``responses``, reusing the job's records when
    an earlier run committed them for the same rows.

    Returns:
        (the records dataset, its layout with ``file`` (the directory, for error messages),
        stats: ``rows``, ``tokens``, ``bytes``, ``bytes_per_token``, ``file``).

    Raises:
        RecordsError: the job's records were written with another layout (mode, teacher,
            vocabulary, k, hidden dtype) than this job asks for, or cover other rows.
    """
    sig = ctx.spec.teacher_signal
    path = ctx.out / "records" / f"teacher-{sig.mode}"
    layout = records_layout(ctx)
    done = open_artifact(path, "records")
    if done is not None:
        check_layout({**done.meta, "file": str(path)}, layout)
        if done.rows != responses.rows:
            raise RecordsError(f"{path} holds the records of {done.rows} rows, but the job trains on {responses.rows}: "
                               "they were scored from other data; delete it (or run the job with --restart)")
        ctx.reporter.message(f"score: reusing the teacher records in {path}")
        records = done
    else:
        with ctx.phase("score", responses.rows, f"teacher {sig.mode} records"):
            row_bytes = _row_bytes(ctx, layout)
            records = ctx.write("score", lambda hub: score_dataset(
                responses.read(EXAMPLE_COLUMNS), ctx.spec, layout, progress=hub, row_bytes=row_bytes),
                path, "records", layout, summarise=record_tokens, row_bytes=row_bytes, expect_rows=responses.rows)
    tokens, size = int(records.info["tokens"]), int(records.info["bytes"])
    stats = {"rows": records.rows, "tokens": tokens, "bytes": size, "bytes_per_token": size / max(tokens, 1),
             "file": str(path)}
    if done is None:
        ctx.reporter.message(f"score: {tokens} response tokens, {stats['bytes_per_token']:.1f} bytes/token "
                             f"({size / 2**20:.2f} MiB) in {path.name}")
    return records, {**layout, "file": str(path)}, stats
