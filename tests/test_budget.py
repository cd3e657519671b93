"""Before any work a job states what it will write, and refuses teacher records over its budget."""

from __future__ import annotations

import pytest

from kdray.errors import SpecError
from kdray.pipeline.budget import check_records_budget, storage_plan
from kdray.spec import parse_spec

QWEN_VOCAB, QWEN_HIDDEN = 152_064, 3_584  # Qwen2.5-7B's config


def spec_of(**signal):
    return parse_spec({"name": "t", "output_dir": "o", "teacher": {"model": "toy:teacher", "max_model_len": 2048},
                       "student": {"model": "toy:student", "max_model_len": 2048}, "data": {"train": "toy:train", "heldout": "toy:heldout"},
                       "generation": {"max_new_tokens": 512}, "training": {"max_seq_len": 1024},
                       "teacher_signal": signal})


def test_the_plan_sizes_each_dataset_as_rows_times_tokens_times_bytes():
    """The issue's job: 200k prompts, 512-token responses, a Qwen2.5 teacher."""
    (responses, topk) = storage_plan(spec_of(mode="topk", k=20), 200_000, teacher_vocab=QWEN_VOCAB,
                                     teacher_hidden=QWEN_HIDDEN)
    assert (responses.rows, responses.tokens_per_row) == (200_000, 513)  # + the EOS
    assert topk.bytes_per_token == 20 * 4 + 20 * 2  # uint32 ids (V > 65,536) + float16 log-probs
    assert topk.bytes == 200_000 * 513 * 120
    (_, hidden) = storage_plan(spec_of(mode="hidden", hidden_dtype="bfloat16"), 200_000, teacher_vocab=QWEN_VOCAB,
                               teacher_hidden=QWEN_HIDDEN)
    assert hidden.bytes_per_token == 3_584 * 2 and "735.4 GB" in hidden.describe()
    small = storage_plan(spec_of(mode="topk", k=20), 10, teacher_vocab=50_000, teacher_hidden=64)[1]
    assert small.bytes_per_token == 20 * 2 + 20 * 2  # uint16 ids below 65,536 tokens
    assert [s.name for s in storage_plan(spec_of(), 10, teacher_vocab=1, teacher_hidden=1)] == ["teacher responses"]


def test_records_over_the_budget_are_refused_with_the_numbers_and_the_fixes():
    spec = spec_of(mode="hidden", hidden_dtype="float32", max_records_gb=500)
    sizes = storage_plan(spec, 200_000, teacher_vocab=QWEN_VOCAB, teacher_hidden=QWEN_HIDDEN)
    with pytest.raises(SpecError) as info:
        check_records_budget(spec, sizes, teacher_vocab=QWEN_VOCAB)
    text = str(info.value)
    assert "teacher_signal.max_records_gb" in text and "1.5 TB" in text and "500.0 GB" in text
    assert "200,000 rows × ≤ 513 tokens × 14,336 B" in text
    assert "teacher_signal.mode: topk (k = 20: 120 B per token" in text and "hidden_dtype: bfloat16" in text
    topk = spec_of(mode="topk", k=64, max_records_gb=10)
    with pytest.raises(SpecError, match=r"a smaller teacher_signal\.k \(now 64\)"):
        check_records_budget(topk, storage_plan(topk, 200_000, teacher_vocab=QWEN_VOCAB, teacher_hidden=1),
                             teacher_vocab=QWEN_VOCAB)
    within = spec_of(mode="topk", k=20, max_records_gb=13)  # 12.3 GB fits
    check_records_budget(within, storage_plan(within, 200_000, teacher_vocab=QWEN_VOCAB, teacher_hidden=1),
                         teacher_vocab=QWEN_VOCAB)


def test_the_plan_counts_every_evaluated_model_and_the_judge():
    base = spec_of().model_dump(mode="json")
    base["data"]["max_prompt_tokens"] = 64
    base["evaluation"] = {"max_new_tokens": 32, "judge": {"model": "toy:teacher", "max_prompts": 10}}
    sizes = {s.name: s for s in storage_plan(parse_spec(base), 100, teacher_vocab=1, teacher_hidden=1, n_heldout=48,
                                             segments=3)}
    answers = sizes["held-out answers (5 models)"]  # teacher, student before, two rounds, student after
    assert (answers.rows, answers.tokens_per_row, answers.bytes_per_token) == (5 * 48, 64 + 2 * 32, 4)
    assert (sizes["judge verdicts"].rows, sizes["judge verdicts"].tokens_per_row) == (10, 2 * 128)
    base["evaluation"] = {"per_round": False}
    names = [s.name for s in storage_plan(parse_spec(base), 100, teacher_vocab=1, teacher_hidden=1, n_heldout=48,
                                          segments=3)]
    assert names == ["teacher responses", "held-out answers (3 models)"]
    base["evaluation"] = {"enabled": False}
    assert [s.name for s in storage_plan(parse_spec(base), 100, teacher_vocab=1, teacher_hidden=1, n_heldout=48)] \
        == ["teacher responses"]
