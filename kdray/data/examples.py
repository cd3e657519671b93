"""Training examples as the trainer consumes them: rows of text (and teacher records) → token
ids, attention masks, labels and, in ``topk`` / ``hidden`` modes, the teacher's signal at the
label positions. Run by a Ray Data actor before the rows are sharded to the workers."""

from __future__ import annotations

from typing import Any

from kdray.data.records import align_signal, decode_signal
from kdray.data.tokenize import PromptEncoding, encode_batch, pack_examples
from kdray.models import load_tokenizer


class TokenizeForTraining:
    """Ray Data callable class: prompt + response text → fixed-length ids, mask and labels.

    Labels are the response tokens (see :func:`kdray.data.tokenize.encode_batch`); the prompt and
    the padding are ``IGNORE_INDEX`` (-100), so losses cover only what the student must learn. Rows
    with a ``student_response`` (DistiLLM-2 rounds) also get ``s_input_ids``,
    ``s_attention_mask`` and ``s_labels`` for it. With ``signal_meta`` (teacher_signal modes
    ``topk`` / ``hidden``) the rows carry their stored teacher records, which are decoded and
    placed at the label positions (:func:`kdray.data.records.align_signal`).

    Prompts are encoded with ``encoding``: the job's :class:`~kdray.data.tokenize.PromptEncoding`
    (what every pool uses), or a ``data.chat_template`` setting resolved against this
    tokenizer, the student's (:meth:`~kdray.data.tokenize.PromptEncoding.resolve`: the same
    encoding, for callers outside a job).
    """

    def __init__(self, tokenizer_ref: str, max_seq_len: int, encoding: PromptEncoding | str = "auto",
                 signal_meta: dict[str, Any] | None = None):
        self.tok = load_tokenizer(tokenizer_ref)
        self.max_len = max_seq_len
        self.encoding = (encoding if isinstance(encoding, PromptEncoding)
                         else PromptEncoding.resolve(encoding, self.tok))
        self.signal_meta = signal_meta  # teacher records travel in the rows (topk / hidden modes)

    def _encode(self, prompts: Any, responses: Any, finished: Any) -> dict[str, Any]:
        pairs = encode_batch(self.tok, list(prompts), list(responses), finished, self.encoding)
        return pack_examples(pairs, self.max_len, self.tok.pad_token_id)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self._encode(batch["prompt"], batch["response"], batch.get("finish_reason"))
        if self.signal_meta is not None:
            names = [c for c in ("n_tokens", "topk_ids", "topk_logprobs", "hidden") if c in batch]
            rows = [decode_signal({c: batch[c][i] for c in names}, self.signal_meta) for i in range(len(batch["prompt"]))]
            out.update(align_signal(rows, out["labels"], self.signal_meta))
        if "student_response" in batch:
            student = self._encode(batch["prompt"], batch["student_response"], batch.get("student_finish_reason"))
            out.update({f"s_{k}": v for k, v in student.items()})
        return out
