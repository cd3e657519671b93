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


def load_output_head(ref: str, dtype: str) -> tuple[Any, Any]:
    """The lm_head ``(weight [V, H], bias [V] or None)`` of a causal LM, read from its
    safetensors files without building the model (``hidden`` teacher signal: the workers hold
    only this). A tied head is the input embedding, as the model itself would use."""
    import json

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(resolve_model(ref))
    if not path.is_dir():
        raise KdrayError(f"teacher_signal.mode 'hidden' needs the teacher's weights on local disk; {ref!r} is not "
                         "a local directory (download it with save_pretrained first)")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()
    head = skeleton.get_output_embeddings()
    names = {id(p): n for n, p in skeleton.named_parameters()}  # a tied weight keeps the embedding's name
    wanted = {"weight": names[id(head.weight)]}
    if getattr(head, "bias", None) is not None:
        wanted["bias"] = names[id(head.bias)]
    index = path / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else None
    out: dict[str, Any] = {}
    for key, name in wanted.items():
        file = path / (files[name] if files else "model.safetensors")
        if not file.exists():
            raise KdrayError(f"cannot read the lm_head of {ref!r}: {file.name} is missing (save it with "
                             "save_pretrained(safe_serialization=True))")
        with safe_open(str(file), framework="pt") as fh:
            if name not in fh.keys():
                raise KdrayError(f"cannot read the lm_head of {ref!r}: {file.name} has no tensor {name!r}")
            out[key] = fh.get_tensor(name).to(getattr(torch, _TORCH_DTYPES[dtype]))
    return out["weight"], out.get("bias")


def vocab_size(ref: str) -> int:
    """Rows of the model's output embedding (``config.vocab_size``; may exceed the tokenizer)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(ref))
    return int(getattr(config, "vocab_size", None) or config.get_text_config().vocab_size)


def shared_vocab_size(teacher_ref: str, student_ref: str) -> int:
    """The vocabulary both models' logits are compared over, or a clear error.

    Teacher and student must tokenize identically (the same token ↔ id map and special
    tokens): distillation compares their distributions id by id. Their embedding matrices may
    still differ in size, padded past the tokenizer (Qwen2.5: 151,936 vs 152,064 rows for
    151,665 tokens); then the logits are compared over the first ``min`` rows, which hold every
    real token, and the padding rows are sliced off."""
    teacher_tok, student_tok = load_tokenizer(teacher_ref), load_tokenizer(student_ref)
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])
        example = ", ".join(f"{tok!r}→{i}" for tok, i in differ[:3])
        raise KdrayError(
            f"teacher.model {teacher_ref!r} and student.model {student_ref!r} have different tokenizers "
            f"({len(t_vocab)} vs {len(s_vocab)} tokens; {len(differ)} token↔id pairs differ, e.g. {example}). "
            "kdray distils token by token over one vocabulary: pick a student from the teacher's model family "
            "(same tokenizer)"
        )
    specials = ("eos_token_id", "pad_token_id", "bos_token_id")
    for name in specials:
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            raise KdrayError(
                f"teacher.model and student.model tokenizers disagree on {name} ({getattr(teacher_tok, name)} vs "
                f"{getattr(student_tok, name)}); save both with the same special tokens"
            )
    sizes = vocab_size(teacher_ref), vocab_size(student_ref)
    common = min(sizes)
    if common < len(student_tok):
        raise KdrayError(
            f"the tokenizer has {len(student_tok)} tokens but the {'teacher' if sizes[0] < sizes[1] else 'student'} "
            f"model has only {common} output rows; its embeddings do not cover the vocabulary (resize_token_embeddings)"
        )
    return common
