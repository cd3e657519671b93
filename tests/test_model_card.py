"""The model card every exported student gets (kdray/report/model_card.py), read back with
huggingface_hub's parser."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from kdray.report.model_card import model_card, write_model_cards
from tests.test_report import make_job


def _report(tmp_path, **kw) -> dict:
    job = make_job(tmp_path, "fkl", rounds=(1,), **kw)
    report = json.loads((job / "report.json").read_text())
    report["spec"].update(data={"train": "hub:org/chats:train", "heldout": "data/heldout.jsonl"},
                          training={"global_batch_size": 32, "lr": 0.003, "num_workers": 2, "zero_stage": 2,
                                    "max_seq_len": 96},
                          curriculum=[{"kind": "pocl", "n_stages": 2}], teacher_signal={"mode": "topk"})
    report["spec"]["student"]["dtype"] = "float32"
    return report


def test_the_final_students_card_parses_with_its_metadata_and_evaluation(tmp_path):
    report = _report(tmp_path)
    card = ModelCard(model_card(report, spec_path="/jobs/fkl/spec.yaml"))
    assert card.data.base_model is None  # a toy model: no Hub id to name (the text names it)
    assert card.data.datasets == ["org/chats"]  # the Hub dataset by its id, the split left out
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["kdray", "knowledge-distillation", "forward_kl", "pocl"]
    text = card.text
    assert "# fkl: the final student" in text and "distilled from the teacher `toy:teacher`" in text
    assert "- objective: `forward_kl`, kd_temperature 1.0, kd_ratio 0.75" in text
    assert "- curriculum: `pocl`" in text and "- teacher signal: `topk`" in text
    assert "| train | `hub:org/chats:train` | 2050 | 2048 |" in text and "| heldout | `data/heldout.jsonl` | 400 | 400 |" in text
    assert "optimizer steps: 6, global batch 32 sequences, learning rate 0.003, 2 workers, DeepSpeed ZeRO-2" in text
    assert "- loss: 1.9000 at step 1, 1.4000 at the last step" in text
    assert "| teacher | 0.947 | 0.935 | 2.74 | 400 |" in text
    assert "| student before | 0.330 | 0.225 | 2.07 | 400 |" in text
    assert "| student after | 0.484 | 0.318 | 2.73 | 400 |" in text
    assert "student round 1" not in text  # the final student's card shows the final student
    assert "kdray run /jobs/fkl/spec.yaml" in text


def test_the_metadata_names_only_what_the_hub_knows(tmp_path):
    """base_model and datasets are Hub ids, or left out: a local directory or file is no id."""
    report = _report(tmp_path)
    report["spec"]["student"]["model"] = "Qwen/Qwen2.5-1.5B-Instruct"
    report["spec"]["data"]["train"] = "/data/train.jsonl"
    report["spec"]["training"]["num_workers"] = 1
    card = ModelCard(model_card(report))
    assert card.data.base_model == "Qwen/Qwen2.5-1.5B-Instruct" and card.data.datasets is None
    assert "| train | `/data/train.jsonl` |" in card.text and "1 worker, DeepSpeed ZeRO-2" in card.text
    report["spec"]["student"]["model"] = "/models/student"
    assert ModelCard(model_card(report)).data.base_model is None


def test_a_rounds_card_shows_that_round_and_an_unevaluated_job_says_so(tmp_path):
    text = ModelCard(model_card(_report(tmp_path / "a"), label="student_round_1")).text
    assert "# fkl: student round 1" in text and "| student round 1 | 0.360 |" in text
    assert "student after" not in text
    bare = ModelCard(model_card(_report(tmp_path / "b", evaluation=False))).text
    assert "Not evaluated" in bare and "| teacher |" not in bare


def test_cards_are_written_into_each_student_directory_and_a_missing_one_is_skipped(tmp_path):
    report = _report(tmp_path)
    final, round1 = tmp_path / "student", tmp_path / "ckpt" / "student"
    final.mkdir()
    round1.mkdir(parents=True)
    written = write_model_cards(report, {"student_round_1": round1, "student_after": final,
                                         "student_round_2": tmp_path / "gone"})
    assert written == [round1 / "README.md", final / "README.md"]
    assert ModelCard.load(final / "README.md").data.base_model is None
    assert "# fkl: student round 1" in (round1 / "README.md").read_text()
    assert not list(tmp_path.rglob("*.tmp"))
