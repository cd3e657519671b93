"""What one training worker holds, estimated before any work from the models' configs and the
spec (``kdray validate``; a job refuses to start above ``training.gpu_memory_gb``).

Every part is in bytes per worker, on the worker's device (its GPU with ``use_gpu``, else its
RAM), for ``N`` workers at ZeRO stage ``z``; ``e`` is the bytes per element of the student's
dtype, ``P`` its parameters and ``T`` the trainable ones (``P``; LoRA: the adapters'):

* **Weights** ``e·P``; ZeRO-3 keeps ``e·P/N`` plus the modules it gathers for one forward
  (the largest module, twice: it and the next, prefetched).
* **Gradients** ``e·T``, ``/N`` from ZeRO-2, plus DeepSpeed's gradient bucket
  (``reduce_bucket_size``, 5·10^8 elements by default: allocated whole on a GPU, only the
  part the step fills, ``min(bucket, T)``, is resident in CPU memory).
* **Optimizer state** (AdamW) ``8·T`` bytes in float32 (the two moments), ``12·T`` with a
  16-bit student (and the float32 master weights); ``/N`` from ZeRO-1; on the host with
  ``offload_optimizer`` (and a GPU). These three follow the ZeRO paper's accounting
  (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models", arXiv:1910.02054, §3.1 and Figure 1: 2Ψ + 2Ψ + KΨ with K = 12).
* **Teacher**: the whole model in ``teacher.dtype`` (``online``; under ZeRO-3 partitioned as
  the student's weights are, ``1/N`` plus its largest module twice, and a copy of its lm_head
  for the fused loss, :mod:`kdray.train.teacher`), its lm_head (``hidden``) or nothing
  (``topk``).
* **Activations** of the student's decoder for one micro-batch of ``b ×`` ``max_seq_len``
  tokens (twice the rows with DistiLLM-2: teacher and student responses). Counted as in
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
  arXiv:2205.05198, §4.1): the tensors each layer saves for its backward, here for
  Llama/Qwen2 decoder layers (RMSNorm, grouped-query attention through SDPA, which saves no
  ``s × s`` scores, a SwiGLU MLP, no dropout). Per token and layer:
  ``e·(8h + 4I + 2·kv) + 4·heads`` bytes, plus ``4h`` at 16 bits (the norms compute in
  float32), and ``e·2h`` per token outside the layers (embedding, final norm); ``h`` hidden
  size, ``I`` MLP size, ``kv`` the key/value width. With ``gradient_checkpointing`` each layer
  keeps its input (``e·h``) and one layer's activations are live again in the backward pass.
  :func:`saved_activation_bytes` measures the same quantity on a model, so the tests hold the
  formula to it.
* **Loss**: on the fused lm-head path (:func:`kdray.losses.fused_linear_divergence`;
  ``online``/``hidden``, unless DistiLLM-2, a LoRA adapter on the lm_head, or logits that are
  not the head's output, :func:`kdray.models.logits_after_head`) one chunk's working set (about 8
  float32 ``[chunk, V]`` buffers eager, 2 compiled, and a half-precision one while logits are
  upcast: :func:`kdray.losses.chunking.chunk_working_set_bytes`, with ``training.compile_loss``)
  plus the float32 gradients of the
  student's hidden states and lm_head it holds until backward; otherwise the ``tokens × V``
  logits, in the model's dtype and as float32 copies (the student's: upcast, log-probs and
  their gradient; the teacher's: logits, upcast, probabilities).
* **Runtime**: what a worker holds before any model (CUDA context and kernels on a GPU; the
  Python process with torch, DeepSpeed and Ray on a CPU): :data:`RUNTIME_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdray.spec import JobSpec

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: DeepSpeed's default ``reduce_bucket_size`` (elements), which kdray's config leaves as is.
REDUCE_BUCKET_ELEMENTS = 500_000_000
#: A worker before any model: "gpu" (CUDA context, cuBLAS/NCCL workspaces) and "cpu" (the
#: process: torch, transformers, DeepSpeed and Ray Train imported take 0.39 GiB of RSS on the
#: 2-core CI host; a Ray Train worker adds its core worker and process group). Round figures.
RUNTIME_BYTES = {"gpu": int(1.0 * GiB), "cpu": int(0.6 * GiB)}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a causal LM, read from its config on the meta device (no
    weights are loaded)."""

    parameters: int
    largest_module: int
    head_parameters: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_size: int
    vocab_size: int
    lora_parameters: int = 0


def model_shape(ref: str, lora_targets: list[str] | None = None, lora_rank: int = 0) -> ModelShape:
    """The :class:`ModelShape` of model ``ref`` (a toy model, a directory or a hub id), counted
    exactly on a weightless skeleton; with ``lora_targets`` also the parameters of rank
    ``lora_rank`` adapters on the linear layers so named (``r·(in + out)`` each, as peft adds).

    Raises:
        ModelError: the config cannot be read (:func:`kdray.models.loading` names the model).
    """
    import torch

    from kdray.models import skeleton as build_skeleton
    from kdray.models import lora_target

    skeleton = build_skeleton(ref)
    text = skeleton.config.get_text_config()
    head = skeleton.get_output_embeddings()
    h, heads = int(text.hidden_size), int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    lora = 0
    for name, module in skeleton.named_modules():
        if lora_targets and isinstance(module, torch.nn.Linear) and lora_target(name, lora_targets):
            lora += lora_rank * (module.in_features + module.out_features)
    return ModelShape(
        parameters=sum(p.numel() for p in skeleton.parameters()),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in skeleton.modules()),
        head_parameters=sum(p.numel() for p in head.parameters()),
        hidden_size=h, intermediate_size=int(text.intermediate_size), num_layers=int(text.num_hidden_layers),
        num_heads=heads, kv_size=int(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        vocab_size=int(text.vocab_size), lora_parameters=lora,
    )


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, *, checkpointing: bool = False) -> int:
    """Bytes the decoder of ``shape`` saves for its backward pass over ``tokens`` tokens
    (module docstring, "Activations"); with ``checkpointing`` the layer inputs plus one layer's
    activations, recomputed in the backward pass."""
    e, h = dtype_bytes, shape.hidden_size
    layer = e * (8 * h + 4 * shape.intermediate_size + 2 * shape.kv_size) + 4 * shape.num_heads
    if e < 4:
        layer += 4 * h  # RMSNorm's float32 upcasts
    outside = e * 2 * h + (2 * h if e < 4 else 0)
    if checkpointing:
        return tokens * (shape.num_layers * e * h + layer + outside)
    return tokens * (shape.num_layers * layer + outside)


def saved_activation_bytes(model: Any, input_ids: Any) -> int:
    """Measured counterpart of :func:`activation_bytes`: the bytes of the distinct tensors
    (by storage) that ``model``'s decoder saves for backward on ``input_ids [b, s]``, its
    parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=input_ids)
    return sum(seen.values())


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-worker memory, part by part: ``device`` on the worker's GPU (or its RAM on a CPU
    worker), ``host`` offloaded to the node's RAM (ZeRO-Offload on a GPU worker)."""

    on: str
    device: list[tuple[str, int]]
    host: list[tuple[str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.device)

    @property
    def host_total(self) -> int:
        return sum(b for _, b in self.host)

    def table(self) -> str:
        """The parts and their totals, one per line, in GiB."""
        where = "GPU" if self.on == "gpu" else "RAM"
        rows = [*self.device, (f"total per worker ({where})", self.total),
                *((f"{name} (host RAM)", b) for name, b in self.host)]
        return "\n".join(f"  {name:<42} {_mib(b):>10}" for name, b in rows)


def _mib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def estimate_worker_memory(spec: JobSpec, student: ModelShape, teacher: ModelShape) -> MemoryEstimate:
    """Per-worker memory of ``spec``'s training step (module docstring for each part).

    Args:
        student, teacher: the models' shapes (:func:`model_shape`; the student's with the spec's
            LoRA adapters counted).
    """
    from kdray.losses._compiled import wants_compiled
    from kdray.losses.chunking import chunk_working_set_bytes
    from kdray.models import logits_after_head
    from kdray.models import lora_target

    t, mode = spec.training, spec.teacher_signal.mode
    on = "gpu" if t.use_gpu else "cpu"
    n, z = t.num_workers, t.zero_stage
    e, e_t = DTYPE_BYTES[spec.student.dtype], DTYPE_BYTES[spec.teacher.dtype]
    params = student.parameters + (student.lora_parameters if t.lora is not None else 0)
    trainable = student.lora_parameters if t.lora is not None else student.parameters
    distillm2 = spec.curriculum_of("distillm2") is not None
    tokens = t.micro_batch_size_per_worker * t.max_seq_len * (2 if distillm2 else 1)
    device: list[tuple[str, int]] = []
    host: list[tuple[str, int]] = []
    offload_host = on == "gpu"  # offloaded state leaves a GPU; on a CPU worker it is the same RAM

    weights = e * params
    if z == 3:
        gathered = 2 * e * student.largest_module
        partition = weights // n
        if t.offload_param and offload_host:
            device.append(("student weights (gathered, ZeRO-3)", gathered))
            host.append(("student weights (partition)", partition))
        else:
            device.append(("student weights (1/N + gathered, ZeRO-3)", partition + gathered))
    else:
        device.append(("student weights", weights))
    grads = e * trainable // (n if z >= 2 else 1)
    bucket = e * (REDUCE_BUCKET_ELEMENTS * (2 if z == 3 else 1) if on == "gpu"
                  else min(REDUCE_BUCKET_ELEMENTS, trainable))
    device.append(("gradients" + (" (1/N)" if z >= 2 else ""), grads))
    device.append(("gradient bucket (DeepSpeed)", bucket))
    optimizer = (12 if e < 4 else 8) * trainable // (n if z >= 1 else 1)
    (host if t.offload_optimizer and offload_host else device).append(
        ("optimizer state" + (" (1/N)" if z >= 1 else ""), optimizer))
    vocab = min(student.vocab_size, teacher.vocab_size)
    adapted_head = t.lora is not None and lora_target("lm_head", list(t.lora.target_modules))
    fused = (mode in ("online", "hidden") and not distillm2 and not adapted_head
             and not any(logits_after_head(ref) for ref in (spec.student.model, spec.teacher.model)))
    if mode == "online" and z == 3:
        t_gathered, t_partition = 2 * e_t * teacher.largest_module, e_t * teacher.parameters // n
        if t.offload_param and offload_host:
            device.append(("teacher (gathered, ZeRO-3)", t_gathered))
            host.append(("teacher (partition)", t_partition))
        else:
            device.append(("teacher (1/N + gathered, ZeRO-3)", t_partition + t_gathered))
        if fused:  # the partitioned head, copied while gathered (kdray.train.teacher.teacher_final_states)
            device.append(("teacher lm_head (copy for the loss)", e_t * vocab * teacher.hidden_size))
    elif mode == "online":
        device.append(("teacher (replicated)", e_t * teacher.parameters))
    elif mode == "hidden":
        device.append(("teacher lm_head", e_t * teacher.head_parameters))
    device.append((f"activations ({tokens:,} tokens" + (", checkpointed)" if t.gradient_checkpointing else ")"),
                   activation_bytes(student, tokens, e, checkpointing=t.gradient_checkpointing)))
    if mode == "online":  # under no_grad: one layer at a time, and the final hidden states
        device.append(("teacher forward", tokens * e_t * (5 * teacher.hidden_size + 3 * teacher.intermediate_size)))
    if fused:
        compiled = wants_compiled(t.compile_loss, spec.objective.kind, vocab)
        upcast = min(e, e_t) < 4
        loss = (chunk_working_set_bytes(tokens, vocab, student.hidden_size, compiled, upcast)
                + 4 * vocab * student.hidden_size + 4 * tokens * student.hidden_size)
        if mode == "hidden":  # the stored hidden states, cast to the head's dtype
            loss += tokens * teacher.hidden_size * (4 + e_t)
        device.append(("loss (fused lm-head, chunked)", loss))
    else:
        per_token = student.vocab_size * (e + 3 * 4)
        if mode != "topk":
            per_token += teacher.vocab_size * (e_t + 2 * 4)
        device.append(("loss (logits)", tokens * per_token))
    device.append(("runtime (" + ("CUDA context" if on == "gpu" else "process") + ")", RUNTIME_BYTES[on]))
    return MemoryEstimate(on, device, host)


def job_estimate(spec: JobSpec) -> MemoryEstimate:
    """:func:`estimate_worker_memory` with the shapes of ``spec``'s models, read from their configs.

    Raises:
        ModelError: a model's config cannot be read.
    """
    lora = spec.training.lora
    student = model_shape(spec.student.model, lora.target_modules if lora else None, lora.r if lora else 0)
    return estimate_worker_memory(spec, student, model_shape(spec.teacher.model))
