"""Training options end to end on the real stack (Ray Train + DeepSpeed on gloo): LoRA under
ZeRO-3 with the partitioned teacher, optimizer and parameter offload and length grouping (a
killed worker resumed from a LoRA checkpoint), and the `kdray bench train` smoke run. (A
bfloat16 student with its optimizer offloaded trains in the hidden-state job of
tests/test_e2e_signal.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdray.report.render import load_report
from tests.test_e2e import _assert_resumed_once, kdray, reduced_demo, run_killing_a_worker


def _spec(tmp_path: Path, **training) -> Path:
    path = reduced_demo(tmp_path, **training)
    spec = yaml.safe_load(path.read_text())
    # The toy dataset's own responses: these jobs are about training (tests/test_e2e.py generates).
    spec["data"]["response_source"] = "dataset"
    spec["evaluation"] = {"enabled": False}
    path.write_text(yaml.safe_dump(spec))
    return path


def _steps(out: Path) -> list[dict]:
    return [m for m in load_report(out, with_steps=True)["train_metrics"] if "loss" in m]


def _assert_plain_export_differs_from_base(out: Path) -> None:
    """The export is a plain HF model (LoRA merged in), loads and generates, and is not the base."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdray.models import load_causal_lm

    with safe_open(str(out / "student" / "model.safetensors"), framework="pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k or "base_model" in k]
    exported = AutoModelForCausalLM.from_pretrained(out / "student")
    base = load_causal_lm("toy:student", "float32", trainable=False)
    changed = {n for (n, p), (_, q) in zip(exported.named_parameters(), base.named_parameters())
               if p.shape == q.shape and not torch.equal(p.float(), q)}
    assert changed and all(any(m in n for m in ("q_proj", "v_proj")) for n in changed), changed
    tok = AutoTokenizer.from_pretrained(out / "student")
    ids = tok("Q: sort 3 1 2\nA:", return_tensors="pt").input_ids
    gen = exported.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]


@pytest.mark.slow
def test_zero3_partitioned_teacher_with_lora_and_offload_resumes_a_killed_worker(tmp_path, toy_world):
    """ZeRO-3 partitions the online teacher too (kdray.train.teacher; its loss equals the whole
    teacher's: tests/test_zero3_teacher.py, tests/test_train_parity.py), with LoRA adapters on
    q/v, optimizer and parameter offload, 2 workers and micro-batches grouped by length; a worker
    is killed after the first checkpoint, the group resumes from it (both engines rebuilt, the
    adapters restored), and the export is gathered and merged into a plain HF model. (No held-out
    evaluation: its three vLLM pools cost CI a minute, and an export with no adapter keys is what
    every other job's evaluation already serves.)"""
    every = 4
    spec = _spec(tmp_path, zero_stage=3, offload_optimizer=True, offload_param=True, lr=1e-2,
                 checkpoint_every_steps=every, max_failures=1,
                 lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                 group_by_length=True, length_group_size=4)
    run_killing_a_worker(spec, tmp_path, every)
    out = tmp_path / "out"
    _assert_resumed_once(out, every)
    steps = _steps(out)
    assert all(m["grad_norm"] > 0 for m in steps)
    assert all(m["peak_rss_mb"] > 100 for m in steps)  # a worker holds torch + two models
    # Grouped by length, the toy rows (11-20 tokens) waste few positions: about 0.06 in windows
    # of 4 micro-batches, 0.20 without grouping (kdray.data.length_groups.pad_fraction on them).
    assert sum(m["pad_fraction"] for m in steps) / len(steps) < 0.12
    # (16 steps of adapters move the loss less than its batch-to-batch noise: the check that
    # training happened is that the adapters changed the exported weights.)
    _assert_plain_export_differs_from_base(out)  # gathered from ZeRO-3, then merged


@pytest.mark.slow
def test_bench_train_quick_smoke(tmp_path, toy_world):
    results = tmp_path / "bench.json"
    # One mode: a top-k job runs end to end in tests/test_e2e_signal.py, and its estimate (no
    # teacher) is checked in tests/test_memory_estimate.py; a second bench job cost CI ~2 min.
    res = kdray("bench", "train", "--quick", "--modes", "online", "--json", str(results),
                "--out", str(tmp_path / "jobs"), cwd=tmp_path, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "distillation tokens/s" in res.stdout and "overhead: bare / Ray" in res.stdout
    data = json.loads(results.read_text())
    ray_run, bare = data["ray"], data["bare"]
    assert ray_run["status"] == "ok" and bare["status"] == "ok", data
    assert ray_run["steps"] == bare["steps"] == 10 and ray_run["steady_steps"] == bare["steady_steps"] == 7
    assert ray_run["tokens_per_s"] > 0 and bare["tokens_per_s"] > 0
    assert data["overhead"] == pytest.approx(bare["tokens_per_s"] / ray_run["tokens_per_s"])
    assert data["overhead_rounds"] == [data["overhead"]]  # --quick: one round of the job and the bare loop
    # The bare loop brackets the job, once before it and once after; the round's bare figure is
    # their mean, which is the bare row's median of two.
    bare_runs = [json.loads((tmp_path / "jobs" / "bare" / f"r{r}" / "bare-1.json").read_text()) for r in (0, 1)]
    assert bare["tokens_per_s"] == pytest.approx(sum(b["tokens_per_s"] for b in bare_runs) / 2)
    assert "over 1 rounds" in res.stdout and "host load (1-min average)" in res.stdout
    assert ray_run["startup_s"] > 0 and bare["startup_s"] > 0
    # Where a step's time goes, beside the bare loop's (kdray.train.step.StepClock's parts).
    assert "where a step's time goes" in res.stdout
    for run in (ray_run, bare):
        assert run["forward_s"] > 0 and run["backward_s"] > 0 and run["optimizer_s"] > 0, run
        assert run["step_s"] >= run["forward_s"] + run["backward_s"] + run["optimizer_s"], run  # the whole step
        assert 0 < run["cpu_s"] < 4 * run["step_s"], run  # the process's CPU time in it (up to 2 threads, and Ray's)
    assert "CPU (share)" in res.stdout
    assert ray_run["report_s"] >= 0 and bare["report_s"] == 0  # the bare loop reports to no driver (the job
    # reports about once a second, kdray.train.worker.REPORT_INTERVAL_S: maybe never in 7 steady toy steps)
    assert ray_run["sequences_per_step"] * data["workers"] == bare["sequences_per_step"] == data["global_batch"]
    assert set(data["modes"]) == {"online"} and data["modes"]["online"]["peak_rss_mb"] > 100
    # The memory section (--quick: on the toy jobs): each mode's measured peak beside its estimate.
    assert data["memory_teacher"] == "toy:teacher" and set(data["memory"]) == {"online"}
    online = data["memory"]["online"]
    assert online["peak_rss_mb"] == data["modes"]["online"]["peak_rss_mb"]
    assert online["estimate_ratio"] == pytest.approx(online["estimate_mb"] / online["peak_rss_mb"])
    assert online["estimate_parts"]["teacher (replicated)"] > 0
    assert "estimate / measured" in res.stdout and "estimate vs measured: worst" in res.stdout
