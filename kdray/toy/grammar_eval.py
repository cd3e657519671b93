"""A model against the grammar world's language (issue 22): its exact log-probability of each
answer, and the scores that separate distillation methods on held-out prompts.

A model's probability of an answer is that of the answer's tokens and EOS after the prompt
(:func:`answer_logprobs`), the event a sampler that stops at EOS produces; so the answers a
prompt has in the language take at most the model's whole mass, and KL(language ‖ model) over
them is exact (:func:`kdray.toy.grammar_metrics.kl`). Scores (:func:`score_model`), each the
mean over prompts, as issue 22 defines them: validity of greedy and of sampled answers
(temperature 1), coverage of the sampled answers, KL(language ‖ model), the model's expected
NLL on the language's answers, and its mass on valid answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from kdray.toy.grammar import GrammarWorld
from kdray.toy.grammar_metrics import coverage, entropy, expected_nll, kl, validity


def answer_logprobs(model, tokenizer, prompt: str, answers: Sequence[str], batch_size: int = 128) -> list[float]:
    """``log q(answer + EOS | prompt)`` in nats for each bare ``answer`` (the response is
    ``" " + answer``, as the rows hold it), summed over the response's tokens and EOS; a causal
    LM's forward in float32 over right-padded batches, no gradient.

    Returns:
        One float per answer, in order; every one finite and below 0.
    """
    import torch

    from kdray.data.tokenize import IGNORE_INDEX, pack_examples

    prompt_ids = tokenizer(prompt)["input_ids"]
    out: list[float] = []
    for i in range(0, len(answers), batch_size):
        pairs = [(prompt_ids, tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                 for a in answers[i:i + batch_size]]
        batch = {k: torch.as_tensor(v) for k, v in pack_examples(
            pairs, max(len(q) + len(r) for q, r in pairs), tokenizer.pad_token_id).items()}
        with torch.no_grad():
            logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]  # position t predicts token t + 1
        picked = logp[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out += (picked * (labels != IGNORE_INDEX)).sum(-1).tolist()
    return out


def fit_to_language(model, tokenizer, language: GrammarWorld, prompts: Sequence[str]) -> dict[str, float]:
    """How close ``model``'s answer distributions are to the language's, over ``prompts``: the
    means per prompt of the exact KL(language ‖ model), the model's expected NLL on the
    language's answers, the language's entropy (nats each), and the model's mass on the
    prompt's answers (``valid_mass``, at most 1; the rest goes to answers the language does not
    make, or to no end)."""
    sums = {"kl": 0.0, "nll": 0.0, "entropy": 0.0, "valid_mass": 0.0}
    for prompt in prompts:
        p = language.answers(prompt)
        log_q = dict(zip(p, answer_logprobs(model, tokenizer, prompt, list(p))))
        sums["kl"] += kl(p, log_q)
        sums["nll"] += expected_nll(p, log_q)
        sums["entropy"] += entropy(p)
        sums["valid_mass"] += sum(math.exp(v) for v in log_q.values())
    n = max(1, len(prompts))
    return {**{k: round(v / n, 4) for k, v in sums.items()}, "prompts": len(prompts)}


def score_model(model, tokenizer, language: GrammarWorld, prompts: Sequence[str], *, samples: int = 8,
                max_new_tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    """``model`` on the distinct ``prompts``: greedy answers and ``samples`` answers per prompt
    at temperature 1 (top-p 1, seeded by ``seed``), scored against the language.

    Returns:
        ``validity_greedy``, ``validity_sampled``, ``coverage`` (the language's mass on the
        distinct valid answers among a prompt's ``samples``; it grows with ``samples``): each
        the mean over prompts; :func:`fit_to_language`'s ``kl``, ``nll``, ``entropy``,
        ``valid_mass``; and ``prompts``, ``samples``.
    """
    import torch

    from kdray.pools.left_padded import generate_left_padded

    prompts = list(dict.fromkeys(prompts))
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    kw = dict(pad_id=tokenizer.pad_token_id, stop_ids=[tokenizer.eos_token_id], max_new_tokens=max_new_tokens)

    def text(token_ids: list[int]) -> str:
        return tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        greedy = generate_left_padded(model, ids, **kw)
        sampled = generate_left_padded(model, ids, temperature=1.0, n=samples, **kw)
    scores = {"validity_greedy": 0.0, "validity_sampled": 0.0, "coverage": 0.0}
    for prompt, g, s in zip(prompts, greedy, sampled):
        p = language.answers(prompt)
        answers = [text(t) for t, _ in s]
        scores["validity_greedy"] += validity(p, [text(g[0][0])])
        scores["validity_sampled"] += validity(p, answers)
        scores["coverage"] += coverage(p, answers)
    n = max(1, len(prompts))
    return {**{k: v / n for k, v in scores.items()}, **fit_to_language(model, tokenizer, language, prompts),
            "samples": samples}
