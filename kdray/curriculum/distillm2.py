"""DistiLLM-2 schedules (Ko et al. 2025, arXiv:2503.07067): rising β, adaptive α, rounds.

* β_t = 1 + 0.5·min(1, 2t/T) over the optimizer steps: the weight of the student-response
  term grows during the first half of training and then stays at 1.5.
* Per-sample α (the skew/mixing coefficient of the skewed KL terms):
  α_i = clip(1 − (1−α₀)·Δ̄ / (Δ_i + 1e-5), 0.01, α₀), α₀ = 0.1, with
  Δ_i = exp(mean token log p(y_i)) − exp(mean token log q(y_i)) for teacher responses and
  the sign flipped for student responses (p: teacher, q: student); Δ̄ is a running mean.
* Batched on-policy rounds: the job runs R rounds; before each, responses are regenerated
  with the current student, then the round trains (``training.epochs`` epochs).

Two modes, so they can be compared:

* ``"paper"``: the schedules above.
* ``"released_code"``: α fixed at α₀ and β = 1. This is what the authors' released trainer
  runs: its ``update_alpha`` and ``gradual_beta`` flags are hard-coded to False in the
  trainer's constructor (distillm_trainer.py, github.com/jongwooko/distillm-2).

Where the paper leaves details open, the choices below follow the released trainer's
(disabled) code path: one running mean per response kind (teacher responses anchor α for
the teacher-response term, student responses for the student-response term), the
anchor comes from *earlier* batches only, and α₀ is used until an anchor exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Union

import torch

from .base import Curriculum, check_choice, check_float, check_int

BoolLike = Union[bool, torch.Tensor]

MODES = ("paper", "released_code")
RUNNING_MEANS = ("cumulative", "ema")
BETA_SCOPES = ("job", "round")
_KINDS = ("teacher", "student")


def distillm2_beta(step: int, total_steps: int) -> float:
    """β_t = 1 + 0.5·min(1, 2t/T): 1 at t=0, 1.5 from t=T/2 on (also past T).

    ``step`` is t, the number of optimizer steps done (0-based); ``total_steps`` is T >= 1.
    """
    step = check_int("step", step, minimum=0)
    total_steps = check_int("total_steps", total_steps, minimum=1)
    return 1.0 + 0.5 * min(1.0, 2.0 * step / total_steps)


def distillm2_alpha(delta: torch.Tensor, delta_mean: float | torch.Tensor, alpha0: float = 0.1,
                    *, alpha_min: float = 0.01, eps: float = 1e-5) -> torch.Tensor:
    """α_i = clip(1 − (1−α₀)·Δ̄ / (Δ_i + eps), alpha_min, α₀), elementwise.

    Args:
        delta: Δ_i, any shape (typically (B,)); see :func:`distillm2_delta`.
        delta_mean: Δ̄, a float or a tensor broadcastable to ``delta``.
        alpha0: α₀, the upper clip and the value where Δ_i = Δ̄ > 0 (0 < α₀ < 1).
        alpha_min: the lower clip (0 < alpha_min <= α₀).
        eps: added to Δ_i as in the paper.

    Returns a detached tensor shaped like ``delta`` (floating dtype; float32 for integer
    input): α is a schedule coefficient, not a path for gradients. A zero denominator
    (Δ_i = −eps) reads as an infinite ratio with Δ̄'s sign (α → alpha_min for Δ̄ > 0,
    α₀ for Δ̄ <= 0) instead of producing NaN. NaN in ``delta`` stays NaN.
    """
    alpha0 = check_float("alpha0", alpha0, low=0.0, high=1.0, low_open=True, high_open=True)
    alpha_min = check_float("alpha_min", alpha_min, low=0.0, high=alpha0, low_open=True)
    eps = check_float("eps", eps, low=0.0)
    d = torch.as_tensor(delta).detach()
    if not torch.is_floating_point(d):
        d = d.to(torch.float32)
    mean = torch.as_tensor(delta_mean, dtype=d.dtype, device=d.device).detach()
    denom = d + eps
    inf = torch.full_like(denom, math.inf)
    at_zero = torch.where(mean == 0, torch.zeros_like(denom), torch.sign(mean) * inf)
    ratio = torch.where(denom == 0, at_zero, mean / denom)
    return (1.0 - (1.0 - alpha0) * ratio).clamp(min=alpha_min, max=alpha0)


def _student_mask(is_student_response: BoolLike, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(is_student_response, torch.Tensor):
        flags = is_student_response.detach().to(device=device)
        if flags.dtype != torch.bool:
            if torch.is_floating_point(flags) or not bool(((flags == 0) | (flags == 1)).all()):
                raise ValueError("is_student_response must be bool (or 0/1 integers), one per sample")
            flags = flags.bool()
        if flags.shape != (batch,):
            raise ValueError(f"is_student_response must have shape ({batch},) (one flag per "
                             f"sample); got {tuple(flags.shape)}")
        return flags
    if isinstance(is_student_response, bool):
        return torch.full((batch,), is_student_response, dtype=torch.bool, device=device)
    raise ValueError(f"is_student_response must be a bool or a (B,) bool tensor; got "
                     f"{type(is_student_response).__name__}")


def distillm2_delta(teacher_logps: torch.Tensor, student_logps: torch.Tensor, mask: torch.Tensor,
                    is_student_response: BoolLike) -> torch.Tensor:
    """Δ_i per sequence, shape (B,), detached, float32 or wider.

    Args:
        teacher_logps: (B, L) log p of each response token under the teacher.
        student_logps: (B, L) log q of each response token under the student.
        mask: (B, L) bool or 0/1; True on response tokens (prompt and padding False).
            Values at masked-out positions are ignored (may be -inf or NaN).
        is_student_response: bool for the whole batch, or (B,) bool: True where the
            response was generated by the student (Δ's sign is flipped there).

    Δ_i = exp(mean log p) − exp(mean log q) (teacher responses), the negation for student
    responses: positive when the response's own author is more likely than the other
    model, i.e. large Δ marks a wide teacher–student gap on that sample.
    """
    if teacher_logps.shape != student_logps.shape or teacher_logps.shape != mask.shape:
        raise ValueError(f"teacher_logps, student_logps and mask must share one (B, L) shape; got "
                         f"{tuple(teacher_logps.shape)}, {tuple(student_logps.shape)}, "
                         f"{tuple(mask.shape)}")
    if teacher_logps.dim() != 2:
        raise ValueError(f"teacher_logps must be (B, L); got {teacher_logps.dim()} dimensions")
    m = mask.detach().bool()
    count = m.sum(-1)
    if bool((count == 0).any()):
        rows = torch.nonzero(count == 0).flatten()[:5].tolist()
        raise ValueError(f"rows {rows} have no response tokens in mask; drop empty responses "
                         "(keep at least the EOS token) before computing Δ")
    dtype = torch.promote_types(teacher_logps.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=teacher_logps.device)
    mean_p = torch.where(m, teacher_logps.detach().to(dtype), zero).sum(-1) / count
    mean_q = torch.where(m, student_logps.detach().to(dtype), zero).sum(-1) / count
    delta = mean_p.exp() - mean_q.exp()
    flip = _student_mask(is_student_response, delta.shape[0], delta.device)
    return torch.where(flip, -delta, delta)


class DistiLLM2Schedule(Curriculum):
    """β, per-sample α and the round counter of a DistiLLM-2 job.

    Per training micro-batch the trainer calls ``a = alpha(delta, is_student)`` (reads
    only), builds the loss, then ``observe(delta, is_student)`` (updates the running means,
    so a batch never anchors its own α); after each optimizer step :meth:`step`. The driver
    calls :meth:`end_round` after each round's epoch; every round needs fresh student
    responses (the plan's segments say so: ``regenerate_student``).

    Args:
        num_rounds: R, the number of generate-then-train rounds (>= 1).
        total_steps: T of the β ramp, in optimizer steps: of the whole job when
            ``beta_scope="job"``, of one round when ``"round"``.
        mode: ``"paper"`` or ``"released_code"`` (module docstring).
        alpha0, alpha_min, eps: see :func:`distillm2_alpha` (paper: 0.1, 0.01, 1e-5).
        running_mean: how Δ̄ is kept per response kind. ``"cumulative"`` (default): the
            mean of every Δ_i observed so far; it has no extra hyperparameter and does not
            depend on batch size. ``"ema"``: Δ̄ ← d·Δ̄ + (1−d)·mean(batch Δ), which follows
            the student as it improves. The paper says only "running mean"; the released
            trainer would take one logging window's mean and freeze it (with the feature
            switched off), so neither choice is more authoritative.
        ema_decay: d for ``"ema"`` (0 <= d < 1); ignored for ``"cumulative"``.
        beta_scope: ``"job"`` (default): t counts optimizer steps across all rounds, one
            ramp per job. ``"round"``: t restarts each round, as it would in the released
            code, where each round is a separate trainer run with its own step count.

    State: ``{"round": int, "step_in_round": int, "global_step": int,
    "means": {"teacher": {"value": float | None, "count": int}, "student": {...}},
    "last_alpha": {"mean", "min", "max"} | None}`` (count: samples observed).
    """

    kind = "distillm2"

    def __init__(self, *, num_rounds: int, total_steps: int, mode: str = "paper",
                 alpha0: float = 0.1, alpha_min: float = 0.01, eps: float = 1e-5,
                 running_mean: str = "cumulative", ema_decay: float = 0.99,
                 beta_scope: str = "job") -> None:
        self._num_rounds = check_int("num_rounds", num_rounds, minimum=1)
        self.total_steps = check_int("total_steps", total_steps, minimum=1)
        self.mode = check_choice("mode", mode, MODES)
        self.alpha0 = check_float("alpha0", alpha0, low=0.0, high=1.0, low_open=True, high_open=True)
        self.alpha_min = check_float("alpha_min", alpha_min, low=0.0, high=self.alpha0, low_open=True)
        self.eps = check_float("eps", eps, low=0.0)
        self.running_mean = check_choice("running_mean", running_mean, RUNNING_MEANS)
        self.ema_decay = check_float("ema_decay", ema_decay, low=0.0, high=1.0, high_open=True)
        self.beta_scope = check_choice("beta_scope", beta_scope, BETA_SCOPES)
        self._round = self._step_in_round = self._global_step = 0
        self._means: dict[str, dict[str, Any]] = {k: {"value": None, "count": 0} for k in _KINDS}
        self._last_alpha: dict[str, float] | None = None  # the last finished step's α statistics
        self._step_alpha: list[float] = []  # this step's: [sum, count, min, max] (empty: none yet)

    # -- rounds ------------------------------------------------------------------------
    @property
    def num_rounds(self) -> int:
        return self._num_rounds

    @property
    def round(self) -> int:
        """The current round, 0-based; equals ``num_rounds`` once all rounds ended."""
        return self._round

    @property
    def finished(self) -> bool:
        return self._round >= self._num_rounds

    def end_round(self) -> None:
        if self.finished:
            raise RuntimeError(f"all {self._num_rounds} rounds already ended")
        self._round += 1
        self._step_in_round = 0

    def step(self) -> None:
        """Record one optimizer step (its α statistics become the last step's)."""
        if self.finished:
            raise RuntimeError("step() after the last round ended")
        if self._step_alpha:
            self._last_alpha = self._alpha_stats()
            self._step_alpha = []
        self._global_step += 1
        self._step_in_round += 1

    # -- schedule values ---------------------------------------------------------------
    @property
    def beta(self) -> float:
        if self.mode == "released_code":
            return 1.0
        t = self._global_step if self.beta_scope == "job" else self._step_in_round
        return distillm2_beta(t, self.total_steps)

    def delta_mean(self, is_student_response: bool) -> float | None:
        """Δ̄ for one response kind, or None before any sample of that kind was observed."""
        return self._means["student" if is_student_response else "teacher"]["value"]

    def alpha(self, delta: torch.Tensor, is_student_response: BoolLike, *, record: bool = True) -> torch.Tensor:
        """Per-sample α for a batch, shape (B,), detached; does not change the running means.

        ``delta`` is (B,) from :func:`distillm2_delta`; ``is_student_response`` a bool or
        (B,) bool tensor. A kind with no running mean yet gets α₀ (as the released code's
        fallback). ``"released_code"`` mode: α₀ everywhere. ``record``: count them in this
        step's α statistics (:meth:`record_alpha`; a data-parallel caller records every rank's).
        """
        d = torch.as_tensor(delta).detach()
        if d.dim() != 1:
            raise ValueError(f"delta must be (B,), one value per sample; got shape {tuple(d.shape)}")
        if not torch.is_floating_point(d):
            d = d.to(torch.float32)
        flags = _student_mask(is_student_response, d.shape[0], d.device)
        out = torch.full_like(d, self.alpha0)
        if self.mode == "paper":
            for kind, sel in (("teacher", ~flags), ("student", flags)):
                mean = self._means[kind]["value"]
                if mean is not None:
                    a = distillm2_alpha(d, mean, self.alpha0, alpha_min=self.alpha_min, eps=self.eps)
                    out = torch.where(sel, a, out)
        if record:
            self.record_alpha(out)
        return out

    def record_alpha(self, alpha: torch.Tensor) -> None:
        """Count per-sample α values in this optimizer step's statistics (``alpha_mean/min/max``
        of :meth:`metrics`): every micro-batch's, so they describe the step however it is split."""
        a = torch.as_tensor(alpha).detach().to(dtype=torch.float64)
        if not a.numel():
            return
        batch = [float(a.sum()), float(a.numel()), float(a.min()), float(a.max())]
        acc = self._step_alpha
        self._step_alpha = batch if not acc else [acc[0] + batch[0], acc[1] + batch[1], min(acc[2], batch[2]),
                                                  max(acc[3], batch[3])]

    def _alpha_stats(self) -> dict[str, float]:
        total, n, low, high = self._step_alpha
        return {"mean": total / n, "min": low, "max": high}

    def observe(self, delta: torch.Tensor, is_student_response: BoolLike) -> None:
        """Fold a batch's Δ into the running mean of each response kind present.

        Kept in both modes, so ``released_code`` runs report the same Δ̄ statistics. In
        data-parallel training pass the all-gathered Δ so every rank keeps the same means.
        """
        d = torch.as_tensor(delta).detach()
        if d.dim() != 1:
            raise ValueError(f"delta must be (B,), one value per sample; got shape {tuple(d.shape)}")
        flags = _student_mask(is_student_response, d.shape[0], d.device)
        d = d.to(device="cpu", dtype=torch.float64)
        flags = flags.cpu()
        for kind, sel in (("teacher", ~flags), ("student", flags)):
            vals = d[sel]
            n = int(vals.numel())
            if n == 0:
                continue
            if not bool(torch.isfinite(vals).all()):
                raise ValueError(f"delta has non-finite values for {kind} responses; check the "
                                 "log-probs and mask passed to distillm2_delta")
            slot = self._means[kind]
            batch_mean = float(vals.mean())
            if slot["value"] is None:
                slot["value"] = batch_mean
            elif self.running_mean == "cumulative":
                total = slot["count"] + n
                slot["value"] = slot["value"] + (float(vals.sum()) - n * slot["value"]) / total
            else:
                slot["value"] = self.ema_decay * slot["value"] + (1.0 - self.ema_decay) * batch_mean
            slot["count"] += n

    def metrics(self) -> dict[str, float]:
        out = {"round": float(self._round), "beta": self.beta}
        stats = self._alpha_stats() if self._step_alpha else self._last_alpha  # this step's, or the last one's
        if stats is not None:
            out.update({f"alpha_{k}": v for k, v in stats.items()})
        for kind in _KINDS:
            if self._means[kind]["value"] is not None:
                out[f"delta_mean_{kind}"] = self._means[kind]["value"]
        return out

    # -- save / restore ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"num_rounds": self._num_rounds, "total_steps": self.total_steps, "mode": self.mode,
                "alpha0": self.alpha0, "alpha_min": self.alpha_min, "eps": self.eps,
                "running_mean": self.running_mean, "ema_decay": self.ema_decay,
                "beta_scope": self.beta_scope}

    def _state(self) -> dict[str, Any]:
        return {"round": self._round, "step_in_round": self._step_in_round,
                "global_step": self._global_step,
                "means": {k: dict(v) for k, v in self._means.items()},
                "last_alpha": None if self._last_alpha is None else dict(self._last_alpha)}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        rnd = check_int("state['round']", state["round"], minimum=0, maximum=self._num_rounds)
        sir = check_int("state['step_in_round']", state["step_in_round"], minimum=0)
        gs = check_int("state['global_step']", state["global_step"], minimum=sir)
        means = {}
        for kind in _KINDS:
            slot = state["means"][kind]
            value = slot["value"]
            if value is not None:
                value = check_float(f"state['means'][{kind!r}]['value']", value)
            means[kind] = {"value": value,
                           "count": check_int(f"state['means'][{kind!r}]['count']", slot["count"],
                                              minimum=0)}
        last = state["last_alpha"]
        self._round, self._step_in_round, self._global_step = rnd, sir, gs
        self._means = means
        self._last_alpha = None if last is None else {k: float(last[k]) for k in ("mean", "min", "max")}
