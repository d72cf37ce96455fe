"""Deployment artefacts (deploy/): the image, the example configuration, compose, Kubernetes.

No container engine or cluster runs here, so each artefact is checked by its linter
(hadolint, kubernetes-validate, the compose-spec schema), against the others (ports,
addresses, paths, versions must agree), and the image's entrypoint is run for real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from app.config import ServeSettings, load_config
from ml.seg.package import load_package
from tests.deploy_helpers import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    EXAMPLE_CONFIG,
    K8S_BASE,
    K8S_GPU,
    ROOT,
    Instruction,
    apply_json_patch,
    copy_sources,
    dockerfile,
    env_vars,
    ignore_patterns,
    ignored,
    k8s_resources,
    kubernetes_findings,
    run_tool,
    stages,
    yaml_docs,
)
from tests.tools import free_port

IMAGE_MODELS = "/opt/oncopacs/models"
IMAGE_CONFIG = "/etc/oncopacs/oncopacs.yaml"
STACK_BYTES = 32 * 1024 * 1024
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def example() -> ServeSettings:
    return load_config(EXAMPLE_CONFIG)


def runtime_stage() -> list[Instruction]:
    return stages(dockerfile())[-1]


def one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the runtime stage, got {len(found)}"
    return found[0]


def statefulset() -> dict[str, Any]:
    return k8s_resources()[("StatefulSet", "oncopacs")]


def container(sts: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = sts["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


# ------------------------------------------------------------------------ image
def test_dockerfile_passes_hadolint() -> None:
    done = run_tool("hadolint", "--no-color", "--failure-threshold", "info", str(DOCKERFILE))
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_dockerfile_pins_base_and_torch_and_runs_as_non_root() -> None:
    froms = [i.args.split()[0] for i in dockerfile() if i.keyword == "FROM"]
    assert froms and all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", f)
                         for f in froms), froms
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    installs = " ".join(i.args for i in dockerfile() if i.keyword == "RUN")
    assert re.search(r'--index-url "\$\{TORCH_INDEX_URL\}" ' + re.escape(torch_pin), installs)
    args = {i.args.partition("=")[0]: i.args.partition("=")[2]
            for i in dockerfile() if i.keyword == "ARG"}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["VERSION"] == PYPROJECT["project"]["version"]
    user = one(runtime_stage(), "USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0, user


def test_image_entrypoint_and_healthcheck_match_the_example_config() -> None:
    runtime, settings = runtime_stage(), example()
    entry = one(runtime, "ENTRYPOINT").exec_form()
    assert entry[:2] == ["bash", "-c"] and "ulimit -s 32768 && exec oncopacs" in entry[2]
    cmd = one(runtime, "CMD").exec_form()
    assert cmd[cmd.index("--config") + 1] == IMAGE_CONFIG
    copies = {copy_sources(i)[1]: copy_sources(i)[0] for i in runtime
              if i.keyword == "COPY" and "--from" not in i.args}
    assert copies[IMAGE_CONFIG] == ["deploy/oncopacs.yaml"]
    assert copies[IMAGE_MODELS] == ["models"]
    exposed = {int(p) for p in one(runtime, "EXPOSE").args.split()}
    assert exposed == {settings.dicom.port, settings.hl7.port, settings.http.port}
    url = env_vars(runtime)["ONCOPACS_HEALTHZ_URL"]
    assert url == f"http://127.0.0.1:{settings.http.port}/healthz"
    assert "ONCOPACS_HEALTHZ_URL" in one(runtime, "HEALTHCHECK").exec_form()[2]


def test_build_context_ignore_file_admits_what_the_image_copies() -> None:
    patterns = ignore_patterns()
    sources = [s for ins in dockerfile() if ins.keyword == "COPY" and "--from" not in ins.args
               for s in copy_sources(ins)[0]]
    assert sources
    for source in sources:
        path = ROOT / source.removeprefix("./")
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()
                                               and "__pycache__" not in f.parts]
        assert files, f"COPY source {source} is missing from the repository"
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            assert not ignored(patterns, rel), f"{rel} is copied but the ignore file drops it"
    for dropped in (".git/HEAD", ".venv/bin/python", "tests/test_deploy.py",
                    "app/__pycache__/cli.cpython-311.pyc", "deploy/compose.yaml"):
        assert ignored(patterns, dropped), f"{dropped} would be sent to the build"


# ---------------------------------------------------------- the example config
def test_example_config_loads_with_absolute_paths_into_the_image() -> None:
    settings = example()
    assert settings.storage.root.is_absolute()
    package = settings.segmentation.package
    assert package.is_absolute() and package.is_relative_to(IMAGE_MODELS), package
    in_repo = ROOT / "models" / package.relative_to(IMAGE_MODELS)
    assert load_package(in_repo, settings.segmentation.label_map).path == in_repo
    assert settings.dicom.require_known_peers and settings.dicom.allowed_peers
    assert settings.hl7.allowed_hosts, "an empty hl7.allowed_hosts means loopback only"


def serving_config(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """deploy/oncopacs.yaml on free loopback ports, its state and model in this checkout."""
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    for section in ("dicom", "hl7", "http"):
        data[section].update(host="127.0.0.1", port=free_port())
    data["storage"]["root"] = str(tmp_path / "state")
    package = Path(data["segmentation"]["package"])
    data["segmentation"]["package"] = str(ROOT / "models" / package.relative_to(IMAGE_MODELS))
    for model in ("crc", "tsr"):
        package = Path(data["models"][model]["package"])
        data["models"][model]["package"] = str(ROOT / "models" /
                                               package.relative_to(IMAGE_MODELS))
    path = tmp_path / "oncopacs.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path, data


def healthcheck(env: dict[str, str]) -> int:
    check = one(runtime_stage(), "HEALTHCHECK").exec_form()
    check[0] = sys.executable
    return subprocess.run(check, env=env, capture_output=True, check=False,
                          timeout=30).returncode


def stack_soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max stack size"):
            return int(line.split()[3])
    raise AssertionError(f"no stack limit in /proc/{pid}/limits")


@pytest.mark.slow
def test_image_entrypoint_serves_the_example_config(tmp_path: Path) -> None:
    """The image's ENTRYPOINT + CMD, run here: 32 MiB stack, /healthz, HEALTHCHECK, SIGTERM."""
    config, data = serving_config(tmp_path)
    runtime = runtime_stage()
    argv = one(runtime, "ENTRYPOINT").exec_form() + one(runtime, "CMD").exec_form()
    argv[argv.index(IMAGE_CONFIG)] = str(config)
    bindir = str(Path(sys.executable).parent)
    url = f"http://127.0.0.1:{data['http']['port']}/healthz"
    env = {**os.environ, **env_vars(runtime), "ONCOPACS_HEALTHZ_URL": url,
           "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    env["HOME"] = env["XDG_CACHE_HOME"] = env["MPLCONFIGDIR"] = str(tmp_path / "home")
    assert shutil.which("oncopacs", path=env["PATH"]), "the oncopacs console script"
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while healthcheck(env) != 0:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no /healthz within 120 s"
            time.sleep(0.5)
        assert stack_soft_limit(proc.pid) == STACK_BYTES
        metrics = requests.get(url.replace("healthz", "metrics"), timeout=5)
        assert metrics.ok and "oncopacs_instances_received" in metrics.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert healthcheck(env) != 0, "the health check passes with the service stopped"
        assert (tmp_path / "state" / "jobs.sqlite").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ Kubernetes
def test_k8s_manifests_validate_strictly() -> None:
    kustomization = yaml_docs(K8S_BASE / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S_BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present, f"kustomization lists {sorted(listed)}, folder has {sorted(present)}"
    findings = [f for name in sorted(listed) for f in kubernetes_findings(K8S_BASE / name)]
    assert not findings, "\n".join(findings)


def test_configmap_holds_the_example_config_verbatim() -> None:
    configmap = k8s_resources()[("ConfigMap", "oncopacs-config")]
    assert configmap["data"]["oncopacs.yaml"] == EXAMPLE_CONFIG.read_text(encoding="utf-8"), \
        "deploy/k8s/base/configmap.yaml differs from deploy/oncopacs.yaml: copy it there"


def test_statefulset_runs_one_locked_down_pod_with_the_config_ports(tmp_path: Path) -> None:
    sts, settings = statefulset(), example()
    spec, box = sts["spec"], container(statefulset())
    assert spec["replicas"] == 1
    assert box["image"] == f"oncopacs:{PYPROJECT['project']['version']}"
    ports = {p["name"]: p["containerPort"] for p in box["ports"]}
    assert ports == {"dicom": settings.dicom.port, "mllp": settings.hl7.port,
                     "http": settings.http.port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert box[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    pod = spec["template"]["spec"]
    uid = int(one(runtime_stage(), "USER").args.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
    assert box["securityContext"]["readOnlyRootFilesystem"]
    assert box["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
    assert mounts[str(settings.storage.root)] == spec["volumeClaimTemplates"][0]["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]
    config_volume = volumes[mounts[str(Path(IMAGE_CONFIG).parent)]]["configMap"]
    assert config_volume["name"] == "oncopacs-config"
    assert box["args"][box["args"].index("--config") + 1] == IMAGE_CONFIG
    assert "nvidia.com/gpu" not in box["resources"]["limits"], "the base is CPU-only"
    assert {"cpu", "memory"} <= box["resources"]["requests"].keys()


def test_services_and_network_policy_admit_only_the_configured_peers() -> None:
    settings, resources = example(), k8s_resources()
    pacs = {f"{p.host}/32" for p in settings.dicom.allowed_peers if p.host}
    lis = {h if "/" in h else f"{h}/32" for h in settings.hl7.allowed_hosts}
    policy = resources[("NetworkPolicy", "oncopacs")]["spec"]
    allowed: dict[int, set[str]] = {}
    for rule in policy["ingress"]:
        cidrs = {peer["ipBlock"]["cidr"] for peer in rule["from"] if "ipBlock" in peer}
        for port in rule["ports"]:
            allowed.setdefault(port["port"], set()).update(cidrs)
    assert allowed[settings.dicom.port] == pacs and allowed[settings.hl7.port] == lis
    assert not allowed.get(settings.http.port), "HTTP is for the monitoring namespace only"
    outbound = {(rule_to["ipBlock"]["cidr"], port["port"]) for rule in policy["egress"]
                for rule_to in rule["to"] if "ipBlock" in rule_to for port in rule["ports"]}
    needed = {(f"{d.host}/32", d.port) for d in settings.destinations if d.kind == "c-store"}
    assert settings.wsi is not None and settings.wsi.dicomweb_url is not None
    web = re.fullmatch(r"https?://([^:/]+):(\d+)/.*", settings.wsi.dicomweb_url)
    assert web is not None
    needed |= {(f"{settings.wsi.host}/32", settings.wsi.port), (f"{web[1]}/32", int(web[2]))}
    assert needed <= outbound, f"egress lacks {sorted(needed - outbound)}"
    for name, ranges in (("oncopacs-dicom", pacs), ("oncopacs-hl7", lis)):
        service = resources[("Service", name)]["spec"]
        assert service["externalTrafficPolicy"] == "Local", f"{name} would hide the peer address"
        assert set(service["loadBalancerSourceRanges"]) == ranges
    http = resources[("Service", "oncopacs-http")]["spec"]
    assert statefulset()["spec"]["serviceName"] == "oncopacs-http"
    assert http["ports"][0]["port"] == settings.http.port


def test_gpu_overlay_adds_one_gpu_and_still_validates(tmp_path: Path) -> None:
    overlay = yaml_docs(K8S_GPU / "kustomization.yaml")[0]
    assert overlay["resources"] == ["../base"]
    (patch,) = overlay["patches"]
    assert patch["target"]["kind"] == "StatefulSet" and patch["target"]["name"] == "oncopacs"
    ops = yaml.safe_load((K8S_GPU / patch["path"]).read_text(encoding="utf-8"))
    patched = apply_json_patch(statefulset(), ops)
    assert container(patched)["resources"]["limits"]["nvidia.com/gpu"] == 1
    out = tmp_path / "statefulset-gpu.yaml"
    out.write_text(yaml.safe_dump(patched), encoding="utf-8")
    assert not kubernetes_findings(out)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("folder", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kustomize_renders_valid_manifests(folder: Path, tmp_path: Path) -> None:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "rendered.yaml"
    out.write_text(done.stdout, encoding="utf-8")
    assert not kubernetes_findings(out)
    kinds = {d["kind"] for d in yaml.safe_load_all(done.stdout) if d}
    assert {"Namespace", "ConfigMap", "StatefulSet", "Service", "NetworkPolicy"} <= kinds


# --------------------------------------------------------------------- compose
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> file in the repository, for each bind mount of ``service``."""
    result = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            result[target] = (COMPOSE.parent / source).resolve()
    return result


def test_compose_file_matches_the_compose_spec() -> None:
    done = run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_mounts_existing_files_and_builds_the_image() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.is_file(), f"{name}: {target} is mounted from missing {source}"
    oncopacs = services["oncopacs"]
    build = oncopacs["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert oncopacs["image"] == f"oncopacs:{PYPROJECT['project']['version']}"
    assert oncopacs["ulimits"]["stack"] == STACK_BYTES
    assert oncopacs["read_only"] and "/tmp" in oncopacs["tmpfs"]
    lua = bind_mounts(services["orthanc"])
    assert DEPLOY / "orthanc" / "forward-ct.lua" in lua.values()


def test_compose_orthanc_and_oncopacs_configs_point_at_each_other() -> None:
    services = compose()["services"]
    settings = load_config(bind_mounts(services["oncopacs"])[IMAGE_CONFIG])
    orthanc_mounts = bind_mounts(services["orthanc"])
    orthanc = json.loads(orthanc_mounts["/etc/orthanc/orthanc.json"].read_text())
    env = services["orthanc"]["environment"]
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true" and env["WSI_PLUGIN_ENABLED"] == "true"
    ip = {name: s["networks"]["pacs"]["ipv4_address"] for name, s in services.items()}
    lua_targets = [t for t, src in orthanc_mounts.items() if src.suffix == ".lua"]
    assert orthanc["LuaScripts"] == lua_targets
    lua = (DEPLOY / "orthanc" / "forward-ct.lua").read_text()
    (modality,) = re.findall(r"/modalities/(\w+)/store", lua)
    assert orthanc["DicomModalities"][modality] == {
        "AET": settings.dicom.ae_title, "Host": ip["oncopacs"], "Port": settings.dicom.port}
    assert (orthanc["DicomAet"], ip["orthanc"]) in {
        (p.ae_title, p.host) for p in settings.dicom.allowed_peers}
    for dest in settings.destinations:
        assert (dest.host, dest.port, dest.called_aet) == (
            ip["orthanc"], orthanc["DicomPort"], orthanc["DicomAet"])
    assert settings.wsi is not None
    assert (settings.wsi.host, settings.wsi.port) == (ip["orthanc"], orthanc["DicomPort"])
    assert settings.wsi.dicomweb_url == f"http://{ip['orthanc']}:8042/dicom-web"
    published = {p.split(":")[-1] for p in services["oncopacs"]["ports"]}
    assert published == {str(settings.dicom.port), str(settings.hl7.port),
                         str(settings.http.port)}
