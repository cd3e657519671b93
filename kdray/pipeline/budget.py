"""What a job will write under its output directory, stated before any work, and the storage
budget its teacher records must fit (``teacher_signal.max_records_gb``), and the GPU memory its
training workers must fit (``training.gpu_memory_gb``, :func:`check_memory_budget`).

Every per-row dataset is sized as rows × response tokens × bytes per token, an upper bound:
responses are counted at ``generation.max_new_tokens`` + 1 (the EOS) tokens, at most
``training.max_seq_len``, and records before compression (:func:`kdray.data.records.
record_bytes_per_token`). For a job of 200,000 prompts with 512-token responses on a Qwen2.5
teacher (vocabulary 152,064, so uint32 ids; hidden size 3,584): top-k records at k = 20 take
120 B per token, 12 GB; bfloat16 hidden states 7,168 B per token, 735 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdray.data.records import record_bytes_per_token
from kdray.errors import SpecError
from kdray.spec import JobSpec

#: Bytes per token of a stored response row (JSON: its text, about 4 bytes per token, and its
#: token ids written out, about 6): an estimate, not a bound.
RESPONSE_BYTES_PER_TOKEN = 10
#: Bytes per token of text alone (the held-out answers and the judge's rows: no token ids).
TEXT_BYTES_PER_TOKEN = 4
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


def storage_plan(spec: JobSpec, n_prompts: int, *, teacher_vocab: int, teacher_hidden: int, n_heldout: int = 0,
                 segments: int = 1) -> list[DatasetSize]:
    """The per-row datasets ``spec`` writes for ``n_prompts`` training prompts, in the order the
    job writes them (teacher responses, DistiLLM-2's student responses, teacher records, then
    with evaluation on ``n_heldout`` held-out prompts: every evaluated model's answers, and
    the judge's rows). The prepared splits (``datasets/train``, ``datasets/heldout``) are on disk
    already when the plan is made and are not counted.

    Args:
        teacher_vocab, teacher_hidden: the teacher's ``vocab_size`` and ``hidden_size`` (its
            config), which size top-k ids and hidden states.
        n_heldout: the committed held-out rows (0: no evaluation datasets are counted).
        segments: the plan's segments (:func:`kdray.curriculum.plan.plan_segments`): with
            ``evaluation.per_round`` each one but the last adds a model's answers.

    The held-out answers (``samples/LABEL/``) hold the prompt, the answer and the reference as
    text, counted at ``data.max_prompt_tokens`` + 2 × ``evaluation.max_new_tokens`` tokens: an
    estimate (a reference may be longer); the judge's rows hold both orders' prompts (each the
    template around the prompt and two answers) and verdicts, counted the same way twice.
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
    if spec.scores_records:
        per_token = record_bytes_per_token(sig.mode, k=sig.k, vocab_size=teacher_vocab, hidden_size=teacher_hidden,
                                           hidden_dtype=sig.hidden_dtype)
        out.append(DatasetSize(f"teacher {sig.mode} records", rows, tokens, per_token))
    ev = spec.evaluation
    if ev.enabled and n_heldout:
        models = 3 + (segments - 1 if ev.per_round else 0)  # teacher, student before and after, rounds
        answer = spec.data.max_prompt_tokens + 2 * ev.max_new_tokens
        out.append(DatasetSize(f"held-out answers ({models} models)", n_heldout * models, answer,
                               TEXT_BYTES_PER_TOKEN))
        if ev.judge is not None:
            judged = min(n_heldout, ev.judge.max_prompts or n_heldout)
            out.append(DatasetSize("judge verdicts", judged, 2 * answer, TEXT_BYTES_PER_TOKEN))
    return out


def check_records_budget(spec: JobSpec, sizes: list[DatasetSize], *, teacher_vocab: int) -> None:
    """Refuse a job whose teacher records may exceed ``teacher_signal.max_records_gb``.

    Raises:
        SpecError: on ``teacher_signal.max_records_gb``, with the numbers and what to change.
    """
    sig = spec.teacher_signal
    if sig.max_records_gb is None or not spec.scores_records:
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


def memory_fixes(spec: JobSpec, estimate: Any) -> list[str]:
    """What would shrink the largest parts of ``estimate`` (a
    :class:`kdray.train.memory.MemoryEstimate` of ``spec``), largest part first."""
    t, parts = spec.training, dict(estimate.device)
    fixes: list[tuple[int, str]] = []
    for name, size in parts.items():
        if name.startswith("activations") or name.startswith("loss"):
            if not t.gradient_checkpointing and name.startswith("activations"):
                fixes.append((size, "training.gradient_checkpointing: true"))
            if t.micro_batch_size_per_worker > 1:
                fixes.append((size, "a smaller training.micro_batch_size_per_worker (more gradient accumulation)"))
        elif name.startswith("optimizer") or name.startswith("gradients") or name.startswith("student weights"):
            if t.zero_stage < 3:
                fixes.append((size, "training.zero_stage: 3"))
            if name.startswith("optimizer") and not t.offload_optimizer:
                fixes.append((size, "training.offload_optimizer: true"))
            if t.lora is None:
                fixes.append((size, "training.lora (train adapters only)"))
        elif name == "teacher (replicated)":
            fixes.append((size, "teacher_signal.mode: topk or hidden (the teacher pool scores once; workers hold no teacher)"))
            if spec.teacher.dtype == "float32":
                fixes.append((size, "teacher.dtype: bfloat16"))
    seen: list[str] = []
    for _, fix in sorted(fixes, key=lambda f: -f[0]):
        if fix not in seen:
            seen.append(fix)
    return seen


def check_memory_budget(spec: JobSpec, estimate: Any) -> None:
    """Refuse a job whose training workers may not fit ``training.gpu_memory_gb``.

    Raises:
        SpecError: on ``training.gpu_memory_gb``, with each part of the estimate and what to change.
    """
    budget = spec.training.gpu_memory_gb
    if budget is None or estimate.total <= budget * GB:
        return
    parts = ", ".join(f"{name} {_size(size)}" for name, size in estimate.device if size)
    fixes = memory_fixes(spec, estimate)
    raise SpecError([("training.gpu_memory_gb",
                      f"a training worker may need {_size(estimate.total)} of GPU memory, more than the "
                      f"{_size(budget * GB)} given ({parts}); use {', '.join(fixes[:4]) or 'more workers'}, "
                      "or raise the budget if the GPUs have more")])
