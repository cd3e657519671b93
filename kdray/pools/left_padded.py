"""Batched Hugging Face ``generate`` on token-id prompts, with vLLM's semantics.

The one place kdray runs ``transformers`` generation: the ``hf`` pool backend
(:class:`kdray.pools.hf.HFGenerator`), DistiLLM's fresh student samples inside a training worker
(:mod:`kdray.train.replay`), the repro harness (:mod:`kdray.repro.run`) and the toy world's
evaluation (:mod:`kdray.toy.train`).

Prompts are left-padded, so every prompt ends where generation starts. Temperature 0 is greedy;
sampling uses the whole vocabulary (``top_k`` off) with nucleus ``top_p``, as vLLM's defaults. A
response ends at its first stop id (kept in the ids, finish reason ``"stop"``) or after
``max_new_tokens`` (``"length"``), and never runs past ``max_model_len`` tokens of prompt plus
response, as vLLM's engine never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def generate_left_padded(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    max_model_len: int | None = None,
    ignore_eos: bool = False,
    synced_gpus: bool = False,
    device: Any = None,
) -> list[list[tuple[list[int], str]]]:
    """``n`` responses per prompt from one ``model.generate`` call.

    Args:
        model: a ``transformers`` causal LM (under a DeepSpeed engine: ``engine.module``).
        prompts: token ids per prompt (not padded).
        pad_id: id written into the padding (masked out, so any id will do).
        stop_ids: ids that end a response (the tokenizer's EOS and the model's).
        max_new_tokens: longest response, in tokens.
        temperature, top_p: sampling; temperature 0 is greedy (every sample the same).
        n: responses per prompt.
        max_model_len: longest prompt + response, in tokens (None: no limit).
        ignore_eos: generate exactly ``max_new_tokens`` tokens, past any stop id (benchmarks).
        synced_gpus: keep ranks in step under ZeRO-3 (every rank must call generate).
        device: where the inputs go (default: the model's first parameter's device).

    Returns:
        Per prompt, ``n`` pairs of (response ids, finish reason ``"stop"`` or ``"length"``).
    """
    import torch
    from transformers import GenerationConfig

    if device is None:
        device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    greedy = temperature == 0.0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        num_return_sequences=1 if greedy else n,
        eos_token_id=None if ignore_eos else list(stop_ids),
        pad_token_id=pad_id,
        **({} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}),
    )
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             synced_gpus=synced_gpus)
    new = out[:, width:].cpu().tolist()
    stops = set() if ignore_eos else set(stop_ids)
    results: list[list[tuple[list[int], str]]] = []
    for row, p in enumerate(prompts):
        room = max_new_tokens if max_model_len is None else min(max_new_tokens, max_model_len - len(p))
        samples = []
        for seq in (new[row: row + 1] * n if greedy else new[row * n: (row + 1) * n]):
            end = next((j + 1 for j, t in enumerate(seq) if t in stops), None)
            if end is not None and end <= room:
                samples.append((seq[:end], "stop"))
            else:
                samples.append((seq[:room], "length"))
        results.append(samples)
    return results
