"""The documentation stays true: the generated spec reference is current, every spec field is
described, the README stays a short door, links resolve, and the commands it names exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from kdray.spec.reference import github_slug, iter_fields, spec_reference_markdown, walk_sections

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_BYTES = 10240


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _without_code_blocks(text))


def _anchors(text: str) -> set[str]:
    return {github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", _without_code_blocks(text), flags=re.MULTILINE)}


# ----------------------------------------------------------------------------- spec reference


def test_spec_reference_is_current():
    page = ROOT / "docs" / "spec-reference.md"
    assert page.is_file(), "docs/spec-reference.md is missing: run `make docs`"
    assert page.read_text(encoding="utf-8") == spec_reference_markdown(), (
        "docs/spec-reference.md is stale (a field, default or description in kdray/spec/ changed): "
        "run `make docs` and commit the result"
    )


def test_spec_reference_is_deterministic():
    assert spec_reference_markdown() == spec_reference_markdown()


def test_every_spec_field_has_a_description():
    missing = [f"{section}: {name}" for section, name, info in iter_fields()
               if not (info.description or "").strip()]
    assert not missing, f"fields without Field(description=...): {missing}"


def test_the_walk_reaches_every_section_and_variant():
    from kdray.spec.curriculum import CurriculumSpec
    from kdray.spec.objective import ObjectiveSpec

    def variants(union):
        return {m.model_fields["kind"].annotation.__args__[0] for m in get_args(get_args(union)[0])}

    sections = walk_sections()
    names = {s.model.__name__ for s in sections}
    assert {"JobSpec", "ModelSpec", "DataSpec", "GenerationSpec", "TeacherSignalSpec", "TrainingSpec",
            "LoraSpec", "EvaluationSpec", "JudgeSpec"} <= names
    kinds = {(s.union, s.kind) for s in sections if s.kind is not None}
    assert kinds == ({("objective", k) for k in variants(ObjectiveSpec)}
                     | {("curriculum[]", k) for k in variants(CurriculumSpec)})
    text = spec_reference_markdown()
    for section in sections:
        assert f"\n## {section.title}\n" in text or f"\n### {section.title}\n" in text


def test_spec_reference_check_mode(tmp_path):
    from kdray.spec.reference import main

    out = tmp_path / "ref.md"
    assert main(["--out", str(out), "--check"]) == 1
    assert main(["--out", str(out)]) == 0
    assert main(["--out", str(out), "--check"]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "edited\n", encoding="utf-8")
    assert main(["--out", str(out), "--check"]) == 1


# ----------------------------------------------------------------------------- README and links


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep it under {README_MAX_BYTES} and move detail to docs/"


def test_readme_links_every_doc():
    linked = {Path(link.split("#")[0]).as_posix() for link in _links(README.read_text(encoding="utf-8"))}
    assert {_rel(page) for page in DOCS} <= linked


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for link in _links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{link} (no heading #{anchor})")
    assert not broken, f"{_rel(page)}: broken links: {broken}"


# ----------------------------------------------------------------------------- commands


def _help(*args: str) -> str:
    script = shutil.which("kdray", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "kdray.cli"]
    return subprocess.run([*cmd, *args, "--help"], capture_output=True, text=True, check=True, timeout=120).stdout


def _choices(help_text: str) -> set[str]:
    match = re.search(r"\{([a-z,-]+)\}", help_text)
    assert match, help_text
    return set(match.group(1).split(","))


def _commands(text: str) -> list[str]:
    """Command text a reader copies: bash/sh code blocks and inline code spans."""
    blocks = re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    blocks = [re.sub(r"(?:^|\s)#.*$", "", b, flags=re.MULTILINE) for b in blocks]  # shell comments
    spans = re.findall(r"`([^`\n]+)`", _without_code_blocks(text))
    return blocks + spans


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_kdray_commands_exist(page):
    commands = _commands(page.read_text(encoding="utf-8"))
    named = {m for c in commands for m in re.findall(r"(?:^|[\s/;(])kdray ([a-z][a-z-]*)", c, flags=re.MULTILINE)}
    subcommands = _choices(_help())
    assert named <= subcommands, f"{_rel(page)} names kdray subcommands that do not exist: {named - subcommands}"
    benches = {m for c in commands for m in re.findall(r"kdray bench ([a-z][a-z-]*)", c)}
    if benches:
        assert benches <= _choices(_help("bench")), f"unknown benches: {benches - _choices(_help('bench'))}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_make_targets_exist(page):
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(encoding="utf-8"), flags=re.MULTILINE))
    named = {m for c in _commands(page.read_text(encoding="utf-8"))
             for m in re.findall(r"(?:^|[\s;(&])make ([a-z][\w-]*)", c, flags=re.MULTILINE)}
    assert named <= targets, f"{_rel(page)} names make targets that do not exist: {named - targets}"


# ----------------------------------------------------------------------------- paths and modules


def _spans(page: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", _without_code_blocks(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_repository_paths_exist(page):
    """`kdray/...`, `jobs/...`, `cluster/...` and `tests/...` in the prose: files that exist
    (stale paths after a move fail here)."""
    paths = {s for s in _spans(page) if re.fullmatch(r"(kdray|jobs|cluster|tests|docs)/[\w./-]*", s)}
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"{_rel(page)} names paths that do not exist: {missing}"


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_modules_exist(page):
    """Dotted names such as `kdray.pools.generate` or `kdray.service:app_builder` resolve."""
    names = set()
    for span in _spans(page):
        for name in re.findall(r"\bkdray(?:\.[A-Za-z_]\w*)+(?::\w+)?", span):
            if name.endswith(".db") or name.endswith(".py"):  # file names, not modules
                continue
            names.add(name.replace(":", "."))
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{_rel(page)} names modules or attributes that do not exist: {missing}"
