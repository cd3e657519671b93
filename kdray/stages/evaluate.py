"""Stage 6, evaluate: held-out answers of each model through the pools, scored by ROUGE-L,
exact match and response length, and an LLM judge's verdicts.

ROUGE-L is the F-measure of the ``rouge-score`` package (its default tokenizer: lower-case,
split on non-alphanumerics), as in the DistiLLM and POCL evaluations. Exact match compares
whitespace-normalised strings, for tasks whose answers are verifiable.

The LLM judge compares the distilled student with a reference model pairwise, once in each
answer order (student as A, then as B), since LLM judges favour a position (Zheng et al.
2023, arXiv:2306.05685, "position bias"). A verdict is the first letter the judge writes,
A or B; anything else counts as a tie. The win rate counts a tie as half a win.
"""

from __future__ import annotations

import json
import re
from statistics import fmean
from typing import Any, Iterable

from kdray.data.text_scores import exact_match, rouge_l
from kdray.data.tokenize import judge_encoding, prompt_token_counter
from kdray.models import load_tokenizer
from kdray.pools import SamplingConfig
from kdray.spec import ModelSpec
from kdray.stages.context import StageContext


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


def evaluate_models(ctx: StageContext, models: list[tuple[str, ModelSpec]],
                    heldout: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    """Greedy answers of each ``(label, model)`` to the held-out prompts through its pool (all
    at once where the cluster has room: :meth:`StageContext.generate_each`), scored, and
    written to ``samples/LABEL.jsonl``. Every model (the teacher too) sees the job's prompt
    encoding (:meth:`StageContext.prompt_encoding`), the one it was distilled on.

    Returns:
        By label: (scores as :func:`score_generated` gives them, the first answer per row id
        for the judge).
    """
    answered = ctx.generate_each(models, heldout, "evaluate", SamplingConfig.greedy(ctx.spec.evaluation.max_new_tokens))
    gold = {r["id"]: r["response"] for r in heldout}
    out = {}
    for label, generated in answered.items():
        path = ctx.out / "samples" / f"{label}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for r in generated:
                fh.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "response": r["response"],
                                     "gold": gold.get(r["id"])}) + "\n")
        answers = {g["id"]: g["response"] for g in generated if g["sample_index"] == 0}
        out[label] = (score_generated(generated, heldout), answers)
    return out


def judge(ctx: StageContext, heldout: list[dict[str, Any]], answers: dict[str, dict[str, str]]) -> dict[str, Any]:
    """``evaluation.judge``: the judge model (served by its pool, greedy) compares the distilled
    student's held-out answers with the reference's, in both orders.

    Prompts whose judge prompt does not fit the judge's ``max_model_len`` are skipped and
    counted. The judge, maybe of another model family, reads them through its own chat template
    (:func:`kdray.data.tokenize.judge_encoding`). Each verdict is written to ``samples/judge.jsonl``.

    Args:
        heldout: the held-out rows.
        answers: per evaluated label (``student_after`` and the reference), answer by row id.

    Returns:
        :func:`judge_summary` plus ``model``, ``reference`` and ``skipped_too_long``.
    """
    cfg = ctx.spec.evaluation.judge
    student, reference = answers["student_after"], answers[cfg.reference]
    rows = heldout[: cfg.max_prompts] if cfg.max_prompts else heldout
    requests = judge_requests([{"id": r["id"], "prompt": r["prompt"], "student": student[r["id"]],
                                "reference": reference[r["id"]]} for r in rows], cfg.template)
    # The judge only generates: it needs no pad token.
    judge_tok = load_tokenizer(cfg.model.model, need_pad=False)
    encoding = judge_encoding(ctx.spec.data.chat_template, judge_tok)
    count = prompt_token_counter(judge_tok, encoding)
    room = cfg.model.max_model_len - cfg.max_new_tokens
    too_long = {q["item"] for q, n in zip(requests, count([q["prompt"] for q in requests])) if n > room}
    requests = [q for q in requests if q["item"] not in too_long]
    verdicts: dict[str, list[str | None]] = {}
    outputs: dict[str, str] = {}
    if requests:
        with ctx.phase("evaluate", len(requests), f"LLM judge, student_after vs {cfg.reference}"):
            generated = ctx.generate(requests, cfg.model, "judge", "evaluate", SamplingConfig.greedy(cfg.max_new_tokens),
                                     encoding=encoding)
        outputs = {g["id"]: g["response"] for g in generated}
        for q in requests:  # [verdict with the student as A, verdict with the student as B]
            verdicts.setdefault(q["item"], [None, None])[0 if q["order"] == "ab" else 1] = \
                parse_verdict(outputs[q["id"]])
    summary = judge_summary({k: (ab, ba) for k, (ab, ba) in verdicts.items()})
    summary.update(model=cfg.model.model, reference=cfg.reference, skipped_too_long=len(too_long))
    path = ctx.out / "samples" / "judge.jsonl"
    path.parent.mkdir(exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for q in requests:
            fh.write(json.dumps({"id": q["item"], "order": "student_first" if q["order"] == "ab" else
                                 "student_second", "judge_prompt": q["prompt"], "output": outputs[q["id"]],
                                 "verdict": parse_verdict(outputs[q["id"]])}) + "\n")
    ctx.reporter.message(
        f"evaluate: judge win rate of student_after vs {cfg.reference}: "
        + (f"{summary['win_rate']:.3f} over {summary['comparisons']} comparisons" if summary["comparisons"]
           else f"no comparisons ({len(too_long)} prompts too long for the judge)"))
    return summary
