"""What a training worker holds of the teacher, and how the fused lm-head loss gets both models'
final hidden states and lm_head weights, under ZeRO-3 too.

By ``teacher_signal.mode`` and ZeRO stage (:func:`worker_teacher`):

* ``online``, ZeRO 0–2: the whole frozen model on every worker (:func:`load_teacher`).
* ``online``, ZeRO-3: the model partitioned over the workers as the student is
  (:func:`load_partitioned_teacher`). It is built under DeepSpeed's ``zero.Init`` through
  transformers' ``HfDeepSpeedConfig`` (so a rank never holds the whole model, not even while
  loading), then wrapped in a DeepSpeed engine at stage 3 with no optimizer: DeepSpeed's
  ZeRO-Inference path, as TRL's ``prepare_deepspeed`` does for its reference and teacher
  models. Each module's weights are gathered for its forward and released after it.
* ``hidden``: its lm_head alone (:class:`TeacherHead`); ``topk``: nothing.

The fused loss (:func:`kdray.losses.fused_linear_divergence`) takes both models' final hidden
states and lm_head weights, so no ``[tokens, V]`` logits exist. Under ZeRO-3 a partitioned
lm_head is whole only inside its own forward: DeepSpeed gathers its weight in a pre-forward
hook, frees it in a post-forward hook, and gathers it again in the backward pass when a
gradient reaches the module's output (DeepSpeed's ``partitioned_param_coordinator``). So
:func:`head_computing` makes the lm_head's forward compute what the loss needs inside those
hooks: the student's returns the fused loss itself (whose weight gradient is formed there), the
teacher's returns the hidden states unchanged and keeps a copy of its weight
(:func:`teacher_final_states`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from kdray.spec import JobSpec


class TeacherHead:
    """The teacher's lm_head alone (``teacher_signal.mode: hidden``): stored hidden states
    times this weight are the teacher's exact logits, with no teacher model in the worker."""

    def __init__(self, weight: Any, bias: Any, vocab: int):
        self.weight = weight[:vocab]
        self.bias = None if bias is None else bias[:vocab]

    def to(self, device: Any) -> "TeacherHead":
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self

    def logits(self, hidden: Any) -> Any:
        """The teacher's logits ``[..., V]`` from its stored hidden states ``[..., H]``."""
        import torch.nn.functional as F

        return F.linear(hidden.to(self.weight.dtype), self.weight, self.bias)


def load_teacher(spec: JobSpec) -> Any:
    """What a process holds of the teacher, whole: the frozen model (``online``), its lm_head
    (``hidden``), or nothing (``topk``: the records hold all it says)."""
    from kdray.models import load_causal_lm, load_output_head, shared_vocab_size

    mode = spec.teacher_signal.mode
    if mode == "online":
        return load_causal_lm(spec.teacher.model, spec.teacher.dtype, trainable=False)
    if mode == "hidden":
        weight, bias = load_output_head(spec.teacher.model, spec.teacher.dtype)
        return TeacherHead(weight, bias, shared_vocab_size(spec.teacher.model, spec.student.model))
    return None


def teacher_zero3_config(spec: JobSpec) -> dict[str, Any]:
    """The DeepSpeed config of the partitioned teacher: the student's
    (:func:`kdray.train.setup.deepspeed_config`: its batch sizes, which DeepSpeed requires of
    any engine, and ``offload_param``) at stage 3, in the teacher's dtype, with nothing of the
    optimizer, and at most twice its largest module gathered at once
    (:func:`kdray.train.setup.zero3_gathering`)."""
    from kdray.train.setup import deepspeed_config, zero3_gathering

    config = deepspeed_config(spec)
    zero = {k: v for k, v in config["zero_optimization"].items() if k != "offload_optimizer"}
    kept = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
            "wall_clock_breakdown")
    zero.update(zero3_gathering(spec.teacher.model))  # the teacher's own largest module
    return {**{k: config[k] for k in kept}, "zero_optimization": {**zero, "stage": 3},
            "bf16": {"enabled": spec.teacher.dtype == "bfloat16"}, "fp16": {"enabled": spec.teacher.dtype == "float16"}}


def load_partitioned_teacher(spec: JobSpec) -> Any:
    """The frozen teacher as a DeepSpeed ZeRO-3 engine without optimizer, each rank holding
    1/N of every parameter (module docstring). Needs ``torch.distributed`` initialised (a Ray
    Train worker). Called with ``engine(input_ids=…, attention_mask=…)`` like the model."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from kdray.models import load_causal_lm
    from kdray.train.setup import training_deepspeed

    deepspeed = training_deepspeed()
    config = teacher_zero3_config(spec)
    deepspeed.init_distributed()  # on the worker's process group: zero.Init reads the world size from it
    # While this object lives, from_pretrained builds the model under zero.Init: partitioned as
    # it is constructed, the checkpoint's tensors scattered into the partitions.
    zero3_marker = HfDeepSpeedConfig(config)
    try:
        model = load_causal_lm(spec.teacher.model, spec.teacher.dtype, trainable=False)
    finally:
        unset_hf_deepspeed_config()  # the student and every later load stay as they were
        del zero3_marker
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def worker_teacher(spec: JobSpec) -> Any:
    """What a Ray Train worker holds of the teacher: partitioned under ZeRO-3 in ``online``
    mode (:func:`load_partitioned_teacher`), else :func:`load_teacher`."""
    if spec.teacher_signal.mode == "online" and spec.training.zero_stage == 3:
        return load_partitioned_teacher(spec)
    return load_teacher(spec)


def partitioned(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine whose weights ZeRO-3 partitions."""
    check = getattr(model, "zero_optimization_partition_weights", None)
    return bool(check is not None and check())


def unwrapped(module: Any) -> Any:
    """The transformers model inside a DeepSpeed engine and a peft wrapper (LoRA), if any."""
    module = getattr(module, "module", module)
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def head_weights(model: Any, vocab: int) -> tuple[Any, Any]:
    """A transformers model's lm_head (weight ``[V, H]``, bias ``[V]`` or None) over the first
    ``vocab`` rows (the vocabulary both models share). Under ZeRO-3, valid only inside the
    head's forward (:func:`head_computing`)."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight[:vocab], None if bias is None else bias[:vocab]


@contextmanager
def head_computing(model: Any, compute: Callable[[Any, Any], Any]) -> Iterator[None]:
    """Within the block, the lm_head of the transformers ``model`` returns ``compute(head,
    hidden)`` instead of its logits (``hidden``: what the model passes it, ``[B, L, H]``), so
    that the model's forward, run through its DeepSpeed engine, hands back whatever ``compute``
    returns as ``.logits``, computed while ZeRO-3 holds the head's weight whole. What the
    head's weight gets as gradient from the returned tensor reaches it through ZeRO-3's own
    backward hooks."""
    head = model.get_output_embeddings()
    head.forward = partial(compute, head)  # an instance attribute: Module.__call__ runs it between the hooks
    try:
        yield
    finally:
        del head.forward


def teacher_final_states(teacher: Any, ids: Any, attn: Any, vocab: int) -> tuple[Any, Any, Any]:
    """The frozen teacher's final hidden states at the positions that predict a label
    (``[B, L-1, H]``) and its lm_head ``(weight [vocab, H], bias or None)``, for the fused loss.
    Call under ``torch.no_grad``. A partitioned teacher (:func:`partitioned`) runs through its
    engine, and its head's weight is copied while gathered (``vocab × H`` elements, freed after
    the micro-batch); a whole one runs its decoder and lends its head."""
    if not partitioned(teacher):
        hidden = teacher.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state[:, :-1]
        return (hidden, *head_weights(teacher, vocab))
    kept: dict[str, tuple[Any, Any]] = {}

    def keep(head: Any, hidden: Any) -> Any:
        weight, bias = head_weights(unwrapped(teacher), vocab)
        kept["head"] = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        return hidden

    with head_computing(unwrapped(teacher), keep):
        hidden = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    if "head" not in kept:
        raise RuntimeError(f"{type(unwrapped(teacher)).__name__}'s forward did not run its lm_head: the fused loss "
                           "cannot take its final hidden states under ZeRO-3")
    return (hidden, *kept["head"])
