"""Training options without a cluster: offload in the DeepSpeed config, LoRA wrapping and its
merged export, and the combinations that validation rejects."""

from __future__ import annotations

import pytest
import torch

from kdray.errors import KdrayError, SpecError
from kdray.spec import parse_spec
from kdray.train.setup import (check_lora_targets, deepspeed_config, load_student, merged_state_dict, peak_rss_mb,
                               save_student)


def spec(student_dtype: str = "float32", **training):
    return parse_spec({
        "name": "t", "output_dir": "o",
        "teacher": {"model": "toy:teacher"}, "student": {"model": "toy:student", "dtype": student_dtype},
        "data": {"train": "toy:train", "heldout": "toy:heldout"},
        "training": training,
    })


def errors(**training) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        spec(**training)
    return info.value.errors


def test_no_offload_by_default_and_a_torch_optimizer_is_allowed():
    cfg = deepspeed_config(spec())
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["zero_force_ds_cpu_optimizer"] is False and "optimizer" not in cfg


def test_offload_optimizer_and_param_go_to_the_cpu_unpinned_on_cpu_hosts():
    cfg = deepspeed_config(spec(zero_stage=3, offload_optimizer=True, offload_param=True))
    assert cfg["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "offload_param": {"device": "cpu", "pin_memory": False},
    }
    cfg = deepspeed_config(spec(zero_stage=1, offload_optimizer=True, use_gpu=True))
    assert cfg["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": True}}


def test_bf16_student_turns_on_deepspeed_bf16():
    assert deepspeed_config(spec("bfloat16"))["bf16"] == {"enabled": True}
    assert deepspeed_config(spec("float32"))["bf16"] == {"enabled": False}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_param_needs_zero3(stage):
    [(path, message)] = errors(zero_stage=stage, offload_param=True)
    assert path == "training"
    assert "offload_param needs zero_stage 3" in message and "set zero_stage to 3" in message


def test_offload_optimizer_needs_zero():
    [(path, message)] = errors(zero_stage=0, offload_optimizer=True)
    assert path == "training" and "offload_optimizer needs ZeRO" in message and "zero_stage to 1, 2 or 3" in message
    for stage in (1, 2, 3):
        assert spec(zero_stage=stage, offload_optimizer=True).training.offload_optimizer


def test_lora_defaults_and_bad_values_name_their_field():
    lora = spec(lora={}).training.lora
    assert lora.r == 16 and lora.alpha == 32 and lora.dropout == 0
    assert lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert spec().training.lora is None
    paths = dict(errors(lora={"r": 0, "dropout": 1.0, "target_modules": []}))
    assert set(paths) == {"training.lora.r", "training.lora.dropout", "training.lora.target_modules"}
    [(path, message)] = errors(lora={"target_modules": ["q proj"]})
    assert path == "training.lora.target_modules" and "not module names" in message
    [(path, _)] = errors(lora={"rank": 8})
    assert path == "training.lora.rank"


def test_lora_targets_the_student_lacks_fail_before_any_work(toy_world):
    check_lora_targets(spec(lora={}))  # the defaults fit the toy Llama
    with pytest.raises(KdrayError, match=r"training.lora.target_modules: \['c_attn'\] match no linear layer") as info:
        check_lora_targets(spec(lora={"target_modules": ["q_proj", "c_attn"]}))
    assert "'down_proj'" in str(info.value)  # lists the names it does have


def test_lora_student_trains_only_adapters_and_exports_them_merged(toy_world, tmp_path):
    from transformers import AutoModelForCausalLM

    s = spec(lora={"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    model = load_student(s)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("down_proj.lora_A" in n for n in trainable) and not any("k_proj" in n for n in trainable)

    with torch.no_grad():  # as training would: the adapters move off their zero init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    ids = torch.tensor([[5, 20, 30, 40, 7]])
    adapted = model(input_ids=ids).logits
    save_student(model, s, str(tmp_path / "student"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    base = load_student(spec())(input_ids=ids).logits
    assert (base - adapted).abs().max() > 1e-2  # the export carries the adapters' change
    assert any("lora_B" in n for n, _ in model.named_parameters())  # the training model keeps them
    # The merge (what the on-policy pool is pushed, too) is peft's own, to the bit.
    merged = merged_state_dict(model)
    reference = load_student(s)
    reference.load_state_dict(model.state_dict())
    reference = reference.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in merged)
    assert merged_state_dict(plain).keys() == reference.keys()  # a plain model: its own state_dict


def test_peak_rss_mb_reads_this_process_high_water_mark():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark to the current RSS
    before = peak_rss_mb()
    block = bytearray(64 * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    after = peak_rss_mb()
    assert 0 < before and after >= before + 60
    del block


@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": ["q_proj", "v_proj"]}])
def test_gradient_checkpointing_recomputes_each_layer_in_backward_and_gives_the_same_gradients(toy_world, lora):
    ids = torch.tensor([[5, 20, 30, 40, 7, 9, 11]])

    def grads(**training):
        torch.manual_seed(0)  # the same LoRA init both times
        model = load_student(spec(lora=lora, **training))
        model.train()
        (mlp,) = [m for n, m in model.named_modules() if n.endswith("layers.0.mlp")]
        calls, forward = [], mlp.forward  # (a recompute runs no module hooks: wrap forward)
        mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads()
    checkpointed, recomputed_calls = grads(gradient_checkpointing=True)
    assert plain_calls == 1 and recomputed_calls == 2  # the layer ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
