"""Build, cache and resolve the toy worlds (data + tokenizer + teacher + student each).

Two worlds, each a :class:`Recipe`: ``toy`` (:mod:`kdray.toy.data`: one right answer per
prompt; the demo's and the tests') and ``grammar`` (:mod:`kdray.toy.grammar_world`: a language
with a known answer distribution, issue 22). Both are built on first use, cached the same way
and resolved through ``toy:`` references (:data:`TOY_REFS`, :data:`GRAMMAR_REFS`)."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
import importlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import kdray.toy.data as _data
import kdray.toy.tokenizer as _tok
import kdray.toy.train as _train

# The world directory is ``<root>/<WORLD_VERSION>-<fingerprint>``: the
# fingerprint hashes the source of the modules that make the world, so any
# change to the data, tokenizer, models or recipes builds a fresh world next to
# the old one (installs of different kdray versions never fight over one
# directory). Bump WORLD_VERSION for a change of layout or meaning.
WORLD_VERSION = "v1"
_FINGERPRINTED = ("data.py", "tokenizer.py", "train.py", "world.py")
SEED = 1234
N_TRAIN_PER_FAMILY = 1000
N_HELDOUT_PER_FAMILY = 100
TEACHER_RECIPE = _train.SFTRecipe(steps=650, batch_size=64, lr=2e-3, warmup=30)
STUDENT_RECIPE = _train.SFTRecipe(steps=80, batch_size=64, lr=2e-3, warmup=10)
EVAL_MAX_NEW_TOKENS = 10

TOY_REFS = ("toy:teacher", "toy:student", "toy:train", "toy:heldout")
GRAMMAR_REFS = ("toy:grammar-teacher", "toy:grammar-student", "toy:grammar-train", "toy:grammar-heldout")


@dataclass(frozen=True)
class Recipe:
    """How a world is made: its cache subdirectory (``name``), its version (bump it for a change
    of layout or meaning), the modules of :mod:`kdray.toy` whose source is its fingerprint, its
    builder (``"module:function"``, called with the directory to fill and a progress callback)
    and its references (teacher, student, train, held-out)."""

    name: str
    version: str
    modules: tuple[str, ...]
    builder: str
    refs: tuple[str, str, str, str]


RECIPES: dict[str, Recipe] = {
    "toy": Recipe("toy", WORLD_VERSION, _FINGERPRINTED, "kdray.toy.world:_build_into", TOY_REFS),
    "grammar": Recipe("grammar", "v1", ("grammar.py", "grammar_eval.py", "grammar_metrics.py", "grammar_world.py",
                                        "tokenizer.py", "train.py", "world.py"),
                      "kdray.toy.grammar_world:build_into", GRAMMAR_REFS),
}


def world_of(ref: str) -> str:
    """The world (a key of :data:`RECIPES`) of a ``toy:`` reference.

    Raises:
        ValueError: not a reference of any world, naming the valid ones.
    """
    for name, recipe in RECIPES.items():
        if ref in recipe.refs:
            return name
    valid = [r for recipe in RECIPES.values() for r in recipe.refs]
    raise ValueError(f"unknown toy reference {ref!r}; valid references: {', '.join(valid)}")


@dataclass(frozen=True)
class ToyWorld:
    """A built world's paths (the same layout for every :class:`Recipe`) and its ``meta.json``."""

    root: Path
    teacher_dir: Path
    student_dir: Path
    train_path: Path
    heldout_path: Path
    meta: dict = field(compare=False, hash=False)

    @classmethod
    def load(cls, root: Path) -> ToyWorld:
        root = Path(root)
        meta = json.loads((root / "meta.json").read_text())
        return cls(
            root=root,
            teacher_dir=root / "teacher",
            student_dir=root / "student",
            train_path=root / "data" / "train.jsonl",
            heldout_path=root / "data" / "heldout.jsonl",
            meta=meta,
        )

    def rows(self, split: str) -> list[dict]:
        """The ``"train"`` or ``"heldout"`` rows."""
        paths = {"train": self.train_path, "heldout": self.heldout_path}
        if split not in paths:
            raise ValueError(f"unknown split {split!r}; valid: {sorted(paths)}")
        return _data.read_jsonl(paths[split])


def cache_root(world: str = "toy") -> Path:
    """``$KDRAY_CACHE_DIR/<world>`` if set, else ``~/.cache/kdray/<world>``."""
    base = os.environ.get("KDRAY_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "kdray") / RECIPES[world].name


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@functools.cache
def fingerprint(world: str = "toy") -> str:
    """Short hash of the code that builds ``world``."""
    recipe = RECIPES[world]
    h = hashlib.sha256(recipe.version.encode())
    for name in recipe.modules:
        h.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:12]


def world_dir_name(world: str = "toy") -> str:
    return f"{RECIPES[world].version}-{fingerprint(world)}"


def _is_complete(world_dir: Path) -> bool:
    return (world_dir / "meta.json").is_file()


def build_toy_world(
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ToyWorld:
    """The ``toy`` world: :func:`build_world` ``("toy", ...)``."""
    return build_world("toy", cache_dir, force=force, progress=progress)


def build_world(
    world: str,
    cache_dir: str | Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ToyWorld:
    """Return ``world`` (a key of :data:`RECIPES`) under ``cache_dir`` (default
    :func:`cache_root`), building it on first use.

    The world lives in ``<cache_dir>/<world_dir_name()>/``. It is built in a
    temporary sibling directory and renamed into place only when complete,
    under an exclusive ``flock`` on ``<cache_dir>/<world_dir_name()>.lock`` so
    concurrent callers (threads, processes, Ray workers on one host) build it
    once. ``force`` rebuilds it. ``progress`` gets one line per build phase.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root(world)
    name = world_dir_name(world)
    world_dir = root / name
    if not force and _is_complete(world_dir):
        return ToyWorld.load(world_dir)
    with _locked(root / f"{name}.lock"):
        if not force and _is_complete(world_dir):  # someone else built it meanwhile
            return ToyWorld.load(world_dir)
        for stale in root.glob(f".{name}.*"):  # leftovers of killed builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            module, function = RECIPES[world].builder.split(":")
            getattr(importlib.import_module(module), function)(tmp, progress or (lambda _msg: None))
            if world_dir.exists():
                old = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(world_dir, old)
                os.replace(tmp, world_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, world_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ToyWorld.load(world_dir)


class PhaseClock:
    """A build's phases: :meth:`done` records one's seconds (``phases``) and reports it."""

    def __init__(self, world: str, progress: Callable[[str], None]):
        self.world, self.progress = world, progress
        self.start, self.phases = time.perf_counter(), {}

    def done(self, name: str, t0: float, msg: str) -> None:
        self.phases[name] = round(time.perf_counter() - t0, 2)
        self.progress(f"{self.world} world: {name}: {msg} ({self.phases[name]:.1f}s)")


def _build_into(out: Path, progress: Callable[[str], None]) -> None:
    import torch

    clock = PhaseClock("toy", progress)

    (out / "data").mkdir(parents=True)
    t0 = time.perf_counter()
    train_rows, heldout_rows = _data.generate_splits(N_TRAIN_PER_FAMILY, N_HELDOUT_PER_FAMILY, SEED)
    _data.write_jsonl(out / "data" / "train.jsonl", train_rows)
    _data.write_jsonl(out / "data" / "heldout.jsonl", heldout_rows)
    clock.done("data", t0, f"{len(train_rows)} train / {len(heldout_rows)} held-out rows")

    t0 = time.perf_counter()
    tokenizer = _tok.train_tokenizer(r["prompt"] + r["response"] for r in train_rows)
    clock.done("tokenizer", t0, f"byte-level BPE, {len(tokenizer)} tokens")

    models = {}
    # fork_rng: seeding for the build leaves the caller's torch RNG state alone
    with _train.quiet_build() as threads, torch.random.fork_rng(devices=[]):
        for name, shape, recipe, seed in (
            ("teacher", _train.TEACHER_SHAPE, TEACHER_RECIPE, SEED),
            ("student", _train.STUDENT_SHAPE, STUDENT_RECIPE, SEED + 1),
        ):
            t0 = time.perf_counter()
            model = _train.make_model(shape, tokenizer, seed)
            loss = _train.sft(model, tokenizer, train_rows, recipe, seed)
            em = _train.exact_match(model, tokenizer, heldout_rows, EVAL_MAX_NEW_TOKENS)
            models[name] = save_model(model, tokenizer, out / name, recipe, loss)
            models[name].update(heldout_exact_match=em["exact_match"], heldout_exact_match_by_family=em["by_family"])
            clock.done(name, t0, f"{models[name]['params']:,} params, SFT {recipe.steps} steps, "
                                 f"held-out EM {em['exact_match']:.3f}")

    write_meta(out, "toy", {
        "seed": SEED,
        "torch_threads": threads,
        "families": list(_data.FAMILIES),
        "n_train": len(train_rows),
        "n_heldout": len(heldout_rows),
        "prompt_format": "prompt = 'Q: <question>\\nA:'; response = ' <answer>' (separator space "
                         "starts the response); exact match = response.strip() equality",
        "eval_max_new_tokens": EVAL_MAX_NEW_TOKENS,
        "tokenizer": tokenizer_meta(tokenizer),
        "teacher": models["teacher"],
        "student": models["student"],
        "teacher_exact_match": models["teacher"]["heldout_exact_match"],
        "student_exact_match": models["student"]["heldout_exact_match"],
    }, clock)


def save_model(model, tokenizer, path: Path, recipe: _train.SFTRecipe, loss: float) -> dict:
    """Save ``model`` and ``tokenizer`` to ``path`` (``save_pretrained``); return the model's
    entry of ``meta.json``: parameters, shape, SFT recipe and final loss."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {
        "params": _train.n_params(model),
        "config": {k: getattr(model.config, k) for k in (
            "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "max_position_embeddings", "tie_word_embeddings")},
        "sft": {"steps": recipe.steps, "batch_size": recipe.batch_size, "lr": recipe.lr,
                "warmup": recipe.warmup, "final_loss": round(loss, 4)},
    }


def tokenizer_meta(tokenizer) -> dict:
    return {"type": "byte-level BPE", "vocab_size": len(tokenizer), "split_pattern": _tok.SPLIT_PATTERN,
            "bos": _tok.BOS, "eos": _tok.EOS, "pad": _tok.PAD, "model_max_length": _tok.MODEL_MAX_LENGTH}


def write_meta(out: Path, world: str, fields: dict, clock: PhaseClock) -> None:
    """Finish a build in ``out``: every file to the umask's mode, then ``meta.json`` (the
    world's version, fingerprint, a fresh build id, timings, library versions and ``fields``),
    whose presence marks the build complete (:func:`_is_complete`)."""
    import torch
    import transformers

    file_mode = (out / "data" / "train.jsonl").stat().st_mode & 0o777
    for path in out.rglob("*"):  # some writers create 0600 temp files; use the umask's mode
        if path.is_file():
            path.chmod(file_mode)
    meta = {
        "world": world,
        "version": RECIPES[world].version,
        "fingerprint": fingerprint(world),
        "build_id": uuid.uuid4().hex,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.perf_counter() - clock.start, 2),
        "phase_seconds": clock.phases,
        **fields,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    clock.progress(f"{world} world: built in {meta['build_seconds']:.1f}s")


def resolve(ref: str, *, cache_dir: str | Path | None = None) -> Path:
    """Path for a ``toy:`` reference (:data:`TOY_REFS`, :data:`GRAMMAR_REFS`), building its world
    on first use (``cache_dir``: that world's cache root)."""
    world = world_of(ref)
    built = build_world(world, cache_dir)
    teacher, student, train, heldout = RECIPES[world].refs
    return {teacher: built.teacher_dir, student: built.student_dir, train: built.train_path,
            heldout: built.heldout_path}[ref]
