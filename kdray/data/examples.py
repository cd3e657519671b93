"""Training examples as the trainer consumes them, in two steps.

1. :class:`TokenizeForTraining` (a Ray Data actor, before the rows are sharded to the workers):
   rows of text → compact examples: each row's token ids, unpadded (int32, prompt + response cut
   at ``max_seq_len``), and where its labels start; in ``topk`` / ``hidden`` modes the row's
   teacher record stays in its stored bytes (uint16/uint32 ids, float16 log-probs, bf16/fp16
   hidden states), checked to cover exactly the row's labels.
2. :class:`CollateExamples` (each worker's ``collate_fn``, per micro-batch): pads the
   micro-batch to its own longest sequence, not to ``max_seq_len``, and places the teacher's
   records at the label positions in their stored dtypes
   (:func:`kdray.data.records.signal_tensors`).

:func:`training_batch` does both at once, for callers outside Ray (``kdray bench``, ``kdray
repro``, tests).
"""

from __future__ import annotations

from typing import Any

from kdray.data.records import SIGNAL_COLUMNS, check_record_lengths, signal_tensors
from kdray.data.tokenize import PromptEncoding, encode_batch, pack_examples
from kdray.models import load_tokenizer

#: The compact columns of one response side (the student's responses get an ``s_`` prefix).
EXAMPLE_COLUMNS = ("input_ids", "prompt_len")


def compact_examples(pairs: list[tuple[list[int], list[int]]], max_seq_len: int) -> dict[str, Any]:
    """(prompt ids, response ids) pairs → compact examples: ``input_ids`` (an object array of
    int32 arrays, prompt + response cut at ``max_seq_len``, unpadded) and ``prompt_len`` (int32
    ``[rows]``: where each row's labels start; a row cut inside its prompt has no labels)."""
    import numpy as np

    seqs = [(list(p) + list(r))[:max_seq_len] for p, r in pairs]
    ids = np.empty(len(seqs), dtype=object)  # ragged: Ray Data stores variable-shaped tensors
    ids[:] = [np.asarray(s, dtype=np.int32) for s in seqs]
    starts = np.asarray([min(len(p), len(s)) for (p, _), s in zip(pairs, seqs)], dtype=np.int32)
    return {"input_ids": ids, "prompt_len": starts}


def sample_examples(prompts: list[list[int]], responses: list[list[int]], max_seq_len: int) -> dict[str, Any]:
    """:func:`compact_examples` of samples: ``responses`` holds the same number of samples of
    each prompt of ``prompts``, prompt-major (a pool's answer, :mod:`kdray.pools.live`)."""
    n = len(responses) // len(prompts)
    return compact_examples(list(zip([p for p in prompts for _ in range(n)], responses)), max_seq_len)


class TokenizeForTraining:
    """Ray Data callable class: prompt + response text → compact training examples.

    Output columns: ``input_ids`` (per row an int32 array, prompt + response cut at
    ``max_seq_len``) and ``prompt_len`` (int32: the response, the labels, starts there; see
    :func:`kdray.data.tokenize.encode_batch`); rows with a ``student_response`` (DistiLLM-2
    rounds) also get ``s_input_ids`` and ``s_prompt_len`` for it. A response a pool generated
    is trained on its ``response_token_ids`` (``student_response_token_ids``), not re-encoded. With ``signal_meta``
    (teacher_signal modes ``topk`` / ``hidden``) the rows' stored teacher records pass through
    as they are (``n_tokens`` and the record's bytes columns).

    Prompts are encoded with ``encoding``: the job's :class:`~kdray.data.tokenize.PromptEncoding`
    (what every pool uses), or a ``data.chat_template`` setting resolved against this
    tokenizer, the student's (:meth:`~kdray.data.tokenize.PromptEncoding.resolve`: the same
    encoding, for callers outside a job). With ``keep_columns`` the input columns stay in the
    output beside the examples (a job's stored datasets: :mod:`kdray.stages.generate`).

    Raises:
        RecordsError: a row's teacher record covers another number of tokens than its labels.
    """

    def __init__(self, tokenizer_ref: str, max_seq_len: int, encoding: PromptEncoding | str = "auto",
                 signal_meta: dict[str, Any] | None = None, keep_columns: bool = False):
        self.keep_columns = keep_columns
        self.tok = load_tokenizer(tokenizer_ref)
        self.max_len = max_seq_len
        self.encoding = (encoding if isinstance(encoding, PromptEncoding)
                         else PromptEncoding.resolve(encoding, self.tok))
        self.signal_meta = signal_meta  # teacher records travel in the rows (topk / hidden modes)

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    def _encode(self, prompts: Any, responses: Any, finished: Any, response_ids: Any = None) -> dict[str, Any]:
        pairs = encode_batch(self.tok, list(prompts), list(responses), finished, self.encoding,
                             None if response_ids is None else list(response_ids))
        return compact_examples(pairs, self.max_len)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch) if self.keep_columns else {}
        out.update(self._encode(batch["prompt"], batch["response"], batch.get("finish_reason"),
                                batch.get("response_token_ids")))
        if self.signal_meta is not None:
            n_labels = [len(ids) - start for ids, start in zip(out["input_ids"], out["prompt_len"])]
            check_record_lengths(batch["n_tokens"], n_labels, self.signal_meta)
            out.update({c: batch[c] for c in ("n_tokens", *SIGNAL_COLUMNS[self.signal_meta["mode"]])})
        if "student_response" in batch:
            student = self._encode(batch["prompt"], batch["student_response"], batch.get("student_finish_reason"),
                                   batch.get("student_response_token_ids"))
            out.update({f"s_{k}": v for k, v in student.items()})
        return out


class CollateExamples:
    """A micro-batch of compact examples → torch tensors padded to its own longest sequence
    (both response sides of a DistiLLM-2 row to the same length, as the objective concatenates
    them): ``input_ids``, ``attention_mask``, ``labels`` ``[B, L]`` int64 (labels
    ``IGNORE_INDEX`` outside the response), ``s_*`` likewise, and the teacher's signal
    (:func:`kdray.data.records.signal_tensors`). Ray Train's ``iter_torch_batches(collate_fn=…)``
    calls it on each worker; tensors stay on the CPU (the worker moves them to its device).
    """

    def __init__(self, pad_id: int, signal_meta: dict[str, Any] | None = None):
        self.pad_id, self.signal_meta = pad_id, signal_meta

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        sides = [p for p in ("", "s_") if f"{p}input_ids" in batch]
        length = max(len(ids) for p in sides for ids in batch[f"{p}input_ids"])
        out: dict[str, Any] = {}
        for p in sides:
            pairs = [(list(ids[:start]), list(ids[start:]))
                     for ids, start in zip(batch[f"{p}input_ids"], batch[f"{p}prompt_len"])]
            packed = pack_examples(pairs, length, self.pad_id)
            out.update({f"{p}{k}": torch.from_numpy(v) for k, v in packed.items()})
        if self.signal_meta is not None:
            n_labels = [len(ids) - int(start) for ids, start in zip(batch["input_ids"], batch["prompt_len"])]
            check_record_lengths(batch["n_tokens"], n_labels, self.signal_meta)
            columns = ("n_tokens", *SIGNAL_COLUMNS[self.signal_meta["mode"]])
            rows = [{c: batch[c][i] for c in columns} for i in range(len(batch["prompt_len"]))]
            out.update(signal_tensors(rows, [int(s) for s in batch["prompt_len"]], length, self.signal_meta))
        return out


def training_batch(encoder: TokenizeForTraining, raw: dict[str, Any]) -> dict[str, Any]:
    """Rows of text (``prompt``, ``response``, ... as numpy arrays or lists) → one padded torch
    micro-batch, as a worker would receive them (:class:`TokenizeForTraining`, then
    :class:`CollateExamples`)."""
    return CollateExamples(encoder.pad_id, encoder.signal_meta)(encoder(raw))
