"""Every file in cluster/ is checked: launcher configs with Ray's own config validation, KubeRay
manifests field by field against the ray.io/v1 RayCluster / RayJob / RayService API."""

import copy
import importlib
from pathlib import Path

import pytest
import ray
import yaml

from ray_ft.config import load_job

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def test_every_cluster_file_is_covered():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "gcp.yaml"}
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}


def _ray_validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    cfg = yaml.safe_load(path.read_text())
    _ray_validate(cfg)  # what `ray up` runs before it touches the cloud
    assert cfg["provider"]["type"] == path.stem
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["min_workers"] == head["max_workers"] == 0  # the head does no GPU work
    gpu_types = {k: v for k, v in cfg["available_node_types"].items() if k.startswith("gpu")}
    assert gpu_types and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types.values())
    assert sum(t["max_workers"] for t in gpu_types.values()) <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 60  # GPU nodes go away after the job
    assert any(f"ray[serve,train,data,default]=={ray.__version__}" in c for c in cfg["setup_commands"])


def test_rays_validation_is_not_a_rubber_stamp():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    bad = copy.deepcopy(cfg)
    bad["max_wrokers"] = 3
    with pytest.raises(Exception, match="max_wrokers"):
        _ray_validate(bad)
    bad = copy.deepcopy(cfg)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_validate(bad)


def _docs():
    return {p.name: yaml.safe_load(p.read_text()) for p in KUBERAY}


def _check_container(c: dict, gpus: int) -> None:
    assert c["name"] and c["image"].startswith("ghcr.io/") and ":" in c["image"]
    res = c["resources"]
    assert res["limits"] == res["requests"]  # Guaranteed QoS; Ray sizes itself from the limits
    assert {"cpu", "memory"} <= set(res["limits"])
    assert int(res["limits"].get("nvidia.com/gpu", 0)) == gpus


def _check_cluster_spec(spec: dict) -> None:
    allowed = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
               "workerGroupSpecs", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions"}
    assert set(spec) <= allowed, set(spec) - allowed
    assert spec["rayVersion"] == ray.__version__  # the operator starts this Ray in the pods
    assert spec["enableInTreeAutoscaling"] is True
    opts = spec["autoscalerOptions"]
    assert set(opts) <= {"upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy",
                         "env", "envFrom", "securityContext", "version"}
    assert opts["upscalingMode"] in {"Default", "Aggressive", "Conservative"}
    assert isinstance(opts["idleTimeoutSeconds"], int) and opts["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert set(head) <= {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # the CRD wants strings
    (container,) = head["template"]["spec"]["containers"]
    _check_container(container, gpus=0)
    ports = {p["containerPort"] for p in container["ports"]}
    assert {6379, 8265, 8000} <= ports
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                              "template", "numOfHosts", "scaleStrategy", "suspend", "idleTimeoutSeconds"}
        assert group["groupName"] and 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]  # room to autoscale
        (worker,) = group["template"]["spec"]["containers"]
        _check_container(worker, gpus=1)
        mounts = {m["name"] for m in worker.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in group["template"]["spec"].get("volumes", [])}


def test_raycluster_manifest():
    doc = _docs()["raycluster.yaml"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_rayjob_manifest_runs_a_job_file_of_this_repo():
    doc = _docs()["rayjob.yaml"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    cmd, stage, job = spec["entrypoint"].split()
    assert cmd == "ray-ft" and stage in {"run", "train", "prepare", "eval"}
    cfg = load_job(ROOT / job)  # the entrypoint's job file exists and validates
    assert cfg.ray.address == "auto" and cfg.train.use_gpu
    _check_cluster_spec(spec["rayClusterSpec"])


def test_rayservice_manifest_imports_our_app_builder():
    doc = _docs()["rayservice.yaml"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    _check_cluster_spec(doc["spec"]["rayClusterConfig"])
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(serve_cfg)  # Serve's own config schema
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder) and load_job(ROOT / app.args["job"])
