"""Stage 2, generate: the responses the student trains on.

The teacher answers every training prompt once per job (``data.response_source: teacher``);
DistiLLM-2's on-policy rounds add the current student's response to each prompt.
"""

from __future__ import annotations

from typing import Any

from kdray.curriculum.plan import Segment
from kdray.pools import SamplingConfig
from kdray.spec import ModelSpec
from kdray.stages.context import StageContext

#: ``finish_reason`` of a response taken from the dataset: it is complete, so the trainer
#: appends EOS to it (only a response cut at the length limit, ``"length"``, gets none).
DATASET_FINISH_REASON = "stop"


def training_responses(ctx: StageContext, train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the student trains on: ``generation.n`` teacher samples per prompt, or the
    dataset's own responses (``sample_index`` 0, ``finish_reason`` :data:`DATASET_FINISH_REASON`)."""
    spec = ctx.spec
    if spec.data.response_source != "teacher":
        return [dict(r, sample_index=0, finish_reason=DATASET_FINISH_REASON) for r in train]
    with ctx.phase("generate", len(train) * spec.generation.n, "teacher responses"):
        return ctx.generate(train, spec.teacher, "teacher", "generate", SamplingConfig.from_spec(spec.generation))


def student_samples(ctx: StageContext, rows: list[dict[str, Any]], student: ModelSpec, segment: Segment,
                    plan_length: int) -> list[dict[str, Any]]:
    """DistiLLM-2's batched on-policy round: one sample of ``student`` per distinct prompt of
    ``rows``, seeded by ``generation.seed`` plus the segment's index."""
    prompts = list({r["id"]: r for r in rows}.values())
    label = segment.label(plan_length) or "round 1/1"
    with ctx.phase("generate", len(prompts), f"student responses, {label}"):
        return ctx.generate(prompts, student, "student", "generate",
                            SamplingConfig.from_spec(ctx.spec.generation, n=1,
                                                     seed=ctx.spec.generation.seed + segment.index))


def pair_student_responses(rows: list[dict[str, Any]], samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``student_response``, ``student_response_token_ids`` and
    ``student_finish_reason`` from ``samples`` (by ``id``)."""
    by_id = {g["id"]: g for g in samples}
    return [dict(r, student_response=by_id[r["id"]]["response"],
                 student_response_token_ids=by_id[r["id"]]["response_token_ids"],
                 student_finish_reason=by_id[r["id"]]["finish_reason"]) for r in rows]
