"""Building what a training worker trains: the student (with LoRA), its DeepSpeed config, its
LR schedule, and the export of the trained student.

Shared by the Ray Train worker (:mod:`kdray.train.worker`) and the local loop
(:mod:`kdray.train.loop`), so a bench or the repro harness trains the same model the same way.
"""

from __future__ import annotations

import math
from typing import Any

from kdray.errors import KdrayError, ModelError
from kdray.models import load_causal_lm, lora_target
from kdray.spec import JobSpec


#: DeepSpeed's ZeRO-3 defaults that :func:`zero3_gathering` caps: elements prefetched ahead of
#: the module that runs, and elements kept gathered at once.
DEEPSPEED_PREFETCH_ELEMENTS, DEEPSPEED_LIVE_ELEMENTS = 50_000_000, 1_000_000_000


def zero3_gathering(ref: str) -> dict[str, int]:
    """ZeRO-3 settings that keep at most twice model ``ref``'s largest module gathered at once
    (prefetching at most that module), as the memory estimate counts it
    (:mod:`kdray.train.memory`), and never more than DeepSpeed's defaults. With the defaults
    (:data:`DEEPSPEED_PREFETCH_ELEMENTS`, :data:`DEEPSPEED_LIVE_ELEMENTS`) a model of fewer
    elements stayed gathered for most of every forward after the first (once DeepSpeed has
    traced the module order): a 0.48B teacher on 2 CPU workers peaked 1.1 GiB above its
    partition, 0.1 GiB with these (docs/benchmarks.md). For a 7B model both are the defaults."""
    from kdray.train.memory import model_shape

    largest = model_shape(ref).largest_module
    return {"stage3_prefetch_bucket_size": min(largest, DEEPSPEED_PREFETCH_ELEMENTS),
            "stage3_max_live_parameters": min(2 * largest, DEEPSPEED_LIVE_ELEMENTS)}


def training_deepspeed() -> Any:
    """``deepspeed``, imported for training: with its shared-memory all-reduce kernel marked
    unavailable. DeepSpeed's torch backend builds that kernel (``deepspeed_shm_comm``, a C++
    extension compiled on first use: 45-70 s on 2 cores, once per environment) whenever it starts
    on CPU, yet only DeepSpeed inference's tensor-parallel all-reduce calls it
    (``TorchBackend.inference_all_reduce`` in ``deepspeed/comm/torch.py``, 0.19); ZeRO's
    collectives are torch.distributed's. Call before anything starts DeepSpeed's backend
    (``deepspeed.initialize``, ``deepspeed.init_distributed``)."""
    import deepspeed
    import deepspeed.ops

    # The op table DeepSpeed reads before building (deepspeed.comm.torch.build_shm_op); probed
    # once per process on first access, then kept, so this edit holds for the process.
    compatible = deepspeed.ops.__compatible_ops__
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(spec: JobSpec) -> dict[str, Any]:
    """The DeepSpeed config for ``spec``; the optimizer is a torch one, passed separately.

    The student keeps DeepSpeed's ZeRO-3 gathering defaults: bounded as the teacher's
    (:func:`zero3_gathering`), a LoRA student's backward failed DeepSpeed's module-order trace
    ("tracing error at step 65": its prefetch queue expected a ``lora_A`` weight, the backward
    asked for the ``lora_B`` one) in the ZeRO-3 LoRA job of ``tests/test_e2e_training.py``."""
    t = spec.training
    zero: dict[str, Any] = {"stage": t.zero_stage}
    # Offload targets host memory; page-locked (pinned) buffers only speed up GPU copies.
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if t.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size_per_worker,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": spec.student.dtype == "bfloat16"},
        "fp16": {"enabled": spec.student.dtype == "float16"},
        "zero_allow_untested_optimizer": True,
        # With offload DeepSpeed insists on its own DeepSpeedCPUAdam unless this is false; the
        # optimizer here is torch's AdamW (deepspeed.initialize(optimizer=...)), stepped on the
        # offloaded fp32 state on the CPU.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def load_student(spec: JobSpec) -> Any:
    """The student to train: the model itself, or with ``training.lora`` the model wrapped in
    peft LoRA adapters (only they train; the base weights are frozen); with
    ``training.gradient_checkpointing`` its activations are recomputed in the backward pass
    (non-reentrant checkpoints, which need no input that requires grad, so LoRA works too)."""
    student = load_causal_lm(spec.student.model, spec.student.dtype, trainable=True)
    if spec.training.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False  # a KV cache is useless in training and clashes with recompute
    lora = spec.training.lora
    if lora is None:
        return student
    from peft import LoraConfig, get_peft_model

    _check_lora_targets(spec, student)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(student, config)


def _check_lora_targets(spec: JobSpec, model: Any) -> None:
    import torch

    linear = sorted({name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
    targets = spec.training.lora.target_modules
    missing = [t for t in targets if not any(lora_target(n, [t]) for n in linear)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise KdrayError(
            f"training.lora.target_modules: {missing} match no linear layer of student.model "
            f"{spec.student.model!r}; its linear layers are named {leaves}"
        )


def check_lora_targets(spec: JobSpec) -> None:
    """Fail before any work when ``training.lora.target_modules`` names a module the student
    lacks (checked on a weightless skeleton of the student: no memory, no download of weights)."""
    if spec.training.lora is None:
        return
    from kdray.models import skeleton

    try:
        model = skeleton(spec.student.model)
    except ModelError:
        return  # not reachable from here (a hub id offline): the workers check when they load it
    _check_lora_targets(spec, model)


def merged_state_dict(model: Any) -> dict[str, Any]:
    """The student's weights as a plain HF model names them, on the CPU: with LoRA, each adapted
    layer's base weight plus its adapter's delta (peft's ``get_delta_weight``: scaling · B·A),
    computed beside the training weights, which keep their adapters unchanged. Tied weights
    (embeddings and lm_head) appear under both names, as ``state_dict`` gives them.

    ``model`` is the engine's module with full weights (under ZeRO-3, inside
    ``GatheredParameters``). Used for the export (:func:`save_student`) and for the on-policy
    pool's weight pushes (:mod:`kdray.train.on_policy`).
    """
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        if not isinstance(model, PeftModel):
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        base = model.get_base_model()
        deltas = {name: module.get_delta_weight(module.active_adapters[0])
                  for name, module in base.named_modules() if isinstance(module, LoraLayer) and module.active_adapters}
        out = {}
        for key, value in base.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            layer = key.rsplit(".", 1)[0]
            if key.endswith(".weight") and layer in deltas:
                value = value + deltas[layer].to(value.dtype)
            out[key] = value.detach().to("cpu", copy=True)
        return out


def save_student(model: Any, spec: JobSpec, out: str) -> None:
    """Write the trained student as a plain HF checkpoint (``from_pretrained`` and vLLM load it).

    ``model`` is the engine's module with full weights (under ZeRO-3, inside
    ``GatheredParameters``). LoRA adapters are merged into the base weights
    (:func:`merged_state_dict`) of the written copy; the training model keeps its adapters."""
    if spec.training.lora is None:
        model.save_pretrained(out, safe_serialization=True)
        return
    plain = load_causal_lm(spec.student.model, spec.student.dtype, trainable=False)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    plain.save_pretrained(out, safe_serialization=True)


def reset_peak_rss() -> None:
    """Start this process's peak resident memory (VmHWM) over from its current RSS (Linux
    ``/proc/self/clear_refs``, value 5); nothing where that file is missing or not writable.

    A worker calls it once its models are loaded, so that :func:`peak_rss_mb` is the peak of
    training: loading maps the checkpoint files, whose pages count in RSS while mapped but are
    the kernel's page cache (shared by the workers of a node, reclaimable). A partitioned
    ZeRO-3 teacher of 0.48B parameters peaked at 1.9 GiB of such pages and 1.2 GiB of its
    own memory on each of 2 CPU workers."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) since it started or since
    :func:`reset_peak_rss`, in MiB; NaN where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cosine_with_warmup(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(spec: JobSpec, model: Any, *, total_steps: int, segment: Any) -> tuple[Any, Any]:
    """AdamW over ``model``'s trainable parameters (``training.lr``, ``weight_decay``) and its LR
    schedule: :func:`cosine_with_warmup` over the whole plan (``total_steps``), or over
    ``segment.steps`` when the segment restarts the optimizer (POCL's separate runs).

    Returns:
        (optimizer, ``torch.optim.lr_scheduler.LambdaLR``), stepped once per optimizer step.
    """
    import torch

    t = spec.training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=t.lr, weight_decay=t.weight_decay)
    span = segment.steps if segment.restart_optimizer else total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup_steps=t.warmup_steps, total_steps=span))
    return optimizer, scheduler
