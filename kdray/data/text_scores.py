"""Per-pair text scores of a response against its reference: ROUGE-L (Lin 2004, through the
``rouge-score`` package) and exact match after whitespace normalisation. Used by the evaluation
stage and, inside the pools' actors, by POCL's difficulty measurer."""

from __future__ import annotations

import functools
from typing import Any


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
