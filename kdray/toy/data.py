"""Synthetic instruction data with verifiable answers.

Row format (one JSON object per line)::

    {"id": "sorting-17", "family": "sorting",
     "prompt": "Q: sort 5 3 8 1\\nA:", "response": " 1 3 5 8"}

The separator space between ``A:`` and the answer lives at the START of
``response``; the prompt ends with ``A:`` and no trailing whitespace. The
tokenizer splits so that ``encode(prompt) + encode(response)`` equals
``encode(prompt + response)`` (see :mod:`kdray.toy.tokenizer`). Answers are
space-separated symbols where that is natural, so ROUGE-L gives partial
credit; exact match compares ``response.strip()``.

Families (all symbols are single digits or lowercase letters)::

    arithmetic  "add 4 7 2"        -> "13"           sum of 2-4 digits
    reversal    "reverse k d a m"  -> "m a d k"      3-6 letters
    sorting     "sort 5 3 8 1"     -> "1 3 5 8"      3-6 digits, ascending
    counting    "count x q x"      -> "3"            how many items (2-9 letters)
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Iterable
from pathlib import Path

FAMILIES = ("arithmetic", "reversal", "sorting", "counting")
PROMPT_PREFIX = "Q: "
PROMPT_SUFFIX = "\nA:"


def make_prompt(question: str) -> str:
    return f"{PROMPT_PREFIX}{question}{PROMPT_SUFFIX}"


def question_of(prompt: str) -> str:
    if not (prompt.startswith(PROMPT_PREFIX) and prompt.endswith(PROMPT_SUFFIX)):
        raise ValueError(f"not a toy prompt: {prompt!r}")
    return prompt[len(PROMPT_PREFIX) : -len(PROMPT_SUFFIX)]


def _arithmetic(rng: random.Random) -> str:
    return "add " + " ".join(rng.choices(string.digits, k=rng.randint(2, 4)))


def _reversal(rng: random.Random) -> str:
    letters = rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))
    return "reverse " + " ".join(letters)


def _sorting(rng: random.Random) -> str:
    digits = rng.choices(string.digits, k=rng.randint(3, 6))
    return "sort " + " ".join(digits)


def _counting(rng: random.Random) -> str:
    return "count " + " ".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9)))


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "reversal": _reversal,
    "sorting": _sorting,
    "counting": _counting,
}


def solve(prompt: str) -> str:
    """The reference answer (without the leading separator space) for a toy prompt."""
    words = question_of(prompt).split(" ")
    op, args = words[0], words[1:]
    if op == "add":
        return str(sum(map(int, args)))
    if op == "reverse":
        return " ".join(reversed(args))
    if op == "sort":
        return " ".join(sorted(args))
    if op == "count":
        return str(len(args))
    raise ValueError(f"unknown toy task {op!r} in {prompt!r}")


def generate_splits(
    n_train_per_family: int | dict[str, int] = 1000, n_heldout_per_family: int = 100, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Deterministic train / held-out rows; no held-out prompt occurs in train.

    Each family draws unique prompts from its own seeded stream; the first
    ``n_train`` become train rows and the next ``n_heldout`` held-out rows, so
    ids (``<family>-<n>``) are unique across both splits.
    """
    train: list[dict] = []
    heldout: list[dict] = []
    for fi, family in enumerate(FAMILIES):
        rng = random.Random(seed * 1000 + fi)
        seen: set[str] = set()
        rows: list[dict] = []
        n_train = (
            n_train_per_family[family] if isinstance(n_train_per_family, dict) else n_train_per_family
        )
        need = n_train + n_heldout_per_family
        tries = 0
        while len(rows) < need:
            tries += 1
            if tries > need * 50:
                raise RuntimeError(f"cannot draw {need} unique {family} prompts")
            prompt = make_prompt(_GENERATORS[family](rng))
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(
                {"id": f"{family}-{len(rows)}", "family": family, "prompt": prompt,
                 "response": " " + solve(prompt)}
            )
        train += rows[:n_train]
        heldout += rows[n_train:]
    random.Random(seed).shuffle(train)
    return train, heldout


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
