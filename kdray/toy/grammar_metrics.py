"""Metrics that separate distillation methods on a language with a known distribution
(:mod:`kdray.toy.grammar`), per prompt; pure Python, exact.

With ``p`` the language's distribution over a prompt's answers and ``q`` a student's:

* **validity** (precision): the fraction of the student's samples the language makes (p > 0).
  Mode-seeking objectives (reverse KL) raise it.
* **coverage**: the language's mass on the distinct valid answers among the samples,
  ``sum_{a in set(samples), p(a) > 0} p(a)``, in [0, 1]. Mode-covering objectives (forward KL)
  raise it.
* **KL(p ‖ q)** = ``sum_a p(a) (log p(a) - log q(a))`` over the language's answers, exact, and
  the student's **NLL** on the language's samples in expectation, ``-sum_a p(a) log q(a)`` =
  H(p) + KL(p ‖ q) (nats). Both are infinite when the student gives a valid answer no mass.

Forward and reverse KL's mode-covering / mode-seeking behaviour: Minka, "Divergence measures
and message passing" (2005); as the distillation papers use it: Gu et al., MiniLLM (ICLR 2024),
Wu et al., "Rethinking KL Divergence in Knowledge Distillation for LLMs" (AKL, COLING 2025).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping


def validity(p: Mapping[str, float], samples: Iterable[str]) -> float:
    """The fraction of ``samples`` (bare answers) with ``p(a) > 0``.

    Raises:
        ValueError: no samples.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("validity of no samples")
    return sum(p.get(a, 0.0) > 0.0 for a in samples) / len(samples)


def coverage(p: Mapping[str, float], samples: Iterable[str]) -> float:
    """The mass ``p`` puts on the distinct valid answers among ``samples``, in [0, 1]."""
    return sum(p.get(a, 0.0) for a in set(samples))


def entropy(p: Mapping[str, float]) -> float:
    """H(p) in nats."""
    return -sum(v * math.log(v) for v in p.values() if v > 0.0)


def _paired(p: Mapping[str, float], log_q: Mapping[str, float]) -> list[tuple[float, float]] | None:
    """``(p(a), log q(a))`` for each answer with ``p(a) > 0``; None when the student gives one of
    them no mass (missing from ``log_q``, or -inf)."""
    pairs = [(v, log_q.get(a, -math.inf)) for a, v in p.items() if v > 0.0]
    return None if any(lq == -math.inf for _, lq in pairs) else pairs


def expected_nll(p: Mapping[str, float], log_q: Mapping[str, float]) -> float:
    """``-sum_a p(a) log q(a)`` (nats): the student's NLL on the language's answers in
    expectation. ``log_q`` holds the student's log-probability of each answer of ``p`` (an
    answer missing from it, or at -inf, makes the result inf)."""
    pairs = _paired(p, log_q)
    return math.inf if pairs is None else -sum(v * lq for v, lq in pairs)


def kl(p: Mapping[str, float], log_q: Mapping[str, float]) -> float:
    """KL(p ‖ q) in nats, exact over the answers of ``p`` (inf as :func:`expected_nll`). Never
    negative for a student whose ``q`` sums to at most 1 over them."""
    pairs = _paired(p, log_q)
    return math.inf if pairs is None else sum(v * (math.log(v) - lq) for v, lq in pairs)
