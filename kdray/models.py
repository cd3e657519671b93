"""Model references: resolve them, and load models and tokenizers.

A model reference in a spec is a toy model (``toy:teacher``), a local directory written by
``save_pretrained``, or a hub id. Resolution happens on the host that loads the model, so a
driver and its workers agree on what a reference means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.errors import KdrayError
from kdray.spec import TOY_PREFIX

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_model(ref: str) -> str:
    """Return a path (or hub id) that ``from_pretrained`` and vLLM accept."""
    if ref.startswith(TOY_PREFIX):
        from kdray import toy

        return str(toy.resolve(ref))
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    return ref


def load_tokenizer(ref: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise KdrayError(f"cannot load the tokenizer of {ref!r}: {exc}") from None
    if tok.pad_token_id is None:
        raise KdrayError(
            f"the tokenizer of {ref!r} has no pad token; add one (tokenizer.add_special_tokens"
            "({'pad_token': '<pad>'})) and save it with save_pretrained"
        )
    return tok


def load_causal_lm(ref: str, dtype: str, *, trainable: bool = True) -> Any:
    """Load a causal LM in ``dtype``; a frozen model (``trainable=False``) is put in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, _TORCH_DTYPES[dtype]))
    except OSError as exc:
        raise KdrayError(f"cannot load model {ref!r}: {exc}") from None
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model
