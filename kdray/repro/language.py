"""``kdray repro --world``: the worlds the grid runs on, and, on the grammar world (issue 22),
each model scored against its language and the claims judged on those scores.

The ``toy`` world's answers are near-deterministic, so its cells are scored by ROUGE-L only
(:mod:`kdray.repro.tables`). The ``grammar`` world's language gives every prompt many valid
answers with known probabilities (:mod:`kdray.toy.grammar`); the student trains on the
language's own samples (``data.response_source: dataset``: a sampled teacher's answers, where
greedy ones would hand every method the mode) and the teacher's logits, and each cell is also
scored on :data:`LANGUAGE_PROMPTS` distinct held-out prompts by
:func:`kdray.toy.grammar_eval.score_model`: KL(language ‖ student), NLL, validity of greedy
and sampled answers, coverage and mass on valid answers.

Claims judged on those scores (:func:`language_verdicts`), each from its paper:

* POCL helps every base loss: lower KL (POCL, arXiv:2506.05695);
* KD < DistiLLM < DistiLLM-2: lower KL (DistiLLM-2, arXiv:2503.07067);
* reverse KL is mode-seeking, forward KL mode-covering: RKL's samples more valid and less
  covering than FKL's (Minka 2005; MiniLLM, arXiv:2306.08543);
* AKL sits between them on both (Wu et al. 2025, arXiv:2404.02657).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from kdray.repro.tables import TIE_TOL, Comparison, Metric, Stat, chain_verdict, method_stats, pocl_verdict

#: Distinct held-out prompts each model is scored on against the language.
LANGUAGE_PROMPTS = 64
#: Sampled answers per prompt (temperature 1) for validity and coverage.
LANGUAGE_SAMPLES = 8
#: Longest answer sampled for scoring, in tokens (the language's answers are at most three
#: words, 23 characters; a longer answer is invalid however it ends).
LANGUAGE_MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class ReproWorld:
    """Where a grid's models and data come from: ``toy:`` references, how the student's
    training responses are made (``response_source``: the teacher's greedy answers, or the
    dataset's own), and whether runs are scored against a language."""

    name: str
    teacher: str
    student: str
    train: str
    heldout: str
    response_source: str
    language: bool


WORLDS: dict[str, ReproWorld] = {
    "toy": ReproWorld("toy", "toy:teacher", "toy:student", "toy:train", "toy:heldout", "teacher", False),
    "grammar": ReproWorld("grammar", "toy:grammar-teacher", "toy:grammar-student", "toy:grammar-train",
                          "toy:grammar-heldout", "dataset", True),
}

#: The language scores of a run, as compared (:func:`language_verdicts`) and tabled.
KL = Metric("kl", "KL(language ‖ model)", higher_is_better=False)
NLL = Metric("nll", "NLL on the language", higher_is_better=False)
VALIDITY = Metric("validity_sampled", "validity (samples)")
VALIDITY_GREEDY = Metric("validity_greedy", "validity (greedy)")
COVERAGE = Metric("coverage", "coverage")
VALID_MASS = Metric("valid_mass", "mass on valid answers")
LANGUAGE_METRICS: tuple[Metric, ...] = (KL, NLL, VALIDITY_GREEDY, VALIDITY, COVERAGE, VALID_MASS)


def language_prompts(heldout: list[dict[str, Any]], n: int = LANGUAGE_PROMPTS) -> list[str]:
    """The first ``n`` distinct prompts of the held-out rows, in their order."""
    return list(dict.fromkeys(r["prompt"] for r in heldout))[:n]


def language_scores(model: Any, tokenizer: Any, model_ref: str, prompts: list[str], *, seed: int = 0) -> dict[str, Any]:
    """``model`` scored against the language of the world ``model_ref`` belongs to
    (:func:`kdray.toy.grammar_eval.score_model` on ``prompts``; its ``meta.json`` gives the
    language), in eval mode; the scores as :func:`~kdray.toy.grammar_eval.score_model` returns them.

    Raises:
        ValueError: ``model_ref`` is not a grammar world reference."""
    from kdray.toy import resolve
    from kdray.toy.grammar_eval import score_model
    from kdray.toy.grammar_world import language_of
    from kdray.toy.world import world_of

    if world_of(model_ref) != "grammar":
        raise ValueError(f"{model_ref} is not a model of the grammar world: it has no language to be scored against")
    meta = json.loads((resolve(model_ref).parent / "meta.json").read_text())
    was_training = model.training
    model.eval()
    try:
        return score_model(model, tokenizer, language_of(meta), prompts, samples=LANGUAGE_SAMPLES,
                           max_new_tokens=LANGUAGE_MAX_NEW_TOKENS, seed=seed)
    finally:
        model.train(was_training)


def language_stats(runs: list[Mapping[str, Any]]) -> dict[str, dict[str, Stat]]:
    """Per language metric key, each method's statistic over its finished runs' ``language``
    scores."""
    flat = [{"method": r["method"], "seed": r["seed"], **r["language"]}
            for r in runs if r.get("language") and not r.get("error")]
    return {m.key: method_stats(flat, m.key) for m in LANGUAGE_METRICS}


def _ordered(metric: Metric, stats: Mapping[str, Stat], chain: list[tuple[str, str]]) -> tuple[list[Comparison], str]:
    """Each link of ``chain`` ((label, method), worst expected first) as a comparison that holds
    when the later one is better on ``metric``, and the chain's values as text, each pair with
    the sign of its means (``<``, ``>``; ``=`` for a tie), then each link's seed noise."""
    cmps = [metric.compare(stats[a], stats[b]) for (_, a), (_, b) in zip(chain, chain[1:])]
    text = f"{chain[0][0]} {stats[chain[0][1]].fmt()}"
    for (_, a), (label, b) in zip(chain, chain[1:]):
        diff = stats[b].mean - stats[a].mean
        text += f" {'=' if abs(diff) <= TIE_TOL else '<' if diff > 0 else '>'} {label} {stats[b].fmt()}"
    return cmps, f"{metric.label}: {text} ({', '.join(c.note() for c in cmps)})"


def _judged(claim: str, cmps: list[Comparison], sides: list[str]) -> dict[str, Any]:
    holds = all(c.holds for c in cmps)
    noise = [c.within_noise for c in cmps]
    beyond = None if any(n is None for n in noise) else (holds and not any(noise))
    word = "HOLDS" if holds else "DOES NOT HOLD"
    if beyond is None:
        detail = "single seed: no noise estimate"
    elif holds:
        detail = "beyond seed noise" if beyond else "within seed noise"
    else:  # how firmly it fails: a link that fails beyond seed noise settles it
        failing = [c.within_noise for c in cmps if not c.holds]
        detail = "fails within seed noise" if all(failing) else "fails beyond seed noise"
    return {"claim": claim, "holds": holds, "beyond_noise": beyond,
            "text": f"{claim}: {word} on this run" + (f" ({detail})" if detail else "") + "; " + "; ".join(sides)}


def mode_verdicts(stats: Mapping[str, Mapping[str, Stat]]) -> list[dict[str, Any]]:
    """RKL more valid and less covering than FKL; AKL between the two on both."""
    valid, cover = stats[VALIDITY.key], stats[COVERAGE.key]
    out = []
    claim = "Mode seeking (Minka 2005; MiniLLM): RKL's samples more valid and less covering than FKL's"
    if all(m in valid for m in ("fkl", "rkl")):
        v_cmps, v_text = _ordered(VALIDITY, valid, [("FKL", "fkl"), ("RKL", "rkl")])
        c_cmps, c_text = _ordered(COVERAGE, cover, [("RKL", "rkl"), ("FKL", "fkl")])
        out.append(_judged(claim, v_cmps + c_cmps, [v_text, c_text]))
    else:
        out.append({"claim": claim, "holds": None, "beyond_noise": None, "text": f"{claim}: not checked (FKL or RKL not run)"})
    claim = "AKL (arXiv:2404.02657): between FKL and RKL in validity and in coverage"
    if all(m in valid for m in ("fkl", "rkl", "akl")):
        low, high = sorted(("fkl", "rkl"), key=lambda m: valid[m].mean)
        v_cmps, v_text = _ordered(VALIDITY, valid, [(low.upper(), low), ("AKL", "akl"), (high.upper(), high)])
        low, high = sorted(("fkl", "rkl"), key=lambda m: cover[m].mean)
        c_cmps, c_text = _ordered(COVERAGE, cover, [(low.upper(), low), ("AKL", "akl"), (high.upper(), high)])
        out.append(_judged(claim, v_cmps + c_cmps, [v_text, c_text]))
    else:
        out.append({"claim": claim, "holds": None, "beyond_noise": None,
                    "text": f"{claim}: not checked (FKL, RKL or AKL not run)"})
    return out


def language_verdicts(stats: Mapping[str, Mapping[str, Stat]]) -> list[dict[str, Any]]:
    """The claims of the module docstring on the language scores (``stats``:
    :func:`language_stats`): POCL and the DistiLLM-2 chains on KL, then the mode claims."""
    kl = stats[KL.key]
    found = [pocl_verdict(kl, KL)]
    for distillm, mode in (("skl", "paper"), ("skl", "released_code"), ("srkl", "paper"), ("srkl", "released_code")):
        found.append(chain_verdict(kl, distillm, mode, KL))
    return found + mode_verdicts(stats)


LANGUAGE_TITLE = "Against the language (mean ± std over seeds; KL and NLL in nats, lower is better)"


def _language_rows(stats: Mapping[str, Mapping[str, Stat]],
                   references: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The table's rows: references (one value each), then every method (mean ± std)."""
    rows = [[f"{label} (reference)", *(f"{scores[m.key]:.3f}" for m in LANGUAGE_METRICS)]
            for label, scores in references.items()]
    for method in dict.fromkeys(m for s in stats.values() for m in s):
        rows.append([method, *(stats[m.key][method].fmt() if method in stats[m.key] else "" for m in LANGUAGE_METRICS)])
    return rows


def language_table(stats: Mapping[str, Mapping[str, Stat]], references: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The language scores as markdown lines (:func:`_language_rows`)."""
    lines = [f"## {LANGUAGE_TITLE}", "", "| model | " + " | ".join(m.label for m in LANGUAGE_METRICS) + " |",
             "|---|" + "---:|" * len(LANGUAGE_METRICS)]
    return lines + ["| " + " | ".join(row) + " |" for row in _language_rows(stats, references)]


def language_rich_table(stats: Mapping[str, Mapping[str, Stat]], references: Mapping[str, Mapping[str, Any]]) -> Any:
    """The same table for the console."""
    from rich.table import Table

    table = Table(title=LANGUAGE_TITLE)
    table.add_column("model")
    for m in LANGUAGE_METRICS:
        table.add_column(m.label, justify="right")
    for row in _language_rows(stats, references):
        table.add_row(*row)
    return table
