"""Stage 4, difficulty (POCL): the training rows sorted easy → hard, measured once per job."""

from __future__ import annotations

from typing import Any

from kdray.curriculum import difficulty_ranks
from kdray.data.difficulty import read_difficulty, write_difficulty
from kdray.pools import SamplingConfig
from kdray.stages.context import StageContext


def order_by_difficulty(ctx: StageContext, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """POCL's difficulty measurer (Liu & Zhang 2025, arXiv:2506.05695).

    The initial student answers every training prompt greedily and scores each row's response
    (the one it will be trained on); ROUGE-L of its answer against that response and its mean
    token cross-entropy on it are fused by reciprocal rank (``curriculum[pocl].rrf_k``). The
    measurements and ranks are written to ``curriculum/difficulty.jsonl``; a later run of the
    same job over the same rows reads them instead of measuring again.

    Returns:
        ``rows``, easiest first.
    """
    spec = ctx.spec
    pocl = spec.curriculum_of("pocl")
    path = ctx.out / "curriculum" / "difficulty.jsonl"
    keys = [f"{r['id']}#{r['sample_index']}" for r in rows]
    saved = read_difficulty(path, keys, spec.student.model)
    if saved is not None:
        ctx.reporter.message(f"score: reusing the difficulty ranks in {path}")
        return [rows[i] for i in saved]
    with ctx.phase("score", len(rows), "difficulty of each training row (POCL)"):
        measured = ctx.generate(rows, spec.student, "initial student", "score",
                                SamplingConfig.greedy(spec.generation.max_new_tokens), score_gold=True)
        rouge = [m["gold_rouge_l"] for m in measured]  # computed in the pool's actors
        ce = [m["gold_ce"] for m in measured]
        ranks = difficulty_ranks(rouge, ce, k=pocl.rrf_k)
        order = [int(i) for i in ranks.order]
        write_difficulty(path, keys, ranks, spec.student.model)
    return [rows[i] for i in order]
