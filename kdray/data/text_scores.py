"""Per-pair text scores of a response against its reference: ROUGE-L (Lin 2004, through the
``rouge-score`` package) and exact match after whitespace normalisation, and their means with
standard errors over a set of pairs. Used by the evaluation stage and, inside the pools' actors,
by POCL's difficulty measurer."""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when ``prediction`` equals ``gold`` up to whitespace, else 0.0."""
    return float(_normalise(prediction) == _normalise(gold))


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure of one prediction against its reference, in [0, 1]."""
    return _scorer().score(gold, prediction)["rougeL"].fmeasure


def response_length(prediction: str) -> int:
    """A response's length in whitespace-separated words."""
    return len(prediction.split())


#: The scores whose standard error a report gives (``rougeL_stderr``, ``exact_match_stderr``).
STDERR_SCORES = ("rougeL", "exact_match")


def stderr_of_mean(total: float, squares: float, n: int) -> float | None:
    """The standard error of a mean of ``n`` values from their sum and sum of squares:
    ``sqrt(s² / n)`` with the sample variance ``s² = (squares - total² / n) / (n - 1)`` (what
    lm-evaluation-harness reports as a score's ``stderr``); None below 2 values."""
    if n < 2:
        return None
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1) / n)


def score_summary(sums: dict[str, float], squares: dict[str, float], n: int) -> dict[str, Any]:
    """A set of answers' ``scores`` from the sums of their rows' ``rougeL``, ``exact_match`` and
    ``length`` and the sums of squares of :data:`STDERR_SCORES`: the means, ``n`` and the
    standard errors (``rougeL_stderr``, ``exact_match_stderr``; None below 2 rows)."""
    means = {name: value / n if n else 0.0 for name, value in sums.items()}
    return {"rougeL": means["rougeL"], "exact_match": means["exact_match"], "mean_length": means["length"], "n": n,
            **{f"{name}_stderr": stderr_of_mean(sums[name], squares[name], n) for name in STDERR_SCORES}}


def paired_difference(pairs: Iterable[tuple[tuple[float, ...], tuple[float, ...]]]) -> dict[str, Any]:
    """The mean of ``b - a`` over pairs of the same prompt's :data:`STDERR_SCORES` (``a``, ``b``:
    two models' ``(rougeL, exact_match)``), with its standard error over the prompts' differences
    (:func:`stderr_of_mean`: a paired comparison, narrower than the two scores' own errors when
    the models find the same prompts hard), and ``n``."""
    sums, squares, n = dict.fromkeys(STDERR_SCORES, 0.0), dict.fromkeys(STDERR_SCORES, 0.0), 0
    for a, b in pairs:
        for name, x, y in zip(STDERR_SCORES, a, b):
            sums[name] += y - x
            squares[name] += (y - x) ** 2
        n += 1
    return {**{name: sums[name] / n if n else 0.0 for name in STDERR_SCORES}, "n": n,
            **{f"{name}_stderr": stderr_of_mean(sums[name], squares[name], n) for name in STDERR_SCORES}}


def score_responses(predictions: Iterable[str], golds: Iterable[str]) -> dict[str, Any]:
    """Mean ROUGE-L (F), exact match and predicted length (:func:`response_length`), and the
    standard errors of the first two (:func:`stderr_of_mean`), over pairs held in memory
    (``kdray repro``'s cells); a job scores its answers in Ray Data tasks and sums the written
    columns (:func:`kdray.stages.evaluate.answer_scores`)."""
    preds, refs = list(predictions), list(golds)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    values = {"rougeL": [rouge_l(p, r) for p, r in zip(preds, refs)],
              "exact_match": [float(exact_match(p, r)) for p, r in zip(preds, refs)],
              "length": [float(response_length(p)) for p in preds]}
    return score_summary({k: math.fsum(v) for k, v in values.items()},
                         {k: math.fsum(x * x for x in values[k]) for k in STDERR_SCORES}, len(preds))
