"""Stage 2, generate: the responses the student trains on, as datasets under ``OUTPUT_DIR``.

The teacher answers every training prompt once per job (``data.response_source: teacher``);
DistiLLM-2's on-policy rounds add the current student's response to each row. The pool actors
make the rows and the tokenizing actors turn them into compact training examples
(:class:`kdray.data.examples.TokenizeForTraining`) before they are written, so the trainer reads
them as they are; the driver sees counts only.

* ``datasets/responses/``: per row ``key`` (``id#sample_index``), ``id``, ``prompt``,
  ``response``, ``finish_reason``, ``sample_index``, ``response_token_ids`` (the pool's ids),
  and the example ``input_ids`` / ``prompt_len``.
* ``datasets/round-N-student/``: the rows a round trains on, plus ``student_response``,
  ``student_response_token_ids``, ``student_finish_reason`` and ``s_input_ids`` /
  ``s_prompt_len``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdray.curriculum.plan import Segment
from kdray.data.artifacts import Artifact, open_artifact
from kdray.data.examples import TokenizeForTraining
from kdray.data.light_tasks import map_light
from kdray.pools import SamplingConfig
from kdray.pools.base import LIGHT_NUM_CPUS
from kdray.pools.run import generate_dataset
from kdray.spec import ModelSpec
from kdray.stages.context import StageContext

#: ``finish_reason`` of a response taken from the dataset: it is complete, so the trainer
#: appends EOS to it (only a response cut at the length limit, ``"length"``, gets none).
DATASET_FINISH_REASON = "stop"
#: A response row's bytes per token, at most: int32 example ids, int32 pool ids, ~4 B of text
#: each for prompt and response (sizes the dataset's files: :data:`kdray.data.artifacts.FILE_BYTES`).
ROW_BYTES_PER_TOKEN = 16


def row_bytes(ctx: StageContext, sides: int = 1) -> int:
    """An upper bound of one response row's size (``sides`` 2: a DistiLLM-2 pair)."""
    return sides * ROW_BYTES_PER_TOKEN * ctx.spec.training.max_seq_len


def with_keys(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add each row's ``key``, ``id#sample_index`` (:func:`kdray.data.records.signal_key`)."""
    batch["key"] = np.asarray([f"{i}#{int(s)}" for i, s in zip(batch["id"], batch["sample_index"])], dtype=object)
    return batch


def keyed(ds: Any) -> Any:
    """The Ray dataset ``ds`` with each row's ``key`` (:func:`with_keys`), added by light tasks
    (:data:`~kdray.pools.base.LIGHT_NUM_CPUS`): they run beside the pool that makes the rows."""
    return ds.map_batches(with_keys, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS)


def tokenized(ctx: StageContext, ds: Any) -> Any:
    """``ds`` with each row's compact training example(s) added (the input columns stay), made by
    at most ``training.tokenize_actors`` tasks at once (:class:`kdray.data.examples.TokenizeForTraining`,
    built once per worker process: :func:`kdray.data.light_tasks.map_light`)."""
    t = ctx.spec.training
    return map_light(ds, TokenizeForTraining, dict(tokenizer_ref=ctx.spec.student.model, max_seq_len=t.max_seq_len,
                                                   encoding=ctx.prompt_encoding(), keep_columns=True),
                     num_cpus=LIGHT_NUM_CPUS, concurrency=t.tokenize_actors or t.num_workers,
                     batch_size=t.tokenize_batch_rows, batch_format="numpy")


def with_dataset_responses(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mark the dataset's own responses as sample 0, complete (:data:`DATASET_FINISH_REASON`)."""
    n = len(batch["id"])
    batch["sample_index"] = np.zeros(n, dtype=np.int64)
    batch["finish_reason"] = np.full(n, DATASET_FINISH_REASON, dtype=object)
    return batch


def training_responses(ctx: StageContext, train: Artifact) -> Artifact:
    """The rows the student trains on, written to ``datasets/responses/``: ``generation.n``
    teacher samples per prompt of ``train`` (the committed ``datasets/prompts/`` of the
    prepare stage, read with Ray Data), or the dataset's own responses (``sample_index`` 0,
    ``finish_reason`` :data:`DATASET_FINISH_REASON`). A run that finds the dataset committed by
    an earlier run of the job reuses it."""
    spec = ctx.spec
    path = ctx.out / "datasets" / "responses"
    done = open_artifact(path, "responses")
    if done is not None:
        ctx.reporter.message(f"generate: reusing {done.rows} training responses saved by an earlier run")
        return done
    if spec.data.response_source != "teacher":
        with ctx.phase("generate", None, "training examples from the dataset's responses"):
            rows = train.read(["_row", "id", "prompt", "response"]).map_batches(
                with_dataset_responses, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS)
            return ctx.write("generate", lambda hub: tokenized(ctx, keyed(rows)), path, "responses",
                             {"source": "dataset"}, row_bytes=row_bytes(ctx), expect_rows=train.rows)
    sampling = SamplingConfig.from_spec(spec.generation)
    with ctx.phase("generate", train.rows * spec.generation.n, "teacher responses"):
        ctx.reporter.message(f"generate: teacher answers {train.rows} prompts ({spec.teacher.model})")
        return ctx.write("generate", lambda hub: tokenized(ctx, keyed(generate_dataset(
            train.read(["_row", "id", "prompt"]), spec.teacher, spec.generation, sampling,
            encoding=ctx.prompt_encoding(), progress=hub))),
            path, "responses", {"source": "teacher", "teacher": spec.teacher.model}, row_bytes=row_bytes(ctx),
            expect_rows=train.rows * spec.generation.n)


def student_responses(ctx: StageContext, rows: Any, n_rows: int, student: ModelSpec, segment: Segment,
                      plan_length: int) -> Artifact:
    """DistiLLM-2's batched on-policy round: one sample of ``student`` for each row of the Ray
    dataset ``rows`` (the round's training rows), seeded by ``generation.seed`` plus the
    segment's index, written with the rows to ``datasets/round-N-student/`` (reused when an
    earlier run of the job committed it)."""
    path = ctx.out / "datasets" / f"round-{segment.round}-student"
    done = open_artifact(path, "student_responses")
    if done is not None:
        return done
    label = segment.label(plan_length) or "round 1/1"
    sampling = SamplingConfig.from_spec(ctx.spec.generation, n=1, seed=ctx.spec.generation.seed + segment.index)
    with ctx.phase("generate", n_rows, f"student responses, {label}"):
        ctx.reporter.message(f"generate: student answers {n_rows} prompts ({student.model})")
        return ctx.write("generate", lambda hub: tokenized(ctx, generate_dataset(
            rows, student, ctx.spec.generation, sampling, encoding=ctx.prompt_encoding(), progress=hub,
            output_prefix="student_")), path, "student_responses", {"student": student.model},
            row_bytes=row_bytes(ctx, sides=2), expect_rows=n_rows)
