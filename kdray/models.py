"""Model references: resolve them, and load models and tokenizers.

A model reference in a spec is a toy model (``toy:teacher``), a local directory written by
``save_pretrained``, or a hub id. Resolution happens on the host that loads the model, so a
driver and its workers agree on what a reference means.

Every way a model can fail to load (a missing or corrupt file, a hub id this node cannot
download, a tokenizer without a pad token, two vocabularies) is a :class:`ModelError` that
names the model, the file and the node.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdray.errors import ModelError, first_line, node
from kdray.spec import TOY_PREFIX

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
#: Files of a checkpoint's weights; a local model directory needs one of them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_FIX = ("give a directory written by save_pretrained (config.json, the tokenizer files, the weights) or a "
        "hub id this node can download (network, HF_TOKEN for gated models)")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What ``from_pretrained`` and ``safe_open`` raise for missing, corrupt or foreign files."""
    from safetensors import SafetensorError

    return (OSError, ValueError, ImportError, KeyError, SafetensorError)


@contextmanager
def loading(what: str, ref: str) -> Iterator[None]:
    """Turn a library's load failure of ``what`` (e.g. "the tokenizer") of model ``ref`` into a
    :class:`ModelError` naming the model, the node and the fix."""
    try:
        yield
    except _load_errors() as exc:
        raise ModelError(f"cannot load {what} of model {ref!r} on node {node()} ({first_line(exc)}); "
                         f"{_FIX}") from None


def resolve_model(ref: str) -> str:
    """Return a path (or hub id) that ``from_pretrained`` and vLLM accept."""
    if ref.startswith(TOY_PREFIX):
        from kdray import toy

        return str(toy.resolve(ref))
    path = Path(ref).expanduser()
    if path.exists():
        return str(path.resolve())
    return ref


def check_model_files(ref: str) -> None:
    """A local model directory must hold its weights (a hub id and a toy model are not checked):
    checked on the driver before any pool or worker tries to load them."""
    if ref.startswith(TOY_PREFIX):
        return
    path = Path(ref).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"model directory {str(path)!r} has no weights (none of {', '.join(WEIGHT_FILES)}); "
                         "save the model there with save_pretrained, or finish copying it")


def load_tokenizer(ref: str, *, need_pad: bool = True) -> Any:
    """The model's tokenizer; with ``need_pad`` (batching for training and scoring) it must have
    a pad token."""
    from transformers import AutoTokenizer

    with loading("the tokenizer", ref):
        tok = AutoTokenizer.from_pretrained(resolve_model(ref))
    if need_pad and tok.pad_token_id is None:
        raise ModelError(
            f"the tokenizer of {ref!r} has no pad token; add one (tokenizer.add_special_tokens"
            "({'pad_token': '<pad>'})) and save it with save_pretrained"
        )
    return tok


def load_causal_lm(ref: str, dtype: str, *, trainable: bool = True) -> Any:
    """Load a causal LM in ``dtype``; a frozen model (``trainable=False``) is put in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    with loading("the weights", ref):
        model = AutoModelForCausalLM.from_pretrained(resolve_model(ref), dtype=getattr(torch, _TORCH_DTYPES[dtype]))
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def load_output_head(ref: str, dtype: str) -> tuple[Any, Any]:
    """The lm_head ``(weight [V, H], bias [V] or None)`` of a causal LM, read from its
    safetensors files without building the model (``hidden`` teacher signal: the workers hold
    only this). A tied head is the input embedding, as the model itself would use."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(resolve_model(ref))
    if not path.is_dir():
        raise ModelError(f"teacher_signal.mode 'hidden' needs the teacher's weights on local disk; {ref!r} is not "
                         "a local directory (download it with save_pretrained first)")
    with loading("the config", ref):
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
    with loading(f"the weight index {index.name}", ref):
        files = json.loads(index.read_text())["weight_map"] if index.exists() else None
    out: dict[str, Any] = {}
    for key, name in wanted.items():
        file = path / (files.get(name, "model.safetensors") if files else "model.safetensors")
        if not file.exists():
            raise ModelError(f"cannot read the lm_head of {ref!r} on node {node()}: {file} is missing (save "
                             "the model with save_pretrained(safe_serialization=True))")
        with loading(f"the lm_head from {file.name}", ref), safe_open(str(file), framework="pt") as fh:
            if name not in fh.keys():
                raise ModelError(f"cannot read the lm_head of {ref!r}: {file} has no tensor {name!r}; save "
                                 "the model with save_pretrained(safe_serialization=True)")
            out[key] = fh.get_tensor(name).to(getattr(torch, _TORCH_DTYPES[dtype]))
    return out["weight"], out.get("bias")


def vocab_size(ref: str) -> int:
    """Rows of the model's output embedding (``config.vocab_size``; may exceed the tokenizer)."""
    from transformers import AutoConfig

    with loading("the config", ref):
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
        raise ModelError(
            f"teacher.model {teacher_ref!r} and student.model {student_ref!r} have different tokenizers "
            f"({len(t_vocab)} vs {len(s_vocab)} tokens; {len(differ)} token↔id pairs differ, e.g. {example}). "
            "kdray distils token by token over one vocabulary: pick a student from the teacher's model family "
            "(same tokenizer)"
        )
    specials = ("eos_token_id", "pad_token_id", "bos_token_id")
    for name in specials:
        if getattr(teacher_tok, name) != getattr(student_tok, name):
            raise ModelError(
                f"the tokenizers of teacher.model {teacher_ref!r} and student.model {student_ref!r} disagree on "
                f"{name} ({getattr(teacher_tok, name)} vs {getattr(student_tok, name)}); save both with the same "
                "special tokens"
            )
    sizes = vocab_size(teacher_ref), vocab_size(student_ref)
    common = min(sizes)
    if common < len(student_tok):
        role, ref = ("teacher", teacher_ref) if sizes[0] < sizes[1] else ("student", student_ref)
        raise ModelError(
            f"the tokenizer has {len(student_tok)} tokens but {role}.model {ref!r} has only {common} output rows; "
            "its embeddings do not cover the vocabulary: resize them (model.resize_token_embeddings) and save it"
        )
    return common
