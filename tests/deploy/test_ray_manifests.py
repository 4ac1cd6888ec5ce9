"""deploy/serve.yaml and deploy/rayservice.yaml, checked offline by the schemas that own them.

Serve configs (deploy/serve.yaml and the RayService's serveConfigV2) by Ray's own schema, the
RayService by deploy/schema/ over Kubernetes' own, the other documents by kubernetes-validate (how,
and what each check covers: ray_manifests.py). Then what no schema knows: the two Serve configs
say the same, the import path builds what they configure, the settings exist, the cluster fits the
application, and every Ray pod sees the model repository, the jobs and the keys where the service
looks for them.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import PurePosixPath

import jsonschema
import pytest
import yaml

from deploy_files import missing_tool
from ray_manifests import (
    MISSING, QUANTITY, KUBERNETES_DEFINITIONS, RAYSERVICE, SCHEMA, SERVE_CONFIG, dotted, get, pod_templates,
    ray_container, rayservice_registry, serve_config_errors, put,
)
from service.settings import Settings

# Where a pod's Serve config differs from deploy/serve.yaml, as (local value, pod value). In a pod
# the proxy serves the Kubernetes Service, so it binds 0.0.0.0; GSA_HOST follows (GSA_AUTH=auto
# then requires keys), which come from the Secret mounted in every pod.
POD_DIFFERENCES = {
    ("http_options", "host"): ("127.0.0.1", "0.0.0.0"),
    ("applications", 0, "runtime_env", "env_vars", "GSA_HOST"): ("127.0.0.1", "0.0.0.0"),
    ("applications", 0, "runtime_env", "env_vars", "GSA_API_KEYS_FILE"): (MISSING, "/etc/gsa/api-keys"),
}


# ---- loading ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_serve() -> None:
    """Ray Serve, for its config schema: optional (the distributed extra), so skip without it."""
    pytest.importorskip("ray.serve.schema", reason="Ray Serve is not installed: pip install -e '.[distributed]'")


@pytest.fixture(scope="module")
def kubernetes_validate():
    """kubernetes-validate (the dev extra): Kubernetes' JSON schemas, offline."""
    try:
        import kubernetes_validate
    except ImportError:
        missing_tool("kubernetes-validate is not installed (pip install kubernetes-validate; it is in the dev extra)")
    return kubernetes_validate


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load(SERVE_CONFIG.read_text())


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]


@pytest.fixture(scope="module")
def rayservice(documents) -> dict:
    (found,) = [d for d in documents if d.get("kind") == "RayService"]
    return found


@pytest.fixture(scope="module")
def pod_serve_config(rayservice) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


@pytest.fixture(scope="module")
def registry(schema, kubernetes_validate):
    return rayservice_registry(schema, kubernetes_validate)


@pytest.fixture(scope="module")
def rayservice_errors(schema, registry):
    validator = jsonschema.Draft202012Validator(schema, registry=registry)

    def errors(document: dict) -> list[tuple[str, str]]:
        return sorted((dotted(e.absolute_path), e.message) for e in validator.iter_errors(document))

    return errors


# ---- tests: the Serve configs -------------------------------------------------------------------
def test_serve_config_is_valid(ray_serve, serve_config):
    assert serve_config_errors(serve_config) == []


def test_rayservice_serve_config_is_valid(ray_serve, pod_serve_config):
    assert serve_config_errors(pod_serve_config) == []


def test_rayservice_serves_the_same_application_as_serve_yaml(serve_config, pod_serve_config):
    for path, (local, pod) in POD_DIFFERENCES.items():
        assert get(serve_config, path) == local, f"serve.yaml {dotted(path)}"
        assert get(pod_serve_config, path) == pod, f"serveConfigV2 {dotted(path)}"
    expected = copy.deepcopy(serve_config)
    for path, (_, pod) in POD_DIFFERENCES.items():
        put(expected, path, pod)
    assert pod_serve_config == expected, "serveConfigV2 and deploy/serve.yaml drifted apart (see POD_DIFFERENCES)"


@pytest.mark.parametrize("which", ["serve.yaml", "serveConfigV2"])
def test_env_vars_are_settings_of_the_service(serve_config, pod_serve_config, which, monkeypatch):
    config = serve_config if which == "serve.yaml" else pod_serve_config
    (app,) = config["applications"]
    env = app["runtime_env"]["env_vars"]
    fields = set(Settings.model_fields)
    unknown = [k for k in env if not k.startswith("GSA_") or k[4:].lower().split("__")[0] not in fields]
    assert not unknown, f"no such setting in service/settings.py: {unknown}"
    for name in [k for k in os.environ if k.startswith("GSA_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # the values parse as the replicas will parse them
    assert PurePosixPath(settings.model_dir) == PurePosixPath(env["GSA_MODEL_DIR"])
    assert settings.intra_op_threads == app["args"]["replica_cpus"], "ONNX Runtime threads = the replica's CPUs"
    graceful = app["deployments"][0]["graceful_shutdown_timeout_s"]
    assert graceful > settings.request_timeout_s, "a stopping replica must be given time for a request in flight"


def test_import_path_builds_the_configured_deployment(ray_serve, serve_config):
    (app,) = serve_config["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    assert callable(builder)

    class Recording(dict):
        """The args, noting which keys the builder reads (an unread key is a typo it ignores)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.read: set[str] = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            self.read.add(key)
            return super().__getitem__(key)

    args = Recording(app["args"])
    deployment = builder(args)._bound_deployment
    assert set(app["args"]) <= args.read, f"args app_builder never reads: {set(app['args']) - args.read}"
    auto = deployment._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (
        app["args"]["min_replicas"], app["args"]["max_replicas"], app["args"]["target_ongoing"])
    assert deployment.ray_actor_options["num_cpus"] == app["args"]["replica_cpus"]
    assert {d["name"] for d in app["deployments"]} <= {deployment.name}, "options for a deployment the app lacks"


BAD_SERVE_CONFIGS = {
    "autoscaling bound": (
        lambda c: c["applications"][0]["deployments"][0].update(autoscaling_config={"min_replicas": -1}),
        "applications.0.deployments.0.autoscaling_config.min_replicas", "greater than or equal to 0"),
    "autoscaling typo": (
        lambda c: c["applications"][0]["deployments"][0].update(autoscaling_config={"target_ongoing_request": 8}),
        "applications.0.deployments.0.autoscaling_config.target_ongoing_request", "unknown key"),
    "deployment option bound": (
        lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_requests=0),
        "applications.0.deployments.0.max_ongoing_requests", "greater than 0"),
    "unknown top-level key": (lambda c: c.update(http_option={"port": 8001}), "http_option", "unknown key"),
    "unknown application key": (
        lambda c: c["applications"][0].update(route_prefx="/v2"), "applications.0.route_prefx", "unknown key"),
    "proxy location": (lambda c: c.update(proxy_location="Everywhere"), "proxy_location", "Input should be"),
    "env var not a string": (
        lambda c: c["applications"][0]["runtime_env"]["env_vars"].update(GSA_INTRA_OP_THREADS=1),
        "applications.0.runtime_env", "must be of type Dict[str, str]"),
    "import path": (
        lambda c: c["applications"][0].update(import_path="service_cluster"), "applications.0.import_path",
        "invalid import path"),
}


@pytest.mark.parametrize("case", list(BAD_SERVE_CONFIGS))
def test_a_bad_serve_config_is_rejected_where_it_is_wrong(ray_serve, serve_config, case):
    mutate, path, message = BAD_SERVE_CONFIGS[case]
    config = copy.deepcopy(serve_config)
    mutate(config)
    errors = serve_config_errors(config)
    assert any(p == path and message.lower() in m.lower() for p, m in errors), errors


# ---- tests: the RayService and its other documents ---------------------------------------------
def test_schema_is_a_valid_draft_2020_12_schema_whose_references_resolve(schema, registry):
    jsonschema.Draft202012Validator.check_schema(schema)
    resolver = registry.resolver(base_uri=schema["$id"])
    refs, stack = set(), [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            refs |= {node["$ref"]} if "$ref" in node else set()
            stack += node.values()
        elif isinstance(node, list):
            stack += node
    for ref in refs:
        resolver.lookup(ref)  # raises Unresolvable for a misspelt definition
    assert f"{KUBERNETES_DEFINITIONS}#/$defs/io.k8s.api.core.v1.PodTemplateSpec" in refs


def test_rayservice_is_valid(rayservice, rayservice_errors):
    assert rayservice_errors(rayservice) == []


def test_other_documents_are_valid_kubernetes_objects(kubernetes_validate, documents):
    others = [d for d in documents if d.get("kind") != "RayService"]
    assert [d["kind"] for d in others] == ["PersistentVolumeClaim"]
    for document in others:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


WORKER = "spec.rayClusterConfig.workerGroupSpecs.0"
CONTAINER = f"{WORKER}.template.spec.containers.0"


def _worker_container(doc: dict) -> dict:
    return ray_container(doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"])


BAD_RAYSERVICES = {
    "misspelt KubeRay field": (
        lambda d: d["spec"]["rayClusterConfig"].update(workerGroupSpec=d["spec"]["rayClusterConfig"].pop("workerGroupSpecs")),
        "spec.rayClusterConfig", "'workerGroupSpec' was unexpected"),
    "port not a number": (
        lambda d: _worker_container(d)["ports"][0].update(containerPort="8000x"),
        f"{CONTAINER}.ports.0.containerPort", "is not of type 'integer'"),
    "bad quantity": (
        lambda d: _worker_container(d)["resources"]["limits"].update(memory="4 GB"),
        f"{CONTAINER}.resources.limits.memory", "is not valid under any of the given schemas"),
    "unknown container field": (
        lambda d: _worker_container(d).update(imagePullPolcy="Always"), CONTAINER, "'imagePullPolcy' was unexpected"),
    "rayStartParams value not a string": (
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", "is not of type 'string'"),
    "upgrade strategy": (
        lambda d: d["spec"]["upgradeStrategy"].update(type="Rolling"), "spec.upgradeStrategy.type", "is not one of"),
    "worker group without a template": (
        lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("template"), WORKER,
        "'template' is a required property"),
    "metadata typo": (lambda d: d["metadata"].update(lables={}), "metadata", "'lables' was unexpected"),
    "api version": (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion", "'ray.io/v1' was expected"),
}


@pytest.mark.parametrize("case", list(BAD_RAYSERVICES))
def test_a_bad_rayservice_is_rejected_where_it_is_wrong(rayservice, rayservice_errors, case):
    mutate, path, message = BAD_RAYSERVICES[case]
    document = copy.deepcopy(rayservice)
    mutate(document)
    errors = rayservice_errors(document)
    assert any(p == path and message in m for p, m in errors), errors


@pytest.mark.parametrize("quantity,valid", [
    ("500m", True), ("4Gi", True), ("1.5", True), (2, True), (0.5, True), ("1e3", True),
    ("4 GB", False), ("4GB", False), ("2 cores", False), ("", False), ("Gi", False),
])
def test_quantities_follow_the_kubernetes_grammar(registry, quantity, valid):
    validator = jsonschema.Draft202012Validator({"$ref": f"{KUBERNETES_DEFINITIONS}#/$defs/{QUANTITY}"}, registry=registry)
    assert validator.is_valid(quantity) is valid


# ---- tests: the cluster fits the application ----------------------------------------------------
def test_the_cluster_can_run_the_application(rayservice, pod_serve_config):
    cluster = rayservice["spec"]["rayClusterConfig"]
    (app,) = pod_serve_config["applications"]
    args = app["args"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "no replicas on the head"
    capacity = 0.0
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        cpus = float(group["rayStartParams"]["num-cpus"])
        assert cpus >= args["replica_cpus"], f"{group['groupName']}: a replica does not fit a pod"
        capacity += group["maxReplicas"] * (cpus // args["replica_cpus"])
        ports = {p.get("name"): p["containerPort"] for p in ray_container(group["template"])["ports"]}
        assert ports["serve"] == pod_serve_config["http_options"]["port"]
    assert capacity >= args["max_replicas"], "max_replicas cannot all be placed"
    # the autoscaler sidecar runs Ray's own image: it must be the cluster's Ray version
    assert cluster["autoscalerOptions"]["image"].rpartition(":")[2] == cluster["rayVersion"]


def _mount_holding(container: dict, path: str, group: str) -> dict:
    """The container's volume mount that ``path`` lies on (the innermost one)."""
    holding = [m for m in container["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert holding, f"{group}: {path} is on no volume"
    return max(holding, key=lambda m: len(m["mountPath"]))


def test_every_ray_pod_sees_models_jobs_and_keys_at_the_configured_paths(documents, rayservice, pod_serve_config):
    env = pod_serve_config["applications"][0]["runtime_env"]["env_vars"]
    claims = {d["metadata"]["name"] for d in documents if d["kind"] == "PersistentVolumeClaim"}
    images = set()
    for group, template in pod_templates(rayservice).items():
        container = ray_container(template)
        images.add(container["image"])
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        models, jobs, keys = (_mount_holding(container, env[name], group)
                              for name in ("GSA_MODEL_DIR", "GSA_JOBS_DIR", "GSA_API_KEYS_FILE"))
        assert models.get("readOnly") and not jobs.get("readOnly")
        for shared in (models, jobs):  # the same claim in every pod: one model repository, one job store
            assert volumes[shared["name"]]["persistentVolumeClaim"]["claimName"] in claims
        assert "secret" in volumes[keys["name"]]
        # KubeRay's login shell would lose the image's PATH: each container starts Ray itself
        assert template["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        assert "$KUBERAY_GEN_RAY_START_CMD" in container["args"][-1]
    assert rayservice["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert len(images) == 1, f"head and workers run different images: {images}"
