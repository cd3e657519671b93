"""What a job will write under its output directory, stated before any work, and the storage
budget its teacher records must fit (``teacher_signal.max_records_gb``).

Every per-row dataset is sized as rows × response tokens × bytes per token, an upper bound:
responses are counted at ``generation.max_new_tokens`` + 1 (the EOS) tokens, at most
``training.max_seq_len``, and records before compression (:func:`kdray.data.records.
record_bytes_per_token`). For a job of 200,000 prompts with 512-token responses on a Qwen2.5
teacher (vocabulary 152,064, so uint32 ids; hidden size 3,584): top-k records at k = 20 take
120 B per token, 12 GB; bfloat16 hidden states 7,168 B per token, 735 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdray.data.records import record_bytes_per_token
from kdray.errors import SpecError
from kdray.spec import JobSpec

#: Bytes per token of a stored response row (JSON: its text, about 4 bytes per token, and its
#: token ids written out, about 6): an estimate, not a bound.
RESPONSE_BYTES_PER_TOKEN = 10
GB = 1e9


@dataclass(frozen=True)
class DatasetSize:
    """One dataset a job writes: ``rows`` × at most ``tokens_per_row`` × ``bytes_per_token``."""

    name: str
    rows: int
    tokens_per_row: int
    bytes_per_token: int

    @property
    def bytes(self) -> int:
        return self.rows * self.tokens_per_row * self.bytes_per_token

    def describe(self) -> str:
        return (f"{self.name}: {self.rows:,} rows × ≤ {self.tokens_per_row:,} tokens × {self.bytes_per_token:,} B "
                f"= {_size(self.bytes)}")


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def storage_plan(spec: JobSpec, n_prompts: int, *, teacher_vocab: int, teacher_hidden: int) -> list[DatasetSize]:
    """The per-row datasets ``spec`` writes for ``n_prompts`` training prompts, in the order the
    job writes them (teacher responses, DistiLLM-2's student responses, teacher records).

    Args:
        teacher_vocab, teacher_hidden: the teacher's ``vocab_size`` and ``hidden_size`` (its
            config), which size top-k ids and hidden states.
    """
    gen, t, sig = spec.generation, spec.training, spec.teacher_signal
    from_teacher = spec.data.response_source == "teacher"
    rows = n_prompts * (gen.n if from_teacher else 1)
    tokens = min(gen.max_new_tokens + 1, t.max_seq_len) if from_teacher else t.max_seq_len
    out = []
    if from_teacher:
        out.append(DatasetSize("teacher responses", rows, tokens, RESPONSE_BYTES_PER_TOKEN))
    d2 = spec.curriculum_of("distillm2")
    if d2 is not None:
        out.append(DatasetSize(f"student responses ({d2.rounds} rounds)", n_prompts * d2.rounds,
                               min(gen.max_new_tokens + 1, t.max_seq_len), RESPONSE_BYTES_PER_TOKEN))
    if sig.mode != "online":
        per_token = record_bytes_per_token(sig.mode, k=sig.k, vocab_size=teacher_vocab, hidden_size=teacher_hidden,
                                           hidden_dtype=sig.hidden_dtype)
        out.append(DatasetSize(f"teacher {sig.mode} records", rows, tokens, per_token))
    return out


def check_records_budget(spec: JobSpec, sizes: list[DatasetSize], *, teacher_vocab: int) -> None:
    """Refuse a job whose teacher records may exceed ``teacher_signal.max_records_gb``.

    Raises:
        SpecError: on ``teacher_signal.max_records_gb``, with the numbers and what to change.
    """
    sig = spec.teacher_signal
    if sig.max_records_gb is None or sig.mode == "online":
        return
    (records,) = [s for s in sizes if s.name.endswith("records")]
    if records.bytes <= sig.max_records_gb * GB:
        return
    fixes = ["fewer rows (data.max_train_samples)", "shorter responses (generation.max_new_tokens)"]
    if sig.mode == "hidden":
        topk = record_bytes_per_token("topk", k=20, vocab_size=teacher_vocab)
        fixes.insert(0, f"teacher_signal.mode: topk (k = 20: {topk:,} B per token with this teacher)")
        if sig.hidden_dtype == "float32":
            fixes.insert(1, "teacher_signal.hidden_dtype: bfloat16 (half the bytes)")
    else:
        fixes.insert(0, f"a smaller teacher_signal.k (now {sig.k})")
    raise SpecError([("teacher_signal.max_records_gb",
                      f"the {records.describe()} may exceed the budget of {_size(sig.max_records_gb * GB)}; use "
                      f"{', '.join(fixes)}, or raise the budget")])
