"""The grammar world's language (kdray.toy.grammar): exact probabilities that sum to 1 over
each prompt's answers and agree with sampling; and its metrics (kdray.toy.grammar_metrics)
on hand-made cases."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from kdray.toy.data import make_prompt
from kdray.toy.grammar import CONTINUE_LENGTHS, CYCLE_P, FAMILIES, LIST_LENGTHS, GrammarWorld
from kdray.toy.grammar_metrics import coverage, entropy, expected_nll, kl, validity


@pytest.fixture(scope="module")
def world() -> GrammarWorld:
    return GrammarWorld(seed=0)


def _prompts(world: GrammarWorld, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_prompt(world.sample_question(rng, family).text) for _ in range(n) for family in FAMILIES]


def test_every_prompts_answers_sum_to_one_and_have_real_entropy(world):
    every = [make_prompt(q.text) for qs in world.questions.values() for q in qs] + [
        p for p in _prompts(world, 40, seed=1) if "continue" in p]
    assert len(every) > 100
    for prompt in every:
        answers = world.answers(prompt)
        assert math.fsum(answers.values()) == pytest.approx(1.0, abs=1e-12), prompt
        assert len(answers) >= 6 and entropy(answers) > 1.0, (prompt, answers)
        # probability() parses any string: it agrees with the enumeration, answer by answer
        assert all(world.probability(prompt, " " + a) == p for a, p in answers.items())


def test_probabilities_follow_the_families_rules(world):
    # continue: a 2-cycle shown ending in "blue"; the next word follows the cycle with CYCLE_P
    prompt = make_prompt("continue red blue red blue")
    assert world.probability(prompt, " red") == pytest.approx(CONTINUE_LENGTHS[0] * CYCLE_P)
    assert world.probability(prompt, " blue red blue") == pytest.approx(  # repeat, next, next
        CONTINUE_LENGTHS[2] * (1 - CYCLE_P) * CYCLE_P * CYCLE_P)
    assert world.probability(prompt, " green") == 0.0 and world.probability(prompt, " red blue red blue") == 0.0
    # list: Plackett-Luce over the matching items' weights
    (category, verb), items = next(iter(world.has.items()))
    prompt = make_prompt(f"list {category} that {verb}")
    a, b = items[0], items[1]
    total = sum(world.weight[i] for i in items)
    assert world.probability(prompt, f" {a} {b}") == pytest.approx(
        LIST_LENGTHS[1] * world.weight[a] / total * world.weight[b] / (total - world.weight[a]))
    assert world.probability(prompt, f" {a} {a}") == 0.0  # without replacement
    outsider = next(i for i in world.weight if i not in items)
    assert world.probability(prompt, f" {outsider}") == 0.0
    # malformed text is no answer; a question of another world is an error
    assert world.probability(prompt, f"  {a}") == 0.0 and world.probability(prompt, "") == 0.0
    with pytest.raises(ValueError, match="not a question of the grammar world"):
        world.probability(make_prompt("describe unicorn"), " red unicorn")


def test_samples_follow_the_exact_distribution(world):
    prompt = make_prompt(world.questions["describe"][3].text)
    rng = random.Random(7)
    n = 20_000
    counts = Counter(world.sample(prompt, rng) for _ in range(n))
    answers = world.answers(prompt)
    assert set(counts) <= set(answers)
    for a, p in answers.items():  # within 5 standard errors
        assert abs(counts[a] / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (a, p, counts[a] / n)


def test_the_world_is_fixed_by_its_seed(world):
    assert GrammarWorld(seed=0).rows(50, seed=3) == world.rows(50, seed=3)
    assert GrammarWorld(seed=1).weight != world.weight
    rows = world.rows(200, seed=4)
    assert {r["family"] for r in rows} == set(FAMILIES)
    assert all(r["response"].startswith(" ") and world.is_valid(r["prompt"], r["response"]) for r in rows)


def test_metrics_on_a_hand_made_case():
    p = {"a": 0.5, "b": 0.25, "c": 0.25}
    samples = ["a", "a", "b", "x", "b", "zz"]
    assert validity(p, samples) == pytest.approx(4 / 6)
    assert coverage(p, samples) == pytest.approx(0.75)  # a and b, each once however often sampled
    assert coverage(p, ["x"]) == 0.0 and coverage(p, ["c", "b", "a"]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        validity(p, [])
    assert entropy(p) == pytest.approx(1.5 * math.log(2))
    log_q = {"a": math.log(0.25), "b": math.log(0.25), "c": math.log(0.25), "x": math.log(0.25)}
    # KL = 0.5 log(0.5/0.25) + 0.25 log 1 + 0.25 log 1 = 0.5 log 2; NLL = H(p) + KL = 2 log 2
    assert kl(p, log_q) == pytest.approx(0.5 * math.log(2))
    assert expected_nll(p, log_q) == pytest.approx(2 * math.log(2))
    assert kl(p, {k: math.log(v) for k, v in p.items()}) == pytest.approx(0.0, abs=1e-15)
    assert kl(p, {"a": 0.0, "b": -1.0}) == math.inf  # c gets no mass
    assert expected_nll(p, {**log_q, "c": -math.inf}) == math.inf
