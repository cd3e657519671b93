"""Held-out scoring: ROUGE-L, exact match and response length.

ROUGE-L is the F-measure of the ``rouge-score`` package (its default tokenizer: lower-case,
split on non-alphanumerics), as in the DistiLLM and POCL evaluations. Exact match compares
whitespace-normalised strings, for tasks whose answers are verifiable.
"""

from __future__ import annotations

import functools
from statistics import fmean
from typing import Any, Iterable


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(_normalise(prediction) == _normalise(gold))


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F-measure of one prediction against its reference."""
    return _scorer().score(gold, prediction)["rougeL"].fmeasure


def score_responses(predictions: Iterable[str], golds: Iterable[str]) -> dict[str, float]:
    """Mean ROUGE-L (F), exact match and predicted length (whitespace tokens) over pairs."""
    preds, refs = list(predictions), list(golds)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not preds:
        return {"rougeL": 0.0, "exact_match": 0.0, "mean_length": 0.0, "n": 0}
    return {
        "rougeL": fmean(rouge_l(p, r) for p, r in zip(preds, refs)),
        "exact_match": fmean(exact_match(p, r) for p, r in zip(preds, refs)),
        "mean_length": fmean(len(p.split()) for p in preds),
        "n": len(preds),
    }


def score_generated(generated: list[dict[str, Any]], heldout: list[dict[str, Any]]) -> dict[str, float]:
    """Score generated rows (first sample per id) against the held-out rows' gold responses."""
    by_id = {r["id"]: r["response"] for r in generated if r.get("sample_index", 0) == 0}
    missing = [r["id"] for r in heldout if r["id"] not in by_id]
    if missing:
        raise ValueError(f"no generation for {len(missing)} held-out rows (first: {missing[:5]})")
    return score_responses((by_id[r["id"]] for r in heldout), (r["response"] for r in heldout))
