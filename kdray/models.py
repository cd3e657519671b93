"""Model references: resolve them, and load models and tokenizers.

A model reference in a spec is a toy model (``toy:teacher``), a local directory written by
``save_pretrained``, or a hub id. Resolution happens on the host that loads the model, so a
driver and its workers agree on what a reference means.

Every way a model can fail to load (a missing or corrupt file, a hub id this node cannot
download, a tokenizer without a pad token, two vocabularies) is a :class:`ModelError` that
names the model, the file and the node. A local directory's files are checked by
:func:`model_files_problem`: its JSON and text files must be UTF-8 (and JSON), its weight files
complete (a safetensors file as long as its header says, a ``.bin`` a whole zip archive).
"""

from __future__ import annotations

import json
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from kdray.errors import KdrayError, ModelError, first_line, node, utf8_fault
from kdray.spec import TOY_PREFIX
from kdray.spec.refs import is_local_model_path

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
#: Files of a checkpoint's weights; a local model directory needs one of them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: Text files of a model directory that the libraries read (the ``.json`` ones are JSON).
TEXT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
              "chat_template.jinja", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_REFETCH = "copy or download the model again, or write it again with save_pretrained"
_FIX = ("give a directory written by save_pretrained (config.json, the tokenizer files, the weights) or a "
        "hub id this node can download (network, HF_TOKEN for gated models)")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What ``from_pretrained`` and ``safe_open`` raise for missing, corrupt or foreign files."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    # StrictDataclassError: a config field of the wrong type (transformers validates configs)
    return (OSError, ValueError, ImportError, KeyError, SafetensorError, StrictDataclassError)


@contextmanager
def loading(what: str, ref: str) -> Iterator[None]:
    """Turn a library's load failure of ``what`` (e.g. "the tokenizer") of model ``ref`` into a
    :class:`ModelError` naming the model, the node and the fix; for a local directory, also the
    file that is corrupt or cut short (:func:`model_files_problem`), whatever the library raised."""
    try:
        yield
    except KdrayError:  # resolve_model's own: the path missing on this node, another toy world
        raise
    except Exception as exc:
        path = Path(ref if ref.startswith(TOY_PREFIX) else resolve_model(ref))  # a toy model is kdray's
        problem = model_files_problem(path) if path.is_dir() else None
        if problem is None and not isinstance(exc, _load_errors()):
            raise  # no file is at fault: a kdray bug
        if problem:
            fix = f"{problem}; {_REFETCH}"
        elif path.is_dir():  # a local model: not a download problem
            fix = f"the files in {path} are not a model the library can read; {_REFETCH}"
        else:
            fix = _FIX
        raise ModelError(f"cannot load {what} of model {ref!r} on node {node()} ({first_line(exc)}); {fix}") from None


def _json_or_text_problem(file: Path) -> tuple[Any, str | None]:
    """(the decoded JSON or None, what is wrong with ``file`` or None)."""
    try:
        raw = file.read_bytes()
    except OSError as exc:
        return None, f"cannot read {file}: {exc.strerror}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"{file} is not UTF-8 text: {utf8_fault(raw, exc)}"
    if file.suffix != ".json":
        return None, None
    try:
        decoded = json.loads(text)
        if not isinstance(decoded, dict):  # every JSON file of a checkpoint is an object
            return None, f"{file} holds a JSON {type(decoded).__name__}, not an object of fields"
        return decoded, None
    except json.JSONDecodeError as exc:
        ends = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")  # open at the end
        cut = " (the file ends there: it is cut short)" if ends else ""
        msg = exc.msg.removesuffix(" at")  # "Invalid control character at", "Unterminated string starting at"
        return None, f"{file} is not valid JSON: {msg} at line {exc.lineno}, column {exc.colno}{cut}"
    except RecursionError:
        return None, f"{file} is not valid JSON: nested too deeply"


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte little-endian header length N, N bytes of JSON header,
    then the tensors' bytes up to the largest ``data_offsets`` end the header lists
    (https://github.com/huggingface/safetensors#format): a shorter file is cut short."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{file} is cut short: {size} bytes, fewer than the 8 of a safetensors header length"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return (f"{file} is cut short or not a safetensors file ({size} bytes; its first 8 bytes "
                        f"say {n} bytes of header follow)")
            header = json.loads(fh.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except OSError as exc:
        return f"cannot read {file}: {exc.strerror}"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return f"{file} is not a safetensors file (its header is not a JSON table of tensors)"
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{file} is cut short: {size} bytes, its header needs {need} ({need - size} missing)"
    return None


def _bin_problem(file: Path) -> str | None:
    """A ``torch.save`` file (a zip archive; an old pickle-only file is not checked)."""
    try:
        with file.open("rb") as fh:
            if fh.read(2) != b"PK":
                return None
        zipfile.ZipFile(file).close()
    except OSError as exc:
        return f"cannot read {file}: {exc.strerror}"
    except zipfile.BadZipFile as exc:
        return f"{file} is cut short or corrupt (not a whole zip archive: {exc})"
    return None


def model_files_problem(path: Path) -> str | None:
    """What is wrong with the files of the local model directory ``path``, or None: the first of
    its :data:`TEXT_FILES` that is not UTF-8 (line, column, byte offset) or not JSON (line,
    column), or a weight file that is missing from its index, cut short or corrupt. Reads only
    the text files and the weights' headers."""
    decoded: dict[str, Any] = {}
    for name in TEXT_FILES:
        if (path / name).is_file():
            decoded[name], problem = _json_or_text_problem(path / name)
            if problem:
                return problem
    weights = [name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in decoded:
            weight_map = decoded[index].get("weight_map") if isinstance(decoded[index], dict) else None
            if not isinstance(weight_map, dict):
                return f"{path / index} has no weight_map (the table of which file holds which tensor)"
            for shard in sorted(set(map(str, weight_map.values()))):
                if not (path / shard).is_file():
                    return f"{path / index} lists {shard}, which is missing from {path}"
                weights.append(shard)
    for name in weights:
        problem = _safetensors_problem(path / name) if name.endswith(".safetensors") else _bin_problem(path / name)
        if problem:
            return problem
    return None


def resolve_model(ref: str) -> str:
    """Return a path (or hub id) that ``from_pretrained`` and vLLM accept, on this node.

    A local path (:func:`~kdray.spec.refs.is_local_model_path`: absolute, ``./``, ``../``, ``~``,
    or not of the form ``org/name``) is this node's absolute path; a hub id is returned as is.

    Raises:
        ModelError: a local path that does not exist on this node, naming the path, the node
            (host, Ray node id and IP) and the fix, before any library can take it for a hub id.
        ToyWorldError: a toy model whose world on this node is not the driver's
            (:func:`kdray.toy.resolve`).
    """
    if ref.startswith(TOY_PREFIX):
        from kdray import toy

        return str(toy.resolve(ref))
    if not is_local_model_path(ref):
        return ref
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelError(missing_model_message(ref, path))
    return str(path.resolve())


def missing_model_message(ref: str, path: Path) -> str:
    """The message for local model path ``ref`` (``path`` expanded) missing on this node."""
    rel = "" if path.is_absolute() else f", relative to this process's directory {Path.cwd()}"
    return (f"model {ref!r} is a local path, and {path.absolute()} does not exist on node {node()}{rel}; every node "
            "that loads a model (the generation pool's replicas, every trainer) reads it at the same path: put it "
            "on storage every node mounts at the same path (e.g. /shared, see cluster/README.md), or copy the "
            "directory save_pretrained wrote to that path on every node; a hub id is written org/name")


def check_model_files(ref: str) -> None:
    """A local model directory must hold its weights, whole, and readable config and tokenizer
    files (:func:`model_files_problem`; a hub id and a toy model are not checked): checked on the
    driver before any pool or worker tries to load them. Raises :class:`ModelError` naming the
    file and the fix, or the node where a local path does not exist."""
    if ref.startswith(TOY_PREFIX) or not is_local_model_path(ref):
        return
    path = Path(resolve_model(ref))  # a ModelError naming this node when it is missing here
    if not path.is_dir():
        raise ModelError(f"model {ref!r} is {path}, which is a file on node {node()}; give the directory that "
                         "save_pretrained wrote")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(f"model directory {str(path)!r} has no weights (none of {', '.join(WEIGHT_FILES)}); "
                         "save the model there with save_pretrained, or finish copying it")
    if not any(f.name.startswith(("tokenizer", "vocab")) or f.suffix in (".model", ".tiktoken") for f in path.iterdir()):
        raise ModelError(f"model directory {str(path)!r} has no tokenizer (tokenizer.json, ...); save it there too")
    problem = model_files_problem(path)
    if problem:
        raise ModelError(f"model directory {str(path)!r}: {problem}; {_REFETCH}")


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


def stop_token_ids(tokenizer: Any, ref: str) -> list[int]:
    """The ids generation stops at, as vLLM gathers them: ``tokenizer``'s EOS plus every EOS id of
    the model's generation config (``generation_config.json``, else the one ``transformers``
    derives from ``config.json``; read without loading weights)."""
    from transformers import AutoConfig, GenerationConfig

    stops: list[Any] = [tokenizer.eos_token_id]
    path = resolve_model(ref)
    try:
        config_eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        config_eos = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path)).eos_token_id
    stops += config_eos if isinstance(config_eos, list) else [config_eos]
    return sorted({int(i) for i in stops if i is not None})


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


def lora_target(name: str, targets: list[str]) -> bool:
    """Whether the module path ``name`` is one of ``targets`` (its last parts), as peft matches them."""
    return any(name == t or name.endswith("." + t) for t in targets)


def skeleton(ref: str) -> Any:
    """Model ``ref`` built from its config on the meta device (shapes and names, no weights, no
    memory), tied weights tied. Raises :class:`ModelError` when the config cannot be read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with loading("the config", ref):
        config = AutoConfig.from_pretrained(resolve_model(ref))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model


def load_output_head(ref: str, dtype: str) -> tuple[Any, Any]:
    """The lm_head ``(weight [V, H], bias [V] or None)`` of a causal LM, read from its
    safetensors files without building the model (``hidden`` teacher signal: the workers hold
    only this). A tied head is the input embedding, as the model itself would use."""
    import torch
    from safetensors import safe_open

    path = Path(resolve_model(ref))
    if not path.is_dir():
        raise ModelError(f"teacher_signal.mode 'hidden' needs the teacher's weights on local disk; {ref!r} is not "
                         "a local directory (download it with save_pretrained first)")
    model = skeleton(ref)
    head = model.get_output_embeddings()
    names = {id(p): n for n, p in model.named_parameters()}  # a tied weight keeps the embedding's name
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


def _config_value(ref: str, name: str) -> int:
    from transformers import AutoConfig

    with loading("the config", ref):
        config = AutoConfig.from_pretrained(resolve_model(ref))
    return int(getattr(config, name, None) or getattr(config.get_text_config(), name))


#: Config fields of models whose forward changes the lm_head's output before it returns the
#: logits (transformers 5: Gemma 2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite
#: ``logits_scaling``), with the values that leave the logits as they are.
LOGIT_TRANSFORMS = {"final_logit_softcapping": (None, 0, 0.0), "logit_scale": (None, 1, 1.0),
                    "logits_scaling": (None, 1, 1.0)}


def logits_after_head(ref: str) -> str | None:
    """``"field=value"`` when model ``ref`` changes its lm_head's output into its logits (a
    :data:`LOGIT_TRANSFORMS` field set), else None: its logits are then not its final hidden
    states times its lm_head, which the fused loss assumes."""
    from transformers import AutoConfig

    with loading("the config", ref):
        config = AutoConfig.from_pretrained(resolve_model(ref))
    for text in (config, config.get_text_config()):
        for name, neutral in LOGIT_TRANSFORMS.items():
            value = getattr(text, name, None)
            if value not in neutral:
                return f"{name}={value}"
    return None


def vocab_size(ref: str) -> int:
    """Rows of the model's output embedding (``config.vocab_size``; may exceed the tokenizer)."""
    return _config_value(ref, "vocab_size")


def hidden_size(ref: str) -> int:
    """Width of the model's final hidden state (``config.hidden_size``)."""
    return _config_value(ref, "hidden_size")


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
