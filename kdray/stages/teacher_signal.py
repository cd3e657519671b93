"""Stage 3, teacher signal (``teacher_signal.mode`` ``topk`` / ``hidden``): score every training
response with the teacher's scorer pool once, into ``records/teacher-<mode>.parquet``."""

from __future__ import annotations

from typing import Any

from kdray.data.records import check_layout, read_signal_records, signal_key, topk_id_dtype, write_signal_records
from kdray.models import vocab_size
from kdray.pools import score_teacher
from kdray.stages.context import StageContext

Signal = tuple[dict[str, Any], dict[str, dict[str, Any]]]


def score_signal(ctx: StageContext, rows: list[dict[str, Any]]) -> tuple[Signal, dict[str, Any]]:
    """The teacher records of ``rows``, reusing the job's records file when it covers them.

    Returns:
        ``((meta, records by key), stats)``: the file's layout (:mod:`kdray.data.records`), each
        row's record by :func:`~kdray.data.records.signal_key`, and ``rows``, ``tokens``,
        ``bytes``, ``bytes_per_token``, ``file`` of the records file.

    Raises:
        RecordsError: the job's records file is unreadable, or covers these rows with another
            layout (mode, teacher, vocabulary, k, hidden dtype) than this job asks for.
    """
    sig, teacher = ctx.spec.teacher_signal, ctx.spec.teacher
    path = ctx.out / "records" / f"teacher-{sig.mode}.parquet"
    keys = [signal_key(r) for r in rows]
    teacher_vocab = vocab_size(teacher.model)
    if path.exists():
        meta, stored = read_signal_records(path)
        if set(keys) <= stored.keys():  # reused only when written with this job's layout (else RecordsError)
            layout = {"mode": sig.mode, "teacher": teacher.model, "vocab_size": teacher_vocab}
            layout.update({"k": sig.k} if sig.mode == "topk" else {"hidden_dtype": sig.hidden_dtype})
            check_layout(meta, layout)
            ctx.reporter.message(f"score: reusing the teacher records in {path}")
            tokens = sum(r["n_tokens"] for r in stored.values())
            size = path.stat().st_size
            return (meta, stored), {"rows": len(stored), "tokens": tokens, "bytes": size,
                                    "bytes_per_token": size / max(tokens, 1), "file": str(path)}
    with ctx.phase("score", len(rows), f"teacher {sig.mode} records"):
        records = score_teacher(rows, ctx.spec, on_rows=lambda n: ctx.reporter.advance("score", n),
                                encoding=ctx.prompt_encoding())
        meta = {"mode": sig.mode, "teacher": teacher.model, "vocab_size": teacher_vocab}
        if sig.mode == "topk":
            meta.update(k=sig.k, id_dtype=topk_id_dtype(teacher_vocab))
        else:
            meta.update(hidden_dtype=sig.hidden_dtype, hidden_size=int(records[0]["hidden"].shape[1]))
        stats = write_signal_records(path, keys, records, meta)
        ctx.reporter.message(f"score: {stats['tokens']} response tokens, {stats['bytes_per_token']:.1f} bytes/token "
                             f"({stats['bytes'] / 2**20:.2f} MiB) in {path.name}")
    return read_signal_records(path), {**stats, "file": str(path)}
