"""A miniature language with a known distribution: prompts whose answers carry real entropy, the
exact probability of any answer, and whether the language accepts it (issue 22's second toy
world; the first, :mod:`kdray.toy.data`, has one right answer per prompt).

Prompts and responses follow the toy world's format (``"Q: <question>\\nA:"``, a response that
starts with a space). Three task families, each an unambiguous generative process, so an
answer's probability is the product of the choices that made it and the answers of a prompt
can be listed with their probabilities (:meth:`GrammarWorld.answers`)::

    describe  "describe otter"          -> "brown otter" | "small brown otter" | "furry otter" ...
              a template (color / size color / texture), then each slot from the item's own
              distribution; the last word is the item.
    list      "list animals that swim"  -> "otter" | "frog otter" | "swan frog otter" ...
              k items (1-3) in order, drawn without replacement by the items' weights
              (Plackett-Luce: each pick is proportional to the weights of those left).
    continue  "continue red blue red"   -> "blue" | "blue red" | "red blue" ...
              1-3 words; each follows the shown cycle (``CYCLE_P``) or repeats the last word.

Every choice's probabilities come from the world's ``seed`` (item weights, slot distributions,
which items have which property): the same seed gives the same language, word for word.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType

from kdray.toy.data import make_prompt, question_of

FAMILIES = ("describe", "list", "continue")

#: Items by category; each category has its own property verbs (``list <category> that <verb>``).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animals": ("otter", "frog", "swan", "eagle", "horse", "goat", "squirrel", "salmon", "owl", "lizard",
                "beaver", "rabbit"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "ladder", "shovel", "rake", "pliers", "axe",
              "brush", "clamp"),
    "foods": ("apple", "bread", "cheese", "lemon", "honey", "rice", "carrot", "plum", "pepper", "onion",
              "melon", "walnut"),
    "vehicles": ("truck", "boat", "bicycle", "train", "canoe", "tractor", "scooter", "wagon", "ferry",
                 "glider", "van", "sled"),
}
PROPERTIES: dict[str, tuple[str, ...]] = {
    "animals": ("swim", "fly", "climb", "run"),
    "tools": ("cut", "lift", "dig", "grip"),
    "foods": ("grow", "keep", "melt", "spread"),
    "vehicles": ("float", "carry", "glide", "haul"),
}
COLORS = ("red", "blue", "green", "brown", "black", "white", "yellow", "grey", "orange", "pink")
SIZES = ("small", "large", "tiny", "long", "short")
TEXTURES = ("smooth", "rough", "furry", "shiny", "soft", "wooden")
#: describe's templates: the slots before the item.
TEMPLATES: tuple[tuple[str, ...], ...] = (("color",), ("size", "color"), ("texture",))
#: list: the probability of k items (cut to the items that match, and renormalised).
LIST_LENGTHS = (0.3, 0.4, 0.3)
#: continue: the probability of 1, 2, 3 words, and that a word follows the cycle (else it repeats).
CONTINUE_LENGTHS = (0.3, 0.4, 0.3)
CYCLE_P = 0.8


def _normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


@dataclass(frozen=True)
class Question:
    """A parsed question: its family and arguments."""

    family: str
    args: tuple[str, ...]

    @property
    def text(self) -> str:
        if self.family == "list":
            return f"list {self.args[0]} that {self.args[1]}"
        return " ".join((self.family, *self.args))


class GrammarWorld:
    """The language of one ``seed``: prompts, exact answer distributions, samples.

    Raises:
        ValueError: a prompt that is not one of this world's questions
            (:meth:`parse_prompt`).
    """

    def __init__(self, seed: int = 0):
        self.seed = seed
        self._answers: dict[str, Mapping[str, float]] = {}
        rng = random.Random(seed)
        self.weight: dict[str, float] = {}
        self.slots: dict[str, dict[str, dict[str, float]]] = {}  # item → slot → word → p
        self.template_p: dict[str, list[float]] = {}
        self.has: dict[tuple[str, str], tuple[str, ...]] = {}  # (category, verb) → items, in category order
        for category, items in CATEGORIES.items():
            for rank, item in enumerate(rng.sample(items, len(items)), start=1):
                self.weight[item] = 1.0 / rank  # Zipf-like popularity within the category
            for item in items:
                self.template_p[item] = _normalised([rng.uniform(0.5, 2.0) for _ in TEMPLATES])
                self.slots[item] = {slot: self._slot_distribution(rng, words, n)
                                    for slot, words, n in (("color", COLORS, 4), ("size", SIZES, 3),
                                                           ("texture", TEXTURES, 3))}
            verbs = PROPERTIES[category]
            # Every item has one or two verbs; every verb has 4-7 items (the list family's choices).
            while True:
                chosen = {item: set(rng.sample(verbs, rng.choice((1, 2)))) for item in items}
                counts = [sum(v in c for c in chosen.values()) for v in verbs]
                if all(4 <= n <= 7 for n in counts):
                    break
            for verb in verbs:
                self.has[(category, verb)] = tuple(item for item in items if verb in chosen[item])
        self.item_category = {item: c for c, items in CATEGORIES.items() for item in items}

    @staticmethod
    def _slot_distribution(rng: random.Random, words: tuple[str, ...], n: int) -> dict[str, float]:
        picked = rng.sample(words, n)
        return dict(zip(picked, _normalised([1.0 / (i + 1) for i in range(n)])))

    # -- questions ----------------------------------------------------------------------------

    @cached_property
    def questions(self) -> dict[str, list[Question]]:
        """Every question of each family except ``continue``'s, whose are drawn (:meth:`sample_question`)."""
        return {"describe": [Question("describe", (item,)) for item in self.weight],
                "list": [Question("list", key) for key in self.has]}

    def sample_question(self, rng: random.Random, family: str | None = None) -> Question:
        """A question of ``family`` (None: uniform over :data:`FAMILIES`), uniform within it."""
        family = family or rng.choice(FAMILIES)
        if family == "continue":
            cycle = rng.sample(COLORS, rng.choice((2, 3)))
            shown = [cycle[i % len(cycle)] for i in range(rng.randint(len(cycle) + 1, 6))]
            return Question("continue", tuple(shown))
        return rng.choice(self.questions[family])

    def parse_prompt(self, prompt: str) -> Question:
        """The :class:`Question` of a ``"Q: …\\nA:"`` prompt of this world (ValueError otherwise)."""
        words = question_of(prompt).split(" ")
        family, args = words[0], tuple(words[1:])
        if family == "describe" and len(args) == 1 and args[0] in self.weight:
            return Question(family, args)
        if family == "list" and len(args) == 3 and args[1] == "that" and (args[0], args[2]) in self.has:
            return Question(family, (args[0], args[2]))
        if family == "continue" and self._cycle(args) is not None:
            return Question(family, args)
        raise ValueError(f"not a question of the grammar world: {prompt!r}")

    @staticmethod
    def _cycle(shown: tuple[str, ...]) -> tuple[str, ...] | None:
        """The cycle a ``continue`` question shows (2 or 3 distinct colors, shown past one turn)."""
        for period in (2, 3):
            cycle = shown[:period]
            if (len(set(cycle)) == period and len(shown) > period and set(shown) <= set(COLORS)
                    and all(w == cycle[i % period] for i, w in enumerate(shown))):
                return cycle
        return None

    # -- the distribution ---------------------------------------------------------------------

    def probability(self, prompt: str, response: str) -> float:
        """The exact probability of ``response`` (one leading space, words split by single
        spaces, as the rows hold it; or the bare answer) given ``prompt``; 0.0 when the language
        does not make it."""
        q = self.parse_prompt(prompt)
        text = response[1:] if response.startswith(" ") else response
        words = text.split(" ")
        if not text or "" in words:
            return 0.0
        return {"describe": self._p_describe, "list": self._p_list, "continue": self._p_continue}[q.family](q, words)

    def is_valid(self, prompt: str, response: str) -> bool:
        return self.probability(prompt, response) > 0.0

    def _p_describe(self, q: Question, words: list[str]) -> float:
        item = q.args[0]
        if words[-1] != item:
            return 0.0
        for t, slots in enumerate(TEMPLATES):
            if len(slots) == len(words) - 1 and all(w in self.slots[item][s] for s, w in zip(slots, words)):
                return self.template_p[item][t] * math.prod(self.slots[item][s][w] for s, w in zip(slots, words))
        return 0.0

    def _list_lengths(self, n_items: int) -> list[float]:
        return _normalised(list(LIST_LENGTHS[:n_items]))

    def _p_list(self, q: Question, words: list[str]) -> float:
        items = self.has[q.args]
        lengths = self._list_lengths(len(items))
        if len(words) > len(lengths) or len(set(words)) != len(words) or not set(words) <= set(items):
            return 0.0
        p, left = lengths[len(words) - 1], sum(self.weight[i] for i in items)
        for w in words:
            p *= self.weight[w] / left
            left -= self.weight[w]
        return p

    def _p_continue(self, q: Question, words: list[str]) -> float:
        cycle = self._cycle(q.args)
        if len(words) > len(CONTINUE_LENGTHS):
            return 0.0
        p, at = CONTINUE_LENGTHS[len(words) - 1], (len(q.args) - 1) % len(cycle)
        for w in words:
            if w == cycle[(at + 1) % len(cycle)]:
                p, at = p * CYCLE_P, at + 1
            elif w == cycle[at % len(cycle)]:
                p *= 1 - CYCLE_P
            else:
                return 0.0
        return p

    def answers(self, prompt: str) -> Mapping[str, float]:
        """Every answer the language makes for ``prompt`` (bare, no leading space) with its
        probability; they sum to 1. (Listed once per prompt: the result is kept.)"""
        if prompt not in self._answers:
            self._answers[prompt] = MappingProxyType(self._list_answers(prompt))
        return self._answers[prompt]

    def _list_answers(self, prompt: str) -> dict[str, float]:
        q = self.parse_prompt(prompt)
        if q.family == "describe":
            item = q.args[0]
            candidates = [[*words, item] for slots in TEMPLATES for words in self._fill(item, slots)]
        elif q.family == "list":
            items = self.has[q.args]
            candidates = [seq for k in range(1, len(self._list_lengths(len(items))) + 1)
                          for seq in _sequences(items, k)]
        else:
            cycle = self._cycle(q.args)
            candidates = [seq for k in range(1, len(CONTINUE_LENGTHS) + 1) for seq in _sequences(cycle, k, repeat=True)]
        out = {" ".join(c): self.probability(prompt, " ".join(c)) for c in candidates}
        return {a: p for a, p in out.items() if p > 0.0}

    def _fill(self, item: str, slots: tuple[str, ...]) -> list[list[str]]:
        fills: list[list[str]] = [[]]
        for slot in slots:
            fills = [f + [w] for f in fills for w in self.slots[item][slot]]
        return fills

    def sample(self, prompt: str, rng: random.Random) -> str:
        """One answer to ``prompt`` drawn from the language (bare, no leading space)."""
        dist = self.answers(prompt)
        return rng.choices(list(dist), weights=list(dist.values()))[0]

    def rows(self, n: int, seed: int, prefix: str = "g") -> list[dict[str, str]]:
        """``n`` rows in the toy world's format (``id``, ``family``, ``prompt``, ``response``:
        a sample of the language, with its leading space), from ``seed``."""
        rng = random.Random(seed)
        out = []
        for i in range(n):
            q = self.sample_question(rng)
            prompt = make_prompt(q.text)
            out.append({"id": f"{prefix}-{i}", "family": q.family, "prompt": prompt,
                        "response": " " + self.sample(prompt, rng)})
        return out


def _sequences(words: tuple[str, ...], k: int, *, repeat: bool = False) -> list[list[str]]:
    """Every length-``k`` sequence over ``words`` (distinct words unless ``repeat``)."""
    seqs: list[list[str]] = [[]]
    for _ in range(k):
        seqs = [s + [w] for s in seqs for w in words if repeat or w not in s]
    return seqs
