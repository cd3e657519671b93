"""The base of every JobSpec section: unknown keys are errors, defaults are validated, and a
validated spec is immutable (frozen), so nothing downstream rewrites a user's value."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


def _yaml(v: Any) -> str:
    """A value as the spec's YAML or JSON writes it (``true``, not ``True``)."""
    return str(v).lower() if isinstance(v, bool) else repr(v)


def _restart_count(v: Any) -> Any:
    if isinstance(v, bool) or (isinstance(v, int) and v < -1):
        raise ValueError(f"{_yaml(v)} is not a number of restarts: give 0 or more (0: fail at the first "
                         "failure), or -1 to retry forever")
    return v


def model_shorthand(v: Any) -> Any:
    """A model field given as its reference alone (``teacher: toy:teacher``) is ``{model: REF}``."""
    return {"model": v} if isinstance(v, str) else v


#: The type of a field counting restarts (``training.max_failures``,
#: ``generation.max_replica_restarts``): 0 or more, or -1 for no limit. A value below -1 gets a
#: message saying what to give, and YAML's true and false are refused (pydantic would take them
#: for 1 and 0).
RestartCount = Annotated[int, BeforeValidator(_restart_count)]
