"""JSON Schemas (draft 7) for the cluster configs under ``cluster/``, and the checks a schema
cannot express.

Three formats live there:

* the Ray cluster launcher's YAML (what ``ray up`` takes), written from the Ray docs page
  "Cluster YAML Configuration Options" and the field list of ``ray/autoscaler/ray-schema.json``
  as shipped with Ray 2.60;
* KubeRay's ``RayCluster`` custom resource (``apiVersion: ray.io/v1``), written from the KubeRay
  API reference and the Go types it is generated from (``ray-operator/apis/ray/v1/
  raycluster_types.go``), plus the few Kubernetes core fields (pod template, container,
  resources) the configs rely on;
* a Kubernetes ``PersistentVolumeClaim`` (the volume the RayCluster mounts at ``/shared``).

Each schema describes the upstream format, then adds kdray's *GPU cluster profile*, marked as
such: GPU nodes say how many GPUs they have, and what every kdray cluster needs (a GPU worker
group, a ReadWriteMany shared volume). Sources are cited next to each required field:

``RAY_DOCS``
    https://docs.ray.io/en/latest/cluster/vms/references/ray-cluster-configuration.html
``RAY_SCHEMA``
    ray/autoscaler/ray-schema.json in the installed Ray 2.60 package
``KUBERAY_API``
    https://ray-project.github.io/kuberay/reference/api/ (ray.io/v1)
``KUBERAY_TYPES``
    https://github.com/ray-project/kuberay/blob/master/ray-operator/apis/ray/v1/raycluster_types.go
    (a field whose json tag has no ``omitempty`` is required in the generated CRD)
``K8S_POD``
    https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-v1/
``K8S_GPUS``
    https://kubernetes.io/docs/tasks/manage-gpus/scheduling-gpus/
``K8S_PVC``
    https://kubernetes.io/docs/reference/kubernetes-api/config-and-storage-resources/persistent-volume-claim-v1/
"""

from __future__ import annotations

import re
from typing import Any

LAUNCHER = "launcher"
RAYCLUSTER = "raycluster"
PVC = "pvc"

# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

_COMMANDS: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
_STRING_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}

# A Kubernetes resource quantity: an integer, a number, or a string such as "44", "0.5",
# "500m", "170Gi", "1e3" (K8S_POD, ResourceRequirements).
_QUANTITY_RE = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"
_QUANTITY: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": _QUANTITY_RE},
    ]
}
# GPUs are whole devices: Kubernetes extended resources take no fractions (K8S_GPUS).
GPU_RESOURCE = "nvidia.com/gpu"
_GPU_COUNT: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": r"^[1-9][0-9]*$"},
    ]
}

# ---------------------------------------------------------------------------------------------
# Ray cluster launcher
# ---------------------------------------------------------------------------------------------

# AWS instance families with NVIDIA GPUs (kdray GPU profile: such a node must declare GPU >= 1).
GPU_INSTANCE_TYPE = r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\."

_NODE_TYPE: dict[str, Any] = {
    "type": "object",
    # RAY_DOCS "node_config ... Required: Yes"; RAY_SCHEMA available_node_types.*.required
    # lists both node_config and resources (the docs let AWS/K8s detect resources, the
    # schema does not).
    "required": ["node_config", "resources"],
    "additionalProperties": False,
    "properties": {
        "node_config": {"type": "object"},
        # RAY_SCHEMA: resource amounts are integers >= 0 (CPU, GPU, memory, custom).
        "resources": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "min_workers": {"type": "integer", "minimum": 0},
        "max_workers": {"type": "integer", "minimum": 0},
        "idle_timeout_s": {"type": "number", "minimum": 0},
        "priority": {"type": "integer"},
        "labels": _STRING_MAP,
        "initialization_commands": _COMMANDS,
        "worker_setup_commands": _COMMANDS,
        "docker": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "worker_image": {"type": "string"},
                "pull_before_run": {"type": "boolean"},
                "worker_run_options": {"type": "array", "items": {"type": "string"}},
                "disable_automatic_runtime_detection": {"type": "boolean"},
                "disable_shm_size_detection": {"type": "boolean"},
            },
        },
    },
    # kdray GPU profile: a node on a GPU instance type says how many GPUs it has, so that the
    # autoscaler bin-packs GPU trainers and vLLM replicas onto it by the config itself.
    "if": {
        "required": ["node_config"],
        "properties": {
            "node_config": {
                "required": ["InstanceType"],
                "properties": {"InstanceType": {"type": "string", "pattern": GPU_INSTANCE_TYPE}},
            }
        },
    },
    "then": {
        "properties": {
            "resources": {"required": ["GPU"], "properties": {"GPU": {"type": "integer", "minimum": 1}}}
        }
    },
}

LAUNCHER_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Ray cluster launcher config (kdray GPU profile)",
    "type": "object",
    "required": [
        "cluster_name",  # RAY_DOCS "cluster_name ... Required: Yes"; RAY_SCHEMA required
        "provider",  # RAY_DOCS "provider ... Required: Yes"; RAY_SCHEMA required
        "auth",  # RAY_DOCS "auth ... Required: Yes"
        "head_node_type",  # RAY_DOCS "head_node_type ... Required: Yes"
        # RAY_DOCS: head_node_type is "the key for one of the node types in
        # available_node_types", so the node types must be there (Ray's validate_config
        # raises without them on AWS).
        "available_node_types",
    ],
    # RAY_SCHEMA: "additionalProperties": false at the top level; a misspelt key is an error,
    # not a silently ignored setting.
    "additionalProperties": False,
    "properties": {
        "cluster_name": {"type": "string", "minLength": 1},
        "max_workers": {"type": "integer", "minimum": 0},
        "upscaling_speed": {"type": "number", "minimum": 0},
        "idle_timeout_minutes": {"type": "number", "minimum": 0},
        "provider": {
            "type": "object",
            "required": ["type"],  # RAY_DOCS "provider.type ... Required: Yes"; RAY_SCHEMA
            "properties": {
                "type": {"type": "string", "minLength": 1},
                "region": {"type": "string"},
                "availability_zone": {"type": "string"},
                "cache_stopped_nodes": {"type": "boolean"},
                "use_internal_ips": {"type": "boolean"},
                "security_group": {"type": "object"},
            },
            # RAY_DOCS "provider.region ... (AWS) Required: Yes".
            "if": {"properties": {"type": {"const": "aws"}}},
            "then": {"required": ["region"]},
        },
        "auth": {
            "type": "object",
            "required": ["ssh_user"],  # RAY_DOCS "auth.ssh_user ... Required: Yes"
            "additionalProperties": False,
            "properties": {
                "ssh_user": {"type": "string", "minLength": 1},
                "ssh_private_key": {"type": "string"},
                "ssh_public_key": {"type": "string"},
                "ssh_proxy_command": {"type": "string"},
                "ssh_proxy_use_node_id": {"type": "boolean"},
            },
        },
        "docker": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "image": {"type": "string", "minLength": 1},
                "head_image": {"type": "string"},
                "worker_image": {"type": "string"},
                "container_name": {"type": "string", "minLength": 1},
                "pull_before_run": {"type": "boolean"},
                "run_options": {"type": "array", "items": {"type": "string"}},
                "head_run_options": {"type": "array", "items": {"type": "string"}},
                "worker_run_options": {"type": "array", "items": {"type": "string"}},
                "disable_automatic_runtime_detection": {"type": "boolean"},
                "disable_shm_size_detection": {"type": "boolean"},
                "use_podman": {"type": "boolean"},
            },
            # RAY_DOCS "docker.image ... Required: Yes (If Docker is in use.)": Docker is in use
            # when image, or head_image and worker_image, are set; `docker: {}` means no Docker.
            "anyOf": [
                {"required": ["image"]},
                {"required": ["head_image", "worker_image"]},
                {"maxProperties": 0},
            ],
        },
        "available_node_types": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": _NODE_TYPE,
        },
        "head_node_type": {"type": "string", "minLength": 1},
        "file_mounts": _STRING_MAP,
        "cluster_synced_files": {"type": "array", "items": {"type": "string"}},
        "file_mounts_sync_continuously": {"type": "boolean"},
        "rsync_exclude": {"type": "array", "items": {"type": "string"}},
        "rsync_filter": {"type": "array", "items": {"type": "string"}},
        "metadata": {"type": "object"},
        "initialization_commands": _COMMANDS,
        "setup_commands": _COMMANDS,
        "head_setup_commands": _COMMANDS,
        "worker_setup_commands": _COMMANDS,
        "head_start_ray_commands": _COMMANDS,
        "worker_start_ray_commands": _COMMANDS,
    },
}

# ---------------------------------------------------------------------------------------------
# KubeRay RayCluster
# ---------------------------------------------------------------------------------------------

_RESOURCES: dict[str, Any] = {
    "type": "object",
    "properties": {
        "limits": {"type": "object", "additionalProperties": _QUANTITY},
        "requests": {"type": "object", "additionalProperties": _QUANTITY},
    },
    # K8S_GPUS: "You cannot specify GPU requests without specifying limits."
    "if": {"required": ["requests"], "properties": {"requests": {"required": [GPU_RESOURCE]}}},
    "then": {"required": ["limits"], "properties": {"limits": {"required": [GPU_RESOURCE]}}},
}

_CONTAINER: dict[str, Any] = {
    "type": "object",
    "required": [
        "name",  # K8S_POD Container: "name ... Required"
        # kdray profile: the image is optional in the core API (controllers may default it)
        # but KubeRay has nothing to default it from; every Ray container names its image.
        "image",
    ],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "image": {"type": "string", "minLength": 1},
        "resources": _RESOURCES,
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                # K8S_POD VolumeMount: "name ... Required", "mountPath ... Required".
                "required": ["name", "mountPath"],
                "properties": {"name": {"type": "string"}, "mountPath": {"type": "string"}},
            },
        },
    },
}

_POD_TEMPLATE: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],  # a pod template without a pod spec starts nothing (K8S_POD)
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],  # K8S_POD PodSpec: "containers ... Required"
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {
                    "type": "array",
                    # K8S_POD Volume: "name ... Required".
                    "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                },
            },
        },
    },
}

_HEAD_GROUP: dict[str, Any] = {
    "type": "object",
    # KUBERAY_TYPES HeadGroupSpec: Template `json:"template"` (no omitempty). rayStartParams is
    # required by older CRDs (no omitempty in KubeRay <= 1.1) and optional in later ones, so it
    # is not required here; the configs set it anyway.
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        # KUBERAY_API: rayStartParams is "object (keys:string, values:string)"; an unquoted
        # `num-cpus: 0` is an integer and the API server rejects it.
        "rayStartParams": _STRING_MAP,
        "template": _POD_TEMPLATE,
    },
}

_WORKER_GROUP: dict[str, Any] = {
    "type": "object",
    # KUBERAY_TYPES WorkerGroupSpec: GroupName `json:"groupName"` and Template `json:"template"`
    # (no omitempty). minReplicas/maxReplicas have CRD defaults (0, 2147483647).
    "required": ["groupName", "template"],
    "additionalProperties": False,
    "properties": {
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string", "minLength": 1},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "rayStartParams": _STRING_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": {"type": "object"},
    },
}

# kdray GPU profile: a worker group whose pod template has a container with a GPU limit.
_GPU_WORKER_GROUP: dict[str, Any] = {
    "required": ["template"],
    "properties": {
        "template": {
            "required": ["spec"],
            "properties": {
                "spec": {
                    "required": ["containers"],
                    "properties": {
                        "containers": {
                            "contains": {
                                "required": ["resources"],
                                "properties": {
                                    "resources": {
                                        "required": ["limits"],
                                        "properties": {
                                            "limits": {
                                                "required": [GPU_RESOURCE],
                                                "properties": {GPU_RESOURCE: _GPU_COUNT},
                                            }
                                        },
                                    }
                                },
                            }
                        }
                    },
                }
            },
        }
    },
}

RAYCLUSTER_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "KubeRay RayCluster, ray.io/v1 (kdray GPU profile)",
    "type": "object",
    # Every Kubernetes object: apiVersion, kind, metadata.name (KUBERAY_API RayCluster);
    # spec: a RayCluster without one describes no cluster.
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},  # KUBERAY_API: ray.io/v1 (v1alpha1 is deprecated)
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            # A DNS-1123 label: KubeRay derives pod and service names from it.
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"}},
        },
        "spec": {
            "type": "object",
            # KUBERAY_TYPES RayClusterSpec: HeadGroupSpec `json:"headGroupSpec"` (no omitempty).
            # kdray profile: workerGroupSpecs too (a head without workers has no GPU).
            "required": ["headGroupSpec", "workerGroupSpecs"],
            # The CRD's structural schema prunes unknown fields silently: a misspelt
            # `workerGroupSpec` would vanish on `kubectl apply`. Here it is an error.
            "additionalProperties": False,
            "properties": {
                "suspend": {"type": "boolean"},
                "managedBy": {"type": "string"},
                "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "resources": {"type": "object"},
                        "image": {"type": "string"},
                        "imagePullPolicy": {"type": "string"},
                        "securityContext": {"type": "object"},
                        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "version": {"enum": ["v1", "v2"]},
                        "env": {"type": "array"},
                        "envFrom": {"type": "array"},
                        "volumeMounts": {"type": "array"},
                    },
                },
                "headServiceAnnotations": _STRING_MAP,
                "gcsFaultToleranceOptions": {"type": "object"},
                "authOptions": {"type": "object"},
                "headGroupSpec": _HEAD_GROUP,
                "workerGroupSpecs": {
                    "type": "array",
                    "minItems": 1,
                    "items": _WORKER_GROUP,
                    "contains": _GPU_WORKER_GROUP,  # kdray GPU profile
                },
            },
        },
    },
}

# ---------------------------------------------------------------------------------------------
# PersistentVolumeClaim (the /shared volume)
# ---------------------------------------------------------------------------------------------

PVC_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "PersistentVolumeClaim for /shared (kdray profile)",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],  # K8S_PVC
    "properties": {
        "apiVersion": {"const": "v1"},
        "kind": {"const": "PersistentVolumeClaim"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
        "spec": {
            "type": "object",
            # K8S_PVC: the API server rejects a claim without access modes or a storage request.
            "required": ["accessModes", "resources"],
            "properties": {
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                    # kdray profile: pods on several nodes write output_dir at once.
                    "contains": {"const": "ReadWriteMany"},
                },
                "storageClassName": {"type": "string"},
                "resources": {
                    "type": "object",
                    "required": ["requests"],
                    "properties": {
                        "requests": {
                            "type": "object",
                            "required": ["storage"],  # K8S_PVC: spec.resources.requests.storage
                            "properties": {"storage": _QUANTITY},
                        }
                    },
                },
            },
        },
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {LAUNCHER: LAUNCHER_SCHEMA, RAYCLUSTER: RAYCLUSTER_SCHEMA, PVC: PVC_SCHEMA}

# ---------------------------------------------------------------------------------------------
# Recognising a document, validating it, and the checks JSON Schema cannot express
# ---------------------------------------------------------------------------------------------

SHARED_MOUNT = "/shared"


def config_format(doc: Any) -> str | None:
    """Which format a parsed YAML document is in: LAUNCHER, RAYCLUSTER, PVC, or None.

    Kubernetes objects say what they are (``apiVersion`` + ``kind``); a launcher config has
    neither and carries ``provider`` / ``cluster_name`` instead.
    """
    if not isinstance(doc, dict):
        return None
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind == "RayCluster" and isinstance(api, str) and api.startswith("ray.io/"):
        return RAYCLUSTER
    if kind == "PersistentVolumeClaim" and api == "v1":
        return PVC
    if kind is None and api is None and ("provider" in doc or "cluster_name" in doc):
        return LAUNCHER
    return None


def schema_errors(doc: Any, fmt: str) -> list[str]:
    """Every JSON-Schema violation of ``doc`` against the schema of ``fmt``, as 'path: message'."""
    import jsonschema

    validator = jsonschema.Draft7Validator(SCHEMAS[fmt])
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def launcher_consistency_errors(doc: dict[str, Any]) -> list[str]:
    """Rules between fields of a launcher config (Ray's own validate_config checks these)."""
    errors: list[str] = []
    types = doc.get("available_node_types") or {}
    head = doc.get("head_node_type")
    # RAY_DOCS: head_node_type is "the key for one of the node types in available_node_types".
    if head not in types:
        errors.append(f"head_node_type {head!r} is not a key of available_node_types ({', '.join(types)})")
    # Ray's validate_config: the global max_workers must cover the sum of min_workers.
    total_min = sum(int(t.get("min_workers", 0)) for t in types.values() if isinstance(t, dict))
    if total_min > int(doc.get("max_workers", 2)):  # RAY_DOCS: max_workers defaults to 2
        errors.append(f"sum of min_workers ({total_min}) exceeds max_workers ({doc.get('max_workers', 2)})")
    return errors


def _pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = doc.get("spec") or {}
    pods = [("headGroupSpec", (spec.get("headGroupSpec") or {}).get("template") or {})]
    for group in spec.get("workerGroupSpecs") or []:
        pods.append((f"workerGroupSpecs[{group.get('groupName')}]", group.get("template") or {}))
    return pods


def raycluster_consistency_errors(doc: dict[str, Any]) -> list[str]:
    """Rules between fields of a RayCluster that the API server or KubeRay enforce."""
    errors: list[str] = []
    names = [g.get("groupName") for g in (doc.get("spec") or {}).get("workerGroupSpecs") or []]
    for name in {n for n in names if names.count(n) > 1}:
        errors.append(f"worker group name {name!r} is used twice")
    for group in (doc.get("spec") or {}).get("workerGroupSpecs") or []:
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2147483647)
        if lo > hi:
            errors.append(f"worker group {group.get('groupName')!r}: minReplicas {lo} > maxReplicas {hi}")
    # K8S_POD: a volumeMount must name a volume of the pod.
    for where, template in _pod_templates(doc):
        pod = template.get("spec") or {}
        volumes = {v.get("name") for v in pod.get("volumes") or []}
        for container in pod.get("containers") or []:
            for mount in container.get("volumeMounts") or []:
                if mount.get("name") not in volumes:
                    errors.append(
                        f"{where}: container {container.get('name')!r} mounts undeclared volume "
                        f"{mount.get('name')!r}"
                    )
    return errors


def shared_storage_errors(doc: dict[str, Any], fmt: str) -> list[str]:
    """kdray profile: every node sees the same /shared (output_dir, data, specs).

    Launcher: a command mounts storage at /shared on the host and Docker binds it into the
    container. RayCluster: every pod template mounts a persistentVolumeClaim at /shared.
    """
    errors: list[str] = []
    if fmt == LAUNCHER:
        docker = doc.get("docker") or {}
        options = " ".join(docker.get("run_options") or [])
        if not re.search(rf"-v\s+{SHARED_MOUNT}:{SHARED_MOUNT}\b", options):
            errors.append(
                f"docker.run_options do not bind {SHARED_MOUNT} into the container "
                f"(-v {SHARED_MOUNT}:{SHARED_MOUNT})"
            )
        mount = re.compile(rf"(^|\s)(sudo\s+)?mount\s+.*\s{SHARED_MOUNT}\s*$")
        if not any(mount.search(c) for c in doc.get("initialization_commands") or []):
            errors.append(f"initialization_commands do not mount shared storage at {SHARED_MOUNT}")
    elif fmt == RAYCLUSTER:
        for where, template in _pod_templates(doc):
            pod = template.get("spec") or {}
            claims = {
                v["name"] for v in pod.get("volumes") or [] if isinstance(v.get("persistentVolumeClaim"), dict)
            }
            mounted = any(
                m.get("mountPath") == SHARED_MOUNT and m.get("name") in claims
                for c in pod.get("containers") or []
                for m in c.get("volumeMounts") or []
            )
            if not mounted:
                errors.append(f"{where}: no container mounts a persistentVolumeClaim at {SHARED_MOUNT}")
    return errors


def shared_claims(doc: dict[str, Any]) -> set[str]:
    """The claimNames of the persistentVolumeClaim volumes a RayCluster's pods use."""
    return {
        v["persistentVolumeClaim"].get("claimName")
        for _, template in _pod_templates(doc)
        for v in (template.get("spec") or {}).get("volumes") or []
        if isinstance(v.get("persistentVolumeClaim"), dict)
    }


def all_errors(doc: Any) -> list[str]:
    """Schema errors, consistency errors and kdray-profile errors of one document."""
    fmt = config_format(doc)
    if fmt is None:
        return ["not a recognised cluster config (Ray launcher YAML, RayCluster, PersistentVolumeClaim)"]
    errors = schema_errors(doc, fmt)
    if fmt == LAUNCHER:
        errors += launcher_consistency_errors(doc)
    elif fmt == RAYCLUSTER:
        errors += raycluster_consistency_errors(doc)
    return errors + shared_storage_errors(doc, fmt)
