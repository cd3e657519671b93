"""The base every curriculum follows (state, resume, metrics), and the argument checks they share.

A curriculum is a small, deterministic state machine that sits beside the loss: it
says which samples are active, which schedule values (temperature, ``kd_ratio``,
β, α, replay threshold) the trainer uses now, and what the driver must prepare before
each round (difficulty ranks, fresh student responses). It owns no model, no data and
no process: the driver and the trainer call it and act on its answers. That keeps it
testable alone and lets a resumed job continue exactly where it stopped, because the
whole state is one JSON-serialisable dict.

State format (every curriculum)::

    {"kind": str,       # "pocl" | "distillm2" | "replay"
     "version": int,    # STATE_VERSION; bumped when the layout changes
     "config": dict,    # the constructor's keyword arguments
     "state": dict}     # the mutable part; layout documented by each class
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

STATE_VERSION = 1

_C = TypeVar("_C", bound="Curriculum")


def check_int(name: str, value: Any, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """Return ``value`` as an int, or raise ValueError naming ``name`` and the fix.

    bool is refused although it is an int subclass: ``True`` as a step count is a bug.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}; got {value}")
    return value


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """Return ``value`` as a finite float within the given bounds, or raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}; got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}; got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, or raise ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


class Curriculum(abc.ABC):
    """What the trainer may ask any curriculum.

    * :attr:`num_rounds` — how many rounds the job runs (1 unless the method has rounds).
    * :meth:`metrics` — the schedule values to report with each training step.
    * :meth:`state_dict` / :meth:`load_state_dict` / :meth:`from_state_dict` — resume.

    Which stages a job runs for its curricula (difficulty, on-policy rounds) is decided once,
    from the spec, by :func:`kdray.curriculum.plan.plan_segments`.
    """

    kind: ClassVar[str]

    @property
    def num_rounds(self) -> int:
        return 1

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The constructor keyword arguments, JSON types only (``cls(**config())`` rebuilds it)."""

    @abc.abstractmethod
    def metrics(self) -> dict[str, float]:
        """Schedule values for the per-step metrics; keys whose value is undefined are left out."""

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]:
        """The mutable state, JSON types only, freshly built (callers may mutate it)."""

    @abc.abstractmethod
    def _load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the mutable state with ``state`` (already checked for kind/version/config)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically: see the module docstring for the layout."""
        return {"kind": self.kind, "version": STATE_VERSION, "config": self.config(),
                "state": self._state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`'s output.

        The saved config must equal this object's config: resuming with other settings
        would silently change the schedule mid-job, so it is refused with the differing
        fields named.
        """
        _check_header(state_dict, self.kind)
        saved = state_dict["config"]
        mine = self.config()
        differing = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if differing:
            details = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {mine.get(k)!r}"
                                for k in differing)
            raise ValueError(
                f"state_dict config differs from this {self.kind} curriculum ({details}); "
                "resume with the same curriculum settings, or build it with "
                f"{type(self).__name__}.from_state_dict(...)")
        try:
            self._load_state(state_dict["state"])
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"state_dict['state'] is malformed for {self.kind}: {exc!r}; "
                             "pass the unmodified output of state_dict()") from exc

    @classmethod
    def from_state_dict(cls: type[_C], state_dict: Mapping[str, Any]) -> _C:
        """Build a curriculum from its saved config and load its saved state."""
        _check_header(state_dict, cls.kind)
        obj = cls(**state_dict["config"])
        obj.load_state_dict(state_dict)
        return obj


def _check_header(state_dict: Any, kind: str) -> None:
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a dict; got {type(state_dict).__name__}")
    missing = [k for k in ("kind", "version", "config", "state") if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks {missing}; pass the output of state_dict()")
    if state_dict["kind"] != kind:
        raise ValueError(f"state_dict is for curriculum kind {state_dict['kind']!r}, "
                         f"not {kind!r}; load it into the matching class")
    if state_dict["version"] != STATE_VERSION:
        raise ValueError(f"state_dict version {state_dict['version']!r} is not supported "
                         f"(this kdray writes version {STATE_VERSION})")
