"""POCL: progressive-overload curriculum (Liu & Zhang 2025, arXiv:2506.05695).

Two parts:

* the pure half of the **difficulty measurer**: the initial student has answered every
  training prompt (done elsewhere, through the generation pool); two per-sample
  measurements are fused by reciprocal rank fusion (RRF, Cormack et al. 2009) into one
  easy → hard order:

  - ROUGE-L of the student's answer against the gold response (higher = easier),
  - the student's mean token cross-entropy on the gold response (lower = easier);

* the **"baby step" training scheduler**: ``n_stages`` cumulative subsets; stage i
  (1-based) trains on the easiest i/n of the data for a fixed interval (epochs or
  optimizer steps) while the KD temperature and ``kd_ratio`` rise linearly.
  ``kd_ratio`` weights KD against the hard-label CE term as in the POCL/DistiLLM code:
  ``loss = (1 - kd_ratio) * ce + kd_ratio * kd``.

Defaults follow the released POCL scripts (github.com/liuliuyuan6/POCL,
scripts/gpt2/pocl/train_0.1B_1.5B/t0..t3.sh): four stages, 8 epochs each,
``--temperature-kld`` 1, 1.33, …, 2 and ``--kd-ratio`` 0.7, 0.8, …, 1.0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from .base import Curriculum, check_choice, check_float, check_int

ArrayLike = Union[Sequence[float], np.ndarray, torch.Tensor]

RRF_K = 60  # Cormack, Clarke & Büttcher (2009), also POCL's choice
TIES = ("average", "min")


def _as_1d(name: str, values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        arr = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a 1-D sequence of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per sample); got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; measure at least one sample")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} has non-finite values at indices {bad[:5].tolist()}; "
                         "fix or drop those samples before ranking")
    return arr


def _rank(values: np.ndarray, *, higher_is_better: bool, ties: str) -> np.ndarray:
    """1-based ranks (rank 1 = best), shape (N,) float64. Tied values share a rank."""
    key = -values if higher_is_better else values
    n = key.size
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = sorted_key[1:] != sorted_key[:-1]
    starts = np.flatnonzero(new_group)             # 0-based first position of each group
    ends = np.append(starts[1:], n)                # exclusive end
    if ties == "min":
        group_rank = starts + 1.0                  # competition ranking: 1, 2, 2, 4
    else:
        group_rank = (starts + 1 + ends) / 2.0     # mean of positions starts+1 … ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = group_rank[np.cumsum(new_group) - 1]
    return ranks


@dataclass(frozen=True, eq=False)
class DifficultyRanks:
    """Per-sample difficulty of a training set, stored with the data so a resumed job
    does not measure again. Arrays have shape (N,), indexed by sample.

    ``rouge_rank`` / ``ce_rank``: 1-based ranks (1 = easiest: highest ROUGE-L, lowest CE).
    ``score``: RRF score ``1/(k + rouge_rank) + 1/(k + ce_rank)``, higher = easier.
    ``order``: sample indices easy → hard. ``position``: each sample's 0-based place in
    ``order`` (0 = easiest).
    """

    rouge: np.ndarray
    ce: np.ndarray
    rouge_rank: np.ndarray
    ce_rank: np.ndarray
    score: np.ndarray
    order: np.ndarray
    k: float
    ties: str

    @property
    def position(self) -> np.ndarray:
        pos = np.empty_like(self.order)
        pos[self.order] = np.arange(self.order.size, dtype=self.order.dtype)
        return pos

    def to_dict(self) -> dict[str, Any]:
        """Column-oriented, JSON-serialisable: one list entry per sample."""
        return {"k": self.k, "ties": self.ties, "rouge": self.rouge.tolist(), "ce": self.ce.tolist(),
                "rouge_rank": self.rouge_rank.tolist(), "ce_rank": self.ce_rank.tolist(),
                "score": self.score.tolist(), "order": self.order.tolist(),
                "position": self.position.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DifficultyRanks":
        """Rebuild from :meth:`to_dict`. The fusion is recomputed from the stored ROUGE-L
        and CE (cheap; no generation) and must reproduce the stored order, which catches
        edited files and ranking-rule changes between versions."""
        missing = [key for key in ("k", "ties", "rouge", "ce", "order") if key not in d]
        if missing:
            raise ValueError(f"difficulty ranks lack {missing}; store DifficultyRanks.to_dict()")
        ranks = difficulty_ranks(d["rouge"], d["ce"], k=d["k"], ties=d["ties"])
        if list(d["order"]) != ranks.order.tolist():
            raise ValueError("stored difficulty order does not match the ROUGE-L/CE values "
                             "stored beside it; re-measure difficulty or restore the file")
        return ranks


def difficulty_ranks(rouge: ArrayLike, ce: ArrayLike, k: float = RRF_K,
                     ties: str = "average") -> DifficultyRanks:
    """Fuse the two difficulty rankings by reciprocal rank; see :func:`rrf_order`.

    Args:
        rouge: (N,) ROUGE-L of the initial student's answer vs the gold response.
        ce: (N,) the initial student's mean token cross-entropy on the gold response.
        k: RRF constant (60 in the RRF paper and POCL); must be >= 0.
        ties: how equal values within one ranking share ranks: ``"average"`` (the mean
            of the positions they occupy; e.g. 1, 2.5, 2.5, 4) or ``"min"`` (competition
            ranking; 1, 2, 2, 4). Either keeps the result independent of sample order.
    """
    rouge_arr, ce_arr = _as_1d("rouge", rouge), _as_1d("ce", ce)
    if rouge_arr.shape != ce_arr.shape:
        raise ValueError(f"rouge and ce must have one value per sample each; got "
                         f"{rouge_arr.size} and {ce_arr.size} values")
    k = check_float("k", k, low=0.0)
    ties = check_choice("ties", ties, TIES)
    rouge_rank = _rank(rouge_arr, higher_is_better=True, ties=ties)
    ce_rank = _rank(ce_arr, higher_is_better=False, ties=ties)
    score = 1.0 / (k + rouge_rank) + 1.0 / (k + ce_rank)
    index = np.arange(score.size)
    # np.lexsort: the LAST key is the primary one.
    order = np.lexsort((index, ce_arr, -rouge_arr, -score)).astype(np.int64)
    return DifficultyRanks(rouge_arr, ce_arr, rouge_rank, ce_rank, score, order, k, ties)


def rrf_order(rouge: ArrayLike, ce: ArrayLike, k: float = RRF_K, ties: str = "average") -> np.ndarray:
    """Sample indices sorted easy → hard, shape (N,) int64.

    Each sample gets two 1-based ranks, as in the RRF paper (rank 1 = best): r₁ by
    ROUGE-L (highest first) and r₂ by mean CE (lowest first); its score is
    ``s = 1/(k + r₁) + 1/(k + r₂)`` and higher s is easier.

    Deterministic tie-breaking: equal values within a ranking share a rank (``ties``);
    equal fused scores are ordered by higher ROUGE-L, then lower CE, then lower sample
    index. The result depends only on the values, so permuting the samples permutes
    the output the same way, and a sample at least as good on both measures (better on
    one) is never placed after the other.

    Accepts Python sequences, numpy arrays or tensors (any device); inputs must be
    finite and of equal length N >= 1.
    """
    return difficulty_ranks(rouge, ce, k=k, ties=ties).order


def pocl_stage_values(stage: int, n_stages: int, t_start: float = 1.0, t_end: float = 2.0,
                      kd_ratio_start: float = 0.7,
                      kd_ratio_end: float = 1.0) -> tuple[float, float, float]:
    """(temperature, kd_ratio, data_fraction) of a POCL stage.

    ``stage`` is 1-based: 1 … ``n_stages``. Stage i trains on the easiest
    ``i / n_stages`` of the data; temperature and kd_ratio move linearly from their
    start value at stage 1 to their end value at stage ``n_stages``. With the defaults
    and 4 stages: temperatures 1, 1.33, 1.67, 2 and kd_ratios 0.7, 0.8, 0.9, 1.0.
    With ``n_stages == 1`` the single stage is also the last one: it uses the end
    values and all data.
    """
    n_stages = check_int("n_stages", n_stages, minimum=1)
    stage = check_int("stage", stage, minimum=1, maximum=n_stages)
    t_start = check_float("t_start", t_start, low=0.0, low_open=True)
    t_end = check_float("t_end", t_end, low=0.0, low_open=True)
    kd_ratio_start = check_float("kd_ratio_start", kd_ratio_start, low=0.0, high=1.0)
    kd_ratio_end = check_float("kd_ratio_end", kd_ratio_end, low=0.0, high=1.0)
    p = 1.0 if n_stages == 1 else (stage - 1) / (n_stages - 1)
    # (1-p)·a + p·b is exactly a at p=0 and exactly b at p=1 (a + (b-a)·p is not).
    temperature = (1.0 - p) * t_start + p * t_end
    kd_ratio = (1.0 - p) * kd_ratio_start + p * kd_ratio_end
    return temperature, kd_ratio, stage / n_stages


def pocl_stage_size(stage: int, n_stages: int, n_samples: int) -> int:
    """How many of the easiest samples stage ``stage`` (1-based) trains on:
    ``ceil(stage * n_samples / n_stages)``, so every stage has at least one sample when
    ``n_samples >= 1``, sizes never shrink, and the last stage has all samples."""
    n_stages = check_int("n_stages", n_stages, minimum=1)
    stage = check_int("stage", stage, minimum=1, maximum=n_stages)
    n_samples = check_int("n_samples", n_samples, minimum=1)
    return -(-stage * n_samples // n_stages)


def _check_order(order: Any) -> np.ndarray:
    if isinstance(order, DifficultyRanks):
        order = order.order
    if isinstance(order, torch.Tensor):
        order = order.detach().cpu().numpy()
    arr = np.asarray(order)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("order must be a non-empty 1-D sequence of sample indices (easy → hard), "
                         "e.g. rrf_order(rouge, ce)")
    if not np.array_equal(np.sort(arr), np.arange(arr.size)):
        raise ValueError(f"order must be a permutation of 0..{arr.size - 1} (each sample once)")
    return arr.astype(np.int64)


class POCLScheduler(Curriculum):
    """The "baby step" scheduler: cumulative easy → hard stages with rising temperature
    and ``kd_ratio``.

    Use: build it from the spec, give it the easy → hard order (``order=`` or
    :meth:`set_order`; stepping before it raises), then per step read
    :meth:`active_indices`, :attr:`temperature`, :attr:`kd_ratio`; call :meth:`step`
    after each optimizer step and :meth:`end_epoch` after each pass over the active
    samples. Both return True when the stage changed (rebuild the sampler). After the
    last stage's interval :attr:`finished` is True; values then stay at the last stage.

    Args:
        n_stages: number of cumulative subsets (POCL: 4).
        stage_interval: length of each stage, in ``interval_unit`` (POCL scripts: 8 epochs).
        interval_unit: ``"epochs"`` (counted by :meth:`end_epoch`) or ``"steps"``
            (optimizer steps, counted by :meth:`step`).
        t_start, t_end, kd_ratio_start, kd_ratio_end: see :func:`pocl_stage_values`.
        order: optional easy → hard sample indices (or a :class:`DifficultyRanks`).

    State: ``{"order": list[int] | None, "stage": int (1-based), "units_done": int
    (completed units in the current stage), "global_step": int, "epoch": int,
    "finished": bool}``.
    """

    kind = "pocl"

    def __init__(self, *, n_stages: int = 4, stage_interval: int = 8, interval_unit: str = "epochs",
                 t_start: float = 1.0, t_end: float = 2.0, kd_ratio_start: float = 0.7,
                 kd_ratio_end: float = 1.0, order: Any = None) -> None:
        self.n_stages = check_int("n_stages", n_stages, minimum=1)
        self.stage_interval = check_int("stage_interval", stage_interval, minimum=1)
        self.interval_unit = check_choice("interval_unit", interval_unit, ("epochs", "steps"))
        # validates the four schedule values once, with the argument names
        pocl_stage_values(1, self.n_stages, t_start, t_end, kd_ratio_start, kd_ratio_end)
        self.t_start, self.t_end = float(t_start), float(t_end)
        self.kd_ratio_start, self.kd_ratio_end = float(kd_ratio_start), float(kd_ratio_end)
        self._order: np.ndarray | None = None
        self._stage, self._units_done, self._global_step, self._epoch = 1, 0, 0, 0
        self._finished = False
        if order is not None:
            self.set_order(order)

    # -- difficulty order ------------------------------------------------------------
    def set_order(self, order: Any) -> None:
        """Set the easy → hard order (a permutation of 0..N-1, or DifficultyRanks).
        Only before training starts: changing it mid-job would change the subsets."""
        if self._global_step or self._epoch:
            raise RuntimeError("set_order() after training started would change the active "
                               "subsets mid-job; set it before the first step")
        self._order = _check_order(order)

    # -- schedule values ---------------------------------------------------------------
    @property
    def stage(self) -> int:
        """Current stage, 1-based."""
        return self._stage

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def total_units(self) -> int:
        """Length of the whole schedule in ``interval_unit`` (n_stages × stage_interval)."""
        return self.n_stages * self.stage_interval

    def _values(self) -> tuple[float, float, float]:
        return pocl_stage_values(self._stage, self.n_stages, self.t_start, self.t_end,
                                 self.kd_ratio_start, self.kd_ratio_end)

    @property
    def temperature(self) -> float:
        return self._values()[0]

    @property
    def kd_ratio(self) -> float:
        return self._values()[1]

    @property
    def data_fraction(self) -> float:
        return self._values()[2]

    def _require_order(self) -> np.ndarray:
        if self._order is None:
            raise RuntimeError("POCL has no difficulty order yet; measure difficulty and call "
                               "set_order(rrf_order(rouge, ce)) first")
        return self._order

    @property
    def n_active(self) -> int:
        return pocl_stage_size(self._stage, self.n_stages, self._require_order().size)

    def active_indices(self) -> np.ndarray:
        """(n_active,) int64 indices of the samples the current stage trains on, easy → hard
        (the trainer shuffles them as usual). A fresh copy."""
        return self._require_order()[: self.n_active].copy()

    # -- advancing -------------------------------------------------------------------
    def _advance_unit(self) -> bool:
        if self._finished:
            return False
        self._units_done += 1
        if self._units_done < self.stage_interval:
            return False
        if self._stage < self.n_stages:
            self._stage, self._units_done = self._stage + 1, 0
            return True
        self._finished = True
        return False

    def step(self) -> bool:
        """Record one optimizer step; True if the stage changed (``interval_unit="steps"``)."""
        self._require_order()
        self._global_step += 1
        return self._advance_unit() if self.interval_unit == "steps" else False

    def end_epoch(self) -> bool:
        """Record the end of one pass over the active samples; True if the stage changed
        (``interval_unit="epochs"``)."""
        self._require_order()
        self._epoch += 1
        return self._advance_unit() if self.interval_unit == "epochs" else False

    def metrics(self) -> dict[str, float]:
        temperature, kd_ratio, fraction = self._values()
        out = {"stage": float(self._stage), "temperature": temperature, "kd_ratio": kd_ratio,
               "data_fraction": fraction}
        if self._order is not None:
            out["n_active"] = float(self.n_active)
        return out

    # -- save / restore ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"n_stages": self.n_stages, "stage_interval": self.stage_interval,
                "interval_unit": self.interval_unit, "t_start": self.t_start, "t_end": self.t_end,
                "kd_ratio_start": self.kd_ratio_start, "kd_ratio_end": self.kd_ratio_end}

    def _state(self) -> dict[str, Any]:
        return {"order": None if self._order is None else self._order.tolist(),
                "stage": self._stage, "units_done": self._units_done,
                "global_step": self._global_step, "epoch": self._epoch, "finished": self._finished}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        order = None if state["order"] is None else _check_order(state["order"])
        stage = check_int("state['stage']", state["stage"], minimum=1, maximum=self.n_stages)
        units = check_int("state['units_done']", state["units_done"], minimum=0,
                          maximum=self.stage_interval)
        step = check_int("state['global_step']", state["global_step"], minimum=0)
        epoch = check_int("state['epoch']", state["epoch"], minimum=0)
        self._order, self._stage, self._units_done = order, stage, units
        self._global_step, self._epoch, self._finished = step, epoch, bool(state["finished"])
