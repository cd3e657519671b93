"""The tables and verdicts of ``kdray repro``: pure functions of the runs' scores.

Two tables and the verdict lines that check two papers' orderings:

* POCL (Liu & Zhang 2025, arXiv:2506.05695), in the shape of its README: per base loss the
  average ROUGE-L ``base → +POCL``; the claim checked is "POCL helps every base loss"
  (``base < +POCL`` for each).
* DistiLLM-2 (Ko et al. 2025, arXiv:2503.07067), in the method order of its Table 2: KD,
  DistiLLM, DistiLLM-2; the claim checked is "DistiLLM-2 beats DistiLLM, which beats KD".
  KD is forward KL. DistiLLM is its skew KL (SKL, α = 0.1) for the headline verdict, and its
  skew reverse KL (SRKL, α = 0.1) in a second line; neither runs DistiLLM's adaptive
  off-policy replay here. DistiLLM-2 is checked in mode ``paper`` (headline) and
  ``released_code``.

Every figure is a mean over seeds with the sample standard deviation (ddof = 1; undefined,
shown as no "±", with a single seed). An ordering ``A < B`` *holds* when B's mean is strictly
above A's; equal means (within 1e-9) are a tie, and a tie does not hold. When both sides have
two or more seeds, a difference of at most twice its standard error
``sqrt(s_A²/n_A + s_B²/n_B)`` is flagged "within seed noise": the verdict still follows the
means, the flag says how much to trust it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import fmean, stdev
from typing import Any, Iterable, Mapping

#: Base losses of the grid, in table order, with their display names.
BASE_LOSSES: dict[str, str] = {
    "fkl": "FKL", "rkl": "RKL", "jsd": "JSD", "tvd": "TVD", "skl": "SKL", "srkl": "SRKL", "akl": "AKL",
}
POCL_SUFFIX = "+pocl"
DISTILLM2_MODES = ("paper", "released_code")
TIE_TOL = 1e-9

#: DistiLLM-2's Table 2 order (weakest first): (row label, method name).
TABLE2_ROWS: tuple[tuple[str, str], ...] = (
    ("KD (FKL)", "fkl"),
    ("DistiLLM (SKL, α=0.1)", "skl"),
    ("DistiLLM (SRKL, α=0.1)", "srkl"),
    ("DistiLLM-2 (released_code)", "distillm2-released_code"),
    ("DistiLLM-2 (paper)", "distillm2-paper"),
)


@dataclass(frozen=True)
class Stat:
    """Mean and sample std of one score over seeds (``std`` None with fewer than 2 values)."""

    mean: float
    std: float | None
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def summarize(values: Iterable[float]) -> Stat:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to summarize; every method needs at least one finished seed")
    return Stat(mean=fmean(vals), std=stdev(vals) if len(vals) > 1 else None, n=len(vals))


@dataclass(frozen=True)
class Comparison:
    """Whether ``low < high`` holds on the means (see the module docstring)."""

    low: Stat
    high: Stat

    @property
    def diff(self) -> float:
        return self.high.mean - self.low.mean

    @property
    def tie(self) -> bool:
        return abs(self.diff) <= TIE_TOL

    @property
    def holds(self) -> bool:
        return self.diff > TIE_TOL

    @property
    def within_noise(self) -> bool | None:
        """|diff| <= 2 standard errors; None when either side has a single seed."""
        if self.low.std is None or self.high.std is None:
            return None
        se = math.sqrt(self.low.std ** 2 / self.low.n + self.high.std ** 2 / self.high.n)
        return abs(self.diff) <= 2 * se

    def word(self) -> str:
        return "tie" if self.tie else ("yes" if self.holds else "no")

    def note(self) -> str:
        noise = self.within_noise
        if noise is None:
            return "single seed: no noise estimate"
        return "within seed noise" if noise else "beyond seed noise"


@dataclass(frozen=True)
class Metric:
    """A score the verdicts compare: its key in a run's result, its label, and which way is
    better (ROUGE-L and validity: higher; KL and NLL: lower)."""

    key: str
    label: str
    higher_is_better: bool = True

    def compare(self, worse: Stat, better: Stat) -> Comparison:
        """The :class:`Comparison` that holds when ``better`` scores better than ``worse``."""
        return Comparison(worse, better) if self.higher_is_better else Comparison(better, worse)

    @property
    def better_sign(self) -> str:
        """``<`` (higher is better) or ``>``: the sign between a worse and a better score."""
        return "<" if self.higher_is_better else ">"


ROUGE_L = Metric("rougeL", "ROUGE-L")


def method_stats(runs: Iterable[Mapping[str, Any]], metric: str = "rougeL") -> dict[str, Stat]:
    """Per method, the statistic of ``metric`` over its finished runs (failed runs skipped)."""
    by_method: dict[str, list[float]] = {}
    for run in runs:
        if run.get("error") is None and run.get(metric) is not None:
            by_method.setdefault(run["method"], []).append(float(run[metric]))
    return {m: summarize(v) for m, v in by_method.items()}


def pocl_rows(stats: Mapping[str, Stat], metric: Metric = ROUGE_L) -> list[dict[str, Any]]:
    """One row per base loss that has both a base and a +POCL result: ``diff`` is +POCL's mean
    minus the base's, ``holds`` whether +POCL is better on ``metric``."""
    rows = []
    for key, label in BASE_LOSSES.items():
        base, pocl = stats.get(key), stats.get(key + POCL_SUFFIX)
        if base is None or pocl is None:
            continue
        cmp = metric.compare(base, pocl)
        rows.append({"loss": label, "base": base, "pocl": pocl, "diff": pocl.mean - base.mean, "holds": cmp.word(),
                     "note": cmp.note()})
    return rows


def table2_rows(stats: Mapping[str, Stat]) -> list[dict[str, Any]]:
    return [{"method": label, "name": name, "stat": stats[name]} for label, name in TABLE2_ROWS if name in stats]


def _pair_text(low_label: str, low: Stat, high_label: str, high: Stat) -> str:
    cmp = Comparison(low, high)
    sign = "<" if cmp.holds else ("=" if cmp.tie else ">")
    return f"{low_label} {low.mean:.3f} {sign} {high_label} {high.mean:.3f} ({cmp.note()})"


def _claim_id(name: str, metric: Metric) -> str:
    return name if metric == ROUGE_L else f"{name}:{metric.key}"


def pocl_verdict(stats: Mapping[str, Stat], metric: Metric = ROUGE_L) -> dict[str, Any]:
    """Whether +POCL scores better than its base loss on ``metric`` for every base loss run."""
    rows = pocl_rows(stats, metric)
    claim = f"POCL (arXiv:2506.05695): POCL helps every base loss ({metric.label}: base {metric.better_sign} +POCL)"
    if not rows:
        return {"claim": _claim_id("pocl", metric), "holds": None,
                "text": f"{claim}: not checked (no base loss was run both with and without POCL)"}
    yes = [r["loss"] for r in rows if r["holds"] == "yes"]
    no = [f"{r['loss']} ({r['base'].mean:.3f} → {r['pocl'].mean:.3f}{', tie' if r['holds'] == 'tie' else ''})"
          for r in rows if r["holds"] != "yes"]
    holds = not no
    text = (f"{claim}: {'HOLDS' if holds else 'DOES NOT HOLD'} on this run; POCL helps {len(yes)} of "
            f"{len(rows)} base losses" + (f" ({', '.join(yes)})" if yes else "")
            + (f"; not {', '.join(no)}" if no else ""))
    noisy = [r["loss"] for r in rows if r["note"] == "within seed noise"]
    if noisy:
        text += f"; within seed noise for {', '.join(noisy)}"
    missing = [label for key, label in BASE_LOSSES.items() if key not in stats or key + POCL_SUFFIX not in stats]
    if missing:
        text += f"; not run: {', '.join(missing)}"
    return {"claim": _claim_id("pocl", metric), "holds": holds, "text": text,
            "pairs": {r["loss"]: {"diff": r["diff"], "holds": r["holds"], "note": r["note"]} for r in rows}}


def chain_verdict(stats: Mapping[str, Stat], distillm: str, mode: str, metric: Metric = ROUGE_L) -> dict[str, Any]:
    """KD (FKL) < DistiLLM (``distillm``: 'skl' or 'srkl') < DistiLLM-2 (``mode``), each better
    than the last on ``metric``. The claim's signs are the metric's (``>`` where lower is
    better), as are the values' signs after it; a failing link is named in words."""
    d_label = f"DistiLLM ({distillm.upper()}, α=0.1)"
    d2_name = f"distillm2-{mode}"
    d2_label = f"DistiLLM-2 ({mode})"
    sign = metric.better_sign
    claim = f"DistiLLM-2 (arXiv:2503.07067): KD (FKL) {sign} {d_label} {sign} {d2_label}"
    if metric != ROUGE_L:
        claim += f" ({metric.label}: {'higher' if metric.higher_is_better else 'lower'} is better)"
    claim_id = _claim_id(f"distillm2:{distillm}:{mode}", metric)
    missing = [n for n in ("fkl", distillm, d2_name) if n not in stats]
    if missing:
        return {"claim": claim_id, "holds": None,
                "text": f"{claim}: not checked (not run: {', '.join(missing)})"}
    kd, d, d2 = stats["fkl"], stats[distillm], stats[d2_name]
    first, second = metric.compare(kd, d), metric.compare(d, d2)
    holds = first.holds and second.holds
    broken = [f"{t} ({c.note()})" for c, t in ((first, "DistiLLM not better than KD"),
                                                (second, "DistiLLM-2 not better than DistiLLM")) if not c.holds]
    text = (f"{claim}: {'HOLDS' if holds else 'DOES NOT HOLD'} on this run"
            + (f" (fails: {', '.join(broken)})" if broken else "") + "; "
            + _pair_text("KD", kd, "DistiLLM", d) + "; " + _pair_text("DistiLLM", d, "DistiLLM-2", d2))
    return {"claim": claim_id, "holds": holds, "text": text,
            "pairs": {"kd<distillm": first.word(), "distillm<distillm2": second.word()}}


def verdicts(stats: Mapping[str, Stat]) -> list[dict[str, Any]]:
    """The POCL verdict, then the DistiLLM-2 chain: headline (SKL, paper) first."""
    out = [pocl_verdict(stats)]
    for distillm, mode in (("skl", "paper"), ("skl", "released_code"), ("srkl", "paper"), ("srkl", "released_code")):
        out.append(chain_verdict(stats, distillm, mode))
    return out


#: A verdict's own word in its text, and its console colour, by ``holds``.
_WORDS = {True: (": HOLDS", "green"), False: (": DOES NOT HOLD", "red"), None: (": not checked", "yellow")}


def verdict_line(verdict: dict[str, Any], rich: bool) -> str:
    """``verdict``'s text with its word (HOLDS, DOES NOT HOLD, not checked) in bold, or in
    colour on the console (``rich``)."""
    word, colour = _WORDS[verdict["holds"]]
    marked = f": [bold {colour}]{word[2:]}[/]" if rich else f": **{word[2:]}**"
    return verdict["text"].replace(word, marked, 1)


def markdown(stats: Mapping[str, Stat], references: Mapping[str, Stat], em: Mapping[str, Stat],
             found: list[dict[str, Any]]) -> str:
    """The two tables and the verdict lines as markdown (``repro.md``'s body)."""
    lines = ["## POCL: average ROUGE-L, base → +POCL (mean ± std over seeds)", "",
             "| base loss | base | +POCL | Δ | POCL helps? |", "|---|---:|---:|---:|---|"]
    for r in pocl_rows(stats):
        lines.append(f"| {r['loss']} | {r['base'].fmt()} | {r['pocl'].fmt()} | {r['diff']:+.3f} | "
                     f"{r['holds']} ({r['note']}) |")
    lines += ["", "## DistiLLM-2 Table 2 order: ROUGE-L and exact match (mean ± std over seeds)", "",
              "| method | ROUGE-L | exact match |", "|---|---:|---:|"]
    for label, stat in references.items():
        lines.append(f"| {label} (reference) | {stat.fmt()} | {em[label].fmt() if label in em else ''} |")
    for r in table2_rows(stats):
        e = em.get(r["name"])
        lines.append(f"| {r['method']} | {r['stat'].fmt()} | {e.fmt() if e else ''} |")
    lines += ["", "## Verdicts", ""]
    lines += [f"- {verdict_line(v, False)}" for v in found]
    return "\n".join(lines) + "\n"


def rich_tables(stats: Mapping[str, Stat], references: Mapping[str, Stat], em: Mapping[str, Stat]) -> list[Any]:
    """The same two tables for the console."""
    from rich.table import Table

    pocl = Table(title="POCL: average ROUGE-L, base → +POCL (mean ± std over seeds)")
    for col, justify in (("base loss", "left"), ("base", "right"), ("+POCL", "right"), ("Δ", "right"),
                         ("POCL helps?", "left")):
        pocl.add_column(col, justify=justify)
    for r in pocl_rows(stats):
        pocl.add_row(r["loss"], r["base"].fmt(), r["pocl"].fmt(), f"{r['diff']:+.3f}", f"{r['holds']} ({r['note']})")
    t2 = Table(title="DistiLLM-2 Table 2 order (mean ± std over seeds)")
    for col, justify in (("method", "left"), ("ROUGE-L", "right"), ("exact match", "right")):
        t2.add_column(col, justify=justify)
    for label, stat in references.items():
        t2.add_row(f"{label} (reference)", stat.fmt(), em[label].fmt() if label in em else "")
    for r in table2_rows(stats):
        e = em.get(r["name"])
        t2.add_row(r["method"], r["stat"].fmt(), e.fmt() if e else "")
    return [pocl, t2]
