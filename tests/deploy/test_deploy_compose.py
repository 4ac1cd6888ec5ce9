"""docker-compose.yml, as a real compose implementation resolves it, and the Prometheus config."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import pytest
import yaml

from deploy_files import ROOT, compose_config, duration_s, mounts, parse_dockerfile
from service.settings import Settings

SERVING = ("serve", "serve-gpu")
PROFILES = ("gpu", "prometheus")


@pytest.fixture(scope="module")
def config() -> dict:
    return compose_config(*PROFILES)


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile()


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # KEY=value list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services_and_profiles(config):
    services = config["services"]
    assert set(services) == {"serve", "serve-gpu", "prometheus"}
    assert not services["serve"].get("profiles"), "the CPU service must start without a profile"
    assert services["serve-gpu"]["profiles"] == ["gpu"]
    assert services["prometheus"]["profiles"] == ["prometheus"]


def test_cpu_by_default_gpu_in_its_profile_with_a_device_reservation(config):
    cpu, gpu = config["services"]["serve"], config["services"]["serve-gpu"]
    assert cpu["build"]["args"]["VARIANT"] == "cpu" and _environment(cpu)["GSA_DEVICE"] == "cpu"
    assert "deploy" not in cpu
    assert gpu["build"]["args"]["VARIANT"] == "gpu" and _environment(gpu)["GSA_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and int(d.get("count", 0)) >= 1 for d in devices)
    # the build argument names a stage pair of the Dockerfile
    stages = {s.name for s in parse_dockerfile().stages}
    assert {"base-cpu", "base-gpu"} <= stages
    assert cpu["image"] != gpu["image"]


@pytest.mark.parametrize("name", SERVING)
def test_models_read_only_and_job_data_on_a_named_volume(config, name):
    service = config["services"][name]
    env = _environment(service)
    found = {m.target: m for m in mounts(service, config["volumes"])}
    models = found[env["GSA_MODEL_DIR"]]
    assert models.read_only and models.kind == "bind" and models.source.endswith("models")
    jobs = PurePosixPath(env["GSA_JOBS_DIR"])
    holding = [m for m in found.values() if jobs.is_relative_to(m.target)]
    assert holding, f"{jobs} is on no volume: job data would die with the container"
    (data,) = holding
    assert data.kind == "volume" and data.source == "gsa-data" and not data.read_only
    assert "gsa-data" in config["volumes"]


@pytest.mark.parametrize("name", SERVING)
def test_healthcheck_is_the_images(config, dockerfile, name):
    check = config["services"][name]["healthcheck"]
    (image_check,) = dockerfile.stage("serve").all("HEALTHCHECK")
    assert image_check.words()[0] == "CMD"
    assert check["test"] == ["CMD", *yaml.safe_load(image_check.args[len("CMD"):].strip())]
    assert duration_s(check["start_period"]) >= 60  # warm-up of every model comes before ready


@pytest.mark.parametrize("name", SERVING)
def test_stop_grace_period_covers_the_services_drain(config, dockerfile, name):
    service = config["services"][name]
    env = _environment(service)
    graceful = float(env["GSA_GRACEFUL_SHUTDOWN_S"])
    assert graceful == float(dockerfile.env("serve")["GSA_GRACEFUL_SHUTDOWN_S"])
    # a request never runs past the request timeout, so the drain lets every in-flight one finish
    assert graceful >= float(env["GSA_REQUEST_TIMEOUT_S"])
    # SIGKILL only after uvicorn's drain and the batchers' (at most one batch more)
    assert duration_s(service["stop_grace_period"]) >= graceful + 5
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


@pytest.mark.parametrize("name", SERVING)
def test_every_setting_is_a_service_setting(config, name):
    fields = set(Settings.model_fields)
    for key in _environment(config["services"][name]):
        assert key.startswith("GSA_"), key
        field = key[len("GSA_"):].split("__")[0].lower()
        assert field in fields, f"{key} is no setting of service/settings.py"


def test_settings_are_documented_in_the_deploy_guide(config):
    guide = (ROOT / "docs" / "deploy.md").read_text()
    compose_text = (ROOT / "docker-compose.yml").read_text()
    names = set(_environment(config["services"]["serve"]))
    names |= set(re.findall(r"\$\{(\w+):-", compose_text))  # what the shell or .env may set
    missing = sorted(n for n in names if f"`{n}`" not in guide)
    assert not missing, f"docs/deploy.md does not document {missing}"
    readme = (ROOT / "README.md").read_text()
    assert "(docs/deploy.md)" in readme[readme.index("## Deploy"):], "the README's Deploy section links the guide"


def test_prometheus_scrapes_every_serving_container(config, dockerfile):
    prom = config["services"]["prometheus"]
    mount = {m.target: m for m in mounts(prom, config["volumes"])}["/etc/prometheus/prometheus.yml"]
    assert mount.read_only and mount.source.endswith("deploy/prometheus.yml")
    prom_config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    (job,) = prom_config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    port = int(dockerfile.env("serve")["GSA_PORT"])
    assert sd["type"] == "A" and sd["port"] == port
    for name in SERVING:
        service = config["services"][name]
        aliases = service["networks"]["default"]["aliases"]
        assert set(sd["names"]) <= set(aliases), f"{name} is not discoverable as {sd['names']}"
        assert any(int(p["target"] if isinstance(p, dict) else str(p).split(":")[-1]) == port for p in service["ports"])
