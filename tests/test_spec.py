"""JobSpec validation: every error reported at once, with its field path and a fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdray.errors import SpecError
from kdray.spec import JobSpec, dump_spec, load_spec, parse_spec, parse_spec_text
from specs import errors_of, minimal

REPO = Path(__file__).resolve().parents[1]


def test_minimal_spec_fills_every_default():
    spec = parse_spec(minimal())
    assert spec.training.zero_stage == 2
    assert spec.objective.kind == "forward_kl"
    assert spec.generation.sampling_temperature == 1.0 and spec.objective.kd_temperature == 1.0
    assert yaml.safe_load(dump_spec(spec)) == spec.model_dump(mode="json")


@pytest.mark.parametrize("job", sorted(p.name for p in (Path(__file__).parents[1] / "jobs").glob("*.yaml")) + ["replay"])
def test_a_spec_written_out_whole_reads_back_as_itself(job, toy_world):
    """spec.yaml, the service's saved copy of a submitted spec and ``kdray.validate(JobSpec)``
    write every field, defaults too: each reads back as the same spec (a replay spec once did
    not: its pool fields, written at their defaults, counted as set for sampler: worker)."""
    import kdray

    repo = Path(__file__).parents[1]
    data = yaml.safe_load((repo / "jobs" / ("demo.yaml" if job == "replay" else job)).read_text())
    if job == "replay":  # DistiLLM's replay, its student pool's fields at their defaults
        data.update(curriculum={"kind": "replay"}, objective={"kind": "skew_forward_kl"})
    spec = parse_spec(data, job, base_dir=str(repo / "jobs"))
    assert parse_spec_text(dump_spec(spec), job) == spec
    if job != "qwen2.5-7b-distillm2-pocl.yaml":  # hub models: nothing to check them against here
        assert kdray.validate(spec) == spec


def test_unknown_keys_wrong_types_and_missing_paths_are_all_reported(tmp_path):
    bad = minimal(
        bogus=1,
        teacher={"model": str(tmp_path / "nope")},
        training={"lr": "fast", "epochs": 0},
    )
    bad["data"] = {"train": "toy:train"}
    errs = errors_of(bad)
    assert "unknown key" in errs["bogus"] and "output_dir" in errs["bogus"]
    assert "does not exist" in errs["teacher.model"] and "save_pretrained" in errs["teacher.model"]
    assert "valid number" in errs["training.lr"] and "'fast'" in errs["training.lr"]
    assert "greater than or equal to 1" in errs["training.epochs"]
    assert errs["data.heldout"] == "required field is missing"
    assert len(errs) == 5


def test_a_misspelt_key_or_kind_is_answered_with_the_closest_name():
    errs = errors_of(minimal(evalution={}, training={"max_step": 5}, objective={"kind": "forward-kl"},
                             curriculum=[{"kind": "poc1"}]))
    assert errs["evalution"].startswith("unknown key (did you mean 'evaluation'?); valid keys here are: name,")
    assert "(did you mean 'max_steps'?)" in errs["training.max_step"]
    assert errs["objective.kind"].startswith("'forward-kl' is not one of: forward_kl, reverse_kl")
    assert errs["objective.kind"].endswith("(did you mean 'forward_kl'?)")
    assert "(did you mean 'pocl'?)" in errs["curriculum[0].kind"], errs
    assert "did you mean" not in errors_of(minimal(zzz=1))["zzz"]  # nothing close: no guess
    # Hugging Face's and TRL's names for a setting, and a known key as the first word.
    errs = errors_of(minimal(training={"learning_rate": 1e-4, "per_device_train_batch_size": 4, "lr_rate": 1},
                             objective={"kind": "forward_kl", "temperature": 2.0},
                             generation={"temperature": 0.7}))
    assert "(did you mean 'lr'?)" in errs["training.learning_rate"] and "(did you mean 'lr'?)" in errs["training.lr_rate"]
    assert "(did you mean 'micro_batch_size_per_worker'?)" in errs["training.per_device_train_batch_size"]
    assert "(did you mean 'kd_temperature'?)" in errs["objective.temperature"]
    assert "(did you mean 'sampling_temperature'?)" in errs["generation.temperature"]
    errs = errors_of(minimal(data={"train": ["a.jsonl", "b.jsonl"], "heldout": {"path": "h.jsonl"}}))
    assert errs["data.train"].startswith("give one dataset per split, not a list: put the rows in one JSONL")
    assert errs["data.heldout"] == "Input should be a valid string (got a mapping)"


def test_nested_unknown_key_lists_the_valid_keys():
    errs = errors_of(minimal(training={"batch_size": 8}))
    assert "global_batch_size" in errs["training.batch_size"]
    assert "micro_batch_size_per_worker" in errs["training.batch_size"]


def test_model_dir_without_config_is_rejected(tmp_path):
    errs = errors_of(minimal(student={"model": str(tmp_path)}))
    assert "config.json" in errs["student.model"]


def test_existing_model_dir_and_hub_id_are_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    spec = parse_spec(minimal(student={"model": str(tmp_path)}, teacher={"model": "Qwen/Qwen2.5-7B-Instruct"}))
    assert spec.student.model == str(tmp_path)


def test_unknown_toy_reference():
    errs = errors_of(minimal(teacher={"model": "toy:giant"}))
    assert "toy:teacher" in errs["teacher.model"]


def test_batch_sizes_must_divide_and_the_message_suggests_a_value():
    errs = errors_of(minimal(training={"global_batch_size": 10, "micro_batch_size_per_worker": 4, "num_workers": 2}))
    assert "multiple of micro_batch_size_per_worker * num_workers (8)" in errs["training"]
    assert "set global_batch_size to 8" in errs["training"]
    errs = errors_of(minimal(training={"global_batch_size": 7, "micro_batch_size_per_worker": 4, "num_workers": 1}))
    assert "set global_batch_size to 8" in errs["training"]  # the nearest multiple, not the one below


def test_gradient_accumulation_is_derived():
    spec = parse_spec(minimal(training={"global_batch_size": 32, "micro_batch_size_per_worker": 4, "num_workers": 2}))
    assert spec.training.gradient_accumulation_steps == 4


def test_group_by_length_is_off_by_default_and_its_window_names_itself_when_bad():
    training = parse_spec(minimal()).training
    assert training.group_by_length is False and training.length_group_size == 50
    training = parse_spec(minimal(training={"group_by_length": True, "length_group_size": 8})).training
    assert training.group_by_length is True and training.length_group_size == 8
    errs = errors_of(minimal(training={"group_by_length": "sometimes", "length_group_size": 0}))
    assert set(errs) == {"training.group_by_length", "training.length_group_size"}
    assert "greater than or equal to 1" in errs["training.length_group_size"]
    assert "valid boolean" in errs["training.group_by_length"]


def test_lengths_must_fit_the_model_window():
    errs = errors_of(minimal(teacher={"model": "toy:teacher", "max_model_len": 64}))
    assert "teacher.max_model_len (64)" in errs["teacher.max_model_len"]  # a check across fields, at the first


def test_a_job_that_needs_responses_must_name_their_field():
    """data.response_field: null (prompts only) suits a job that never reads a gold response:
    not one evaluated (the default), nor one trained on the data set's responses."""
    prompts_only = {"train": "toy:train", "heldout": "toy:heldout", "response_field": None}
    errs = errors_of(minimal(data=prompts_only))
    assert "evaluation scores the answers against them" in errs["data.response_field"]
    assert "or set evaluation.enabled: false" in errs["data.response_field"]
    assert parse_spec(minimal(data=prompts_only, evaluation={"enabled": False})).data.response_field is None
    errs = errors_of(minimal(data={**prompts_only, "response_source": "dataset"}, evaluation={"enabled": False}))
    assert "data.response_source: dataset trains on them" in errs["data.response_field"]
    assert "evaluation.enabled" not in errs["data.response_field"]


def test_invalid_yaml_reports_the_line():
    with pytest.raises(SpecError) as info:
        parse_spec_text("name: a\nteacher: [unclosed\n")
    assert "line" in info.value.errors[0][0]


def test_non_mapping_spec():
    with pytest.raises(SpecError, match="expected a mapping"):
        parse_spec_text("- just\n- a list\n")


def test_every_example_job_validates():
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert jobs, "jobs/ holds no example specs"
    for path in jobs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Run: kdray run "), f"{path.name} must open with the command that runs it"
        assert isinstance(load_spec(path), JobSpec)


def test_cli_validate_prints_resolved_spec_or_every_error(tmp_path):
    kdray = [sys.executable, "-m", "kdray.cli"]
    ok = subprocess.run([*kdray, "validate", str(REPO / "jobs" / "demo.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["training"]["zero_stage"] == 2

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(bogus=True, training={"zero_stage": 5})))
    res = subprocess.run([*kdray, "validate", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "bogus: unknown key" in res.stderr
    assert "training.zero_stage" in res.stderr
    assert "Traceback" not in res.stderr


def test_objective_is_a_tagged_union_with_per_kind_parameters():
    spec = parse_spec(minimal(objective={"kind": "skew_reverse_kl", "alpha": 0.2, "detach_mixture_student": True}))
    assert spec.objective.divergence_params() == {"alpha": 0.2, "detach_mixture_student": True}
    assert parse_spec(minimal()).objective.kind == "forward_kl"

    errs = errors_of(minimal(objective={"kind": "skew_reverse_kl", "alpha": 2, "mu": 0.5}))
    assert errs["objective.detach_mixture_student"] == "required field is missing"
    assert "less than or equal to 1" in errs["objective.alpha"]
    assert "unknown key" in errs["objective.mu"] and "detach_mixture_student" in errs["objective.mu"]

    errs = errors_of(minimal(objective={"alpha": 0.1}))
    assert "field 'kind' is missing" in errs["objective"] and "adaptive_kl" in errs["objective"]
    errs = errors_of(minimal(objective={"kind": "kl"}))
    assert "'kl' is not one of: forward_kl," in errs["objective.kind"]


def test_every_objective_kind_names_a_loss_library_divergence():
    import inspect

    from kdray import losses

    for kind, params in {
        "forward_kl": {}, "reverse_kl": {}, "tvd": {}, "skew_forward_kl": {},
        "skew_reverse_kl": {"detach_mixture_student": False}, "jsd": {}, "adaptive_kl": {},
    }.items():
        obj = parse_spec(minimal(objective={"kind": kind, **params})).objective
        fn = losses.DIVERGENCES[kind]
        accepted = set(inspect.signature(fn).parameters)
        assert set(obj.divergence_params()) <= accepted, kind


def test_a_model_or_a_curriculum_may_be_given_by_its_name_alone():
    """``teacher: toy:teacher`` as ``judge.model`` takes it; ``curriculum: pocl`` (or a list of
    kinds) as ``{kind: pocl}`` with its defaults; other values are still errors at their field."""
    spec = parse_spec(minimal(teacher="toy:teacher", student="toy:student", curriculum="pocl"))
    assert (spec.teacher.model, spec.student.model) == ("toy:teacher", "toy:student")
    assert spec.teacher == parse_spec(minimal()).teacher
    assert [c.kind for c in spec.curriculum] == ["pocl"] and spec.curriculum == parse_spec(
        minimal(curriculum={"kind": "pocl"})).curriculum
    listed = parse_spec(minimal(curriculum=["pocl", {"kind": "replay"}], objective={"kind": "skew_forward_kl"}))
    assert [c.kind for c in listed.curriculum] == ["pocl", "replay"]
    assert "did you mean 'pocl'" in errors_of(minimal(curriculum="pocll"))["curriculum[0].kind"]
    assert errors_of(minimal(teacher=3))["teacher"] == (
        "expected a mapping of this section's fields, or the model reference alone (docs/spec-reference.md lists "
        "them) (got 3)")
    assert errors_of(minimal(training="big"))["training"].startswith("expected a mapping of this section's fields (")
