"""References in a job spec: toy models and data sets, local paths, hub ids; ``output_dir``.

Checked at validation, offline: a local path must exist now (a typo should fail at
validation, not twenty minutes into a job); a hub id is resolved by the host that loads it.
Imports only the standard library.

Model references follow one rule (:func:`is_local_model_path`): ``toy:...`` is a toy model; a
reference that is absolute or starts with ``./``, ``../`` or ``~``, or that no hub id could be
(a hub id is ``org/name``: one ``/``, no ``\\``), is a local directory, which every node that
loads it must have (a missing one is an error naming the node, never a hub lookup); the rest,
``org/name``, is a hub id. An ``org/name`` that is also a directory where the spec is validated
is refused as ambiguous: write ``./org/name`` for the directory.

URIs (``s3://``, ``gs://``, ``file://``, any ``scheme://``) are refused in ``output_dir`` and
in model and data references (:func:`uri_problem`): kdray reads and writes them as local paths
on every node (Ray Train's storage, the datasets, the checkpoints), and a URI there would become
a directory called ``s3:`` under the working directory. Mount the bucket on every node instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TOY_PREFIX = "toy:"
#: The toy worlds' references (:data:`kdray.toy.world.RECIPES`): the toy world's, then the
#: grammar world's (issue 22).
TOY_MODELS = ("toy:teacher", "toy:student", "toy:grammar-teacher", "toy:grammar-student")
TOY_DATA = ("toy:train", "toy:heldout", "toy:grammar-train", "toy:grammar-heldout")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: What a reference is, for the message of a URI refused in it.
_URI_USE = {
    "output_dir": "kdray writes output_dir as a local path on every node (Ray Train's storage_path, the "
                  "datasets, the checkpoints and the exported student, read back by the driver)",
    "model": "kdray loads a model from a local directory or a hub id 'org/name'",
    "data": "kdray reads a dataset from a local file or directory, or a hub dataset 'hub:ORG/NAME'",
}


def uri_problem(value: str, what: str) -> str | None:
    """Why ``value``, given for ``what`` (``output_dir``, ``model`` or ``data``), is refused as a
    URI (``scheme://...``), with the fix; None when it is not one. ``file://`` names the local
    path to write instead; any other scheme (``s3``, ``gs``, ``hdfs``, ``http``...) says to mount
    the storage at one path on every node and give that path."""
    m = _URI.match(value)
    if m is None:
        return None
    scheme = m.group(1).lower()
    if scheme == "file":
        local = value[m.end():]
        local = local if local.startswith("/") else "/" + local.split("/", 1)[-1]
        return f"{value!r} is a file:// URI; write the local path itself: {local!r}"
    return (f"{value!r} is a {scheme}:// URI, which kdray does not support: {_URI_USE[what]}. Mount the "
            "bucket at the same path on every node (e.g. mountpoint-s3 or s3fs for S3, gcsfuse for GCS, or a "
            "shared file system such as EFS, Filestore or NFS) and give that path, e.g. /shared/...")


def check_output_dir(value: str) -> str:
    """Accept a local path; refuse a URI (:func:`uri_problem`) or an empty value."""
    problem = uri_problem(value, "output_dir")
    if problem:
        raise ValueError(problem)
    if not value.strip():
        raise ValueError("output_dir is empty; give a directory, e.g. runs/NAME or /shared/runs/NAME")
    return value


def is_local_model_path(ref: str) -> bool:
    """Whether model reference ``ref`` names a local directory (the module's rule): absolute,
    starting with ``./``, ``../`` or ``~``, or not of a hub id's form ``org/name``; a ``toy:``
    reference is not."""
    if ref.startswith(TOY_PREFIX):
        return False
    return ref.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(ref)


def local_path(ref: str, base: str | None = None) -> Path:
    """The absolute path that local reference ``ref`` names: ``~`` expanded, a relative path
    taken from ``base`` (default: this process's working directory), ``..`` folded, symlinks
    kept (a mount's own path is what every node shares)."""
    return Path(os.path.normpath(os.path.join(base or os.getcwd(), os.path.expanduser(ref))))


def _relative_note(ref: str, path: Path) -> str:
    """`` (looked for PATH: ...)`` for a relative ``ref``, which says where it was looked for."""
    if os.path.isabs(os.path.expanduser(ref)):
        return ""
    return (f" (looked for {path}: a relative path is taken from the directory kdray runs in; under kdray "
            "serve, its working directory)")


def check_model_ref(ref: str, base: str | None = None) -> str:
    """A toy model as written, an existing local model directory as its absolute path
    (:func:`local_path`: processes that run elsewhere, Ray Train's workers among them, read
    the same directory), or a hub id ``org/name`` as written (:func:`is_local_model_path`
    tells them apart).

    A local path must exist now and hold a ``config.json``: a typo should fail at validation,
    not twenty minutes into a job. A hub id is resolved by the host that loads it.

    Raises:
        ValueError: a URI, an unknown toy model, a missing local directory, a file, a directory
            without config.json, an ``org/name`` that is also a directory here (ambiguous), or
            a reference that is none of these.
    """
    if ref.startswith(TOY_PREFIX):
        if ref not in TOY_MODELS:
            raise ValueError(f"unknown toy model {ref!r}; use one of {', '.join(TOY_MODELS)}")
        return ref
    problem = uri_problem(ref, "model")
    if problem:
        raise ValueError(problem)
    path = local_path(ref, base)
    if _HUB_ID.match(ref) and path.exists():
        raise ValueError(
            f"{ref!r} is both a hub id and a directory here ({path}); write './{ref}' or the "
            "absolute path for the directory, or run from a directory without it to mean the hub model"
        )
    if ref.startswith(("/", "./", "../", "~")) or path.exists():
        if path.is_file():
            raise ValueError(f"model path {ref!r} is a file; give the directory save_pretrained wrote "
                             f"({path.parent}, if that is it)")
        if not path.is_dir():
            raise ValueError(
                f"model path {ref!r} does not exist{_relative_note(ref, path)}; give a directory written by "
                "save_pretrained, a hub id 'org/name', or 'toy:teacher' / 'toy:student'"
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {ref!r} has no config.json; point at the directory that "
                "save_pretrained wrote"
            )
        return str(path)
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


def check_data_ref(ref: str, base: str | None = None) -> str:
    """A toy split or a hub dataset ``hub:ORG/NAME[:SPLIT]`` as written, or an existing JSONL /
    parquet file or ``save_to_disk`` directory as its absolute path (:func:`local_path`).

    Raises:
        ValueError: a URI, a bad hub reference, an unknown toy split, a missing path or a file
            of another suffix."""
    if ref.startswith(HUB_PREFIX):
        parse_hub_ref(ref)
        return ref
    if ref.startswith(TOY_PREFIX):
        if ref not in TOY_DATA:
            raise ValueError(f"unknown toy dataset {ref!r}; use one of {', '.join(TOY_DATA)}")
        return ref
    problem = uri_problem(ref, "data")
    if problem:
        raise ValueError(problem)
    path = local_path(ref, base)
    if not path.exists():
        raise ValueError(
            f"dataset {ref!r} does not exist{_relative_note(ref, path)}; give a .jsonl or .parquet file, a directory "
            "written by datasets' save_to_disk, a hub dataset 'hub:ORG/NAME[:SPLIT]', or "
            "'toy:train' / 'toy:heldout'"
        )
    if path.is_file() and path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"dataset {ref!r} has suffix {path.suffix!r}; use .jsonl or .parquet")
    return str(path)
