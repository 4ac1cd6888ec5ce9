"""Readers and validators of the Ray deployment files (deploy/serve.yaml, deploy/rayservice.yaml).

Serve configs are checked by Ray's own pydantic schema (``ray.serve.schema.ServeDeploySchema``)
and by what Serve checks only when it deploys: a deployment's ``autoscaling_config``
(``AutoscalingConfig``; the schema keeps it a plain dict) and ``runtime_env`` (``RuntimeEnv``:
env_vars must be strings). Ray's schema ignores unknown keys, for forward compatibility; here an
unknown key is an error, as it would be a typo that Serve silently drops.

The RayService is checked by deploy/schema/rayservice.ray.io_v1.schema.json, whose pod templates,
Services and metadata refer to Kubernetes' strict JSON schema shipped by kubernetes-validate. That
schema takes any string for a quantity (the API server parses them), so the registry here gives
quantities the grammar of Kubernetes' ``resource.Quantity``.
"""

from __future__ import annotations

import importlib.resources
import json

import pydantic
from referencing import Registry, Resource

from deploy_files import ROOT

SERVE_CONFIG = ROOT / "deploy" / "serve.yaml"
RAYSERVICE = ROOT / "deploy" / "rayservice.yaml"
SCHEMA = ROOT / "deploy" / "schema" / "rayservice.ray.io_v1.schema.json"

KUBERNETES_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"  # the $id of kubernetes-validate's
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
# Kubernetes' quantity grammar (k8s.io/apimachinery resource.Quantity): a signed decimal number,
# then a binary suffix (Ki..Ei), a decimal one (n u m k M G T P E) or an exponent (e3, E-2)
_NUMBER = r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
QUANTITY_PATTERN = rf"^{_NUMBER}([KMGTPE]i|[numkMGTPE]|[eE]{_NUMBER})?$"

MISSING = object()


# ---- paths into YAML trees ----------------------------------------------------------------------
def get(tree, path):
    """The value at ``path`` (keys and list indices), or MISSING."""
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError):
            return MISSING
    return tree


def put(tree, path, value):
    """Set the value at ``path``; MISSING removes it."""
    *parents, last = path
    for key in parents:
        tree = tree[key]
    if value is MISSING:
        tree.pop(last, None)
    else:
        tree[last] = value


def dotted(path) -> str:
    """``applications.0.runtime_env``: a path as the error messages here name it."""
    return ".".join(str(p) for p in path)


# ---- Serve configs --------------------------------------------------------------------------------
def unknown_keys(model: pydantic.BaseModel, raw: dict, path: tuple) -> list[tuple[tuple, str]]:
    """Keys of ``raw`` that are no field of ``model``, recursively through nested models."""
    fields = type(model).model_fields
    keys = {field.alias or name: name for name, field in fields.items()} | {name: name for name in fields}
    errors = [(path + (k,), "unknown key") for k in raw if k not in keys]
    for key, sub in raw.items():
        value = getattr(model, keys[key], None) if key in keys else None
        if isinstance(value, pydantic.BaseModel) and isinstance(sub, dict):
            errors += unknown_keys(value, sub, path + (key,))
        elif isinstance(value, list) and isinstance(sub, list):
            for i, (item, raw_item) in enumerate(zip(value, sub)):
                if isinstance(item, pydantic.BaseModel) and isinstance(raw_item, dict):
                    errors += unknown_keys(item, raw_item, path + (key, i))
    return errors


def serve_config_errors(config: dict) -> list[tuple[str, str]]:
    """(dotted path, message) of everything wrong in a Serve config file; empty when valid."""
    from ray.runtime_env import RuntimeEnv
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    try:
        parsed = ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as exc:
        return [(dotted(e["loc"]), e["msg"]) for e in exc.errors()]
    errors = unknown_keys(parsed, config, ())
    for i, app in enumerate(parsed.applications):
        where = ("applications", i)
        try:
            RuntimeEnv(**app.runtime_env)
        except (TypeError, ValueError) as exc:
            errors.append((where + ("runtime_env",), str(exc)))
        for j, deployment in enumerate(app.deployments):
            auto = deployment.autoscaling_config
            if not isinstance(auto, dict):
                continue  # not set, or already an AutoscalingConfig
            at = where + ("deployments", j, "autoscaling_config")
            try:  # what Serve does when it applies the override (application_state.py)
                checked = AutoscalingConfig.model_validate(auto)
            except pydantic.ValidationError as exc:
                errors += [(at + tuple(e["loc"]), e["msg"]) for e in exc.errors()]
            else:
                errors += unknown_keys(checked, auto, at)
    return [(dotted(p), m) for p, m in errors]


# ---- the RayService ------------------------------------------------------------------------------
def kubernetes_definitions(kubernetes_validate) -> dict:
    """Kubernetes' strict JSON schema (the newest kubernetes-validate ships), quantities parsed."""
    version = kubernetes_validate.latest_version()
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    definitions["$defs"][QUANTITY] = {
        "description": "a Kubernetes quantity: an integer, a number, or a string of the quantity grammar",
        "anyOf": [{"type": "string", "pattern": QUANTITY_PATTERN}, {"type": "number"}],
    }
    return definitions


def rayservice_registry(schema: dict, kubernetes_validate) -> Registry:
    """A ``referencing`` registry holding our RayService schema and Kubernetes' definitions."""
    definitions = kubernetes_definitions(kubernetes_validate)
    assert definitions["$id"] == KUBERNETES_DEFINITIONS
    return Registry().with_resources([
        (definitions["$id"], Resource.from_contents(definitions)),
        (schema["$id"], Resource.from_contents(schema)),
    ])


def pod_templates(rayservice: dict) -> dict[str, dict]:
    """The pod template of each Ray group: ``head`` and the worker groups by name."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates |= {g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}
    return templates


def ray_container(template: dict) -> dict:
    """The Ray container of a pod template."""
    return template["spec"]["containers"][0]  # KubeRay's Ray container is the first
