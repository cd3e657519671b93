"""Stage 4, difficulty (POCL): the training rows' keys sorted easy → hard, measured once per job."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdray.curriculum import difficulty_ranks
from kdray.data.artifacts import Artifact, open_artifact
from kdray.data.difficulty import write_difficulty
from kdray.errors import DataError
from kdray.pools import SamplingConfig
from kdray.pools.base import LIGHT_NUM_CPUS
from kdray.pools.run import generate_dataset
from kdray.stages.context import StageContext

#: What the difficulty pool reads of each training row, and what it writes of each.
_INPUT = ["_row", "key", "id", "prompt", "response", "finish_reason"]
COLUMNS = ["key", "student_response", "gold_rouge_l", "gold_ce"]


def order_by_difficulty(ctx: StageContext, responses: Artifact) -> Any:
    """POCL's difficulty measurer (Liu & Zhang 2025, arXiv:2506.05695).

    The initial student answers every training prompt greedily and scores each row's response
    (the one it will be trained on), in the pool's actors: ROUGE-L of its answer against that
    response and its mean token cross-entropy on it, written with each row's key and the
    student's answer (``student_response``) to the dataset ``curriculum/difficulty/`` (reused by
    a later run of the job). The driver reads those two
    numbers per row, fuses them by reciprocal rank (``curriculum[pocl].rrf_k``) and writes the
    ranks to ``curriculum/difficulty.parquet`` for people to read.

    Returns:
        The rows' keys (numpy array of str), easiest first.
    """
    spec = ctx.spec
    pocl = spec.curriculum_of("pocl")
    path = ctx.out / "curriculum" / "difficulty"
    measured = open_artifact(path, "difficulty")
    if measured is not None and (measured.meta.get("student") != spec.student.model
                                 or measured.meta.get("training_rows") != responses.rows
                                 or measured.meta.get("columns") != COLUMNS):
        measured = None  # measured for other rows, another student or by an older kdray: measure again
    if measured is not None:
        ctx.reporter.message(f"score: reusing the difficulty measurements in {path}")
    else:
        with ctx.phase("score", responses.rows, "difficulty of each training row (POCL)"):
            ctx.reporter.message(f"score: initial student answers {responses.rows} prompts ({spec.student.model})")

            def build(hub: Any) -> Any:
                rows = responses.read(_INPUT).rename_columns(  # light tasks: they run beside the pool
                    {"response": "gold_response", "finish_reason": "gold_finish_reason"}, num_cpus=LIGHT_NUM_CPUS)
                answered = generate_dataset(rows, spec.student, spec.generation,
                                            SamplingConfig.greedy(spec.generation.max_new_tokens), score_gold=True,
                                            encoding=ctx.prompt_encoding(), progress=hub, output_prefix="student_")
                return answered.select_columns(COLUMNS, num_cpus=LIGHT_NUM_CPUS)

            # vLLM answers and scores each row as two requests, hence two rows (generate_dataset)
            per_row = 2 if spec.student.backend == "vllm" else 1
            measured = ctx.write("score", build, path, "difficulty",
                                 {"student": spec.student.model, "training_rows": responses.rows, "columns": COLUMNS},
                                 expect_rows=per_row * responses.rows)
    keys, rouge, ce = per_key(measured.column("key"), measured.column("gold_rouge_l"), measured.column("gold_ce"),
                              where=str(measured.path))
    ranks = difficulty_ranks(rouge, ce, k=pocl.rrf_k)
    write_difficulty(ctx.out / "curriculum" / "difficulty.parquet", keys, ranks, spec.student.model)
    return keys[ranks.order]


def per_key(keys: Any, rouge: Any, ce: Any, *, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each training row's key (sorted) with its ROUGE-L and cross-entropy, from the measured
    rows (1-d arrays): one row per key (``hf``), or an answer row and a gold-score row per key
    (``vllm``, the other measure NaN in each; :func:`kdray.pools.run.generate_dataset`).

    Raises:
        DataError: a key lacks a measure (a damaged dataset ``where``): names it and the fix.
    """
    unique, inverse = np.unique(np.asarray(keys).astype(str), return_inverse=True)
    out = []
    for name, column in (("gold_rouge_l", rouge), ("gold_ce", ce)):
        values = np.full(len(unique), np.nan)
        np.fmax.at(values, inverse, np.asarray(column, dtype=np.float64))
        missing = unique[np.isnan(values)]
        if missing.size:
            raise DataError(f"{where} has no {name} for {missing.size} training rows (first: "
                            f"{', '.join(missing[:3])}); run the job with --restart to measure them again")
        out.append(values)
    return unique, out[0], out[1]
