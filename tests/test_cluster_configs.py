"""The cluster configs under cluster/: every YAML parses, is recognised as a Ray launcher config,
a KubeRay RayCluster or a PersistentVolumeClaim, and validates against its schema
(tests/cluster_schemas.py); the schemas catch the mistakes they exist for; the commands and
the example job spec in cluster/README.md are real.

Nothing here needs a cluster, a cloud account or the network.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema  # a dependency of Ray; the schemas below are applied with it
import pytest
import yaml
from cluster_schemas import (  # tests/ has no __init__.py: pytest puts it on sys.path
    GPU_RESOURCE,
    LAUNCHER,
    PVC,
    RAYCLUSTER,
    SCHEMAS,
    all_errors,
    config_format,
    launcher_consistency_errors,
    raycluster_consistency_errors,
    schema_errors,
    shared_claims,
    shared_storage_errors,
)

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER_FILE = CLUSTER / "ray-cluster-gpu.yaml"
RAYCLUSTER_FILE = CLUSTER / "kuberay" / "raycluster.yaml"
PVC_FILE = CLUSTER / "kuberay" / "shared-pvc.yaml"
README = CLUSTER / "README.md"


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _one(path: Path) -> dict[str, Any]:
    docs = _docs(path)
    assert len(docs) == 1, f"{path} holds {len(docs)} documents"
    return copy.deepcopy(docs[0])


@pytest.fixture
def launcher() -> dict[str, Any]:
    return _one(LAUNCHER_FILE)


@pytest.fixture
def raycluster() -> dict[str, Any]:
    return _one(RAYCLUSTER_FILE)


@pytest.fixture
def pvc() -> dict[str, Any]:
    return _one(PVC_FILE)


def _gpu_group(doc: dict[str, Any]) -> dict[str, Any]:
    def has_gpu(group: dict[str, Any]) -> bool:
        containers = group["template"]["spec"]["containers"]
        return any(GPU_RESOURCE in (c.get("resources") or {}).get("limits", {}) for c in containers)

    groups = [g for g in doc["spec"]["workerGroupSpecs"] if has_gpu(g)]
    assert groups, "the RayCluster has no GPU worker group"
    return groups[0]


def _gpu_node_type(doc: dict[str, Any]) -> dict[str, Any]:
    types = [t for t in doc["available_node_types"].values() if t.get("resources", {}).get("GPU")]
    assert types, "the launcher config has no GPU node type"
    return types[0]


# ------------------------------------------------------------------------------------------
# The files themselves
# ------------------------------------------------------------------------------------------


def test_the_expected_files_exist():
    found = set(_yaml_files())
    assert {LAUNCHER_FILE, RAYCLUSTER_FILE, PVC_FILE} <= found
    assert README.is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_yaml_parses_is_recognised_and_validates(path: Path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert config_format(doc) is not None, f"{path}: not a launcher config, RayCluster or PVC"
        assert all_errors(doc) == [], f"{path}: " + "; ".join(all_errors(doc))


def test_formats_are_told_apart(launcher, raycluster, pvc):
    assert config_format(launcher) == LAUNCHER
    assert config_format(raycluster) == RAYCLUSTER
    assert config_format(pvc) == PVC
    assert config_format({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {}}) is None
    assert config_format({"setup_commands": ["true"]}) is None  # neither provider nor cluster_name
    assert config_format(["cluster_name"]) is None
    assert all_errors({"foo": 1}) != []


@pytest.mark.parametrize("fmt", sorted(SCHEMAS))
def test_schemas_are_valid_draft7(fmt):
    jsonschema.Draft7Validator.check_schema(SCHEMAS[fmt])


def test_launcher_also_passes_the_schema_ray_ships(launcher):
    """Cross-check against Ray's own ray-schema.json (the one `ray up` applies)."""
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    if not path.is_file():
        pytest.skip("this Ray build ships no ray-schema.json")
    ray_schema = json.loads(path.read_text(encoding="utf-8"))
    errors = [e.message for e in jsonschema.Draft7Validator(ray_schema).iter_errors(launcher)]
    assert errors == []
    # ... and Ray's schema, like ours, rejects a config without a provider.
    del launcher["provider"]
    assert any("provider" in e.message for e in jsonschema.Draft7Validator(ray_schema).iter_errors(launcher))


def test_the_raycluster_volume_is_the_read_write_many_claim(raycluster, pvc):
    assert shared_claims(raycluster) == {pvc["metadata"]["name"]}
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_launcher_and_raycluster_agree_with_kdray_on_ray_version(launcher, raycluster):
    """kdray pins ray==2.60.0: the cluster must run that Ray (a mismatch fails at connect)."""
    import ray

    assert raycluster["spec"]["rayVersion"] == ray.__version__
    assert f"rayproject/ray:{ray.__version__}-" in launcher["docker"]["image"]


def test_launcher_installs_kdray_with_the_gpu_extra(launcher):
    pip = [c for c in launcher["setup_commands"] if "pip install" in c]
    assert any(re.search(r"kdray\[gpu\]", c) for c in pip), pip


# ------------------------------------------------------------------------------------------
# Negative cases: each mutation of a valid file must be caught, by the expected rule
# ------------------------------------------------------------------------------------------


def _assert_caught(errors: list[str], *needles: str) -> None:
    assert errors, "expected a validation error, got none"
    text = "\n".join(errors)
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"


@pytest.mark.parametrize("field", ["cluster_name", "provider", "auth", "head_node_type", "available_node_types"])
def test_launcher_without_a_required_field_is_rejected(launcher, field):
    del launcher[field]
    _assert_caught(schema_errors(launcher, LAUNCHER), f"'{field}' is a required property")


def test_launcher_unknown_top_level_key_is_rejected(launcher):
    launcher["setup_command"] = launcher.pop("setup_commands")  # a typo Ray would reject too
    _assert_caught(schema_errors(launcher, LAUNCHER), "'setup_command' was unexpected")


def test_launcher_aws_provider_needs_a_region(launcher):
    del launcher["provider"]["region"]
    _assert_caught(schema_errors(launcher, LAUNCHER), "provider", "'region' is a required property")


def test_launcher_gpu_node_without_gpu_resource_is_rejected(launcher):
    node = _gpu_node_type(launcher)
    del node["resources"]["GPU"]
    _assert_caught(schema_errors(launcher, LAUNCHER), "'GPU' is a required property")


def test_launcher_gpu_node_with_zero_gpus_is_rejected(launcher):
    _gpu_node_type(launcher)["resources"]["GPU"] = 0
    _assert_caught(schema_errors(launcher, LAUNCHER), "less than the minimum of 1")


def test_launcher_cpu_node_needs_no_gpu(launcher):
    """The GPU rule follows the instance type: the m5 head is valid without a GPU."""
    head = launcher["available_node_types"][launcher["head_node_type"]]
    assert "GPU" not in head["resources"]
    assert schema_errors(launcher, LAUNCHER) == []
    head["node_config"]["InstanceType"] = "g5.xlarge"  # the same node on a GPU instance
    _assert_caught(schema_errors(launcher, LAUNCHER), "'GPU' is a required property")


def test_launcher_node_type_without_node_config_is_rejected(launcher):
    del _gpu_node_type(launcher)["node_config"]
    _assert_caught(schema_errors(launcher, LAUNCHER), "'node_config' is a required property")


def test_launcher_fractional_resource_is_rejected(launcher):
    _gpu_node_type(launcher)["resources"]["CPU"] = 47.5
    _assert_caught(schema_errors(launcher, LAUNCHER), "is not of type 'integer'")


def test_launcher_docker_without_an_image_is_rejected(launcher):
    del launcher["docker"]["image"]
    _assert_caught(schema_errors(launcher, LAUNCHER), "docker")


def test_launcher_head_node_type_must_name_a_node_type(launcher):
    launcher["head_node_type"] = "ray.head.default"
    _assert_caught(launcher_consistency_errors(launcher), "'ray.head.default' is not a key")


def test_launcher_min_workers_over_max_workers_is_rejected(launcher):
    _gpu_node_type(launcher)["min_workers"] = launcher["max_workers"] + 1
    _assert_caught(launcher_consistency_errors(launcher), "exceeds max_workers")


def test_launcher_without_shared_storage_is_rejected(launcher):
    launcher["docker"]["run_options"] = [o for o in launcher["docker"]["run_options"] if "/shared" not in o]
    _assert_caught(shared_storage_errors(launcher, LAUNCHER), "do not bind /shared")
    launcher["initialization_commands"] = [c for c in launcher["initialization_commands"] if "mount -t" not in c]
    _assert_caught(shared_storage_errors(launcher, LAUNCHER), "do not mount shared storage")


def test_raycluster_without_head_group_is_rejected(raycluster):
    del raycluster["spec"]["headGroupSpec"]
    _assert_caught(schema_errors(raycluster, RAYCLUSTER), "'headGroupSpec' is a required property")


def test_raycluster_head_group_without_template_is_rejected(raycluster):
    del raycluster["spec"]["headGroupSpec"]["template"]
    _assert_caught(schema_errors(raycluster, RAYCLUSTER), "'template' is a required property")


def test_raycluster_worker_group_without_group_name_is_rejected(raycluster):
    del _gpu_group(raycluster)["groupName"]
    _assert_caught(schema_errors(raycluster, RAYCLUSTER), "'groupName' is a required property")


def test_raycluster_gpu_worker_group_without_gpu_limit_is_rejected(raycluster):
    group = _gpu_group(raycluster)
    for container in group["template"]["spec"]["containers"]:
        for part in ("limits", "requests"):
            container.get("resources", {}).get(part, {}).pop(GPU_RESOURCE, None)
    _assert_caught(schema_errors(raycluster, RAYCLUSTER), "spec.workerGroupSpecs", "valid under the given schema")


def test_raycluster_gpu_request_without_limit_is_rejected(raycluster):
    container = _gpu_group(raycluster)["template"]["spec"]["containers"][0]
    del container["resources"]["limits"][GPU_RESOURCE]
    _assert_caught(schema_errors(raycluster, RAYCLUSTER), f"'{GPU_RESOURCE}' is a required property")


def test_raycluster_fractional_gpu_is_rejected(raycluster):
    container = _gpu_group(raycluster)["template"]["spec"]["containers"][0]
    container["resources"]["limits"][GPU_RESOURCE] = "0.5"
    assert schema_errors(raycluster, RAYCLUSTER) != []


def test_raycluster_unquoted_ray_start_param_is_rejected(raycluster):
    raycluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # YAML `num-cpus: 0`
    _assert_caught(schema_errors(raycluster, RAYCLUSTER), "0 is not of type 'string'")


def test_raycluster_misspelt_spec_key_is_rejected(raycluster):
    raycluster["spec"]["workerGroupSpec"] = raycluster["spec"].pop("workerGroupSpecs")
    _assert_caught(schema_errors(raycluster, RAYCLUSTER), "'workerGroupSpec' was unexpected")


def test_raycluster_old_api_version_is_rejected(raycluster):
    raycluster["apiVersion"] = "ray.io/v1alpha1"
    assert config_format(raycluster) == RAYCLUSTER  # still recognised ...
    _assert_caught(schema_errors(raycluster, RAYCLUSTER), "'ray.io/v1' was expected")  # ... and refused


def test_raycluster_min_replicas_over_max_is_rejected(raycluster):
    group = _gpu_group(raycluster)
    group["minReplicas"] = group["maxReplicas"] + 1
    _assert_caught(raycluster_consistency_errors(raycluster), "minReplicas")


def test_raycluster_mount_of_undeclared_volume_is_rejected(raycluster):
    raycluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] = []
    _assert_caught(raycluster_consistency_errors(raycluster), "undeclared volume 'shared'")


def test_raycluster_pod_without_shared_volume_is_rejected(raycluster):
    container = _gpu_group(raycluster)["template"]["spec"]["containers"][0]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/shared"]
    _assert_caught(shared_storage_errors(raycluster, RAYCLUSTER), "workerGroupSpecs[gpu]", "/shared")


def test_pvc_read_write_once_is_rejected(pvc):
    pvc["spec"]["accessModes"] = ["ReadWriteOnce"]
    _assert_caught(schema_errors(pvc, PVC), "spec.accessModes", "valid under the given schema")


def test_pvc_without_storage_request_is_rejected(pvc):
    del pvc["spec"]["resources"]["requests"]["storage"]
    _assert_caught(schema_errors(pvc, PVC), "'storage' is a required property")


# ------------------------------------------------------------------------------------------
# cluster/README.md and the comments of the configs: real commands, a valid job spec
# ------------------------------------------------------------------------------------------


def _command_text() -> list[tuple[str, str, bool]]:
    """(where, text, whole) for every place a shell command is written: README code blocks and
    the indented command lines of the YAML files' comments (whole commands), and README inline
    code (often a fragment such as `kdray run`)."""
    out: list[tuple[str, str, bool]] = []
    readme = README.read_text(encoding="utf-8")
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.DOTALL):
        out += [("README.md", line, True) for line in block.splitlines() if not line.startswith(("#", " "))]
    prose = re.sub(r"```.*?```", "", readme, flags=re.DOTALL)
    out += [("README.md", span, False) for span in re.findall(r"`([^`\n]+)`", prose)]
    for path in _yaml_files():
        for line in path.read_text(encoding="utf-8").splitlines():
            if re.match(r"#\s{3,}\S", line):  # top comments: commands are indented by 3+
                out.append((str(path.relative_to(ROOT)), line[1:], True))
    return out


# `kdray` in command position: first word, after `--` (ray job submit, kubectl exec), a quote
# (ray exec '...'), `&&` / `;`, or `env VAR=value`; elsewhere it is an argument (a name).
_KDRAY_CALL = re.compile(
    r"(?:^|--\s+|['\"(]|&&\s*|;\s*)(?:env\s+(?:\S+=\S+\s+)+)?kdray\s+([^'\"`#|;&)\n]*)"
)


def _kdray_invocations() -> list[tuple[str, list[str], bool]]:
    return [
        (where, shlex.split(m.group(1)), whole)
        for where, text, whole in _command_text()
        for m in _KDRAY_CALL.finditer(text.strip())
    ]


def _subcommands(parser: Any) -> dict[str, Any]:
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_readme_and_configs_only_use_real_kdray_commands_and_flags():
    from kdray.cli import build_parser

    invocations = _kdray_invocations()
    whole = {args[0] for _, args, w in invocations if w and args}
    assert {"run", "validate", "report", "compare"} <= whole, whole  # the extraction works
    subcommands = _subcommands(build_parser())
    for where, args, is_whole in invocations:
        assert args and args[0] in subcommands, f"{where}: `kdray {' '.join(args)}`: no such command"
        flags = set(subcommands[args[0]]._option_string_actions)
        for token in args[1:]:
            if token.startswith("-") and token not in ("-", "..."):
                assert token.split("=")[0] in flags, f"{where}: `kdray {' '.join(args)}`: no flag {token}"
        if is_whole:
            try:
                build_parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{where}: `kdray {' '.join(args)}` does not parse")


def test_run_commands_connect_to_the_cluster():
    """A `kdray run` typed on the head (not through `ray job submit`, which sets RAY_ADDRESS)
    needs --address: without it kdray starts a private Ray and never uses the GPU workers."""
    checked = 0
    for where, text, whole in _command_text():
        if whole and "ray job submit" not in text:
            for match in re.finditer(r"kdray run [^'\"`#|;&)\n]*", text):
                assert "--address" in match.group(0), f"{where}: {text.strip()}"
                checked += 1
    assert checked >= 2


def _readme_spec() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    specs = [b for b in blocks if re.search(r"^teacher:", b, flags=re.MULTILINE)]
    assert len(specs) == 1, "cluster/README.md should hold exactly one example job spec"
    return specs[0]


def test_readme_example_spec_is_a_valid_gpu_job(tmp_path):
    from kdray.spec import parse_spec_text

    text = _readme_spec()
    raw = yaml.safe_load(text)
    # Every path of the spec is on the shared volume, absolute.
    for path in (raw["output_dir"], raw["data"]["train"], raw["data"]["heldout"]):
        assert path.startswith("/shared/"), path
    # kdray checks data paths exist where the spec is loaded: stand a tmp dir in for /shared.
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "heldout.jsonl"):
        (tmp_path / "data" / name).write_text('{"id": 0, "prompt": "1+1", "response": "2"}\n')
    spec = parse_spec_text(text.replace("/shared/", f"{tmp_path}/"), "cluster/README.md")
    assert spec.training.use_gpu is True
    assert spec.training.zero_stage == 3
    assert spec.teacher.dtype == spec.student.dtype == "bfloat16"
    assert not spec.teacher.model.startswith("toy:") and not spec.student.model.startswith("toy:")
    assert spec.generation.num_gpus_per_replica >= 1
    assert spec.generation.enforce_eager is False
    # The pool and the trainers fit the cluster the configs describe (max GPU workers x 4).
    gpus = sum(
        t["max_workers"] * t["resources"]["GPU"]
        for t in _one(LAUNCHER_FILE)["available_node_types"].values()
        if t["resources"].get("GPU")
    )
    assert spec.training.num_workers <= gpus
    assert spec.generation.replicas * spec.generation.num_gpus_per_replica <= gpus
