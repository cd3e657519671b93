"""The grammar world's models and data (issue 22): a teacher trained on samples of the language
of :mod:`kdray.toy.grammar` until its answer distributions are close to the language's, and a
smaller, briefly trained student, sharing a tokenizer; built on first use and cached like the
toy world (:func:`kdray.toy.world.build_world` ``("grammar")``, references
:data:`~kdray.toy.world.GRAMMAR_REFS`).

Layout (the toy world's): ``data/train.jsonl`` and ``data/heldout.jsonl`` (rows ``id``,
``family``, ``prompt``, ``response``: a sample of the language, from two seeds), ``teacher/``,
``student/`` (``save_pretrained``) and ``meta.json``, which records each model's exact fit to
the language on held-out prompts (:func:`kdray.toy.grammar_eval.fit_to_language`).

How a model is scored against the language: :mod:`kdray.toy.grammar_eval`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import kdray.toy.tokenizer as _tok
import kdray.toy.train as _train
from kdray.toy.data import write_jsonl
from kdray.toy.grammar import GrammarWorld
from kdray.toy.grammar_eval import fit_to_language
from kdray.toy.world import PhaseClock, save_model, tokenizer_meta, write_meta

SEED = 2207
N_TRAIN = 8000
N_HELDOUT = 400
TEACHER_SHAPE = _train.TEACHER_SHAPE
#: One layer, two heads of 32 (vLLM's CPU attention takes head_dim 32), a tenth of the
#: teacher's parameters. Measured on the held-out fit prompts (2 threads): the teacher's 1200
#: steps give KL(language ‖ teacher) 0.30 nats against the language's entropy 2.55 and 0.92 of
#: its mass on valid answers (157 s); the student's 400 steps give KL 2.05 and 0.29 (9 s), where
#: 2,000 steps would reach 0.34: it knows the format and has far to go.
STUDENT_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
TEACHER_RECIPE = _train.SFTRecipe(steps=1200, batch_size=64, lr=2e-3, warmup=30)
STUDENT_RECIPE = _train.SFTRecipe(steps=400, batch_size=64, lr=2e-3, warmup=10)
#: Distinct held-out prompts each model's fit is measured on (meta.json).
FIT_PROMPTS = 64


def build_into(out: Path, progress: Callable[[str], None]) -> None:
    """Build the grammar world into the empty directory ``out`` (the builder of
    :data:`kdray.toy.world.RECIPES` ``["grammar"]``)."""
    import torch

    clock = PhaseClock("grammar", progress)
    language = GrammarWorld(SEED)
    (out / "data").mkdir(parents=True)
    t0 = time.perf_counter()
    train_rows = language.rows(N_TRAIN, SEED, prefix="grammar-train")
    heldout_rows = language.rows(N_HELDOUT, SEED + 1, prefix="grammar-heldout")
    write_jsonl(out / "data" / "train.jsonl", train_rows)
    write_jsonl(out / "data" / "heldout.jsonl", heldout_rows)
    clock.done("data", t0, f"{len(train_rows)} train / {len(heldout_rows)} held-out samples")

    t0 = time.perf_counter()
    tokenizer = _tok.train_tokenizer(r["prompt"] + r["response"] for r in train_rows)
    clock.done("tokenizer", t0, f"byte-level BPE, {len(tokenizer)} tokens")

    fit_prompts = list(dict.fromkeys(r["prompt"] for r in heldout_rows))[:FIT_PROMPTS]
    models: dict[str, dict] = {}
    with _train.quiet_build() as threads, torch.random.fork_rng(devices=[]):
        for name, shape, recipe, seed in (("teacher", TEACHER_SHAPE, TEACHER_RECIPE, SEED),
                                          ("student", STUDENT_SHAPE, STUDENT_RECIPE, SEED + 1)):
            t0 = time.perf_counter()
            model = _train.make_model(shape, tokenizer, seed)
            loss = _train.sft(model, tokenizer, train_rows, recipe, seed)
            models[name] = save_model(model, tokenizer, out / name, recipe, loss)
            models[name]["heldout_fit"] = fit = fit_to_language(model, tokenizer, language, fit_prompts)
            clock.done(name, t0, f"{models[name]['params']:,} params, SFT {recipe.steps} steps, held-out "
                                 f"KL(language ‖ {name}) {fit['kl']:.3f} nats (language entropy "
                                 f"{fit['entropy']:.3f}), mass on valid answers {fit['valid_mass']:.3f}")
    write_meta(out, "grammar", {
        "seed": SEED,
        "torch_threads": threads,
        "families": ["describe", "list", "continue"],
        "n_train": len(train_rows),
        "n_heldout": len(heldout_rows),
        "prompt_format": "the toy world's: prompt = 'Q: <question>\\nA:'; response = ' <answer>'",
        "tokenizer": tokenizer_meta(tokenizer),
        "teacher": models["teacher"],
        "student": models["student"],
    }, clock)


def language_of(meta: Mapping) -> GrammarWorld:
    """The language a built world's ``meta.json`` was made from."""
    return GrammarWorld(int(meta["seed"]))
