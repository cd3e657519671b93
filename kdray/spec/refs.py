"""References in a job spec: toy models and data sets, local paths, hub ids.

Checked at validation, offline: a local path must exist now (a typo should fail at
validation, not twenty minutes into a job); a hub id is resolved by the host that loads it.
Imports only the standard library.
"""

from __future__ import annotations

import re
from pathlib import Path

TOY_PREFIX = "toy:"
TOY_MODELS = ("toy:teacher", "toy:student")
TOY_DATA = ("toy:train", "toy:heldout")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_local_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).exists()


def check_model_ref(ref: str) -> str:
    """Accept a toy model, an existing local model directory, or a hub id ``org/name``.

    A local path (absolute, or starting with ``./``, ``../`` or ``~``) must exist now and hold
    a ``config.json``: a typo should fail at validation, not twenty minutes into a job.
    A hub id is resolved by the host that loads it.
    """
    if ref.startswith(TOY_PREFIX):
        if ref not in TOY_MODELS:
            raise ValueError(f"unknown toy model {ref!r}; use one of {', '.join(TOY_MODELS)}")
        return ref
    if _looks_like_local_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"model path {ref!r} does not exist; give a directory written by "
                "save_pretrained, a hub id 'org/name', or 'toy:teacher' / 'toy:student'"
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {ref!r} has no config.json; point at the directory that "
                "save_pretrained wrote"
            )
        return ref
    if _HUB_ID.match(ref):
        return ref
    raise ValueError(
        f"{ref!r} is neither a local model directory (start local paths with /, ./, ../ or ~), "
        "a hub id 'org/name', nor a toy model ('toy:teacher', 'toy:student')"
    )


HUB_PREFIX = "hub:"
# A datasets split expression: NAME, NAME[start:end] with ints or percentages, joined by '+'.
_SPLIT_PART = r"[A-Za-z_][\w.-]*(?:\[\s*-?\d*%?\s*:\s*-?\d*%?\s*\])?"
_HUB_SPLIT = re.compile(rf"^{_SPLIT_PART}(?:\+{_SPLIT_PART})*$")


def parse_hub_ref(ref: str) -> tuple[str, str]:
    """``hub:ORG/NAME[:SPLIT]`` → (``ORG/NAME``, split); the split defaults to ``train``.

    SPLIT is the ``datasets`` slice syntax (``train``, ``train[:14000]``, ``train[90%:]``,
    ``train+validation``). Checked here without network access; the dataset itself is read
    by the host that runs the job (:func:`kdray.data.sources.read_rows`)."""
    body = ref.removeprefix(HUB_PREFIX)
    name, sep, split = body.partition(":")
    if not _HUB_ID.match(name):
        raise ValueError(
            f"hub dataset {ref!r}: {name!r} is not a hub id; write hub:ORG/NAME or "
            "hub:ORG/NAME:SPLIT, e.g. hub:databricks/databricks-dolly-15k:train[:14000]"
        )
    split = split.replace(" ", "") if sep else "train"
    if not _HUB_SPLIT.match(split):
        raise ValueError(
            f"hub dataset {ref!r}: split {split!r} is not a datasets split expression; use a split "
            "name with an optional slice, e.g. train, train[:14000], train[14000:], train[90%:]"
        )
    return name, split


def check_data_ref(ref: str) -> str:
    """Accept a toy split, a hub dataset ``hub:ORG/NAME[:SPLIT]``, or an existing JSONL /
    parquet file or ``save_to_disk`` directory."""
    if ref.startswith(HUB_PREFIX):
        parse_hub_ref(ref)
        return ref
    if ref.startswith(TOY_PREFIX):
        if ref not in TOY_DATA:
            raise ValueError(f"unknown toy dataset {ref!r}; use one of {', '.join(TOY_DATA)}")
        return ref
    path = Path(ref).expanduser()
    if not path.exists():
        raise ValueError(
            f"dataset {ref!r} does not exist; give a .jsonl or .parquet file, a directory "
            "written by datasets' save_to_disk, a hub dataset 'hub:ORG/NAME[:SPLIT]', or "
            "'toy:train' / 'toy:heldout'"
        )
    if path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"dataset {ref!r} has suffix {path.suffix!r}; use .jsonl or .parquet")
    return ref
