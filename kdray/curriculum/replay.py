"""DistiLLM adaptive off-policy replay (Ko et al. 2024, arXiv:2402.03898).

Each training step draws r ~ U(0, 1) and, with threshold φ:

* ``"fresh"`` if r < φ·(1 − t/T), or r < φ while the buffer is not yet full: generate
  fresh student samples, :meth:`ReplayScheduler.push` them into the FIFO buffer and train
  on them;
* ``"replay"`` else if r < φ: train on :meth:`ReplayScheduler.sample` from the buffer;
* ``"fixed"`` otherwise: train on the fixed data set.

φ starts at ``init_threshold`` (0) and, at each validation, rises by ``threshold_step``
(0.1, capped at 1) when the validation loss has risen by at least ``loss_eps`` (0.1).

What the rise is measured against follows the released code (github.com/jongwooko/distillm,
finetune.py): an absolute difference, ``val_loss >= reference + loss_eps``, where the
reference is the validation loss at the last raise of φ, or the first validation (DistiLLM
evaluates once before training) if φ was never raised. ``reference="previous"`` instead
compares with the immediately preceding validation. Capacity 1000, loss_eps 0.1 and
init_threshold 0 are the values of DistiLLM's training scripts.
"""

from __future__ import annotations

import copy
import json
import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Curriculum, check_choice, check_float, check_int

FRESH, REPLAY, FIXED = "fresh", "replay", "fixed"
DECISIONS = (FRESH, REPLAY, FIXED)
REFERENCES = ("last_raise", "previous")


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def _set_rng_state(rng: random.Random, state: Sequence[Any]) -> None:
    version, internal, gauss_next = state
    rng.setstate((version, tuple(internal), gauss_next))


def _canonical(sample: Any, where: str) -> dict[str, Any]:
    """A JSON round-trip copy: checks the sample can be saved, and makes a restored buffer
    equal the live one (tuples become lists either way)."""
    if not isinstance(sample, Mapping):
        raise ValueError(f"{where} must be a dict (a JSON-serialisable sample); got "
                         f"{type(sample).__name__}")
    try:
        return json.loads(json.dumps(sample, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} is not JSON-serialisable ({exc}); store token ids as lists "
                         "of ints, not tensors") from exc


class ReplayScheduler(Curriculum):
    """Seeded state machine for DistiLLM's adaptive replay; the trainer acts on its answers.

    Per optimizer step: ``d = decide(step, total_steps)``; on ``"fresh"`` generate, then
    ``push(samples)`` and train on them; on ``"replay"`` train on ``sample(batch_size)``;
    on ``"fixed"`` train on the data set. Call :meth:`on_validation` with each validation
    loss, including one before training (it sets the reference and never raises φ).

    Args:
        capacity: buffer size in samples (DistiLLM: 1000); the oldest are dropped first.
        init_threshold: φ at the start (DistiLLM: 0.0; 0 ≤ φ ≤ 1).
        threshold_step: the rise of φ per triggering validation (DistiLLM: 0.1).
        loss_eps: the absolute validation-loss rise that triggers it (DistiLLM: 0.1).
        reference: ``"last_raise"`` (DistiLLM's code) or ``"previous"``; see module docstring.
        seed: seeds the decision RNG (``random.Random(seed)``) and, separately, the replay
            sampling RNG, so decisions do not depend on how often the buffer is sampled.

    State: ``{"decide_rng": [version, [625 ints], gauss_next], "sample_rng": (same),
    "raises": int, "reference": float | None, "buffer": [sample dicts, oldest first],
    "counts": {"fresh": int, "replay": int, "fixed": int}, "last_decision": str | None,
    "validations": int}``.
    """

    kind = "replay"

    def __init__(self, *, capacity: int = 1000, init_threshold: float = 0.0,
                 threshold_step: float = 0.1, loss_eps: float = 0.1,
                 reference: str = "last_raise", seed: int = 0) -> None:
        self.capacity = check_int("capacity", capacity, minimum=1)
        self.init_threshold = check_float("init_threshold", init_threshold, low=0.0, high=1.0)
        self.threshold_step = check_float("threshold_step", threshold_step, low=0.0, high=1.0)
        self.loss_eps = check_float("loss_eps", loss_eps, low=0.0)
        self.reference = check_choice("reference", reference, REFERENCES)
        self.seed = check_int("seed", seed)
        self._decide_rng = random.Random(self.seed)
        self._sample_rng = random.Random(f"kdray-replay-sample-{self.seed}")
        self._raises = 0
        self._reference_loss: float | None = None
        self._buffer: deque[dict[str, Any]] = deque(maxlen=self.capacity)
        self._counts = {d: 0 for d in DECISIONS}
        self._last_decision: str | None = None
        self._validations = 0

    # -- threshold ---------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """φ = min(1, init_threshold + raises·threshold_step), recomputed from the count so
        it does not accumulate float error."""
        return min(1.0, self.init_threshold + self._raises * self.threshold_step)

    @property
    def reference_loss(self) -> float | None:
        return self._reference_loss

    def on_validation(self, val_loss: float) -> bool:
        """Record a validation loss; return True if φ was raised by it."""
        val_loss = check_float("val_loss", val_loss)
        self._validations += 1
        if self._reference_loss is None:
            self._reference_loss = val_loss
            return False
        risen = val_loss >= self._reference_loss + self.loss_eps
        raised = risen and self.threshold < 1.0
        if raised:
            self._raises += 1
        if risen or self.reference == "previous":
            self._reference_loss = val_loss
        return raised

    # -- per-step decision -------------------------------------------------------------
    def decide(self, step: int, total_steps: int) -> str:
        """``"fresh"``, ``"replay"`` or ``"fixed"`` for optimizer step t = ``step`` of T =
        ``total_steps`` (0 <= t <= T). One draw from the decision RNG per call, whatever φ."""
        total_steps = check_int("total_steps", total_steps, minimum=1)
        step = check_int("step", step, minimum=0, maximum=total_steps)
        r = self._decide_rng.random()
        phi = self.threshold
        if r < phi * (1.0 - step / total_steps) or (r < phi and len(self._buffer) < self.capacity):
            decision = FRESH
        elif r < phi:
            decision = REPLAY
        else:
            decision = FIXED
        self._counts[decision] += 1
        self._last_decision = decision
        return decision

    # -- buffer ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._buffer)

    @property
    def is_full(self) -> bool:
        return len(self._buffer) >= self.capacity

    def push(self, samples: Sequence[Mapping[str, Any]]) -> None:
        """Append samples (JSON-serialisable dicts, e.g. token-id lists) to the buffer;
        beyond ``capacity`` the oldest are dropped (FIFO). Stores copies."""
        if isinstance(samples, Mapping) or not isinstance(samples, Sequence):
            raise ValueError("samples must be a list of sample dicts; wrap a single sample "
                             "in a list")
        copies = [_canonical(s, f"samples[{i}]") for i, s in enumerate(samples)]
        self._buffer.extend(copies)

    def sample(self, batch_size: int) -> list[dict[str, Any]]:
        """``batch_size`` distinct buffer entries drawn uniformly without replacement (as
        DistiLLM's ``random.sample``) by the seeded sampling RNG; deep copies."""
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if batch_size > len(self._buffer):
            raise ValueError(f"batch_size {batch_size} exceeds the {len(self._buffer)} samples in "
                             "the replay buffer; use capacity >= batch_size")
        picks = self._sample_rng.sample(range(len(self._buffer)), batch_size)
        return [copy.deepcopy(self._buffer[i]) for i in picks]

    def metrics(self) -> dict[str, float]:
        return {"replay_threshold": self.threshold, "replay_buffer_size": float(len(self._buffer)),
                **{f"replay_{d}_steps": float(n) for d, n in self._counts.items()}}

    # -- save / restore ----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "init_threshold": self.init_threshold,
                "threshold_step": self.threshold_step, "loss_eps": self.loss_eps,
                "reference": self.reference, "seed": self.seed}

    def _state(self) -> dict[str, Any]:
        return {"decide_rng": _rng_state(self._decide_rng),
                "sample_rng": _rng_state(self._sample_rng),
                "raises": self._raises, "reference": self._reference_loss,
                "buffer": copy.deepcopy(list(self._buffer)), "counts": dict(self._counts),
                "last_decision": self._last_decision, "validations": self._validations}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        decide_rng, sample_rng = random.Random(), random.Random()
        _set_rng_state(decide_rng, state["decide_rng"])
        _set_rng_state(sample_rng, state["sample_rng"])
        buffer = state["buffer"]
        if len(buffer) > self.capacity:
            raise ValueError(f"saved buffer holds {len(buffer)} samples, more than capacity "
                             f"{self.capacity}; the state does not belong to this config")
        samples = [_canonical(s, f"state['buffer'][{i}]") for i, s in enumerate(buffer)]
        reference = state["reference"]
        if reference is not None:
            reference = check_float("state['reference']", reference)
        last = state["last_decision"]
        if last is not None:
            check_choice("state['last_decision']", last, DECISIONS)
        raises = check_int("state['raises']", state["raises"], minimum=0)
        counts = {d: check_int(f"state['counts'][{d!r}]", state["counts"][d], minimum=0)
                  for d in DECISIONS}
        validations = check_int("state['validations']", state["validations"], minimum=0)
        self._decide_rng, self._sample_rng = decide_rng, sample_rng
        self._raises, self._reference_loss = raises, reference
        self._buffer = deque(samples, maxlen=self.capacity)
        self._counts, self._last_decision, self._validations = counts, last, validations
