"""The base of every JobSpec section: unknown keys are errors, defaults are validated, and a
validated spec is immutable (frozen), so nothing downstream rewrites a user's value."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)
