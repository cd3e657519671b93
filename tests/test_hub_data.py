"""Hub dataset refs ``hub:ORG/NAME[:SPLIT]``: checked without network when a spec is validated,
read with ``datasets.load_dataset`` when a job runs (optional extra ``kdray[hub]``)."""

from __future__ import annotations

import sys

import pytest

from kdray.data.datasets import read_rows
from kdray.errors import DataError, SpecError
from kdray.spec import check_data_ref, parse_hub_ref, parse_spec

DOLLY = "databricks/databricks-dolly-15k"


@pytest.mark.parametrize("ref, expected", [
    (f"hub:{DOLLY}", (DOLLY, "train")),
    (f"hub:{DOLLY}:train", (DOLLY, "train")),
    (f"hub:{DOLLY}:train[:14000]", (DOLLY, "train[:14000]")),
    (f"hub:{DOLLY}:train[14000:]", (DOLLY, "train[14000:]")),
    (f"hub:{DOLLY}:train[14000:14500]", (DOLLY, "train[14000:14500]")),
    ("hub:org/name.v2:test[10%:20%]", ("org/name.v2", "test[10%:20%]")),
    ("hub:org/name:train[-500:]", ("org/name", "train[-500:]")),
    ("hub:org/name:train+validation[:10]", ("org/name", "train+validation[:10]")),
    ("hub:org/name:train[ :100 ]", ("org/name", "train[:100]")),
])
def test_hub_refs_parse_into_name_and_split(ref, expected):
    assert parse_hub_ref(ref) == expected
    assert check_data_ref(ref) == ref  # accepted as written, no network needed


@pytest.mark.parametrize("ref, says", [
    ("hub:dolly", "is not a hub id"),
    ("hub:", "is not a hub id"),
    ("hub:org/name/extra", "is not a hub id"),
    ("hub:org/name:", "is not a datasets split"),
    ("hub:org/name:train[:abc]", "is not a datasets split"),
    ("hub:org/name:train[5]", "is not a datasets split"),
    ("hub:org/name:train[:10", "is not a datasets split"),
    ("hub:org/name:train]", "is not a datasets split"),
])
def test_bad_hub_refs_say_what_is_wrong_and_the_form(ref, says):
    with pytest.raises(ValueError, match=says) as info:
        check_data_ref(ref)
    assert "e.g." in str(info.value)


def test_a_spec_with_hub_data_validates_and_bad_ones_name_the_field():
    base = {"name": "t", "output_dir": "runs/t", "teacher": {"model": "Qwen/Qwen2.5-7B-Instruct"},
            "student": {"model": "Qwen/Qwen2.5-1.5B-Instruct"}}
    spec = parse_spec(dict(base, data={"train": f"hub:{DOLLY}:train[:14000]", "heldout": f"hub:{DOLLY}:train[14000:]",
                                       "prompt_field": "instruction", "id_field": None}))
    assert spec.data.train.endswith("train[:14000]")
    with pytest.raises(SpecError) as info:
        parse_spec(dict(base, data={"train": "hub:dolly", "heldout": f"hub:{DOLLY}:train[x]"}))
    errors = dict(info.value.errors)
    assert "hub:ORG/NAME" in errors["data.train"]
    assert "split 'train[x]'" in errors["data.heldout"]


def test_reading_a_hub_ref_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError) as info:
        read_rows(f"hub:{DOLLY}:train[:10]")
    assert "pip install 'kdray[hub]'" in str(info.value) and DOLLY in str(info.value)


def test_a_hub_dataset_that_cannot_be_fetched_is_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("datasets", reason="needs the optional extra kdray[hub]")
    # No network here (and none wanted): offline mode with an empty cache cannot find it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    with pytest.raises(DataError) as info:
        read_rows("hub:kdray-tests/no-such-dataset:train[:10]")
    text = str(info.value)
    assert "cannot load hub dataset 'kdray-tests/no-such-dataset' split 'train[:10]'" in text
    assert "local .jsonl / .parquet" in text


def test_the_gpu_example_reads_dolly_from_the_hub_and_validates_here():
    from kdray.spec import load_spec
    from tests.test_e2e import REPO

    spec = load_spec(REPO / "jobs" / "qwen2.5-7b-distillm2-pocl.yaml")  # no network, no GPU needed
    assert parse_hub_ref(spec.data.train) == (DOLLY, "train[:14000]")
    assert parse_hub_ref(spec.data.heldout) == (DOLLY, "train[14000:]")
    assert (spec.teacher.model, spec.student.model) == ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")
    assert spec.training.zero_stage == 3 and spec.training.use_gpu and spec.student.dtype == "bfloat16"
    assert spec.generation.replicas == 4 and spec.generation.num_gpus_per_replica == 1
    assert {c.kind for c in spec.curriculum} == {"pocl", "distillm2"} and spec.objective.kind == "distillm2"
    assert spec.evaluation.per_round and spec.evaluation.judge is not None
