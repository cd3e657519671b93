"""Loading job specs and reporting their errors.

Turns pydantic's errors into ``(field path, message that says the fix)`` pairs: union tags are
dropped from paths (``objective.alpha``, not ``objective.skew_forward_kl.alpha``), an unknown
key lists the valid keys at its level, and every error is reported at once.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from kdray.errors import SpecError, bad_char, utf8_fault
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


#: Names users bring from Hugging Face ``TrainingArguments`` and TRL's trainers, with kdray's
#: for the same setting (the one among a key's siblings is suggested: ``temperature`` is
#: ``objective.kd_temperature`` or ``generation.sampling_temperature``).
OTHER_NAMES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr",), "num_train_epochs": ("epochs",), "max_grad_norm": ("gradient_clipping",),
    "per_device_train_batch_size": ("micro_batch_size_per_worker",), "max_length": ("max_seq_len", "max_model_len"),
    "model_name_or_path": ("model",), "temperature": ("kd_temperature", "sampling_temperature"),
    "warmup": ("warmup_steps",), "batch_size": ("global_batch_size",), "num_epochs": ("epochs",),
}


def _did_you_mean(given: Any, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``given``, else ``""``: difflib's
    ratio of at least 0.75 (a typo, a ``-`` for ``_``, a letter dropped), another tool's name
    for it (:data:`OTHER_NAMES`), or a choice that is ``given``'s first word (``lr_rate``)."""
    given = str(given)
    close = difflib.get_close_matches(given, choices, n=1, cutoff=0.75)
    close += [name for name in OTHER_NAMES.get(given, ()) if name in choices]
    close += [name for name in choices if given.startswith(name + "_")]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _friendly(err: dict[str, Any]) -> tuple[str, str]:
    loc = tuple(err["loc"])
    path = _loc_to_path(_walk(loc)[1])
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = list(parent.model_fields) if parent else []
        return path, f"unknown key{_did_you_mean(loc[-1], known)}; valid keys here are: {', '.join(known)}"
    if kind == "missing":
        return path, "required field is missing"
    if kind == "union_tag_not_found":
        tags = err.get("ctx", {}).get("discriminator", "'kind'")
        model, _ = _walk(loc)
        while get_origin(model) is Annotated:
            model = get_args(model)[0]
        choices = ", ".join(get_args(m.model_fields["kind"].annotation)[0] for m in get_args(model))
        return path, f"field {tags} is missing; choose one of: {choices}"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tags = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip(" '")]
        tag, field = ctx.get("tag"), str(ctx.get("discriminator", "kind")).strip("'")
        return f"{path}.{field}", f"{tag!r} is not one of: {', '.join(tags)}{_did_you_mean(tag, tags)}"
    msg = err["msg"]
    if kind in ("model_type", "model_attributes_type", "dict_type"):  # pydantic's words name its classes
        msg = "expected a mapping of this section's fields"
        msg += ", or the model reference alone" if path in ("teacher", "student") or path.endswith(".model") else ""
        msg += " (docs/spec-reference.md lists them)"
    if kind == "string_pattern_mismatch":
        field = _field_at(loc)
        if field is not None and field.description:
            msg = f"{msg}: {field.description}"
    if kind in ("value_error", "assertion_error"):
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        named = re.match(r"([a-z_]+(?:\.[a-z_]+)+)\b", msg)  # a check across fields, said from a field
        if not loc and named and named[1].split(".")[0] in JobSpec.model_fields:
            path = named[1]  # ... given at the field its message opens with
    elif "input" in err and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    elif kind.endswith("_type") and isinstance(err.get("input"), (dict, list)):
        msg = f"{msg} (got a {'list' if isinstance(err['input'], list) else 'mapping'})"
    return path, msg


def spec_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Every problem in ``exc`` as (dotted field path, message that says the fix)."""
    return [_friendly(e) for e in exc.errors()]


def _join_pairs(text: str) -> str:
    """``text`` with each UTF-16 surrogate pair joined into its character (PyYAML leaves the
    escapes ``"\\ud83d\\ude00"`` as two halves; JSON joins them); lone halves stay."""
    if not any("\ud800" <= c <= "\udfff" for c in text):
        return text
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if "\ud800" <= c <= "\udbff" and i + 1 < len(text) and "\udc00" <= text[i + 1] <= "\udfff":
            out.append(chr(0x10000 + ((ord(c) - 0xD800) << 10) + ord(text[i + 1]) - 0xDC00))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _escaped(text: str) -> str:
    """``text`` with each lone surrogate and NUL written as its ``\\uXXXX`` escape."""
    return "".join(f"\\u{ord(c):04x}" if bad_char(c) else c for c in text)


def _clean_text(data: Any, loc: tuple[Any, ...], errors: list[tuple[str, str]], what: str = "text") -> Any:
    """``data`` with surrogate pairs joined. A key or value that still holds a lone surrogate or a
    NUL (no field takes one: not a path, not a tokenizer) goes to ``errors`` and is validated
    with those characters escaped, so the other fields' errors are reported with it."""
    if isinstance(data, str):
        data = _join_pairs(data)
        bad = bad_char(data)
        if bad is None:
            return data
        shown = f"'{_escaped(data)}' " if len(data) <= 40 else ""
        escaped = _escaped(data)
        errors.append((_loc_to_path(loc[:-1] + (escaped,) if what == "key" else loc),
                       f"the {what} {shown}holds {bad[1]} at character {bad[0] + 1}; remove it, or write the "
                       "character itself (the file as UTF-8) or a \\uXXXX escape of a whole character (a pair "
                       "\\uD8xx\\uDCxx above U+FFFF)"))
        return escaped
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            key = _clean_text(k, loc + (k,), errors, "key")
            out[key] = _clean_text(v, loc + (key,), errors)
        return out
    if isinstance(data, list):
        return [_clean_text(v, loc + (i,), errors) for i, v in enumerate(data)]
    return data


def parse_spec(data: Any, source: str | None = None, base_dir: str | None = None) -> JobSpec:
    """Validate a decoded spec (dict) and return a JobSpec, or raise SpecError with all errors.
    Relative model and data paths are taken from ``base_dir`` (default: the working directory).

    A string with a lone surrogate or a NUL character, anywhere in ``data``, is an error of its
    field (its other errors, and those of the fields under it, are not repeated)."""
    if data is None:
        raise SpecError([("(spec)", "the spec is empty; write its fields (see docs/guide.md)")], source)
    if not isinstance(data, dict):
        raise SpecError([("(spec)", f"expected a mapping of fields, got {type(data).__name__}")], source)
    text_errors: list[tuple[str, str]] = []
    data = _clean_text(data, (), text_errors)
    flagged = tuple(path for path, _ in text_errors)
    try:
        spec = JobSpec.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        others = [e for e in spec_errors(exc)
                  if not any(e[0] == f or e[0].startswith((f + ".", f + "[")) for f in flagged)]
        raise SpecError(text_errors + others, source) from None
    if text_errors:
        raise SpecError(text_errors, source)
    return spec


def _line_column(text: str, index: int) -> str:
    """``line L, column C`` of character ``index`` of ``text``, counting lines as editors do (at
    ``\\n`` only; PyYAML also breaks lines at U+0085, U+2028 and U+2029)."""
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    return f"line {line}, column {index - text.rfind(chr(10), 0, index)}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error (PyYAML
    keeps the last one silently: a spec with two ``data:`` sections would lose the first).
    Keys a merge (``<<: *anchor``) brings in may still be overridden."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is written twice in this mapping (first on line "
                        f"{seen[key] + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def parse_spec_text(text: str, source: str | None = None, base_dir: str | None = None) -> JobSpec:
    """Parse YAML (JSON is YAML) text into a JobSpec (:func:`parse_spec`); a YAML error names its
    line and column, and a key written twice in one mapping is an error."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. NUL or U+0001
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise SpecError([(_line_column(text, exc.position),
                          f"not valid YAML: the character U+{ord(char):04X} is not allowed in a YAML file; "
                          "remove it (a file full of NULs is UTF-16 or not text: save it as UTF-8)")],
                         source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = _line_column(text, mark.index) if mark else "(spec)"
        raise SpecError([(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")], source) from None
    return parse_spec(data, source, base_dir)


def load_spec(path: str | os.PathLike[str]) -> JobSpec:
    """Read and validate a spec file (UTF-8 YAML or JSON).

    Raises :class:`SpecError` naming the file for a missing or unreadable file, a byte that is
    not UTF-8 (its line, column and byte offset), YAML that does not parse, and every invalid
    field."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError([("(file)", f"{p} does not exist")], str(p)) from None
    except OSError as exc:
        raise SpecError([("(file)", f"cannot read {p}: {exc.strerror}")], str(p)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([("(file)", f"{p} is not UTF-8 text: {utf8_fault(raw, exc)}; save the file as "
                          "UTF-8")], str(p)) from None
    return parse_spec_text(text, str(p))


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec, every default filled in, as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
