"""The cluster configs under cluster/: every YAML parses, is recognised as a Ray launcher config,
a KubeRay RayCluster, a KubeRay RayService or a PersistentVolumeClaim, and validates against its
schema (tests/cluster_schemas.py); the schemas catch the mistakes they exist for; the RayService's
Serve config deploys the kdray service that exists (kdray.service:app_builder, with arguments it
accepts); the commands and the example job spec in cluster/README.md are real.

Nothing here needs a cluster, a cloud account, a running Ray or the network.
"""

from __future__ import annotations

import copy
import importlib
import json
import posixpath
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema  # a dependency of Ray; the schemas below are applied with it
import pytest
import yaml
from cluster_schemas import (  # tests/ has no __init__.py: pytest puts it on sys.path
    GPU_RESOURCE,
    KDRAY_IMPORT_PATH,
    LAUNCHER,
    PVC,
    RAYCLUSTER,
    RAYSERVICE,
    SCHEMAS,
    SERVE_CONFIG_SCHEMA,
    all_errors,
    HEAD_RESOURCE,
    api_token_mounts,
    claim_mounts,
    config_format,
    fitting_groups,
    kdray_application,
    kdray_service_errors,
    launcher_consistency_errors,
    raycluster_consistency_errors,
    schema_errors,
    serve_config,
    serve_config_errors,
    shared_claims,
    shared_storage_errors,
    shm_errors,
)

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER_FILE = CLUSTER / "ray-cluster-gpu.yaml"
RAYCLUSTER_FILE = CLUSTER / "kuberay" / "raycluster.yaml"
PVC_FILE = CLUSTER / "kuberay" / "shared-pvc.yaml"
STATE_PVC_FILE = CLUSTER / "kuberay" / "state-pvc.yaml"
RAYSERVICE_FILE = CLUSTER / "kuberay" / "rayservice.yaml"
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


@pytest.fixture
def rayservice() -> dict[str, Any]:
    return _one(RAYSERVICE_FILE)


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
    assert {LAUNCHER_FILE, RAYCLUSTER_FILE, PVC_FILE, STATE_PVC_FILE, RAYSERVICE_FILE} <= found
    assert README.is_file()


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_yaml_parses_is_recognised_and_validates(path: Path):
    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert config_format(doc) is not None, f"{path}: not a launcher config, RayCluster, RayService or PVC"
        assert all_errors(doc) == [], f"{path}: " + "; ".join(all_errors(doc))


def test_formats_are_told_apart(launcher, raycluster, pvc, rayservice):
    assert config_format(launcher) == LAUNCHER
    assert config_format(raycluster) == RAYCLUSTER
    assert config_format(pvc) == PVC
    assert config_format(rayservice) == RAYSERVICE
    assert config_format({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {}}) is None
    assert config_format({"setup_commands": ["true"]}) is None  # neither provider nor cluster_name
    assert config_format(["cluster_name"]) is None
    assert all_errors({"foo": 1}) != []


@pytest.mark.parametrize("fmt", sorted(SCHEMAS))
def test_schemas_are_valid_draft7(fmt):
    jsonschema.Draft7Validator.check_schema(SCHEMAS[fmt])


def test_serve_config_schema_is_valid_draft7():
    jsonschema.Draft7Validator.check_schema(SERVE_CONFIG_SCHEMA)


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
# The RayService: its Serve config deploys the kdray service that exists, on the cluster it
# brings up, with the API token where the app builder reads it
# ------------------------------------------------------------------------------------------


def _import_attr(import_path: str) -> Any:
    """What Serve does with an application's import_path: 'module:attr' or 'module.attr'."""
    module, _, attr = import_path.partition(":") if ":" in import_path else import_path.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _kdray_app(doc: dict[str, Any]) -> dict[str, Any]:
    app = kdray_application(doc)
    assert app is not None, f"no Serve application with import_path {KDRAY_IMPORT_PATH}"
    return app


def _set_serve_config(doc: dict[str, Any], config: Any) -> None:
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)


def _cluster(doc: dict[str, Any]) -> dict[str, Any]:
    """A RayService's cluster, shaped as a RayCluster (for the RayCluster helpers above)."""
    return {"kind": "RayCluster", "spec": doc["spec"]["rayClusterConfig"]}


def _head_container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _pod_templates_of(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = doc["spec"]["rayClusterConfig"]
    return [("headGroupSpec", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]
    ]


def test_rayservice_cluster_is_the_raycluster_one(rayservice, raycluster, pvc):
    """rayClusterConfig mirrors raycluster.yaml: the same Ray, image, GPU workers, autoscaling and
    shared volume; only what the service needs is added."""
    import ray

    service, cluster = rayservice["spec"]["rayClusterConfig"], raycluster["spec"]
    assert service["rayVersion"] == cluster["rayVersion"] == ray.__version__
    assert service["enableInTreeAutoscaling"] is cluster["enableInTreeAutoscaling"] is True
    assert service["autoscalerOptions"] == cluster["autoscalerOptions"]
    assert shared_claims(rayservice) == shared_claims(raycluster) == {pvc["metadata"]["name"]}
    head_params = service["headGroupSpec"]["rayStartParams"]
    for key, value in cluster["headGroupSpec"]["rayStartParams"].items():
        assert head_params[key] == value, key
    assert _head_container(rayservice)["image"] == cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    ours, theirs = _gpu_group(_cluster(rayservice)), _gpu_group(raycluster)
    for key in ("groupName", "minReplicas", "maxReplicas"):
        assert ours[key] == theirs[key], key
    ours_c, theirs_c = ours["template"]["spec"]["containers"][0], theirs["template"]["spec"]["containers"][0]
    assert (ours_c["image"], ours_c["resources"]) == (theirs_c["image"], theirs_c["resources"])
    # KubeRay names the head service NAME-head-svc: the two files may share a namespace.
    assert rayservice["metadata"]["name"] != raycluster["metadata"]["name"]


def test_rayservice_serve_config_passes_rays_own_schema(rayservice):
    """Cross-check against the pydantic models Ray Serve validates a config with."""
    from ray.serve.schema import ServeDeploySchema

    assert serve_config_errors(rayservice) == []
    ServeDeploySchema.model_validate(serve_config(rayservice))  # raises what Serve would refuse


def test_serve_config_schema_names_only_fields_ray_knows():
    """Every field our Serve schema allows is a field of Ray 2.60's own models (none invented)."""
    from ray.serve.schema import (
        DeploymentSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    application = SERVE_CONFIG_SCHEMA["properties"]["applications"]["items"]
    deployment = application["properties"]["deployments"]["items"]
    actor = deployment["properties"]["ray_actor_options"]
    for ours, ray_model in ((SERVE_CONFIG_SCHEMA, ServeDeploySchema), (application, ServeApplicationSchema),
                            (deployment, DeploymentSchema), (actor, RayActorOptionsSchema)):
        assert set(ours["properties"]) <= set(ray_model.model_fields), ray_model.__name__
        required = {n for n, f in ray_model.model_fields.items() if f.is_required()}
        assert required <= set(ours.get("required", [])), ray_model.__name__


def test_kdray_application_imports_and_serves_at_the_root(rayservice):
    app = _kdray_app(rayservice)
    module, _, attr = app["import_path"].partition(":")
    assert module == "kdray.service"
    assert callable(getattr(importlib.import_module(module), attr))
    assert callable(_import_attr(app["import_path"]))
    assert app["route_prefix"] == "/"  # the client calls SERVER/v1/jobs..., SERVER/healthz


def test_kdray_application_args_are_accepted_by_app_builder(rayservice, tmp_path, monkeypatch):
    """Build the application as Serve will, from the file's args (tmp paths standing in for the
    pod's /shared and /etc/kdray): a Serve Application, with no running Ray."""
    from ray import serve

    app = _kdray_app(rayservice)
    builder = _import_attr(app["import_path"])
    args = dict(app["args"])
    assert {"state_dir", "output_root", "token_file"} <= set(args)
    token = tmp_path / posixpath.basename(args["token_file"])
    token.write_text("s3cret\n", encoding="utf-8")
    args.update(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), token_file=str(token))
    monkeypatch.delenv("KDRAY_API_TOKEN", raising=False)  # the token comes from token_file alone
    built = builder(args)
    assert isinstance(built, serve.Application)
    # The same args minus token_file, with the token in KDRAY_API_TOKEN, build too.
    monkeypatch.setenv("KDRAY_API_TOKEN", "s3cret")
    assert isinstance(builder({k: v for k, v in args.items() if k != "token_file"}), serve.Application)
    # Serve refuses options for a deployment the application lacks ("does not exist"), and the
    # config's ray_actor_options would replace the code's: the file leaves them to the code, which
    # asks for no CPU and pins the replica to the head.
    ingress = built._bound_deployment
    assert ingress.ray_actor_options["num_cpus"] == 0
    assert ingress.ray_actor_options["resources"] == {"node:__internal_head__": 0.001}
    for deployment in app.get("deployments") or []:
        assert deployment["name"] == ingress.name and "ray_actor_options" not in deployment


def test_api_token_secret_is_mounted_where_token_file_points(rayservice):
    token_file = _kdray_app(rayservice)["args"]["token_file"]
    mounts = api_token_mounts(rayservice, token_file)
    # The head alone: the replica that reads it is pinned there; the GPU workers never see it.
    assert mounts == {"headGroupSpec": mounts["headGroupSpec"], "workerGroupSpecs[gpu]": None}
    secret = mounts["headGroupSpec"]
    assert secret is not None
    # The Secret the file's own commands create, under the key the volume maps to the file.
    created = re.search(r"kubectl create secret generic (\S+) --from-literal=(\w+)=", RAYSERVICE_FILE.read_text())
    assert created and created.group(1) == secret
    pod = dict(_pod_templates_of(rayservice))["headGroupSpec"]["spec"]
    (volume,) = [v for v in pod["volumes"] if (v.get("secret") or {}).get("secretName") == secret]
    assert volume["secret"]["items"] == [{"key": created.group(2), "path": posixpath.basename(token_file)}]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == posixpath.dirname(token_file) and mount["readOnly"] is True
    for where, template in _pod_templates_of(rayservice)[1:]:
        volumes = template["spec"]["volumes"]
        assert not [v for v in volumes if "secret" in v], f"{where} mounts a Secret"


def test_the_job_store_is_on_a_volume_of_the_head_alone(rayservice):
    """SQLite's WAL mode needs every user of the store on one host: the replica and the jobs'
    drivers all run on the head, and the store's claim is mounted there only, block storage
    that one node attaches (never the shared file system)."""
    state_dir = _kdray_app(rayservice)["args"]["state_dir"]
    claims = claim_mounts(rayservice, state_dir)
    state_pvc = _one(STATE_PVC_FILE)
    assert claims == {"headGroupSpec": state_pvc["metadata"]["name"], "workerGroupSpecs[gpu]": None}
    assert state_pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not state_dir.startswith("/shared") and claims["headGroupSpec"] not in shared_claims(rayservice)
    # Ray's token authentication guards the dashboard the operator must reach on the pod network.
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    assert "kubectl apply -f cluster/kuberay/state-pvc.yaml" in RAYSERVICE_FILE.read_text()


def test_service_replica_is_pinned_to_the_head(rayservice):
    """kdray's code pins the one replica to the head (see the app builder test): it runs next
    to the dashboard (the default dashboard_url), the jobs' drivers and the store's volume,
    and never holds a GPU worker up."""
    config = serve_config(rayservice)
    (deployment,) = _kdray_app(rayservice)["deployments"]
    assert deployment["num_replicas"] == 1
    assert config["proxy_location"] == "HeadOnly"  # the one proxy is where the replica is
    assert "dashboard_url" not in _kdray_app(rayservice)["args"]  # http://127.0.0.1:8265 on the head
    assert rayservice["spec"]["upgradeStrategy"] == {"type": "None"}


def test_rayservice_commands_reach_the_serve_port(rayservice):
    name = rayservice["metadata"]["name"]
    ports = {p["name"]: p["containerPort"] for p in _head_container(rayservice)["ports"]}
    assert ports["dashboard"] == 8265
    assert ports["serve"] == (serve_config(rayservice).get("http_options") or {}).get("port", 8000)
    text = RAYSERVICE_FILE.read_text(encoding="utf-8")
    forward = re.search(r"kubectl port-forward svc/(\S+) (\d+):(\d+)", text)
    assert forward and forward.group(1) == f"{name}-serve-svc" and int(forward.group(3)) == ports["serve"]
    local = f"http://127.0.0.1:{forward.group(2)}"
    servers = re.findall(r"(?:--server |KDRAY_SERVER=)(\S+)", text)
    assert servers and set(servers) == {local}
    assert f"kubectl wait --for=condition=Ready rayservice/{name} " in text
    assert f"kubectl get rayservice {name} " in text


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


@pytest.mark.parametrize("which", ["raycluster", "rayservice"])
def test_every_pod_has_a_memory_backed_dev_shm_and_a_head_without_one_is_rejected(which, request):
    doc = request.getfixturevalue(which)
    assert shm_errors(doc) == []
    spec = doc["spec"]["rayClusterConfig"] if which == "rayservice" else doc["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["volumeMounts"] = [m for m in head["containers"][0]["volumeMounts"]
                                             if m["mountPath"] != "/dev/shm"]
    _assert_caught(shm_errors(doc), "headGroupSpec: container 'ray-head'", "/dev/shm")
    assert all("headGroupSpec" in e for e in shm_errors(doc))
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]
    for volume in worker["volumes"]:
        volume.get("emptyDir", {}).pop("medium", None)  # a disk-backed emptyDir is no fix
    _assert_caught(shm_errors(doc), "workerGroupSpecs[gpu]: container 'ray-worker'")


def test_job_store_off_a_volume_of_the_head_alone_is_rejected(rayservice):
    config = serve_config(rayservice)
    config["applications"][0]["args"]["state_dir"] = "/shared/kdray-state"
    _set_serve_config(rayservice, config)
    _assert_caught(kdray_service_errors(rayservice), "is on the shared volume")
    config["applications"][0]["args"]["state_dir"] = "/tmp/kdray-state"  # the container's own layer: lost with the pod
    _set_serve_config(rayservice, config)
    _assert_caught(kdray_service_errors(rayservice), "is not on a persistentVolumeClaim of the head pod")


def test_pvc_without_storage_request_is_rejected(pvc):
    del pvc["spec"]["resources"]["requests"]["storage"]
    _assert_caught(schema_errors(pvc, PVC), "'storage' is a required property")


def test_rayservice_without_serve_config_is_rejected(rayservice):
    del rayservice["spec"]["serveConfigV2"]
    _assert_caught(schema_errors(rayservice, RAYSERVICE), "'serveConfigV2' is a required property")
    _assert_caught(kdray_service_errors(rayservice), "no application with import_path")


def test_rayservice_without_head_group_is_rejected(rayservice):
    del rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    _assert_caught(
        schema_errors(rayservice, RAYSERVICE), "spec.rayClusterConfig", "'headGroupSpec' is a required property"
    )


def test_rayservice_without_cluster_config_is_rejected(rayservice):
    # `rayClusterSpec` is the Go field's name; the JSON key is rayClusterConfig.
    rayservice["spec"]["rayClusterSpec"] = rayservice["spec"].pop("rayClusterConfig")
    _assert_caught(
        schema_errors(rayservice, RAYSERVICE),
        "'rayClusterConfig' is a required property",
        "'rayClusterSpec' was unexpected",
    )


def test_rayservice_cluster_replacing_upgrade_is_rejected(rayservice):
    rayservice["spec"]["upgradeStrategy"]["type"] = "NewCluster"
    _assert_caught(schema_errors(rayservice, RAYSERVICE), "'None' was expected")
    rayservice["spec"]["upgradeStrategy"]["type"] = "Recreate"  # no such strategy at all
    _assert_caught(schema_errors(rayservice, RAYSERVICE), "is not one of")


def test_serve_config_that_does_not_parse_is_rejected(rayservice):
    rayservice["spec"]["serveConfigV2"] = "applications:\n  - name: kdray\n   import_path: [\n"
    _assert_caught(serve_config_errors(rayservice), "does not parse as YAML")


def test_unknown_service_arg_is_refused_by_app_builder(rayservice, tmp_path, monkeypatch):
    from kdray.errors import ConfigError
    from kdray.service.app import app_builder

    args = dict(_kdray_app(rayservice)["args"])
    args.update(state_dir=str(tmp_path / "state"), output_root=str(tmp_path / "runs"), outputs_root="/shared/x")
    del args["token_file"]
    monkeypatch.setenv("KDRAY_API_TOKEN", "s3cret")
    with pytest.raises(ConfigError, match="unknown kdray service args.*outputs_root"):
        app_builder(args)


def test_import_path_that_does_not_exist_is_caught(rayservice):
    for bad in ("kdray.service:no_such_builder", "kdray.no_such_module:app_builder"):
        with pytest.raises((ImportError, AttributeError)):
            _import_attr(bad)
        config = serve_config(rayservice)
        config["applications"][0]["import_path"] = bad
        _set_serve_config(rayservice, config)
        _assert_caught(kdray_service_errors(rayservice), "no application with import_path 'kdray.service:app_builder'")
    config["applications"][0]["import_path"] = "kdray/service.py"  # not an import path at all
    _set_serve_config(rayservice, config)
    _assert_caught(serve_config_errors(rayservice), "import_path", "does not match")


def _with_actor_options(rayservice, options):
    config = serve_config(rayservice)
    config["applications"][0]["deployments"][0]["ray_actor_options"] = options
    _set_serve_config(rayservice, config)
    return config


def test_misspelt_actor_option_is_rejected_though_ray_ignores_it(rayservice):
    from ray.serve.schema import ServeDeploySchema

    config = _with_actor_options(rayservice, {"num_cpu": 0, "resources": {HEAD_RESOURCE: 0.001}})
    ServeDeploySchema.model_validate(config)  # Ray drops the key silently ...
    _assert_caught(serve_config_errors(rayservice), "'num_cpu' was unexpected")  # ... we do not
    # ... and the replica would reserve Serve's default CPU, which the head (num-cpus 0), the
    # only node with the head resource, does not have: it would stay pending forever.
    _assert_caught(kdray_service_errors(rayservice), "deployment 'kdray'", "fit no node group")


def test_actor_options_that_let_the_replica_off_the_head_are_rejected(rayservice):
    _with_actor_options(rayservice, {"num_cpus": 0})  # replacing kdray's, without the head resource
    assert fitting_groups(rayservice, {"num_cpus": 0}) == ["headGroupSpec", "workerGroupSpecs[gpu]"]
    _assert_caught(kdray_service_errors(rayservice), "let the replica run off the head")
    _with_actor_options(rayservice, {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}})
    assert kdray_service_errors(rayservice) == []  # kdray's own options, repeated: fine


def test_head_resource_string_that_is_not_quoted_json_is_rejected(rayservice):
    _with_actor_options(rayservice, {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.001}})
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["resources"] = "{kdray: 1}"
    _assert_caught(kdray_service_errors(rayservice), "is not a quoted JSON object")


def test_token_file_without_a_secret_mount_is_rejected(rayservice):
    head = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]
    for mount in head["template"]["spec"]["containers"][0]["volumeMounts"]:
        if mount["name"] == "kdray-api-token":
            mount["mountPath"] = "/etc/secrets"
    _assert_caught(kdray_service_errors(rayservice), "headGroupSpec: no secret volume provides token_file")


def test_service_without_any_api_token_is_rejected(rayservice):
    config = serve_config(rayservice)
    del config["applications"][0]["args"]["token_file"]
    _set_serve_config(rayservice, config)
    _assert_caught(kdray_service_errors(rayservice), "no API token")


def test_service_files_off_the_shared_volume_are_rejected(rayservice):
    config = serve_config(rayservice)
    config["applications"][0]["args"]["output_root"] = "/tmp/runs"  # the trainers' pods never see it
    _set_serve_config(rayservice, config)
    _assert_caught(kdray_service_errors(rayservice), "args.output_root '/tmp/runs' is not under /shared")


def test_rayservice_pod_without_shared_volume_is_rejected(rayservice):
    container = _head_container(rayservice)
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/shared"]
    _assert_caught(shared_storage_errors(rayservice, RAYSERVICE), "headGroupSpec", "/shared")


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


def _haproxy_switch(container: dict[str, Any]) -> str | None:
    return {e["name"]: e.get("value") for e in container.get("env") or []}.get("RAY_SERVE_ENABLE_HA_PROXY")


def test_every_ray_node_turns_on_haproxy_ingress(launcher, raycluster, rayservice):
    """The service is served through Ray Serve's HAProxy ingress on every cluster kdray ships
    (docs/service.md, "Latency"). Every Ray process reads the switch from its own environment,
    so a node without it would disagree with the controller: each Ray container and each
    `ray start` of the launcher sets it."""
    for doc in (raycluster, _cluster(rayservice)):
        spec = doc["spec"]
        templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for template in templates:
            for container in template["spec"]["containers"]:
                assert _haproxy_switch(container) == "1", (doc["kind"], container["name"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in launcher[key] if "ray start" in c]
        assert starts and all("RAY_SERVE_ENABLE_HA_PROXY=1 ray start" in c for c in starts), key
