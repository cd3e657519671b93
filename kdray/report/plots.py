"""The PNG plots of job reports (used by :mod:`kdray.report`).

matplotlib's Agg canvas is used directly (no display, no pyplot state) under fixed rc
settings, so a plot renders to the same bytes every time; files are written under a
temporary name and moved into place.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import secrets
from pathlib import Path
from typing import Any

_STATS = ("mean", "min", "max")
_COUNTERS = {"round", "stage"}  # plotted only when they change during the job
_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3,
          "axes.spines.top": False, "axes.spines.right": False, "legend.fontsize": 8,
          "legend.frameon": False, "figure.dpi": 100, "savefig.dpi": 100}

_SCORES = (("rougeL", "ROUGE-L"), ("exact_match", "exact match"))
#: Said in the title of a plot whose scores carry error bars (``KEY_stderr``:
#: :func:`kdray.data.text_scores.stderr_of_mean`).
_ERROR_NOTE = "\n(error bars: ± 1 standard error)"


def _num(value: Any) -> float:
    """A plottable float: numbers as they are, everything else (None, str, bool) as NaN."""
    return math.nan if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)


def _panels(keys: list[str]) -> list[tuple[str, list[str]]]:
    """Schedule keys grouped one panel per quantity: ``alpha_mean/min/max`` share the panel ``alpha``."""
    panels: dict[str, list[str]] = {}
    for k in keys:
        base, _, stat = k.rpartition("_")
        panels.setdefault(base if stat in _STATS and base else k, []).append(k)
    return [(name, sorted(ks, key=lambda k: _STATS.index(k.rpartition("_")[2]))) if len(ks) > 1 else (ks[0], ks)
            for name, ks in panels.items()]


def _steps(metrics: list[dict[str, Any]]) -> tuple[list[float], str]:
    steps = [_num(m.get("step")) for m in metrics]
    if all(not math.isnan(s) for s in steps) and all(b > a for a, b in itertools.pairwise(steps)):
        return steps, "optimizer step"
    return [float(i + 1) for i in range(len(metrics))], "logged step (cumulative)"


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write under a unique name in the same directory (with the umask's permissions, unlike
    mkstemp's 0600), then os.replace it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _figure(**kw: Any) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same bytes
    return _write_atomic(path, buf.getvalue())


def _mark_rounds(ax: Any, x: list[float], metrics: list[dict[str, Any]], label: bool = False) -> None:
    rounds = [_num(m.get("round")) for m in metrics]
    for i in range(1, len(rounds)):
        if rounds[i] != rounds[i - 1] and not math.isnan(rounds[i]):
            ax.axvline(x[i], color="grey", linestyle=":", linewidth=1)
            if label:
                ax.text(x[i], 0.99, f" round {rounds[i]:g}", transform=ax.get_xaxis_transform(),
                        va="top", ha="left", fontsize=7, color="grey")


def _trailing_mean(values: list[float], window: int) -> list[float]:
    parts = [[v for v in values[max(0, i - window + 1):i + 1] if not math.isnan(v)] for i in range(len(values))]
    return [sum(p) / len(p) if p else math.nan for p in parts]


def plot_loss(metrics: list[dict[str, Any]], keys: list[str], path: Path, title: str) -> Path:
    import matplotlib

    x, xlabel = _steps(metrics)
    grad = [_num(m.get("grad_norm")) for m in metrics]
    has_grad = any(not math.isnan(g) for g in grad)
    with matplotlib.rc_context(_STYLE):
        fig = _figure(figsize=(8, 6 if has_grad else 4))
        axes = fig.subplots(2 if has_grad else 1, 1, sharex=True, squeeze=False,
                            height_ratios=[2, 1] if has_grad else None)[:, 0]
        series = {k: [_num(m.get(k)) for m in metrics] for k in keys}
        if "loss" in series:
            # Above the parts (zorder), so a part equal to the loss (kd at kd_ratio 1) cannot hide it.
            raw, window, many = series["loss"], max(5, len(x) // 16), len(x) >= 30
            axes[0].plot(x, raw, color="black", linewidth=0.8 if many else 1.8, alpha=0.45 if many else 1,
                         label="loss", marker=None if many else ".", zorder=3)
            if many:
                axes[0].plot(x, _trailing_mean(raw, window), color="black", linewidth=2, zorder=3,
                             label=f"loss, mean of last {window} steps")
        styles = ["--", "-.", ":", (0, (5, 1, 1, 1))]
        for i, k in enumerate(k for k in keys if k != "loss"):
            same = "loss" in series and all(math.isclose(u, v, abs_tol=1e-12) or math.isnan(u) and math.isnan(v)
                                            for u, v in zip(series[k], series["loss"], strict=True))
            axes[0].plot(x, series[k], label=f"{k} (= loss)" if same else k, linestyle=styles[i % 4],
                         linewidth=2.4 if same else 1.2, marker="." if len(x) < 30 else None)
        axes[0].set(title=f"{title}: training loss and its parts per step", ylabel="loss value")
        axes[0].legend(loc="upper right")
        if has_grad:
            axes[1].plot(x, grad, color="tab:grey", linewidth=1)
            axes[1].set(title="gradient norm (before clipping)", ylabel="grad norm")
        axes[-1].set_xlabel(xlabel)
        for i, ax in enumerate(axes):
            _mark_rounds(ax, x, metrics, label=i == 0)
        return _save(fig, path)


def plot_schedule(metrics: list[dict[str, Any]], keys: list[str], path: Path, title: str) -> Path:
    import matplotlib

    x, xlabel = _steps(metrics)
    panels = _panels(keys)
    ncols = 1 if len(panels) <= 3 else 2
    nrows = math.ceil(len(panels) / ncols)
    with matplotlib.rc_context(_STYLE):
        fig = _figure(figsize=(8 if ncols == 1 else 9, 0.6 + 2.0 * nrows))
        axes = fig.subplots(nrows, ncols, sharex=True, squeeze=False).ravel()
        for n, (ax, (name, ks)) in enumerate(zip(axes, panels)):
            ys = {k: [_num(m.get(k)) for m in metrics] for k in ks}
            for k in ks:
                # A value only some steps carry (an on-policy step's staleness, replay's val_loss)
                # gets markers: a lone step between gaps draws no line.
                gaps = any(math.isnan(v) for v in ys[k])
                ax.plot(x, ys[k], linewidth=1.4, label=k, drawstyle="steps-post" if k in _COUNTERS else "default",
                        marker="o" if gaps else None, markersize=2.5)
            distinct = {f"{v:.6g}" for k in ks for v in ys[k] if not math.isnan(v)}
            ax.set_title(f"{name} (constant {distinct.pop()})" if len(distinct) == 1 else name)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
            if len(ks) > 1:
                ax.legend(loc="best")
            _mark_rounds(ax, x, metrics, label=n < ncols)
            if n >= len(panels) - ncols:  # the lowest panel of its column
                ax.set_xlabel(xlabel)
                ax.tick_params(labelbottom=True)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{title}: schedule values per step")
        return _save(fig, path)


def _errors(entries: list[dict[str, Any]], key: str) -> list[float] | None:
    """The standard errors of score ``key`` of each of ``entries`` (NaN, drawn as no bar, where
    one has none), or None where none has one (a report written before kdray gave them)."""
    errors = [_num(s.get(f"{key}_stderr")) for s in entries]
    return None if all(math.isnan(e) for e in errors) else errors


def _bars(ax: Any, groups: list[str], series: list[tuple[str, list[float], list[float] | None]]) -> list[list[float]]:
    """Grouped bars, each series with its error bars where it has them (:func:`_errors`), and
    their values written on top; returns each series' bar centres."""
    width, centres = 0.8 / len(series), []
    for j, (name, values, errors) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=name, yerr=errors,
                      capsize=3, error_kw={"elinewidth": 1, "ecolor": "0.3"})
        ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.3f}" for v in values], fontsize=7, padding=2)
        centres.append(xs)
    ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 5 else 0)
    ax.set_ylim(0, 1.1)
    ax.grid(axis="x", visible=False)
    return centres


def plot_evaluation(entries: list[tuple[str, dict[str, Any]]], path: Path, title: str) -> Path:
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig = _figure(figsize=(max(5.0, 1.3 * len(entries) + 2), 4))
        ax = fig.subplots()
        series = [(name, [_num(s.get(key)) for _, s in entries], _errors([s for _, s in entries], key))
                  for key, name in _SCORES]
        _bars(ax, [label.replace("_", " ") for label, _ in entries], series)
        note = _ERROR_NOTE if any(errors for _, _, errors in series) else ""
        ax.set(ylabel="score on held-out set", xlabel="model",
               title=f"{title}: held-out evaluation per model and round{note}")
        ax.legend(loc="upper right", ncols=2)
        return _save(fig, path)


def plot_evaluation_rounds(rounds: list[tuple[str, dict[str, Any]]], references: dict[str, dict[str, Any]],
                           path: Path, title: str, unit: str = "round") -> Path:
    """Held-out scores of the student after each round (``rounds``: label and scores, in order,
    the last one the final student), one panel per metric, with the teacher's and the initial
    student's scores (``references``) as horizontal lines."""
    import matplotlib

    metrics = (*_SCORES, ("mean_length", "mean length (words)"))
    errors = {key: _errors([s for _, s in rounds], key) for key, _ in _SCORES}  # none for the length
    x = list(range(1, len(rounds) + 1))
    with matplotlib.rc_context(_STYLE):
        fig = _figure(figsize=(11, 3.6))
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for ax, (key, name) in zip(axes, metrics):
            ys = [_num(s.get(key)) for _, s in rounds]
            ax.errorbar(x, ys, yerr=errors.get(key), marker="o", linewidth=1.8, capsize=3, color="tab:blue",
                        label="student")
            for i, y in zip(x, ys):
                if not math.isnan(y):
                    ax.annotate(f"{y:.3f}" if key != "mean_length" else f"{y:.2f}", (i, y),
                                textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
            for ref, style, color in (("teacher", "--", "tab:green"), ("student_before", ":", "black")):
                value = _num(references.get(ref, {}).get(key))
                if not math.isnan(value):
                    ax.axhline(value, linestyle=style, color=color, linewidth=1.4,
                               label=f"{ref.replace('_', ' ')} ({value:.3f})")
            ax.set_xticks(x, [f"{i}" if i < len(x) else f"{i}\n(final)" for i in x])
            ax.set(title=name, xlabel=unit)
            if key != "mean_length":
                ax.set_ylim(0, 1.05)
            ax.legend(loc="best")
        axes[0].set_ylabel("score on held-out set")
        note = _ERROR_NOTE if any(errors.values()) else ""
        fig.suptitle(f"{title}: held-out evaluation of the student after each {unit}{note}")
        return _save(fig, path)


def plot_compare(labels: list[str], evs: list[dict[str, Any]], path: Path) -> Path:
    """``evs[i]`` is job i's evaluation: ``{"student_before": {...}, "student_after": {...}}``."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig = _figure(figsize=(max(5.0, 1.4 * len(labels) + 2), 4.2))
        ax = fig.subplots()
        after = [e.get("student_after", {}) for e in evs]
        series = [(f"{name} after", [_num(s.get(key)) for s in after], _errors(after, key)) for key, name in _SCORES]
        centres = _bars(ax, labels, series)
        for j, ((key, _), xs) in enumerate(zip(_SCORES, centres)):
            before = [_num(e.get("student_before", {}).get(key)) for e in evs]
            ax.hlines(before, [x - 0.2 for x in xs], [x + 0.2 for x in xs], colors="black", linewidths=2,
                      label="before training" if j == 0 else None)
        note = _ERROR_NOTE if any(errors for _, _, errors in series) else ""
        ax.set(ylabel="student score on held-out set", xlabel="job",
               title=f"student after distillation (bars) vs before (black lines){note}")
        ax.legend(loc="upper right", ncols=3)
        return _save(fig, path)
