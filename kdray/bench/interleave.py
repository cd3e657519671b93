"""Side-by-side figures that hold on a shared host: variants run interleaved, ratios per pair.

A bench that measures variant A for a minute and then B for a minute compares A under one load
with B under another: on a shared 2-core host, two runs of ``kdray bench train`` gave ratios of
1.58x, 0.74x and 0.54x. Run instead A, B, A, B, ... for a fixed number of rounds
(:func:`interleave`), take the ratio within each round, where a load change hits both sides
alike, and report the median of those ratios with their spread (:func:`ratio_summary`), and
the host's load over the run (:class:`HostLoad`). Where a round lasts minutes, the baseline
can bracket the others (A B A B ... A; :func:`bracketed`): each round's ratio then sets the
others against the baseline measured on both sides of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


def interleave(measure: Callable[[str, int], T], variants: Sequence[str], rounds: int, *,
               bracket: int = 0) -> dict[str, list[T]]:
    """``measure(variant, round)`` for every variant in every round, in the order A B ... A B
    ...; returns each variant's results in round order. ``rounds`` >= 1.

    With ``bracket`` = k, the first k variants run once more after the last round (round
    ``rounds``: A B A B ... A), so every round of the others lies between two runs of theirs,
    and they have ``rounds + 1`` results: :func:`bracketed` pairs them with the others' rounds.
    With k > 1 they run in reverse order every other round (A1 A2 B A2 A1 B A1 A2 ...), so each
    one's two runs around a round of the others are the same distance from it.

    Raises:
        ValueError: ``rounds`` < 1, no variants, or ``bracket`` outside 0 .. len(variants) - 1.
    """
    if rounds < 1 or not variants:
        raise ValueError(f"need rounds >= 1 and at least one variant; got {rounds} rounds of {list(variants)}")
    if not 0 <= bracket < len(variants):
        raise ValueError(f"bracket must leave at least one of the {len(variants)} variants inside; got {bracket}")
    results: dict[str, list[T]] = {v: [] for v in variants}
    outer, inner = list(variants[:bracket]), list(variants[bracket:])
    for r in range(rounds + (1 if bracket else 0)):
        for v in (outer if r % 2 == 0 else outer[::-1]) + (inner if r < rounds else []):
            results[v].append(measure(v, r))
    return results


def bracketed(values: Sequence[float | None]) -> list[float | None]:
    """A bracketing variant's figure per round of the others (:func:`interleave`'s
    ``bracket``): the mean of its runs just before and just after that round, so a load that
    drifts steadily through the round moves both sides of the round's ratio alike; the one run
    that has a figure where the other has none (a failed run); None where neither has.
    ``len(values) - 1`` figures."""
    def around(a: float | None, b: float | None) -> float | None:
        present = [x for x in (a, b) if x is not None]
        return sum(present) / len(present) if present else None

    return [around(a, b) for a, b in zip(values, values[1:])]


def add_rounds_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--rounds N``: interleaved rounds of ``what`` (default 3; 1 with ``--quick``)."""
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"interleaved rounds of {what} (default 3; 1 with --quick)")


def resolve_rounds(args: argparse.Namespace) -> int:
    """``args.rounds`` with its default filled in (3; 1 with ``args.quick``); exits on < 1."""
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        raise SystemExit("--rounds must be 1 or more")
    return args.rounds


def median_row(runs: Sequence[dict[str, Any]], ran: Callable[[dict[str, Any]], bool], medians: Sequence[str],
               maxima: Sequence[str] = ()) -> dict[str, Any]:
    """One variant's runs as one row: the first run that ``ran``, with the median over the runs
    that ran of each key in ``medians`` and the largest of each in ``maxima`` (runs where a key
    is None left out; None when it is None in all), and ``runs``, how many ran (one per round,
    or one more for a bracketing variant); the first run when none ran (its error)."""
    ok = [r for r in runs if ran(r)]
    if not ok:
        return dict(runs[0])

    def over(key: str, how: Callable[[list[Any]], Any]) -> Any:
        values = [r[key] for r in ok if r[key] is not None]
        return how(values) if values else None

    return {**ok[0], **{k: over(k, statistics.median) for k in medians}, **{k: over(k, max) for k in maxima},
            "runs": len(ok)}


@dataclass(frozen=True)
class RatioSummary:
    """Per-round ratios ``numerator[i] / denominator[i]`` and their summary: the median, and the
    spread, ``(max - min) / median`` (0.15: the rounds' ratios lie within 15 % of the median's
    size of each other; 0 with one round)."""

    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        return (max(self.ratios) - min(self.ratios)) / self.median if self.median else float("inf")

    def __str__(self) -> str:
        return f"{self.median:.2f}x (spread {self.spread:.0%} over {len(self.ratios)} rounds)"


def ratio_summary(numerator: Sequence[float | None], denominator: Sequence[float | None]) -> RatioSummary | None:
    """The per-round ratios of two variants' figures (rounds where either is missing or the
    denominator is 0 are left out); None when no round has both."""
    ratios = tuple(a / b for a, b in zip(numerator, denominator) if a is not None and b)
    return RatioSummary(ratios) if ratios else None


class HostLoad:
    """The host's 1-minute load average sampled every ``every_s`` seconds while the ``with``
    block runs (a daemon thread): ``str()`` gives its mean and max and the CPU count."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "HostLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def __str__(self) -> str:
        mean = statistics.fmean(self.samples)
        return f"host load (1-min average) {mean:.1f} mean, {max(self.samples):.1f} max on {os.cpu_count()} CPUs"
