"""The grammar world's models and data (kdray.toy.grammar_world): a build's layout, samples and
meta; its references resolved and pinned like the toy world's; a model scored against the
language (kdray.toy.grammar_eval). The build runs here at a tiny size (seconds); the real one
trains for minutes."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.worlds import build_tiny_grammar


@pytest.fixture
def tiny_grammar(tmp_path, monkeypatch):
    """A grammar world built at a tiny size into a cache of its own."""
    return build_tiny_grammar(monkeypatch, tmp_path / "cache")


def test_a_build_holds_samples_of_the_language_two_models_and_their_fit(tiny_grammar, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdray import toy
    from kdray.toy.grammar_world import language_of

    world = tiny_grammar
    assert world.root.parent == tmp_path / "cache" / "grammar" and world.root.name == toy.world_dir_name("grammar")
    assert world.meta["world"] == "grammar" and world.meta["n_train"] == 256 and world.meta["n_heldout"] == 24
    language = language_of(world.meta)
    train, heldout = world.rows("train"), world.rows("heldout")
    assert len(train) == 256 and len(heldout) == 24
    assert all(language.probability(r["prompt"], r["response"]) > 0 for r in train + heldout)
    assert {r["family"] for r in train} == {"describe", "list", "continue"}
    tok = AutoTokenizer.from_pretrained(world.teacher_dir)
    text = train[0]["prompt"] + train[0]["response"]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    for name in ("teacher", "student"):
        fit = world.meta[name]["heldout_fit"]
        assert fit["prompts"] == 4 and fit["kl"] > 0 and fit["entropy"] > 1.0 and 0 <= fit["valid_mass"] <= 1
        assert AutoModelForCausalLM.from_pretrained(world.root / name).config.vocab_size == len(tok)
    assert world.meta["student"]["params"] < world.meta["teacher"]["params"]
    # The references: the paths of this build, from the same cache
    assert toy.resolve("toy:grammar-teacher") == world.teacher_dir
    assert toy.resolve("toy:grammar-heldout") == world.heldout_path
    with pytest.raises(ValueError, match="unknown toy reference 'toy:grammar'.*toy:grammar-student"):
        toy.resolve("toy:grammar")


def test_the_driver_pins_each_world_its_spec_names(tiny_grammar, monkeypatch):
    from kdray import toy
    from kdray.errors import ToyWorldError

    for name in toy.BUILD_ID_ENVS.values():  # absent before, and so after: monkeypatch restores it
        monkeypatch.delenv(name, raising=False)
    pinned = toy.pin_for_job(["toy:grammar-student", "/data/heldout.jsonl"])
    assert pinned == {"grammar": tiny_grammar.meta["build_id"]}
    assert os.environ[toy.BUILD_ID_ENVS["grammar"]] == pinned["grammar"] and toy.BUILD_ID_ENV not in os.environ
    monkeypatch.setenv(toy.BUILD_ID_ENVS["grammar"], "f" * 32)  # another build than this node's
    with pytest.raises(ToyWorldError, match=f"has the grammar world .* resolved the build {'f' * 32}"):
        toy.resolve("toy:grammar-teacher")
    toy.unpin()
    assert not set(toy.BUILD_ID_ENVS.values()) & set(os.environ)


def test_answer_logprobs_are_the_models_sequence_log_probabilities(tiny_grammar):
    """Each answer's log q (its tokens and EOS after the prompt) equals a plain forward of that
    one sequence, whatever the batch it is padded into; the language's answers of a prompt
    take at most the model's whole mass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdray.toy.grammar_eval import answer_logprobs, fit_to_language
    from kdray.toy.grammar_world import language_of

    tok = AutoTokenizer.from_pretrained(tiny_grammar.student_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_grammar.student_dir).eval()
    language = language_of(tiny_grammar.meta)
    prompt = tiny_grammar.rows("heldout")[0]["prompt"]
    answers = list(language.answers(prompt))
    got = answer_logprobs(model, tok, prompt, answers, batch_size=7)
    for answer, lq in zip(answers[:5], got[:5]):
        p_ids = tok(prompt)["input_ids"]
        r_ids = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(input_ids=torch.as_tensor([p_ids + r_ids])).logits[0].double().log_softmax(-1)
        expected = sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(r_ids))
        assert lq == pytest.approx(expected, abs=1e-4)
    assert all(math.isfinite(v) and v < 0 for v in got)
    assert sum(math.exp(v) for v in got) <= 1 + 1e-5
    fit = fit_to_language(model, tok, language, [prompt])
    assert fit["valid_mass"] == pytest.approx(sum(math.exp(v) for v in got), abs=1e-3)
    p = language.answers(prompt)
    assert fit["kl"] == pytest.approx(sum(v * (math.log(v) - lq) for v, lq in zip(p.values(), got)), abs=1e-3)


def test_the_spec_knows_every_worlds_references():
    from kdray.spec import TOY_DATA, TOY_MODELS
    from kdray.toy import RECIPES

    assert set(TOY_MODELS) | set(TOY_DATA) == {ref for recipe in RECIPES.values() for ref in recipe.refs}
    assert json.dumps(sorted(RECIPES)) == '["grammar", "toy"]'


def test_a_models_scores_against_the_language_are_consistent(tiny_grammar):
    """score_model's parts agree with one another and with their definitions: NLL = entropy +
    KL (exact over each prompt's answers); validity and coverage are fractions; the same seed
    gives the same samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdray.toy.grammar_eval import score_model
    from kdray.toy.grammar_world import language_of

    tok = AutoTokenizer.from_pretrained(tiny_grammar.teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_grammar.teacher_dir).eval()
    prompts = [r["prompt"] for r in tiny_grammar.rows("heldout")][:6]
    language = language_of(tiny_grammar.meta)
    scores = score_model(model, tok, language, prompts + prompts[:2], samples=4, seed=3)
    assert scores["prompts"] == len(set(prompts)) and scores["samples"] == 4
    for key in ("validity_greedy", "validity_sampled", "coverage", "valid_mass"):
        assert 0.0 <= scores[key] <= 1.0, (key, scores)
    assert scores["kl"] > 0 and scores["nll"] == pytest.approx(scores["entropy"] + scores["kl"], abs=2e-3)
    assert score_model(model, tok, language, prompts, samples=4, seed=3) == scores
