"""The toy world for the demo and the tests: nothing comes from a model hub.

* a synthetic instruction data set with verifiable answers (:mod:`kdray.toy.data`),
* a byte-level BPE tokenizer trained locally (:mod:`kdray.toy.tokenizer`),
* a small Llama teacher trained by SFT until it solves most held-out prompts,
  and a smaller, weak Llama student with the same tokenizer (:mod:`kdray.toy.train`).

A second world, ``grammar`` (:mod:`kdray.toy.grammar_world`), has a language with a known
answer distribution per prompt instead (``toy:grammar-teacher``, ``toy:grammar-student``,
``toy:grammar-train``, ``toy:grammar-heldout``), built the same way on first use.

It is built on first use into ``<cache>/<WORLD_VERSION>-<fingerprint>/`` (see
:func:`cache_root`; the fingerprint hashes the code that builds the world, so a
change to it builds a fresh world) and reused afterwards::

    from kdray.toy import build_toy_world, resolve
    world = build_toy_world(progress=print)
    resolve("toy:teacher")  # -> Path of a save_pretrained model directory

Inside a job, :func:`resolve` loads only the build the job's driver pinned
(:mod:`kdray.toy.pinning`), on every node.

Run ``python -m kdray.toy [--force] [--cache-dir DIR]`` to build it and print its meta.
Importing this package is cheap: torch and transformers are imported only to build.
"""

from kdray.toy.data import FAMILIES, make_prompt, read_jsonl, solve
from kdray.toy.pinning import BUILD_ID_ENV, BUILD_ID_ENVS, pin_for_job, resolve, unpin
from kdray.toy.world import (
    GRAMMAR_REFS,
    RECIPES,
    TOY_REFS,
    WORLD_VERSION,
    ToyWorld,
    build_toy_world,
    build_world,
    cache_root,
    fingerprint,
    world_dir_name,
)

__all__ = [
    "BUILD_ID_ENV",
    "BUILD_ID_ENVS",
    "FAMILIES",
    "GRAMMAR_REFS",
    "RECIPES",
    "TOY_REFS",
    "WORLD_VERSION",
    "ToyWorld",
    "build_toy_world",
    "build_world",
    "cache_root",
    "fingerprint",
    "make_prompt",
    "pin_for_job",
    "read_jsonl",
    "resolve",
    "solve",
    "unpin",
    "world_dir_name",
]
