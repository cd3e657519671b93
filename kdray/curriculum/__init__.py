"""Curricula and training schedules: POCL, DistiLLM-2's adaptive α and rising β, and
DistiLLM's adaptive replay.

Pure and deterministic (torch, numpy and the standard library only): the driver and the
trainer own models, data and processes and ask these objects what to do. Every curriculum
follows :class:`Curriculum` and saves its whole state as one JSON-serialisable dict;
:func:`curriculum_from_state_dict` rebuilds any of them.

Modules: :mod:`.pocl` (difficulty fusion, baby-step stages), :mod:`.distillm2` (β, α,
rounds), :mod:`.replay` (adaptive off-policy replay), :mod:`.base` (the protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import STATE_VERSION, Curriculum
from .distillm2 import DistiLLM2Schedule, distillm2_alpha, distillm2_beta, distillm2_delta
from .pocl import (RRF_K, DifficultyRanks, POCLScheduler, difficulty_ranks, pocl_stage_size,
                   pocl_stage_values, rrf_order)
from .replay import DECISIONS, FIXED, FRESH, REPLAY, ReplayScheduler

CURRICULA: dict[str, type[Curriculum]] = {
    cls.kind: cls for cls in (POCLScheduler, DistiLLM2Schedule, ReplayScheduler)
}


def curriculum_from_state_dict(state_dict: Mapping[str, Any]) -> Curriculum:
    """Rebuild whichever curriculum wrote ``state_dict`` (dispatch on its ``"kind"``)."""
    kind = state_dict.get("kind") if isinstance(state_dict, Mapping) else None
    if kind not in CURRICULA:
        raise ValueError(f"state_dict kind {kind!r} is not a known curriculum; expected one of "
                         f"{sorted(CURRICULA)}")
    return CURRICULA[kind].from_state_dict(state_dict)


__all__ = [
    "CURRICULA", "Curriculum", "DECISIONS", "DifficultyRanks", "DistiLLM2Schedule", "FIXED",
    "FRESH", "POCLScheduler", "REPLAY", "RRF_K", "ReplayScheduler", "STATE_VERSION",
    "curriculum_from_state_dict", "difficulty_ranks", "distillm2_alpha", "distillm2_beta",
    "distillm2_delta", "pocl_stage_size", "pocl_stage_values", "rrf_order",
]
