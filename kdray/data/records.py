"""Teacher-signal records: the teacher's per-token top-k log-probs or hidden states of every
training row.

One parquet file per job (``OUTPUT_DIR/records/teacher-<mode>.parquet``), one row per training
row (``key`` = "id#sample_index"), written once by the scoring pass and read by the trainer:

* ``topk``: ``topk_ids`` holds n_tokens·k token ids as little-endian uint16 (vocabularies up to
  65,536) or uint32, ``topk_logprobs`` n_tokens·k float16 log-probs, descending per token (a
  -inf slot is padding). The tail mass is not stored: it is 1 − Σ exp(top-k), recomputed
  from the stored values. Raw bytes in a binary column cost 4 bytes of offsets per row, not
  per token; parquet compresses the pages with zstd.
* ``hidden``: ``hidden`` holds n_tokens·H values of the teacher's final hidden state in
  ``hidden_dtype``.

The file's schema metadata (``kdray.signal``) records the mode, k, dtypes, sizes and the teacher,
so a reader never guesses the layout. A file that is missing, unreadable, of another layout or
scored from other data is a :class:`~kdray.errors.RecordsError` naming it; the fix is always to
score again (``kdray run --restart``, or delete the file).
"""

from __future__ import annotations

from typing import Any

from kdray.errors import RecordsError, first_line

SIGNAL_META_KEY = b"kdray.signal"
SIGNAL_FORMAT = 1
_HIDDEN_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16"}
#: Metadata each mode's layout needs, and the columns that hold its rows.
_META_KEYS = {"topk": ("k", "vocab_size", "id_dtype"), "hidden": ("hidden_size", "hidden_dtype")}
SIGNAL_COLUMNS = {"topk": ("topk_ids", "topk_logprobs"), "hidden": ("hidden",)}
#: Layout fields a job compares with what it asks for before reusing a file.
LAYOUT_FIELDS = ("mode", "teacher", "vocab_size", "k", "hidden_dtype")
_RESCORE = "run the job with --restart (or delete the file) and kdray scores the teacher again"


def topk_id_dtype(vocab_size: int) -> str:
    """The narrowest id type that holds every token id of the vocabulary."""
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


def record_bytes_per_token(mode: str, *, k: int = 0, vocab_size: int = 0, hidden_size: int = 0,
                           hidden_dtype: str = "float32") -> int:
    """Bytes one response token's record takes before compression: ``k`` ids
    (:func:`topk_id_dtype` of ``vocab_size``) + ``k`` float16 log-probs, or ``hidden_size`` values
    of ``hidden_dtype``. zstd shrinks top-k records little (log-probs are noisy); hidden states
    hardly at all."""
    import numpy as np

    if mode == "topk":
        return k * (np.dtype(topk_id_dtype(vocab_size)).itemsize + 2)
    return hidden_size * (4 if hidden_dtype == "float32" else 2)


def signal_key(row: dict[str, Any]) -> str:
    return f"{row['id']}#{int(row.get('sample_index', 0))}"


def encode_signal(record: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """One scored row (numpy arrays) → the bytes stored in its parquet row."""
    import numpy as np

    if meta["mode"] == "topk":
        ids, lps = np.asarray(record["topk_ids"]), np.asarray(record["topk_logprobs"])
        if ids.shape != lps.shape or ids.ndim != 2 or ids.shape[1] != meta["k"]:
            raise ValueError(f"top-k record has ids {ids.shape} and log-probs {lps.shape}; expected [n, {meta['k']}]")
        if ids.size and (ids.min() < 0 or ids.max() >= meta["vocab_size"]):
            raise ValueError(f"top-k ids must lie in [0, {meta['vocab_size']}), got [{ids.min()}, {ids.max()}]")
        return {"n_tokens": int(ids.shape[0]), "topk_ids": ids.astype(meta["id_dtype"]).tobytes(),
                "topk_logprobs": lps.astype("<f2").tobytes()}
    hidden = np.asarray(record["hidden"], dtype=np.float32)
    if hidden.ndim != 2 or hidden.shape[1] != meta["hidden_size"]:
        raise ValueError(f"hidden record has shape {hidden.shape}; expected [n, {meta['hidden_size']}]")
    return {"n_tokens": int(hidden.shape[0]), "hidden": _hidden_bytes(hidden, meta["hidden_dtype"])}


def _hidden_bytes(hidden: Any, dtype: str) -> bytes:
    if dtype == "bfloat16":  # numpy has no bfloat16: round through torch, keep the raw 2 bytes
        import torch

        return torch.from_numpy(hidden).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return hidden.astype(_HIDDEN_DTYPES[dtype]).tobytes()


def _stored_arrays(row: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A stored parquet row → zero-copy numpy views in the stored dtypes, ``[n, k]`` / ``[n, H]``
    (bfloat16 hidden states as their raw int16 bits: numpy has no bfloat16)."""
    import numpy as np

    n = int(row["n_tokens"])
    _check_sizes(row, meta, n)
    if meta["mode"] == "topk":
        k = meta["k"]
        return {"n_tokens": n, "topk_ids": np.frombuffer(row["topk_ids"], dtype=meta["id_dtype"]).reshape(n, k),
                "topk_logprobs": np.frombuffer(row["topk_logprobs"], dtype="<f2").reshape(n, k)}
    dtype = "<i2" if meta["hidden_dtype"] == "bfloat16" else _HIDDEN_DTYPES[meta["hidden_dtype"]]
    return {"n_tokens": n, "hidden": np.frombuffer(row["hidden"], dtype=dtype).reshape(n, meta["hidden_size"])}


def decode_signal(row: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A stored parquet row → numpy arrays for inspection: ``topk_ids`` int64 / ``topk_logprobs``
    float32 ``[n, k]``, or ``hidden`` float32 ``[n, H]``. (The trainer keeps the stored dtypes:
    :func:`signal_tensors`.)"""
    import numpy as np

    arrays = _stored_arrays(row, meta)
    if meta["mode"] == "topk":
        return {"n_tokens": arrays["n_tokens"], "topk_ids": arrays["topk_ids"].astype(np.int64),
                "topk_logprobs": arrays["topk_logprobs"].astype(np.float32)}
    hidden = arrays["hidden"]
    if meta["hidden_dtype"] == "bfloat16":
        import torch

        hidden = torch.from_numpy(hidden.copy()).view(torch.bfloat16).float().numpy()
    return {"n_tokens": arrays["n_tokens"], "hidden": hidden.astype(np.float32)}


def _check_sizes(row: dict[str, Any], meta: dict[str, Any], n: int) -> None:
    """Each column of a stored row holds n_tokens x width values, or the file is corrupt."""
    import numpy as np

    if meta["mode"] == "topk":
        k = meta["k"]
        sizes = {"topk_ids": n * k * np.dtype(meta["id_dtype"]).itemsize, "topk_logprobs": n * k * 2}
    else:
        dtype = meta["hidden_dtype"]
        itemsize = 2 if dtype == "bfloat16" else np.dtype(_HIDDEN_DTYPES[dtype]).itemsize
        sizes = {"hidden": n * meta["hidden_size"] * itemsize}
    for column, size in sizes.items():
        got = len(row[column]) if row.get(column) is not None else 0
        if got != size:
            raise RecordsError(f"{meta.get('file', 'the teacher records file')}: a record of {n} tokens holds {got} "
                               f"bytes of {column}, not {size}; the file is corrupt: {_RESCORE}")


def write_signal_records(path: Any, keys: list[str], records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Write the scored rows to ``path`` (atomically) → stats: rows, tokens, bytes, bytes/token."""
    import json
    import os
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    meta = {**meta, "format": SIGNAL_FORMAT}
    encoded = [encode_signal(r, meta) for r in records]
    columns: dict[str, Any] = {"key": pa.array(keys, pa.string()),
                               "n_tokens": pa.array([e["n_tokens"] for e in encoded], pa.int32())}
    for name in (("topk_ids", "topk_logprobs") if meta["mode"] == "topk" else ("hidden",)):
        columns[name] = pa.array([e[name] for e in encoded], pa.binary())
    table = pa.table(columns).replace_schema_metadata({SIGNAL_META_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    tokens = sum(e["n_tokens"] for e in encoded)
    size = path.stat().st_size
    return {"rows": len(keys), "tokens": tokens, "bytes": size, "bytes_per_token": size / max(tokens, 1)}


def read_signal_records(path: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(meta, key → stored row with raw bytes) of a records file; decode rows with
    :func:`decode_signal`."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise RecordsError(f"teacher records file {path} does not exist; {_RESCORE}") from None
    except (OSError, pa.ArrowException) as exc:
        raise RecordsError(f"{path} is not a readable parquet file ({first_line(exc)}): it was cut short or "
                           f"overwritten; {_RESCORE}") from None
    raw = (table.schema.metadata or {}).get(SIGNAL_META_KEY)
    if raw is None:
        raise RecordsError(f"{path} is not a kdray teacher-signal file (no {SIGNAL_META_KEY.decode()} metadata); "
                           f"{_RESCORE}")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise RecordsError(f"{path}: its {SIGNAL_META_KEY.decode()} metadata is not a JSON object; {_RESCORE}")
    if meta.get("format") != SIGNAL_FORMAT:
        raise RecordsError(f"{path} has record format {meta.get('format')}; this kdray reads format "
                           f"{SIGNAL_FORMAT}: {_RESCORE}")
    mode = meta.get("mode")
    missing = [k for k in ("mode", *_META_KEYS.get(mode, ())) if k not in meta]
    missing += [c for c in ("key", "n_tokens", *SIGNAL_COLUMNS.get(mode, ())) if c not in table.column_names]
    if mode not in _META_KEYS or missing:
        raise RecordsError(f"{path} is not a complete teacher-signal file (mode {mode!r}, missing "
                           f"{', '.join(missing) or 'a known mode'}); {_RESCORE}")
    rows = table.to_pylist()
    return {**meta, "file": str(path)}, {r.pop("key"): r for r in rows}


def check_layout(meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise :class:`RecordsError` when a records file's layout (:data:`LAYOUT_FIELDS`) differs
    from what the job asks for, naming each field that differs."""
    differ = [f"{k} {meta.get(k)!r} (this job: {expected[k]!r})" for k in LAYOUT_FIELDS
              if k in expected and meta.get(k) != expected[k]]
    if differ:
        raise RecordsError(f"{meta.get('file', 'the teacher records file')} was written with another layout: "
                           f"{', '.join(differ)}; it comes from another job or another version of this one: "
                           f"{_RESCORE}")


def check_record_lengths(n_tokens: Any, n_labels: Any, meta: dict[str, Any]) -> None:
    """Each row's record must cover exactly its label tokens, else it was scored from other data."""
    for i, (n, m) in enumerate(zip(n_tokens, n_labels)):
        if int(n) != int(m):
            raise RecordsError(f"{meta.get('file', 'the teacher records file')}: the teacher record of row {i} covers "
                               f"{int(n)} response tokens but the trainer labels {int(m)}: the records were scored "
                               f"from different data or settings; {_RESCORE}")


def signal_tensors(rows: list[dict[str, Any]], label_starts: list[int], length: int,
                   meta: dict[str, Any]) -> dict[str, Any]:
    """Place each stored row's signal at its label positions, in the stored dtypes, as torch
    tensors of one micro-batch padded to ``length``: ``t_topk_ids`` (int64, for ``gather``) and
    ``t_topk_logprobs`` (float16) ``[B, L, k]``, or ``t_hidden [B, L, H]`` in ``hidden_dtype``.
    Position ``p`` holds the teacher's signal for predicting the token at ``p`` (the trainer
    shifts it with the labels); row ``i``'s labels are the ``n_tokens`` positions from
    ``label_starts[i]``.

    Other positions get a harmless filler (one certain token; zeros), never read by a loss
    because the label mask excludes them.

    Raises:
        RecordsError: a stored row's bytes do not match its token count (a corrupt file).
    """
    import torch

    arrays = [_stored_arrays(r, meta) for r in rows]
    n_rows = len(rows)
    if meta["mode"] == "topk":
        k = meta["k"]
        ids = torch.zeros((n_rows, length, k), dtype=torch.int64)
        lps = torch.full((n_rows, length, k), float("-inf"), dtype=torch.float16)
        lps[..., 0] = 0.0
        for i, (a, start) in enumerate(zip(arrays, label_starts)):
            stop = start + a["n_tokens"]
            ids[i, start:stop] = torch.from_numpy(a["topk_ids"].astype("int64"))
            lps[i, start:stop] = torch.from_numpy(a["topk_logprobs"].copy())
        return {"t_topk_ids": ids, "t_topk_logprobs": lps}
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[meta["hidden_dtype"]]
    hidden = torch.zeros((n_rows, length, meta["hidden_size"]), dtype=dtype)
    for i, (a, start) in enumerate(zip(arrays, label_starts)):
        values = torch.from_numpy(a["hidden"].copy())
        hidden[i, start:start + a["n_tokens"]] = values.view(torch.bfloat16) if dtype == torch.bfloat16 else values
    return {"t_hidden": hidden}
