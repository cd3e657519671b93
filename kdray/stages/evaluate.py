"""Stage 6, evaluate: held-out answers of each model through the pools, scored by ROUGE-L,
exact match and response length, and two models' scores compared prompt by prompt. The LLM
judge's pairwise verdicts are :mod:`kdray.stages.judge`'s.

ROUGE-L is the F-measure of the ``rouge-score`` package (its default tokenizer: lower-case,
split on non-alphanumerics), as in the DistiLLM and POCL evaluations. Exact match compares
whitespace-normalised strings, for tasks whose answers are verifiable.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from kdray.data.artifacts import Artifact, files_of, open_artifact
from kdray.data.text_scores import STDERR_SCORES, exact_match, paired_difference, response_length, rouge_l, score_summary
from kdray.pools import SamplingConfig
from kdray.pools.base import LIGHT_NUM_CPUS
from kdray.pools.run import generate_dataset
from kdray.spec import ModelSpec
from kdray.stages.context import StageContext


#: The committed dataset of a model's held-out answers (``samples/LABEL/``).
ANSWERS_KIND = "answers"
#: The columns of an answers dataset: the held-out row (``_row``, ``id``, ``prompt``, its gold
#: response ``gold``), the model's greedy ``response`` and the row's scores.
ANSWER_COLUMNS = ["_row", "id", "prompt", "response", "gold", "rougeL", "exact_match", "length"]
#: An answers row's bytes per token, at most (~4 B of text per token of prompt, answer and gold).
ANSWER_ROW_BYTES_PER_TOKEN = 12


def score_answers(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of a pool's held-out answers (``response``, the gold ``gold``) with each row's
    ROUGE-L, exact match and length: the :data:`ANSWER_COLUMNS` (a Ray Data task's map)."""
    pairs = [(str(p), str(g)) for p, g in zip(batch["response"], batch["gold"])]
    out = {c: batch[c] for c in ANSWER_COLUMNS[:5]}
    out["rougeL"] = np.asarray([rouge_l(p, g) for p, g in pairs], dtype=np.float64)
    out["exact_match"] = np.asarray([exact_match(p, g) for p, g in pairs], dtype=np.float64)
    out["length"] = np.asarray([response_length(p) for p, _ in pairs], dtype=np.int64)
    return out


def answer_scores(files: list[Path]) -> dict[str, Any]:
    """The marker's ``scores`` of an answers dataset: its rows' mean scores and the standard
    errors of ROUGE-L and exact match (:func:`~kdray.data.text_scores.score_summary`), summed
    file by file in the driver (three numbers per row of one file at a time)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    sums, squares, n = {"rougeL": 0.0, "exact_match": 0.0, "length": 0.0}, dict.fromkeys(STDERR_SCORES, 0.0), 0
    for path in files:
        table = pq.read_table(path, columns=list(sums))
        n += table.num_rows
        for name in sums:
            sums[name] += float(pc.sum(table.column(name)).as_py() or 0.0)
        for name in squares:
            column = table.column(name)
            squares[name] += float(pc.sum(pc.multiply(column, column)).as_py() or 0.0)
    return {"scores": score_summary(sums, squares, n)}


#: The pairs of models whose scores a report compares prompt by prompt (:func:`paired_scores`);
#: a job scored per round adds each round's student against the one before it (:func:`round_pairs`).
PAIRED = (("student_after", "student_before"), ("student_after", "teacher"))


def _score_rows(answers: Artifact) -> Iterator[tuple[int, tuple[float, ...]]]:
    """(``_row``, its :data:`STDERR_SCORES`) of an answers dataset, a file's batch at a time."""
    import pyarrow.parquet as pq
    for path in files_of(answers.path, answers.info):
        for batch in pq.ParquetFile(path).iter_batches(columns=["_row", *STDERR_SCORES]):
            rows, *scores = (batch.column(i).to_pylist() for i in range(batch.num_columns))
            yield from zip(rows, zip(*scores))


def round_pairs(out: Path, round_scores: dict[str, Any]) -> tuple[dict[str, Artifact], list[tuple[str, str]]]:
    """The answers datasets (``OUT/samples/LABEL/``) of the students scored after each round
    (``round_scores``: their scores by label, in round order, as the job state keeps them), and
    the pairs that compare each student with the one before it: round 1 with the student before,
    …, the student after with the last round. A round whose dataset is gone, or holds other
    scores (an earlier run's), is left out with its pairs."""
    rounds = {label: answers for label, scores in round_scores.items()
              if (answers := open_artifact(out / "samples" / label, ANSWERS_KIND)) is not None
              and answers.info.get("scores") == scores}
    chain = ["student_before", *round_scores, "student_after"] if round_scores else []
    return rounds, list(zip(chain[1:], chain[:-1]))


def paired_scores(answers: dict[str, Artifact], pairs: Iterable[tuple[str, str]] = PAIRED) -> dict[str, Any]:
    """For each pair ``(A, B)`` of ``pairs`` (:data:`PAIRED`) among ``answers``: A's scores
    minus B's on the same held-out prompts (:func:`~kdray.data.text_scores.paired_difference`),
    by ``"A - B"``, read side by side a batch at a time; a pair whose rows (``_row``) do not line
    up is left out."""
    out = {}
    for a, b in (pair for pair in pairs if set(pair) <= set(answers)):
        rows = itertools.zip_longest(_score_rows(answers[b]), _score_rows(answers[a]))
        lined_up = itertools.takewhile(lambda pair: None not in pair and pair[0][0] == pair[1][0], rows)
        difference = paired_difference((x, y) for (_, x), (_, y) in lined_up)
        if 0 < difference["n"] == answers[a].rows == answers[b].rows:
            out[f"{a} - {b}"] = difference
    return out


def _as_gold(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Held-out rows with their response as ``gold`` (the pool adds its own ``response``)."""
    batch["gold"] = batch.pop("response")
    return batch


def answers_dataset(ctx: StageContext, heldout: Artifact, model: ModelSpec, progress: Any = None) -> Any:
    """``model``'s greedy answers to the committed held-out rows, scored per row in Ray Data
    tasks (:func:`score_answers`), as a lazy dataset of :data:`ANSWER_COLUMNS`."""
    # renamed in a light task, as every task beside a pool (kdray.pools.base.LIGHT_NUM_CPUS)
    rows = heldout.read(["_row", "id", "prompt", "response"]).map_batches(
        _as_gold, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS)
    answered = generate_dataset(rows, model, ctx.spec.generation, SamplingConfig.greedy(ctx.spec.evaluation.max_new_tokens),
                                encoding=ctx.prompt_encoding(), progress=progress)
    return answered.map_batches(score_answers, batch_format="numpy", num_cpus=LIGHT_NUM_CPUS)


def evaluate_models(ctx: StageContext, models: list[tuple[str, ModelSpec]], heldout: Artifact) -> dict[str, Artifact]:
    """Greedy answers of each ``(label, model)`` to the held-out prompts through its pool (all
    at once where the cluster has room: :meth:`StageContext.each_pool`), scored in Ray Data
    tasks and written by them to the committed dataset ``samples/LABEL/``
    (:data:`ANSWER_COLUMNS`, in the held-out rows' order). Every model (the teacher too) sees
    the job's prompt encoding (:meth:`StageContext.prompt_encoding`), the one it was distilled on.

    Returns:
        The answers datasets by label; each marker's ``scores`` holds the mean ``rougeL``,
        ``exact_match`` and ``mean_length`` (words) over its ``n`` rows (:func:`answer_scores`).
    """
    row_bytes = ANSWER_ROW_BYTES_PER_TOKEN * (ctx.spec.data.max_prompt_tokens + 2 * ctx.spec.training.max_seq_len)

    def write(label: str, model: ModelSpec, release: bool) -> Artifact:
        ctx.reporter.message(f"evaluate: {label} answers {heldout.rows} prompts ({model.model})")
        return ctx.write("evaluate", lambda hub: answers_dataset(ctx, heldout, model, hub), ctx.out / "samples" / label,
                         ANSWERS_KIND, {"label": label, "model": model.model}, summarise=answer_scores,
                         row_bytes=row_bytes, expect_rows=heldout.rows, release=release)

    return ctx.each_pool(models, "evaluate", write)

