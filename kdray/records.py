"""The rows passed from generation to training, and how one example becomes token ids.

One function, :func:`encode_batch`, decides which tokens of prompt + response the student
is trained and scored on, so the trainer (:class:`kdray.training.TokenizeForTraining`) and
the scorer (the POCL difficulty measurer in :mod:`kdray.generation`) can never disagree:

* the prompt is tokenized by :func:`prompt_token_ids`: wrapped as a user turn by the
  tokenizer's chat template when it has one and the spec allows it (``data.chat_template``),
  else tokenized as the tokenizer does by default (special tokens included). Generation pools
  receive these ids, never the raw text, so a prompt means the same tokens everywhere;
* the response is tokenized without special tokens, and gets EOS appended unless the
  generator stopped it at the length limit (``finish_reason == "length"``): a response that
  ended on its own teaches the student to stop.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def uses_chat_template(tokenizer: Any, setting: str) -> bool:
    """Whether prompts are wrapped by the tokenizer's chat template (``data.chat_template``)."""
    return setting == "auto" and bool(getattr(tokenizer, "chat_template", None))


def prompt_token_ids(tokenizer: Any, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """The token ids of each prompt: as one user turn of the chat template, with the
    generation prompt appended (``chat_template=True``), or plain tokenization."""
    if not chat_template:
        return [list(ids) for ids in tokenizer([str(p) for p in prompts]).input_ids]
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": str(p)}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


def encode_batch(tokenizer: Any, prompts: list[str], responses: list[str], finish_reasons: list[str] | None,
                 chat_template: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per example; one tokenizer call per side."""
    prompt_ids = prompt_token_ids(tokenizer, prompts, chat_template)
    response_ids = tokenizer([str(r) for r in responses], add_special_tokens=False).input_ids
    out = []
    for i in range(len(prompt_ids)):
        resp = list(response_ids[i])
        if finish_reasons is None or str(finish_reasons[i]) != "length":
            resp.append(tokenizer.eos_token_id)
        out.append((list(prompt_ids[i]), resp))
    return out


def pack_examples(pairs: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> dict[str, Any]:
    """(prompt ids, response ids) pairs → fixed-length ``input_ids``, ``attention_mask`` and
    ``labels`` (int64 numpy, right-padded, cut at ``max_len``). Labels are the response tokens;
    the prompt and the padding are -100, so losses cover only what the student must learn."""
    import numpy as np

    n = len(pairs)
    ids = np.full((n, max_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    labels = np.full((n, max_len), IGNORE_INDEX, dtype=np.int64)
    for i, (prompt, response) in enumerate(pairs):
        seq = (list(prompt) + list(response))[:max_len]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(prompt) : len(seq)] = seq[len(prompt) :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- teacher-signal records ----------------------------------------------------------------------
#
# One parquet file per job (``OUTPUT_DIR/records/teacher-<mode>.parquet``), one row per training
# row (``key`` = "id#sample_index"), written once by the scoring pass and read by the trainer:
#
# * ``topk``: ``topk_ids`` holds n_tokens·k token ids as little-endian uint16 (vocabularies up to
#   65,536) or uint32, ``topk_logprobs`` n_tokens·k float16 log-probs, descending per token (a
#   -inf slot is padding). The tail mass is not stored: it is 1 − Σ exp(top-k), recomputed
#   from the stored values. Raw bytes in a binary column cost 4 bytes of offsets per row, not
#   per token; parquet compresses the pages with zstd.
# * ``hidden``: ``hidden`` holds n_tokens·H values of the teacher's final hidden state in
#   ``hidden_dtype``.
#
# The file's schema metadata (``kdray.signal``) records the mode, k, dtypes, sizes and the teacher,
# so a reader never guesses the layout.

SIGNAL_META_KEY = b"kdray.signal"
SIGNAL_FORMAT = 1
_HIDDEN_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16"}


def topk_id_dtype(vocab_size: int) -> str:
    """The narrowest id type that holds every token id of the vocabulary."""
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


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


def decode_signal(row: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A stored parquet row → numpy arrays: ``topk_ids`` int64 / ``topk_logprobs`` float32
    ``[n, k]``, or ``hidden`` float32 ``[n, H]``."""
    import numpy as np

    n = int(row["n_tokens"])
    if meta["mode"] == "topk":
        k = meta["k"]
        ids = np.frombuffer(row["topk_ids"], dtype=meta["id_dtype"]).reshape(n, k).astype(np.int64)
        lps = np.frombuffer(row["topk_logprobs"], dtype="<f2").reshape(n, k).astype(np.float32)
        return {"n_tokens": n, "topk_ids": ids, "topk_logprobs": lps}
    dtype = meta["hidden_dtype"]
    if dtype == "bfloat16":
        import torch

        raw = np.frombuffer(row["hidden"], dtype="<i2").reshape(n, meta["hidden_size"]).copy()
        hidden = torch.from_numpy(raw).view(torch.bfloat16).float().numpy()
    else:
        hidden = np.frombuffer(row["hidden"], dtype=_HIDDEN_DTYPES[dtype]).reshape(n, meta["hidden_size"])
    return {"n_tokens": n, "hidden": hidden.astype(np.float32)}


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

    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(SIGNAL_META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a kdray teacher-signal file (no {SIGNAL_META_KEY.decode()} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != SIGNAL_FORMAT:
        raise ValueError(f"{path} has record format {meta.get('format')}; this kdray reads format {SIGNAL_FORMAT}")
    rows = table.to_pylist()
    return meta, {r.pop("key"): r for r in rows}


def align_signal(rows: list[dict[str, Any]], labels: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Place each row's decoded signal at its label positions: ``t_topk_ids`` /
    ``t_topk_logprobs`` ``[B, L, k]`` or ``t_hidden`` ``[B, L, H]``, where position ``p`` holds
    the teacher's signal for predicting the token at ``p`` (the trainer shifts it with the labels).

    Other positions get a harmless filler (one certain token; zeros), never read by a loss
    because the label mask excludes them. A row whose record covers a different number of
    tokens than its labels was scored from other data, and is an error."""
    import numpy as np

    n, length = labels.shape
    label_pos = [np.nonzero(labels[i] != IGNORE_INDEX)[0] for i in range(n)]
    for i, (row, pos) in enumerate(zip(rows, label_pos)):
        if row["n_tokens"] != len(pos):
            raise ValueError(f"teacher record of row {i} covers {row['n_tokens']} response tokens but the trainer "
                             f"labels {len(pos)}: the records were scored from different data or settings; "
                             "rerun the job with --restart")
    if meta["mode"] == "topk":
        k = meta["k"]
        ids = np.zeros((n, length, k), dtype=np.int64)
        lps = np.full((n, length, k), -np.inf, dtype=np.float32)
        lps[..., 0] = 0.0
        for i, (row, pos) in enumerate(zip(rows, label_pos)):
            ids[i, pos], lps[i, pos] = row["topk_ids"], row["topk_logprobs"]
        return {"t_topk_ids": ids, "t_topk_logprobs": lps}
    hidden = np.zeros((n, length, meta["hidden_size"]), dtype=np.float32)
    for i, (row, pos) in enumerate(zip(rows, label_pos)):
        hidden[i, pos] = row["hidden"]
    return {"t_hidden": hidden}
