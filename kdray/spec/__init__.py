"""The JobSpec and everything about reading one: the one entry point for specs.

:mod:`.job` (the JobSpec and its model, data and evaluation sections), :mod:`.generation` (the pools),
:mod:`.training` (training, LoRA, teacher signal), :mod:`.objective` and :mod:`.curriculum`
(losses and curricula, discriminated by ``kind``), :mod:`.refs` (model and data references),
:mod:`.loading` (YAML/JSON in, every error at once out), :mod:`.base` (the strict base model).
"""

from kdray.spec.curriculum import DistiLLM2Curriculum, OnPolicyCurriculum, POCLCurriculum, ReplayCurriculum
from kdray.spec.job import (DEFAULT_JUDGE_TEMPLATE, DataSpec, EvaluationSpec, GenerationSpec, JobSpec,
                            JudgeSpec, ModelSpec)
from kdray.spec.loading import dump_spec, load_spec, parse_spec, parse_spec_text, spec_errors
from kdray.spec.objective import ObjectiveSpec
from kdray.spec.refs import (HUB_PREFIX, TOY_DATA, TOY_MODELS, TOY_PREFIX, check_data_ref, check_model_ref,
                             parse_hub_ref)
from kdray.spec.training import LoraSpec, TeacherSignalSpec, TrainingSpec

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE", "DataSpec", "DistiLLM2Curriculum", "EvaluationSpec", "GenerationSpec",
    "HUB_PREFIX", "JobSpec", "JudgeSpec", "LoraSpec", "ModelSpec", "ObjectiveSpec", "POCLCurriculum",
    "OnPolicyCurriculum", "ReplayCurriculum", "TOY_DATA", "TOY_MODELS", "TOY_PREFIX", "TeacherSignalSpec", "TrainingSpec",
    "check_data_ref", "check_model_ref", "dump_spec", "load_spec", "parse_hub_ref", "parse_spec",
    "parse_spec_text", "spec_errors",
]
