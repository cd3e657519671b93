"""The per-worker memory estimate (kdray.train.memory): exact parameter counts, the activation
formula held to the tensors torch saves, the ZeRO / offload / LoRA / teacher-signal accounting,
and the refusal above training.gpu_memory_gb in the job's plan and in `kdray validate`."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from kdray.errors import SpecError
from kdray.pipeline.budget import check_memory_budget
from kdray.spec import JobSpec, load_spec
from kdray.train.memory import (DTYPE_BYTES, activation_bytes, estimate_worker_memory, model_shape,
                                saved_activation_bytes)

from tests.test_spec import REPO

CONFIGS = {
    "llama": LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=500, tie_word_embeddings=True),
    "qwen2": Qwen2Config(hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=1, vocab_size=700, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    out = {}
    for name, config in CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shapes_count_the_real_models_parameters_and_peft_adapters(saved_models, name):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(saved_models[name])
    shape = model_shape(saved_models[name], ["q_proj", "v_proj", "down_proj"], 8)
    assert shape.parameters == sum(p.numel() for p in model.parameters())  # tied weights once
    head = model.get_output_embeddings().weight
    assert shape.head_parameters == head.numel()
    assert shape.largest_module == max(head.numel(), model.get_input_embeddings().weight.numel())
    assert (shape.hidden_size, shape.vocab_size, shape.num_layers) == (
        CONFIGS[name].hidden_size, CONFIGS[name].vocab_size, CONFIGS[name].num_hidden_layers)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    assert shape.lora_parameters == sum(p.numel() for p in peft.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_formula_matches_the_tensors_torch_saves(name, dtype):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name], dtype=getattr(torch, dtype))
    shape = model_shape_of(model)
    b, s = 3, 80
    ids = torch.randint(0, CONFIGS[name].vocab_size, (b, s))
    measured = saved_activation_bytes(model, ids)
    estimate = activation_bytes(shape, b * s, DTYPE_BYTES[dtype])
    assert estimate == pytest.approx(measured, rel=0.05)
    # Checkpointed: each layer keeps its input; the estimate adds one layer, live again in backward.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    kept = saved_activation_bytes(model, ids)
    one_layer = (measured - kept) / shape.num_layers  # a layer's activations beyond its input
    assert kept < measured / 4
    assert activation_bytes(shape, b * s, DTYPE_BYTES[dtype], checkpointing=True) == pytest.approx(
        kept + one_layer, rel=0.1)


def model_shape_of(model):
    """model_shape without files: the same fields, read from a built model."""
    import kdray.train.memory as memory

    config = model.config
    return memory.ModelShape(
        parameters=sum(p.numel() for p in model.parameters()), largest_module=0, head_parameters=0,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        kv_size=config.num_key_value_heads * (config.hidden_size // config.num_attention_heads),
        vocab_size=config.vocab_size)


def job(saved_models, sections=None, **training):
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["teacher"]["model"], spec["student"]["model"] = saved_models["qwen2"], saved_models["llama"]
    spec["training"].update(training)
    for section, values in (sections or {}).items():
        spec.setdefault(section, {}).update(values)
    return JobSpec.model_validate(spec)


def parts(estimate):
    return dict(estimate.device)


def test_zero_stages_offload_lora_and_teacher_signal_move_what_they_should(saved_models):
    student = model_shape(saved_models["llama"], ["q_proj", "v_proj"], 4)
    teacher = model_shape(saved_models["qwen2"])
    base = dict(use_gpu=True, num_workers=4, global_batch_size=32, micro_batch_size_per_worker=2)
    z0, z1, z2, z3 = (estimate_worker_memory(job(saved_models, **base, zero_stage=z), student, teacher)
                      for z in range(4))
    p = student.parameters
    assert parts(z0)["student weights"] == 4 * p and parts(z0)["optimizer state"] == 8 * p
    assert parts(z1)["optimizer state (1/N)"] == 8 * p // 4 and parts(z1)["gradients"] == 4 * p
    assert parts(z2)["gradients (1/N)"] == 4 * p // 4
    assert parts(z3)["student weights (1/N + gathered, ZeRO-3)"] == 4 * p // 4 + 2 * 4 * student.largest_module
    assert z0.total > z1.total > z2.total
    # ZeRO-3 partitions the online teacher too; the loss stays on the fused path (in the head's forward).
    t = teacher.parameters
    assert parts(z2)["teacher (replicated)"] == 4 * t and "teacher (replicated)" not in parts(z3)
    assert parts(z3)["teacher (1/N + gathered, ZeRO-3)"] == 4 * t // 4 + 2 * 4 * teacher.largest_module
    assert parts(z3)["teacher lm_head (copy for the loss)"] == 4 * min(student.vocab_size, teacher.vocab_size) \
        * teacher.hidden_size
    assert "loss (fused lm-head, chunked)" in parts(z3) and "loss (fused lm-head, chunked)" in parts(z2)
    z3_off = estimate_worker_memory(job(saved_models, **base, zero_stage=3, offload_param=True), student, teacher)
    assert dict(z3_off.host)["teacher (partition)"] == 4 * t // 4
    head_lora = job(saved_models, **base, zero_stage=2, lora={"r": 4, "target_modules": ["q_proj", "lm_head"]})
    assert "loss (logits)" in parts(estimate_worker_memory(head_lora, student, teacher))  # the fused loss reads the base head

    off = estimate_worker_memory(job(saved_models, **base, zero_stage=2, offload_optimizer=True), student, teacher)
    assert "optimizer state (1/N)" not in parts(off) and dict(off.host)["optimizer state (1/N)"] == 8 * p // 4
    on_cpu = estimate_worker_memory(job(saved_models, **dict(base, use_gpu=False), zero_stage=2,
                                        offload_optimizer=True), student, teacher)
    assert parts(on_cpu)["optimizer state (1/N)"] == 8 * p // 4 and not on_cpu.host  # the same RAM

    lora = estimate_worker_memory(job(saved_models, **base, zero_stage=2, lora={"r": 4, "target_modules":
                                                                                 ["q_proj", "v_proj"]}),
                                  student, teacher)
    assert parts(lora)["optimizer state (1/N)"] == 8 * student.lora_parameters // 4
    assert parts(lora)["student weights"] == 4 * (p + student.lora_parameters)

    bf16 = job(saved_models, {"student": {"dtype": "bfloat16"}}, **base, zero_stage=2)
    mixed = estimate_worker_memory(bf16, student, teacher)
    assert parts(mixed)["optimizer state (1/N)"] == 12 * p // 4 and parts(mixed)["student weights"] == 2 * p

    signals = {}
    for mode in ("online", "hidden", "topk"):
        spec = job(saved_models, {"teacher_signal": {"mode": mode}}, **base, zero_stage=2)
        signals[mode] = parts(estimate_worker_memory(spec, student, teacher))
    assert signals["online"]["teacher (replicated)"] == 4 * teacher.parameters
    assert signals["hidden"]["teacher lm_head"] == 4 * teacher.head_parameters
    assert not any(k.startswith("teacher") for k in signals["topk"])

    checkpointed = estimate_worker_memory(job(saved_models, **base, zero_stage=2, gradient_checkpointing=True),
                                          student, teacher)
    assert parts(checkpointed)["activations (192 tokens, checkpointed)"] < parts(z2)["activations (192 tokens)"] / 2


def test_a_job_over_its_gpu_budget_is_refused_naming_the_parts_and_the_fixes(saved_models):
    spec = job(saved_models, use_gpu=True, gpu_memory_gb=0.5)
    from kdray.train.memory import job_estimate

    estimate = job_estimate(spec)
    assert estimate.total > 0.5e9  # the CUDA context alone is 1 GiB
    with pytest.raises(SpecError) as err:
        check_memory_budget(spec, estimate)
    text = str(err.value)
    assert "training.gpu_memory_gb" in text and "500.0 MB given" in text
    assert "runtime (CUDA context)" in text and "activations" in text
    check_memory_budget(job(saved_models, use_gpu=True, gpu_memory_gb=estimate.total / 1e9 + 0.01),
                        estimate)  # fits: no error


def test_gpu_memory_gb_needs_use_gpu():
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["training"]["gpu_memory_gb"] = 80
    with pytest.raises(Exception, match="gpu_memory_gb is the memory of a worker's GPU; set use_gpu: true"):
        JobSpec.model_validate(spec)


def test_validate_prints_the_estimate_and_refuses_a_job_over_budget(tmp_path, toy_world, capsys):
    from kdray import cli

    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert "memory per training worker (estimate, 2 workers, ZeRO-2)" in out.err
    assert "total per worker (RAM)" in out.err and "teacher (replicated)" in out.err
    assert yaml.safe_load(out.out)["training"]["zero_stage"] == 2  # stdout stays the resolved spec

    spec["training"].update(use_gpu=True, gpu_memory_gb=0.2)
    path.write_text(yaml.safe_dump(spec))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "training.gpu_memory_gb" in err and "Traceback" not in err
    assert load_spec(path).training.gpu_memory_gb == 0.2


def test_the_bench_reads_the_partitioned_teachers_share_against_one_nth_of_the_replicated():
    from kdray.bench.train_memory import PARTITIONED, partitioned_share

    memory = {"online": {"status": "ok", "peak_rss_mb": 2500.0, "estimate_parts": {"teacher (replicated)": 1800.0}},
              "hidden": {"status": "ok", "peak_rss_mb": 600.0},
              PARTITIONED: {"status": "ok", "peak_rss_mb": 1600.0, "estimate_parts": {
                  "teacher forward": 63.0, "teacher (1/N + gathered, ZeRO-3)": 945.0,
                  "teacher lm_head (copy for the loss)": 2.0}}}
    share = partitioned_share(memory, 2)
    # allowed: half the measured replicated share, plus forward, gathered modules (945 - 1800 / 2) and head copy
    assert share == {"workers": 2, "replicated_mb": 1900.0, "partitioned_mb": 1000.0,
                     "allowed_mb": 1900.0 / 2 + 63.0 + 45.0 + 2.0}
    assert partitioned_share({**memory, "hidden": {"status": "failed", "error": "x"}}, 2) is None
    assert partitioned_share({k: v for k, v in memory.items() if k != PARTITIONED}, 2) is None


def test_zero3_gathers_at_most_twice_the_largest_module_and_never_more_than_deepspeeds_defaults(saved_models, tmp_path):
    from kdray.train.setup import DEEPSPEED_LIVE_ELEMENTS, DEEPSPEED_PREFETCH_ELEMENTS, zero3_gathering

    small = model_shape(saved_models["qwen2"]).largest_module  # its untied 700 x 192 embedding / lm_head
    assert zero3_gathering(saved_models["qwen2"]) == {"stage3_prefetch_bucket_size": small,
                                                      "stage3_max_live_parameters": 2 * small}
    # Qwen2.5-7B's shape (config only): a 545M-element embedding, so DeepSpeed's defaults stand
    Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False).save_pretrained(tmp_path)
    assert zero3_gathering(str(tmp_path)) == {"stage3_prefetch_bucket_size": DEEPSPEED_PREFETCH_ELEMENTS,
                                             "stage3_max_live_parameters": DEEPSPEED_LIVE_ELEMENTS}


def test_logits_the_model_changes_after_its_head_keep_the_loss_off_the_fused_path(saved_models, tmp_path):
    from kdray.models import logits_after_head

    assert logits_after_head(saved_models["llama"]) is None
    from transformers import Gemma2Config

    Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=500, final_logit_softcapping=30.0).save_pretrained(tmp_path)
    assert logits_after_head(str(tmp_path)) == "final_logit_softcapping=30.0"
    spec = job(saved_models, {"teacher": {"model": str(tmp_path)}}, num_workers=2, global_batch_size=4,
               micro_batch_size_per_worker=2, zero_stage=3)
    estimate = parts(estimate_worker_memory(spec, model_shape(saved_models["llama"]), model_shape(str(tmp_path))))
    assert "loss (logits)" in estimate and "teacher lm_head (copy for the loss)" not in estimate
