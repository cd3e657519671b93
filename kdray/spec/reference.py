"""The job-spec reference (``docs/spec-reference.md``), generated from the pydantic models.

:func:`walk_sections` visits :class:`~kdray.spec.JobSpec` and every section model under it,
depth first in field order; each variant of a discriminated union (``objective``,
``curriculum``) is a section of its own. :func:`spec_reference_markdown` renders one table per
section: field, type (with its bounds), default and the field's ``description``. The output
depends only on the models, so it is the same on every run and machine.

    python -m kdray.spec.reference            # write docs/spec-reference.md (make docs)
    python -m kdray.spec.reference --check    # exit 1 if that file is stale
    python -m kdray.spec.reference --print    # write the text to stdout
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kdray.spec.job import JobSpec

DEFAULT_PATH = Path("docs") / "spec-reference.md"


@dataclass
class Section:
    """One table of the reference: a model, every path it sits at, and, for a variant of a
    discriminated union, the union's path and the variant's ``kind``."""

    model: type[BaseModel]
    paths: list[str] = field(default_factory=list)
    union: str | None = None
    kind: str | None = None

    @property
    def title(self) -> str:
        if self.model is JobSpec:
            return "Top level (JobSpec)"
        if self.kind is not None:
            return f"`{self.union}` with `kind: {self.kind}`"
        return ", ".join(f"`{p}`" for p in self.paths) + f" ({self.model.__name__})"


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _models_in(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    """The section models a field holds (directly, optionally, in a list or a union), and
    whether they are the items of a list."""
    annotation = _strip(annotation)
    if _is_model(annotation):
        return [annotation], False
    if get_origin(annotation) is list:
        models, _ = _models_in(get_args(annotation)[0])
        return models, True
    if _is_union(annotation):
        out: list[type[BaseModel]] = []
        in_list = False
        for arg in get_args(annotation):
            models, listed = _models_in(arg)
            out += models
            in_list = in_list or listed
        return out, in_list
    return [], False


def _kind(model: type[BaseModel]) -> str:
    (tag,) = get_args(model.model_fields["kind"].annotation)
    return tag


def walk_sections() -> list[Section]:
    """Every section model under JobSpec, in first-visit order (depth first, field order)."""
    order: list[Section] = []
    seen: dict[type[BaseModel], Section] = {}

    def visit(model: type[BaseModel], path: str, union: str | None = None) -> None:
        if model in seen:
            seen[model].paths.append(path)
            return
        section = Section(model, [path], union, _kind(model) if union is not None else None)
        seen[model] = section
        order.append(section)
        for name, info in model.model_fields.items():
            sub = f"{path}.{name}" if path else name
            models, listed = _models_in(info.annotation)
            sub += "[]" if listed else ""
            tagged = len(models) > 1
            for member in models:
                visit(member, sub, sub if tagged else None)

    visit(JobSpec, "")
    return order


def iter_fields() -> list[tuple[str, str, FieldInfo]]:
    """(section title, field name, FieldInfo) for every field of every section."""
    return [(s.title, name, info) for s in walk_sections() for name, info in _fields(s.model)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markdown code marks dropped, lower case, everything
    but letters, digits, spaces, '-' and '_' removed, spaces become '-'."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("*", "\\*")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:  # YAML 1.1 wants 1.0e-5, not 1e-05
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{int(exponent)}"
        return text
    if isinstance(value, str):
        plain = re.fullmatch(r"[\w./:+-]+", value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value, ensure_ascii=False)
    return str(value)


def _yaml(value: Any) -> str:
    """A value as YAML flow text, as it would be written in a spec."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return _scalar(value)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    return f"`{_yaml(info.get_default(call_default_factory=True))}`"


def _bounds(info: FieldInfo, base: str) -> str:
    lo = hi = None
    out = []
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Ge):
            lo = f"[{_scalar(meta.ge)}"
        elif isinstance(meta, annotated_types.Gt):
            lo = f"({_scalar(meta.gt)}"
        elif isinstance(meta, annotated_types.Le):
            hi = f"{_scalar(meta.le)}]"
        elif isinstance(meta, annotated_types.Lt):
            hi = f"{_scalar(meta.lt)})"
        elif isinstance(meta, annotated_types.MinLen):
            out.append(f"at least {meta.min_length} {'item' if base.startswith('list') else 'character'}"
                       + ("s" if meta.min_length != 1 else ""))
        elif getattr(meta, "pattern", None):
            out.append(f"matching `{meta.pattern}`")
    if lo and hi:
        out.insert(0, f"in {lo}, {hi}")
    elif lo:
        out.insert(0, ("≥ " if lo[0] == "[" else "> ") + lo[1:])
    elif hi:
        out.insert(0, ("≤ " if hi[-1] == "]" else "< ") + hi[:-1])
    return ", ".join(out)


def _type(annotation: Any, anchors: dict[Any, str]) -> str:
    annotation = _strip(annotation)
    if annotation is type(None):
        return "null"
    if get_origin(annotation) is Literal:
        values = [f"`{_scalar(v)}`" for v in get_args(annotation)]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if _is_model(annotation):
        return f"mapping: [{annotation.__name__}](#{anchors[annotation]})"
    if get_origin(annotation) is list:
        item = _strip(get_args(annotation)[0])
        if _is_union(item) and all(_is_model(a) for a in get_args(item)):
            return "list of mappings with `kind` " + _kinds(item, anchors)
        return f"list of {_type(item, anchors)}"
    if _is_union(annotation):
        args = get_args(annotation)
        if all(_is_model(a) for a in args):
            return "mapping with `kind` " + _kinds(annotation, anchors)
        parts = [_type(a, anchors) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def _kinds(union: Any, anchors: dict[Any, str]) -> str:
    return ", ".join(f"[`{_kind(m)}`](#{anchors[m]})" for m in get_args(union))


def _type_cell(info: FieldInfo, anchors: dict[Any, str]) -> str:
    annotation = _strip(info.annotation)
    bounds = _bounds(info, _type(annotation, anchors))
    if not bounds:
        return _type(annotation, anchors)
    if _is_union(annotation) and type(None) in get_args(annotation):  # bounds are the value's
        value = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(_type(a, anchors) for a in value) + f", {bounds}; or null"
    return f"{_type(annotation, anchors)}, {bounds}"


def _doc(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")
    return " ".join(inspect.cleandoc(doc).split()) if doc else ""


def _source(model: type[BaseModel]) -> str:
    path = model.__module__.replace(".", "/") + ".py"
    return f"[`{path}`](../{path})"


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """A model's fields in declaration order, ``kind`` (a union variant's tag) first."""
    items = list(model.model_fields.items())
    return sorted(items, key=lambda item: item[0] != "kind")


def _union_intro(path: str, members: list[Section], anchors: dict[Any, str]) -> str:
    kinds = ", ".join(f"[`{s.kind}`](#{anchors[s.model]})" for s in members)
    if path.endswith("[]"):
        return (f"Each entry of the list `{path[:-2]}` is a mapping whose `kind` selects one of "
                f"these variants, each with its own fields: {kinds}.")
    return (f"`{path}` is a mapping whose `kind` selects one of these variants, each with its own "
            f"fields: {kinds}.")


def spec_reference_markdown() -> str:
    """The whole reference page, deterministic: one table per section."""
    sections = walk_sections()
    anchors = {s.model: github_slug(s.title) for s in sections}
    lines = [
        "# Job spec reference",
        "",
        "<!-- Generated by `make docs` (python -m kdray.spec.reference) from the pydantic models in "
        "kdray/spec/. Do not edit by hand: tests/test_docs.py fails when this file is stale. -->",
        "",
        "Every field of a kdray job spec (`kdray.spec.JobSpec`), generated from the models in "
        "`kdray/spec/`. A spec is YAML (or JSON): a mapping with the top-level fields below. "
        "Unknown keys are errors at every level. `kdray validate SPEC` prints a spec with every "
        "default filled in, or every error with its field path. A default of `{}` means the "
        "section with every field at its default; `required` means the field has no default. "
        "Intervals give a number's allowed range: `[a, b]` includes both ends, `(a, b]` excludes "
        "a. Rules that involve several fields (for example `max_model_len` against the prompt "
        "and response lengths) are checked too; they are described with the fields and in "
        "[the guide](guide.md).",
        "",
        "Sections:",
        "",
    ]
    lines += [f"- [{s.title}](#{anchors[s.model]})" for s in sections]
    unions_done: set[str] = set()
    for section in sections:
        lines.append("")
        level = "##"
        if section.union is not None:
            level = "###"
            if section.union not in unions_done:
                unions_done.add(section.union)
                members = [s for s in sections if s.union == section.union]
                lines += [f"## `{section.union}`", "", _union_intro(section.union, members, anchors), ""]
        lines += [f"{level} {section.title}", ""]
        doc = _doc(section.model)
        lines += [doc, ""] if doc else []
        lines += [f"Model: `{section.model.__name__}` in {_source(section.model)}.", ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, info in _fields(section.model):
            lines.append(f"| `{name}` | {_cell(_type_cell(info, anchors))} | {_cell(_default(info))} "
                         f"| {_cell(info.description or '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdray.spec.reference",
                                     description="Write (or check) the job-spec reference page.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help=f"the page (default {DEFAULT_PATH})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the page differs from the models")
    mode.add_argument("--print", action="store_true", help="write the page to stdout instead")
    args = parser.parse_args(argv)
    text = spec_reference_markdown()
    if args.print:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is stale: run `make docs` (python -m kdray.spec.reference)", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
