"""Spec helpers shared by test modules: a minimal valid job spec, and the field errors of one."""

from __future__ import annotations

import pytest

from kdray.errors import SpecError
from kdray.spec import parse_spec


def minimal(**overrides):
    """The smallest valid job spec (toy models and data), with ``overrides`` at the top level."""
    spec = {
        "name": "t",
        "output_dir": "runs/t",
        "teacher": {"model": "toy:teacher"},
        "student": {"model": "toy:student"},
        "data": {"train": "toy:train", "heldout": "toy:heldout"},
    }
    spec.update(overrides)
    return spec


def errors_of(data) -> dict[str, str]:
    """``{field path: message}`` of the SpecError that parsing ``data`` must raise."""
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return dict(info.value.errors)
