"""Held-out scoring: ROUGE-L, exact match and response length, and an LLM judge's verdicts.

ROUGE-L is the F-measure of the ``rouge-score`` package (its default tokenizer: lower-case,
split on non-alphanumerics), as in the DistiLLM and POCL evaluations. Exact match compares
whitespace-normalised strings, for tasks whose answers are verifiable.

The LLM judge compares the distilled student with a reference model pairwise, once in each
answer order (student as A, then as B), since LLM judges favour a position (Zheng et al.
2023, arXiv:2306.05685, "position bias"). A verdict is the first letter the judge writes,
A or B; anything else counts as a tie. The win rate counts a tie as half a win.
"""

from __future__ import annotations

import functools
import re
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


# The verdict: optional quotes/brackets/markdown, an optional word like "Response", then A or
# B not followed by a letter or digit ("A", " B.", "(A)", "**B**", "Response A"; not "Apple").
_VERDICT = re.compile(r"^[\s\"'*(\[]*(?:(?i:response|answer|output|assistant)\s*)?([AB])(?![A-Za-z0-9])")


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' when the judge's output starts with that verdict, else None (a tie)."""
    match = _VERDICT.match(text)
    return match.group(1) if match else None


def judge_requests(items: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Two judge prompts per item ``{"id", "prompt", "student", "reference"}``: id ``ID|ab``
    has the student's answer as A and the reference's as B; ``ID|ba`` swaps them."""
    out = []
    for item in items:
        for order, (a, b) in (("ab", (item["student"], item["reference"])),
                              ("ba", (item["reference"], item["student"]))):
            out.append({"id": f"{item['id']}|{order}", "item": item["id"], "order": order,
                        "prompt": template.format(prompt=item["prompt"], a=a, b=b)})
    return out


def judge_summary(verdicts: dict[str, tuple[str | None, str | None]]) -> dict[str, Any]:
    """Rates over ``{item: (verdict with the student as A, verdict with the student as B)}``.

    ``win_rate`` = (student wins + ties / 2) / comparisons, over both orders (two comparisons
    per item); ``position_consistency`` = the share of items whose verdict names the same
    answer in both orders (both ties included); ``first_position_bias`` /
    ``second_position_bias`` = the share of items judged A (B) in both orders.
    """
    n = len(verdicts)
    wins = sum((ab == "A") + (ba == "B") for ab, ba in verdicts.values())
    losses = sum((ab == "B") + (ba == "A") for ab, ba in verdicts.values())
    comparisons = 2 * n
    ties = comparisons - wins - losses
    both = list(verdicts.values())

    def share(pred: Any) -> float | None:
        return sum(1 for v in both if pred(v)) / n if n else None

    return {
        "items": n,
        "comparisons": comparisons,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": (wins + ties / 2) / comparisons if comparisons else None,
        "position_consistency": share(lambda v: v in (("A", "B"), ("B", "A"), (None, None))),
        "first_position_bias": share(lambda v: v == ("A", "A")),
        "second_position_bias": share(lambda v: v == ("B", "B")),
        "verdicts": {order: {k: sum(1 for v in both if v[i] == key) for k, key in
                             (("A", "A"), ("B", "B"), ("tie", None))}
                     for i, order in enumerate(("student_first", "student_second"))},
    }
