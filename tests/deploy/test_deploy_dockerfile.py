"""The Dockerfile (lint, stages, user, models, healthcheck), the serving extras and the healthcheck."""

from __future__ import annotations

import http.server
import os
import re
import subprocess
import sys
import threading
import tomllib

import pytest

from deploy_files import ROOT, DOCKERFILE, hadolint, parse_dockerfile

ORT = {"onnxruntime", "onnxruntime-gpu"}


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile()


def test_hadolint_finds_nothing():
    r = subprocess.run([hadolint(), "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _extra_closure(extras: dict[str, list[str]], name: str) -> set[str]:
    """Distributions an extra asks for directly, following this project's own extras."""
    names = set()
    for req in extras[name]:
        if _requirement_name(req) == "gsa-serve":
            for inner in re.search(r"\[(.*)\]", req).group(1).split(","):
                names |= _extra_closure(extras, inner.strip())
        else:
            names.add(_requirement_name(req))
    return names


def test_each_serving_extra_has_exactly_one_onnx_runtime_and_no_torch():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not _extra_closure(extras, "serve-base") & (ORT | {"torch"})
    for extra, runtime in (("serve", "onnxruntime"), ("serve-gpu", "onnxruntime-gpu")):
        closure = _extra_closure(extras, extra)
        assert closure & ORT == {runtime}, extra
        assert "torch" not in closure
        assert closure - {runtime} == _extra_closure(extras, "serve-base"), f"{extra} is serve-base plus {runtime}"


def test_variants_choose_their_extra_and_base(dockerfile):
    assert dockerfile.global_args["VARIANT"] == "cpu"
    assert dockerfile.stage("base-cpu").env()["SERVE_EXTRA"] == "serve"
    gpu = dockerfile.stage("base-gpu")
    assert gpu.env()["SERVE_EXTRA"] == "serve-gpu"
    assert gpu.base.startswith("nvidia/cuda:") and "cudnn-runtime" in gpu.base
    assert "slim" in dockerfile.stage("base-cpu").base
    build, serve = dockerfile.stage("build"), dockerfile.stage("serve")
    assert build.base == serve.base == "base-cpu"  # both on the same base: the same Python
    assert re.findall(r"^FROM base-\$\{VARIANT\} AS (\w+)$", DOCKERFILE.read_text(), re.M) == ["build", "serve"]
    (run,) = build.all("RUN")
    assert run.words()[:4] == ["sh", "deploy/install-serve.sh", "/opt/venv", "$SERVE_EXTRA${WITH_RAY:+,ray}"]
    assert [i.words() for i in build.all("ARG")] == [["WITH_RAY="]]  # no Ray unless asked for; the `ray` extra adds Ray Serve alone
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert _extra_closure(extras, "ray") == {"ray"} and _extra_closure(extras, "distributed") == _extra_closure(extras, "serve") | {"ray"}


def test_build_copies_only_the_serving_code(dockerfile):
    copied = [w for ins in dockerfile.stage("build").all("COPY") for w in ins.words()[:-1]]
    assert sorted(copied) == ["README.md", "deploy/install-serve.sh", "gsa_contract/", "pyproject.toml", "service/"]


def test_serving_stage(dockerfile):
    serve = dockerfile.stage("serve")
    assert dockerfile.stages[-1] is serve, "the serving image must be the default target"
    (user,) = serve.all("USER")
    uid = user.args.split(":")[0]
    assert uid not in ("0", "root") and uid.isdigit(), "run as a numeric non-root user"
    froms = [(c.flags.get("from"), c.words()) for c in serve.all("COPY") if "from" in c.flags]
    assert froms == [("build", ["/opt/venv", "/opt/venv"])], "only the virtualenv comes from the build stage"
    env = dockerfile.env("serve")
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["GSA_HOST"] == "0.0.0.0" and env["GSA_MODEL_DIR"] == "/models"
    # the job store sits in a directory the user owns (a fresh named volume there inherits it)
    (run,) = serve.all("RUN")
    owned = re.search(r"install -d -o gsa -g gsa -m \d+ (\S+)", run.args).group(1)
    assert env["GSA_JOBS_DIR"].startswith(owned + "/") and serve.all("WORKDIR")[-1].args == owned
    (expose,) = serve.all("EXPOSE")
    assert expose.args == env["GSA_PORT"]
    models = [c.words() for c in serve.all("COPY") if c.words()[-1].rstrip("/") == "/models"]
    assert models == [["${MODELS}/", "/models/"]], "models are baked in only through the MODELS build argument"
    (arg,) = serve.all("ARG")
    assert arg.args.startswith("MODELS=") and (ROOT / arg.args.split("=", 1)[1]).is_dir()
    (check,) = serve.all("HEALTHCHECK")
    assert check.args == 'CMD ["python", "/usr/local/bin/gsa-healthcheck"]'
    assert any(c.words() == ["deploy/healthcheck.py", "/usr/local/bin/gsa-healthcheck"] for c in serve.all("COPY"))
    (cmd,) = serve.all("CMD")
    assert cmd.args == '["python", "-m", "service"]', "exec form, so that SIGTERM reaches the server"
    assert [s.args for s in serve.all("STOPSIGNAL")] in ([], ["SIGTERM"])


class _Fixed(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/v2/health/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, code", [(200, 0), (400, 1), (None, 1)])
def test_healthcheck_script(status, code):
    handler = type("Handler", (_Fixed,), {"status": status or 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nothing listens on the port
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "GSA_PORT": str(port)}
        r = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == code, r.stderr
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
