"""JSON Schemas (draft 7) for the cluster configs under ``cluster/``, and the checks a schema
cannot express.

Four formats live there:

* the Ray cluster launcher's YAML (what ``ray up`` takes), written from the Ray docs page
  "Cluster YAML Configuration Options" and the field list of ``ray/autoscaler/ray-schema.json``
  as shipped with Ray 2.60;
* KubeRay's ``RayCluster`` custom resource (``apiVersion: ray.io/v1``), written from the KubeRay
  API reference and the Go types it is generated from (``ray-operator/apis/ray/v1/
  raycluster_types.go``), plus the few Kubernetes core fields (pod template, container,
  resources) the configs rely on;
* a Kubernetes ``PersistentVolumeClaim`` (the volume the RayCluster mounts at ``/shared``);
* KubeRay's ``RayService`` (``ray.io/v1``): the same cluster spec under ``rayClusterConfig``, plus
  ``serveConfigV2``, a Ray Serve config file as a YAML string, which deploys kdray's HTTP service
  (``kdray.service:app_builder``). The Serve config gets its own schema, written from the Ray
  Serve docs and the pydantic models of ``ray/serve/schema.py`` in Ray 2.60.

Each schema describes the upstream format, then adds kdray's *GPU cluster profile*, marked as
such: GPU nodes say how many GPUs they have, and what every kdray cluster needs (a GPU worker
group, a ReadWriteMany shared volume). The RayService adds a *kdray service profile*: the Serve
config deploys kdray's service with its files on ``/shared``, its API token reaches the app
builder, its replica fits a node, and the cluster is never replaced under running jobs. Sources
are cited next to each required field:

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
``K8S_SECRET_VOLUME``
    https://kubernetes.io/docs/concepts/configuration/secret/#using-secrets-as-files-from-a-pod
``KUBERAY_SERVICE_TYPES``
    https://github.com/ray-project/kuberay/blob/master/ray-operator/apis/ray/v1/rayservice_types.go
    (RayServiceSpec; with KUBERAY_API's RayServiceSpec table, KubeRay v1.7)
``KUBERAY_RAYSERVICE``
    https://docs.ray.io/en/latest/cluster/kubernetes/user-guides/rayservice.html
``RAY_RESOURCES``
    https://docs.ray.io/en/latest/ray-core/scheduling/resources.html (custom resources; on KubeRay
    ``rayStartParams.resources`` holds a JSON object inside a quoted string)
``SERVE_CONFIG``
    https://docs.ray.io/en/latest/serve/production-guide/config.html (Serve config files)
``SERVE_SCHEMA``
    ray/serve/schema.py in the installed Ray 2.60 (ServeDeploySchema, ServeApplicationSchema,
    DeploymentSchema, RayActorOptionsSchema): field names, which fields are required
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from typing import Any

LAUNCHER = "launcher"
RAYCLUSTER = "raycluster"
PVC = "pvc"
RAYSERVICE = "rayservice"

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

# RayClusterSpec: the `spec` of a RayCluster, and the `rayClusterConfig` of a RayService
# (KUBERAY_SERVICE_TYPES: RayClusterSpec RayClusterSpec `json:"rayClusterConfig"`).
_RAYCLUSTER_SPEC: dict[str, Any] = {
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
}

# A DNS-1123 label: KubeRay derives pod and service names from a RayCluster's or RayService's name.
_K8S_NAME: dict[str, Any] = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"}

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
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": _K8S_NAME}},
        "spec": _RAYCLUSTER_SPEC,
    },
}

# ---------------------------------------------------------------------------------------------
# PersistentVolumeClaim (the /shared volume)
# ---------------------------------------------------------------------------------------------

PVC_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "PersistentVolumeClaim (/shared, or the job service's state volume)",
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
                    # Which mode a claim needs depends on where it is mounted: the one at /shared
                    # ReadWriteMany (pods on several nodes write output_dir at once), the service's
                    # state volume on the head alone (tests/test_cluster_configs.py checks both).
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

# ---------------------------------------------------------------------------------------------
# Ray Serve config (the YAML string in a RayService's serveConfigV2)
# ---------------------------------------------------------------------------------------------

# The application kdray's service is: an application builder taking the service's args.
KDRAY_IMPORT_PATH = "kdray.service:app_builder"

_NON_NEGATIVE: dict[str, Any] = {"type": "number", "minimum": 0}
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(\.{_IDENT})*"

# Ray's pydantic models ignore unknown keys (SERVE_SCHEMA: no `extra="forbid"`): a misspelt
# `num_cpu` is dropped without a word and the replica reserves the default CPU. Every level below
# is closed, so a misspelling is an error here. Field names: SERVE_CONFIG and SERVE_SCHEMA.
_RAY_ACTOR_OPTIONS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "runtime_env": {"type": "object"},
        "num_cpus": _NON_NEGATIVE,  # SERVE_SCHEMA: ge=0; Serve reserves 1 when unset
        "num_gpus": _NON_NEGATIVE,
        "memory": _NON_NEGATIVE,
        "resources": {"type": "object", "additionalProperties": _NON_NEGATIVE},  # custom resources
        "accelerator_type": {"type": "string"},
        "label_selector": _STRING_MAP,
    },
}

_SERVE_DEPLOYMENT: dict[str, Any] = {
    "type": "object",
    "required": ["name"],  # SERVE_SCHEMA DeploymentSchema: name is the only required field
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "num_replicas": {"anyOf": [{"type": "integer", "minimum": 0}, {"const": "auto"}]},
        "max_ongoing_requests": {"type": "integer", "minimum": 1},
        "max_queued_requests": {"type": "integer"},
        "user_config": {"type": "object"},
        "autoscaling_config": {"type": "object"},
        "graceful_shutdown_wait_loop_s": _NON_NEGATIVE,
        "graceful_shutdown_timeout_s": _NON_NEGATIVE,
        "health_check_period_s": _NON_NEGATIVE,
        "health_check_timeout_s": _NON_NEGATIVE,
        "ray_actor_options": _RAY_ACTOR_OPTIONS,
        "placement_group_bundles": {"type": "array", "items": {"type": "object"}},
        "placement_group_strategy": {"type": "string"},
        "max_replicas_per_node": {"type": "integer", "minimum": 1},
        "logging_config": {"type": "object"},
    },
}

_SERVE_APPLICATION: dict[str, Any] = {
    "type": "object",
    # SERVE_SCHEMA ServeApplicationSchema: import_path is required. kdray profile: name too
    # (KubeRay reports each application's status under its name).
    "required": ["import_path", "name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        # SERVE_SCHEMA: starts with "/", no trailing "/" (but "/" itself), no wildcards.
        "route_prefix": {"type": "string", "pattern": r"^/([^{}]*[^/{}])?$"},
        # SERVE_SCHEMA import_path: "module.sub:attr", or "module.attr" (at least one dot).
        "import_path": {"type": "string", "pattern": rf"^({_DOTTED}:{_DOTTED}|{_IDENT}(\.{_IDENT})+)$"},
        "runtime_env": {"type": "object"},
        # An application builder's keyword arguments (SERVE_CONFIG "args").
        "args": {"type": "object"},
        "deployments": {"type": "array", "items": _SERVE_DEPLOYMENT},
        "logging_config": {"type": "object"},
    },
}

SERVE_CONFIG_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Ray Serve config file (serveConfigV2 of a RayService)",
    "type": "object",
    "required": ["applications"],  # SERVE_SCHEMA ServeDeploySchema: applications is required
    "additionalProperties": False,
    "properties": {
        "proxy_location": {"enum": ["Disabled", "HeadOnly", "EveryNode"]},  # SERVE_CONFIG
        "http_options": {
            "type": "object",
            "properties": {
                "host": {"type": "string"},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "request_timeout_s": _NON_NEGATIVE,
                "keep_alive_timeout_s": _NON_NEGATIVE,
            },
        },
        "grpc_options": {"type": "object"},
        "logging_config": {"type": "object"},
        "target_capacity": {"type": "number", "minimum": 0, "maximum": 100},
        "applications": {"type": "array", "minItems": 1, "items": _SERVE_APPLICATION},
    },
}

# ---------------------------------------------------------------------------------------------
# KubeRay RayService
# ---------------------------------------------------------------------------------------------

RAYSERVICE_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "KubeRay RayService, ray.io/v1 (kdray service profile)",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],  # KUBERAY_API RayService
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": _K8S_NAME}},
        "spec": {
            "type": "object",
            "required": [
                # KUBERAY_SERVICE_TYPES: RayClusterSpec `json:"rayClusterConfig"` (no omitempty in
                # current KubeRay; older CRDs had omitempty, but a RayService without a cluster
                # has nowhere to run).
                "rayClusterConfig",
                # `json:"serveConfigV2,omitempty"` (+optional) upstream; kdray profile: the
                # service is the point of this RayService.
                "serveConfigV2",
                # KUBERAY_API RayServiceUpgradeStrategy; kdray profile, see the allOf below.
                "upgradeStrategy",
            ],
            "additionalProperties": False,  # as for RayClusterSpec: pruned silently otherwise
            "properties": {
                # KUBERAY_SERVICE_TYPES: "a YAML multi-line scalar string"; its content is checked
                # against SERVE_CONFIG_SCHEMA by serve_config_errors().
                "serveConfigV2": {"type": "string", "minLength": 1},
                "rayClusterConfig": _RAYCLUSTER_SPEC,
                "upgradeStrategy": {
                    "type": "object",
                    "required": ["type"],
                    "additionalProperties": False,
                    "properties": {
                        # KUBERAY_API RayServiceUpgradeType.
                        "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
                        "clusterUpgradeOptions": {"type": "object"},
                    },
                },
                "serveService": {"type": "object"},  # a corev1 Service (KUBERAY_API)
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},  # KUBERAY_API
                "managedBy": {"type": "string"},
                "suspend": {"type": "boolean"},
                # KUBERAY_API: "Deprecated: This field is not used anymore" (kuberay issue 1685);
                # still accepted by the CRD, so allowed, and a no-op.
                "serviceUnhealthySecondThreshold": {"type": "integer", "minimum": 0},
                "deploymentUnhealthySecondThreshold": {"type": "integer", "minimum": 0},
            },
        },
    },
    # kdray service profile: kdray's jobs are Ray jobs of this one cluster. An upgrade that moves
    # the service to a new RayCluster (NewCluster, the default, and the incremental variant)
    # deletes the old cluster with its running jobs (KUBERAY_RAYSERVICE, zero-downtime upgrade),
    # so the cluster is never replaced behind the jobs' back.
    "allOf": [
        {
            "properties": {
                "spec": {"properties": {"upgradeStrategy": {"properties": {"type": {"const": "None"}}}}}
            }
        }
    ],
}

SCHEMAS: dict[str, dict[str, Any]] = {
    LAUNCHER: LAUNCHER_SCHEMA,
    RAYCLUSTER: RAYCLUSTER_SCHEMA,
    PVC: PVC_SCHEMA,
    RAYSERVICE: RAYSERVICE_SCHEMA,
}

# ---------------------------------------------------------------------------------------------
# Recognising a document, validating it, and the checks JSON Schema cannot express
# ---------------------------------------------------------------------------------------------

SHARED_MOUNT = "/shared"
#: The resource Ray gives the head node (ray._common.constants.HEAD_NODE_RESOURCE_NAME), which
#: kdray's service replica asks a sliver of (kdray.service.app.HEAD_RESOURCE).
HEAD_RESOURCE = "node:__internal_head__"


def config_format(doc: Any) -> str | None:
    """Which format a parsed YAML document is in: LAUNCHER, RAYCLUSTER, PVC, RAYSERVICE, or None.

    Kubernetes objects say what they are (``apiVersion`` + ``kind``); a launcher config has
    neither and carries ``provider`` / ``cluster_name`` instead.
    """
    if not isinstance(doc, dict):
        return None
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if kind == "RayCluster" and isinstance(api, str) and api.startswith("ray.io/"):
        return RAYCLUSTER
    if kind == "RayService" and isinstance(api, str) and api.startswith("ray.io/"):
        return RAYSERVICE
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


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayClusterSpec of a RayCluster (its ``spec``) or of a RayService (``rayClusterConfig``)."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayService":
        return spec.get("rayClusterConfig") or {}
    return spec


def _pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = _cluster_spec(doc)
    pods = [("headGroupSpec", (spec.get("headGroupSpec") or {}).get("template") or {})]
    for group in spec.get("workerGroupSpecs") or []:
        pods.append((f"workerGroupSpecs[{group.get('groupName')}]", group.get("template") or {}))
    return pods


def raycluster_consistency_errors(doc: dict[str, Any]) -> list[str]:
    """Rules between fields of a RayCluster (or a RayService's cluster) that the API server or
    KubeRay enforce."""
    errors: list[str] = []
    names = [g.get("groupName") for g in _cluster_spec(doc).get("workerGroupSpecs") or []]
    for name in {n for n in names if names.count(n) > 1}:
        errors.append(f"worker group name {name!r} is used twice")
    for group in _cluster_spec(doc).get("workerGroupSpecs") or []:
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
    container. RayCluster and RayService: every pod template mounts a persistentVolumeClaim at
    /shared.
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
    elif fmt in (RAYCLUSTER, RAYSERVICE):
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


def shm_errors(doc: dict[str, Any]) -> list[str]:
    """kdray profile: every pod (head and workers) of a RayCluster or RayService mounts a
    memory-backed emptyDir at /dev/shm. A container's /dev/shm is 64 MiB by default: Ray then
    puts its object store in /tmp (disk) instead, and vLLM and NCCL run short of shared memory
    (https://docs.ray.io/en/latest/cluster/kubernetes/user-guides/config.html)."""
    errors: list[str] = []
    for where, template in _pod_templates(doc):
        pod = template.get("spec") or {}
        memory = {v.get("name") for v in pod.get("volumes") or []
                  if (v.get("emptyDir") or {}).get("medium") == "Memory"}
        for container in pod.get("containers") or []:
            if not any(m.get("mountPath") == "/dev/shm" and m.get("name") in memory
                       for m in container.get("volumeMounts") or []):
                errors.append(f"{where}: container {container.get('name')!r} mounts no emptyDir with medium: Memory "
                              "at /dev/shm (Ray would put its object store in /tmp)")
    return errors


def shared_claims(doc: dict[str, Any]) -> set[str]:
    """The claimNames of the persistentVolumeClaims a RayCluster's (or RayService's) pods mount
    at /shared."""
    return {claim for claim in claim_mounts(doc, SHARED_MOUNT).values() if claim is not None}


# ---------------------------------------------------------------------------------------------
# RayService: the Serve config inside it, and how it fits the cluster it deploys on
# ---------------------------------------------------------------------------------------------


def serve_config(doc: dict[str, Any]) -> Any:
    """The parsed ``serveConfigV2`` of a RayService (raises yaml.YAMLError when it does not parse)."""
    import yaml

    return yaml.safe_load((doc.get("spec") or {}).get("serveConfigV2") or "")


def serve_config_errors(doc: dict[str, Any]) -> list[str]:
    """serveConfigV2 parses as YAML into a Serve config that SERVE_CONFIG_SCHEMA accepts.

    KubeRay only checks that the field is a string; a Serve config that does not parse or does
    not validate surfaces later, as a failed deploy on the running cluster."""
    import jsonschema
    import yaml

    try:
        config = serve_config(doc)
    except yaml.YAMLError as exc:
        return [f"spec.serveConfigV2 does not parse as YAML: {exc}"]
    validator = jsonschema.Draft7Validator(SERVE_CONFIG_SCHEMA)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    return [f"spec.serveConfigV2.{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def kdray_application(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The Serve application of a RayService that runs kdray's service, or None."""
    import yaml

    try:
        config = serve_config(doc)
    except yaml.YAMLError:
        return None
    apps = config.get("applications") if isinstance(config, dict) else None
    for app in apps if isinstance(apps, list) else []:
        if isinstance(app, dict) and app.get("import_path") == KDRAY_IMPORT_PATH:
            return app
    return None


def _quantity(value: Any) -> float | None:
    """A CPU or GPU count from a Kubernetes quantity ("8", 4, "500m"); None if it is not one."""
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def group_resources(group: dict[str, Any]) -> dict[str, float | None]:
    """The Ray resources one pod of a head or worker group offers: CPU and GPU (from
    rayStartParams, else from the Ray container's limits, as KubeRay does; None when unknown)
    and the custom resources of rayStartParams.resources (RAY_RESOURCES).

    Raises ValueError when rayStartParams.resources is not a JSON object once the shell that
    runs `ray start` has unquoted it."""
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    offered: dict[str, float | None] = {
        "CPU": _quantity(params["num-cpus"]) if "num-cpus" in params else _quantity(limits.get("cpu", "")),
        "GPU": _quantity(params["num-gpus"]) if "num-gpus" in params else _quantity(limits.get(GPU_RESOURCE, 0)),
    }
    if "resources" in params:
        try:  # KubeRay passes the value to a shell: `ray start ... --resources=VALUE`
            words = shlex.split(str(params["resources"]))
            custom = json.loads(words[0]) if len(words) == 1 else None
        except ValueError:  # unbalanced quotes, or not JSON
            custom = None
        if not isinstance(custom, dict):
            raise ValueError(f"rayStartParams.resources {params['resources']!r} is not a quoted JSON object")
        offered.update({str(k): float(v) for k, v in custom.items()})
    return offered


def _node_groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = _cluster_spec(doc)
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{g.get('groupName')}]", g) for g in spec.get("workerGroupSpecs") or []]
    return groups


def fitting_groups(doc: dict[str, Any], actor_options: dict[str, Any]) -> list[str]:
    """The node groups one of whose pods can host a Serve replica with these ray_actor_options.

    Serve reserves 1 CPU for a replica whose options leave num_cpus unset (SERVE_SCHEMA)."""
    num_cpus, num_gpus = actor_options.get("num_cpus"), actor_options.get("num_gpus")
    wanted = {"CPU": 1.0 if num_cpus is None else float(num_cpus), "GPU": float(num_gpus or 0)}
    wanted.update({str(k): float(v) for k, v in (actor_options.get("resources") or {}).items()})

    def offers(offered: dict[str, float | None], name: str, amount: float) -> bool:
        if amount <= 0:
            return True
        if name in ("CPU", "GPU") and offered[name] is None:
            return True  # a count this file does not state: give the benefit of the doubt
        return (offered.get(name) or 0) >= amount

    fits = []
    for where, group in _node_groups(doc):
        offered = group_resources(group)
        if where == "headGroupSpec":
            offered[HEAD_RESOURCE] = 1.0  # Ray gives the head node this resource (RAY_HEAD_RESOURCE)
        if all(offers(offered, name, amount) for name, amount in wanted.items()):
            fits.append(where)
    return fits


def _head_template(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(_pod_templates(doc)).get("headGroupSpec") or {}


def claim_mounts(doc: dict[str, Any], path: str) -> dict[str, str | None]:
    """For each pod template, the persistentVolumeClaim its Ray container mounts at ``path`` or
    above it (the longest such mount), or None."""
    found: dict[str, str | None] = {}
    for where, template in _pod_templates(doc):
        pod = template.get("spec") or {}
        claims = {v.get("name"): (v.get("persistentVolumeClaim") or {}).get("claimName")
                  for v in pod.get("volumes") or [] if isinstance(v.get("persistentVolumeClaim"), dict)}
        container = (pod.get("containers") or [{}])[0]
        best, found[where] = "", None
        for mount in container.get("volumeMounts") or []:
            at = str(mount.get("mountPath", "")).rstrip("/")
            if mount.get("name") in claims and (path == at or path.startswith(at + "/")) and len(at) > len(best):
                best, found[where] = at, claims[mount["name"]]
    return found


def api_token_mounts(doc: dict[str, Any], token_file: str) -> dict[str, str | None]:
    """For each pod template, the Secret that puts ``token_file`` into its Ray container
    (a secret volume mounted at the file's directory that provides the file's name), or None."""
    directory, name = posixpath.split(token_file)
    found: dict[str, str | None] = {}
    for where, template in _pod_templates(doc):
        pod = template.get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        container = (pod.get("containers") or [{}])[0]  # KubeRay's Ray container is the first
        found[where] = None
        for mount in container.get("volumeMounts") or []:
            secret = (volumes.get(mount.get("name")) or {}).get("secret")
            if mount.get("mountPath", "").rstrip("/") != directory or not isinstance(secret, dict):
                continue
            items = secret.get("items")
            # K8S_SECRET_VOLUME: without items every key becomes a file of its name; with items,
            # only the listed keys, each at its `path`.
            if items is None or any(i.get("path") == name for i in items):
                found[where] = secret.get("secretName")
    return found


def kdray_service_errors(doc: dict[str, Any]) -> list[str]:
    """kdray service profile of a RayService: the Serve config deploys kdray's service, its
    files are on /shared, its API token reaches the app builder, and its replicas fit a node."""
    errors: list[str] = []
    app = kdray_application(doc)
    if app is None:
        return [f"spec.serveConfigV2 has no application with import_path {KDRAY_IMPORT_PATH!r}"]
    args = app.get("args") or {}
    # The jobs' outputs: the drivers on the head and the trainers on the GPU workers see the
    # same files. The job store: on a volume of the head alone (its users all run there, and
    # SQLite's WAL mode does not work over a network file system).
    output_root = str(args.get("output_root") or "")
    if not (output_root == SHARED_MOUNT or output_root.startswith(SHARED_MOUNT + "/")):
        errors.append(f"application {app.get('name')!r}: args.output_root {output_root!r} is not under {SHARED_MOUNT}")
    state_dir = str(args.get("state_dir") or "")
    claims = claim_mounts(doc, state_dir)
    if claims.get("headGroupSpec") is None:
        errors.append(f"application {app.get('name')!r}: args.state_dir {state_dir!r} is not on a "
                      "persistentVolumeClaim of the head pod")
    elif claims["headGroupSpec"] in shared_claims(doc):
        errors.append(f"application {app.get('name')!r}: args.state_dir {state_dir!r} is on the shared volume; "
                      "the job store belongs on a volume of the head alone")
    # kdray's replica (pinned to the head) reads token_file when it starts; else KDRAY_API_TOKEN.
    token_file = args.get("token_file")
    if token_file:
        if api_token_mounts(doc, str(token_file)).get("headGroupSpec") is None:
            errors.append(f"headGroupSpec: no secret volume provides token_file {token_file}")
    elif "KDRAY_API_TOKEN" not in ((app.get("runtime_env") or {}).get("env_vars") or {}):
        container = ((_head_template(doc).get("spec") or {}).get("containers") or [{}])[0]
        if "KDRAY_API_TOKEN" not in {e.get("name") for e in container.get("env") or []}:
            errors.append(f"headGroupSpec: no API token for application {app.get('name')!r} "
                          "(args.token_file, or KDRAY_API_TOKEN)")
    # A replica whose resources no node group offers can never be scheduled.
    for deployment in app.get("deployments") or []:
        options = deployment.get("ray_actor_options")
        if not isinstance(options, dict):
            continue  # the options in kdray's code apply
        try:
            fits = fitting_groups(doc, options)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if not fits:
            errors.append(f"deployment {deployment.get('name')!r}: ray_actor_options {options} fit no node group")
        elif fits != ["headGroupSpec"]:  # they replace kdray's own, which pin the replica to the head
            errors.append(f"deployment {deployment.get('name')!r}: ray_actor_options {options} let the replica run "
                          f"off the head ({', '.join(fits)}); they replace kdray's, which pin it there: leave them "
                          f"out, or keep num_cpus 0 and resources {{{HEAD_RESOURCE}: 0.001}}")
    return errors


def all_errors(doc: Any) -> list[str]:
    """Schema errors, consistency errors and kdray-profile errors of one document."""
    fmt = config_format(doc)
    if fmt is None:
        return ["not a recognised cluster config (Ray launcher YAML, RayCluster, RayService, PersistentVolumeClaim)"]
    errors = schema_errors(doc, fmt)
    if fmt == LAUNCHER:
        errors += launcher_consistency_errors(doc)
    elif fmt == RAYCLUSTER:
        errors += raycluster_consistency_errors(doc) + shm_errors(doc)
    elif fmt == RAYSERVICE:
        errors += (raycluster_consistency_errors(doc) + shm_errors(doc) + serve_config_errors(doc)
                   + kdray_service_errors(doc))
    return errors + shared_storage_errors(doc, fmt)
