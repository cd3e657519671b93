"""Loading job specs and reporting their errors.

Turns pydantic's errors into ``(field path, message that says the fix)`` pairs: union tags are
dropped from paths (``objective.alpha``, not ``objective.skew_forward_kl.alpha``), an unknown
key lists the valid keys at its level, and every error is reported at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from kdray.errors import SpecError
from kdray.spec.job import JobSpec

def _loc_to_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(spec)"


def _union_member(annotation: Any, tag: Any) -> Any:
    """The member of a tagged union (``kind`` discriminator) whose tag is ``tag``."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    for member in get_args(annotation):
        kind = getattr(member, "model_fields", {}).get("kind")
        if kind is not None and tag in get_args(kind.annotation):
            return member
    return None


def _walk(loc: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
    """Follow ``loc`` from JobSpec: the model reached and the loc without union tags."""
    model: Any = JobSpec
    path: list[Any] = []
    for item in loc:
        if isinstance(item, int) and get_origin(model) is list:  # an item of a list field
            model = get_args(model)[0]
            path.append(item)
            continue
        member = _union_member(model, item)
        if member is not None:
            model = member
            continue
        field = getattr(model, "model_fields", {}).get(item)
        path.append(item)
        model = field.annotation if field is not None else None
    return model, tuple(path)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model, _ = _walk(loc)
    member = _union_member(model, None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else member


def _field_at(loc: tuple[Any, ...]) -> Any:
    parent = _model_at(loc[:-1])
    return parent.model_fields.get(loc[-1]) if parent and loc else None


def _friendly(err: dict[str, Any]) -> tuple[str, str]:
    loc = tuple(err["loc"])
    path = _loc_to_path(_walk(loc)[1])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = ", ".join(parent.model_fields) if parent else ""
        return path, f"unknown key; valid keys here are: {known}"
    if kind == "missing":
        return path, "required field is missing"
    if kind == "union_tag_not_found":
        tags = err.get("ctx", {}).get("discriminator", "'kind'")
        model, _ = _walk(loc)
        while get_origin(model) is Annotated:
            model = get_args(model)[0]
        choices = ", ".join(get_args(m.model_fields["kind"].annotation)[0] for m in get_args(model))
        return path, f"field {tags} is missing; choose one of: {choices}"
    msg = err["msg"]
    if kind == "string_pattern_mismatch":
        field = _field_at(loc)
        if field is not None and field.description:
            msg = f"{msg}: {field.description}"
    if kind in ("value_error", "assertion_error"):
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return path, msg


def spec_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Every problem in ``exc`` as (dotted field path, message that says the fix)."""
    return [_friendly(e) for e in exc.errors()]


def parse_spec(data: Any, source: str | None = None) -> JobSpec:
    """Validate a decoded spec (dict) and return a JobSpec, or raise SpecError with all errors."""
    if not isinstance(data, dict):
        raise SpecError([("(spec)", f"expected a mapping of fields, got {type(data).__name__}")], source)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(spec_errors(exc), source) from None


def parse_spec_text(text: str, source: str | None = None) -> JobSpec:
    """Parse YAML (JSON is YAML) text into a JobSpec."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(spec)"
        raise SpecError([(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")], source) from None
    return parse_spec(data, source)


def load_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([("(file)", f"{p} does not exist")], str(p)) from None
    except OSError as exc:
        raise SpecError([("(file)", f"cannot read {p}: {exc.strerror}")], str(p)) from None
    return parse_spec_text(text, str(p))


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec, every default filled in, as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
