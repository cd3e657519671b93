"""How one example becomes token ids: prompts for the pools, examples for the trainer.

One function, :func:`encode_batch`, decides which tokens of prompt + response the student
is trained and scored on, so the trainer (:class:`TokenizeForTraining`) and
the scorer (the POCL difficulty measurer in :mod:`kdray.pools`) can never disagree:

* the prompt is tokenized by :func:`prompt_token_ids`: wrapped as a user turn by the
  tokenizer's chat template when it has one and the spec allows it (``data.chat_template``),
  else tokenized as the tokenizer does by default (special tokens included). Generation pools
  receive these ids, never the raw text, so a prompt means the same tokens everywhere;
* the response is tokenized without special tokens, and gets EOS appended unless the
  generator stopped it at the length limit (``finish_reason == "length"``): a response that
  ended on its own teaches the student to stop.
"""

from __future__ import annotations

from typing import Any, Callable

from kdray.losses import IGNORE_INDEX  # re-exported: the label of positions no loss covers



def uses_chat_template(tokenizer: Any, setting: str) -> bool:
    """Whether prompts are wrapped by the tokenizer's chat template (``data.chat_template``)."""
    return setting == "auto" and bool(getattr(tokenizer, "chat_template", None))


def prompt_token_ids(tokenizer: Any, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """The token ids of each prompt: as one user turn of the chat template, with the
    generation prompt appended (``chat_template=True``), or plain tokenization."""
    if not chat_template:
        return [list(ids) for ids in tokenizer([str(p) for p in prompts]).input_ids]
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": str(p)}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


def encode_batch(tokenizer: Any, prompts: list[str], responses: list[str], finish_reasons: list[str] | None,
                 chat_template: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per example; one tokenizer call per side."""
    prompt_ids = prompt_token_ids(tokenizer, prompts, chat_template)
    response_ids = tokenizer([str(r) for r in responses], add_special_tokens=False).input_ids
    out = []
    for i in range(len(prompt_ids)):
        resp = list(response_ids[i])
        if finish_reasons is None or str(finish_reasons[i]) != "length":
            resp.append(tokenizer.eos_token_id)
        out.append((list(prompt_ids[i]), resp))
    return out


def pack_examples(pairs: list[tuple[list[int], list[int]]], max_len: int, pad_id: int) -> dict[str, Any]:
    """(prompt ids, response ids) pairs → fixed-length ``input_ids``, ``attention_mask`` and
    ``labels`` (int64 numpy, right-padded, cut at ``max_len``). Labels are the response tokens;
    the prompt and the padding are ``IGNORE_INDEX``, so losses cover only what the student must learn."""
    import numpy as np

    n = len(pairs)
    ids = np.full((n, max_len), pad_id, dtype=np.int64)
    mask = np.zeros((n, max_len), dtype=np.int64)
    labels = np.full((n, max_len), IGNORE_INDEX, dtype=np.int64)
    for i, (prompt, response) in enumerate(pairs):
        seq = (list(prompt) + list(response))[:max_len]
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(prompt) : len(seq)] = seq[len(prompt) :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_token_counter(tokenizer: Any, chat_template: str) -> Callable[[list[str]], list[int]]:
    """A function giving each prompt's token count as the pools will see it
    (:func:`prompt_token_ids` under ``data.chat_template``)."""
    use = uses_chat_template(tokenizer, chat_template)
    return lambda prompts: [len(ids) for ids in prompt_token_ids(tokenizer, prompts, use)]
