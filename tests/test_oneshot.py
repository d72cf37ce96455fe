"""The one-shot mode (MONAI Application Package contract) over a folder of studies.

``python -m app -i IN -o OUT -m models`` turns a folder holding a CRC and a PDAC CT
study (any layout) and their HL7 files into SEG, SR and card per study, each passing
dciodvfy, with ``report.json`` naming what was not used and why; the package's entry
point, staged by the packager's own code, does the same from ``HOLOSCAN_*`` variables
alone; and the objects equal those of serve's steps on the same study.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from holoscan_cli.packager.config_reader import ApplicationConfiguration
from holoscan_cli.packager.container_builder import PythonAppBuilder
from holoscan_cli.packager.models import Models
from holoscan_cli.packager.parameters import PackageBuildParameters
from holoscan_cli.runner.resources import get_shared_memory_size

from app.config import REPO_ROOT
from app.oneshot import (
    OneShotError,
    find_model_package,
    find_seg_package,
    load_oneshot_config,
)
from app.oneshot_cmd import is_oneshot_argv
from ml.errors import ConfigError
from ml.synth.cohort import CohortOptions, generate_cohort
from tests.oneshot_helpers import (
    copy_ct,
    copy_hl7,
    run_python,
    seg_summary,
    serve_mode_results,
    sr_values,
    write_mr,
)
from tests.tools import dciodvfy

APP_YAML = REPO_ROOT / "deploy" / "app.yaml"
MAP_ENTRY = REPO_ROOT / "deploy" / "map"
RESULTS = ("seg", "sr", "card")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("oneshot-cohort") / "c"
    return out, generate_cohort(CohortOptions(out=out, patients=2, seed=78, size="default",
                                              workers=2))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory, cohort: tuple[Path, dict[str, Any]],
               ) -> dict[str, Any]:
    """One ``python -m app -i IN -o OUT -m models`` run over both studies, HL7 files,
    an MR study and a text file."""
    root, manifest = cohort
    crc, pdac = manifest["patients"]
    base = tmp_path_factory.mktemp("oneshot-run")
    inp, out = base / "in", base / "out"
    copy_ct(root, crc, inp / "crc" / "ct", flat=False)
    copy_ct(root, pdac, inp / "deeper" / "pdac", flat=True)
    copy_hl7(root, crc, inp / "hl7")
    copy_hl7(root, pdac, inp / "hl7")
    mr_study = write_mr(inp / "mr.dcm")
    (inp / "notes.txt").write_text("not DICOM\n")
    started = time.perf_counter()
    proc = run_python(["-m", "app", "-i", str(inp), "-o", str(out), "-m",
                       str(REPO_ROOT / "models")])
    seconds = time.perf_counter() - started
    report: dict[str, Any] | None = json.loads((out / "report.json").read_text()) \
        if (out / "report.json").is_file() else None
    run: dict[str, Any] = {"proc": proc, "out": out, "seconds": seconds, "crc": crc,
                           "pdac": pdac, "mr_study": mr_study, "report": report}
    return run


def _job(report: dict[str, Any], study_uid: str) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = [s for s in report["studies"] if s["study_uid"] == study_uid]
    assert len(jobs) == 1, report
    return jobs[0]


@pytest.mark.peers
@pytest.mark.slow
def test_folder_run_writes_valid_seg_sr_and_card_per_study(folder_run: dict[str, Any]) -> None:
    proc, out, report = folder_run["proc"], folder_run["out"], folder_run["report"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for patient, pipeline in ((folder_run["crc"], "A"), (folder_run["pdac"], "B")):
        study_uid = patient["ct"]["study_uid"]
        job = _job(report, study_uid)
        assert (job["state"], job["pipeline"]) == ("done", pipeline), job
        assert job["files"] == [f"{study_uid}/{n}.dcm" for n in sorted(RESULTS)]
        for name in RESULTS:
            path = out / study_uid / f"{name}.dcm"
            validation = dciodvfy(path)
            assert not validation.errors, str(validation)
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == study_uid and ds.PatientID == patient["patient_id"]
        assert {"routing", "segmentation", "seg_writer", "sr_writer", "result_card"} \
            <= set(job["timings_s"])
    assert report["ok"] is True and report["hl7_messages"] == 5


@pytest.mark.slow
def test_unusable_input_is_reported_with_reasons(folder_run: dict[str, Any]) -> None:
    report = folder_run["report"]
    mr = _job(report, folder_run["mr_study"])
    assert mr["state"] == "unmatched" and mr["pipeline"] is None and mr["files"] == []
    assert "no rule matched" in mr["reason"]
    assert not (folder_run["out"] / folder_run["mr_study"]).exists()
    assert report["skipped"] == [{"file": "notes.txt",
                                  "reason": "not a DICOM Part 10 file (no DICM prefix)"}]
    assert report["jobs"] == {"done": 2, "unmatched": 1}


@pytest.mark.peers
@pytest.mark.slow
def test_same_objects_as_serve_mode(folder_run: dict[str, Any], cohort: tuple[Path, Any],
                                    tmp_path: Path) -> None:
    root, _ = cohort
    crc = folder_run["crc"]
    served = serve_mode_results(tmp_path / "serve-state", root, crc)
    oneshot = {n: folder_run["out"] / crc["ct"]["study_uid"] / f"{n}.dcm" for n in RESULTS}
    a, b = ({n: pydicom.dcmread(p[n]) for n in RESULTS} for p in (served, oneshot))
    for name in RESULTS:  # two runs, not one file read twice
        assert a[name].SOPInstanceUID != b[name].SOPInstanceUID
        assert a[name].SeriesNumber == b[name].SeriesNumber
    assert seg_summary(a["seg"]) == seg_summary(b["seg"])
    labels = a["seg"].pixel_array
    assert labels.any() and np.array_equal(labels, b["seg"].pixel_array)
    values = sr_values(a["sr"])
    assert sum(1 for v in values if v[0].endswith("Volume")) >= 3
    assert values == sr_values(b["sr"])
    assert np.array_equal(a["card"].pixel_array, b["card"].pixel_array)


def _build_parameters(config: Path) -> PackageBuildParameters:
    """What ``monai-deploy package deploy/map -c CONFIG -m models`` sets."""
    params = PackageBuildParameters()  # type: ignore[no-untyped-call]
    params.application = MAP_ENTRY
    params.app_config_file_path = config
    models = Models().build(REPO_ROOT / "models")
    assert models is not None
    params.models = models
    return params


def _stage_map(tmp: Path, config: Path) -> Path:
    """The packager's build context (its own PythonAppBuilder, without Docker):
    app/ (the entry point), lib/ (oncopacs), models/, app.config, pip/requirements.txt."""
    lib = tmp / "map-lib"
    for package in ("app", "operators", "ml"):
        shutil.copytree(REPO_ROOT / package, lib / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    params = _build_parameters(config)
    params.additional_libs = [str(lib)]
    context = tmp / "context"
    context.mkdir()
    builder = PythonAppBuilder(params, str(context))
    builder._copy_pip_requirements()  # type: ignore[no-untyped-call]
    return context


@pytest.mark.slow
def test_package_entry_point_runs_from_holoscan_variables(
        cohort: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    root, manifest = cohort
    pdac = manifest["patients"][1]
    config = tmp_path / "app.yaml"
    data = yaml.safe_load(APP_YAML.read_text())
    config.write_text(yaml.safe_dump({**data, "results": {"series_number_base": 9100}}))
    context = _stage_map(tmp_path, config)
    inp, out, work = tmp_path / "input", tmp_path / "output", tmp_path / "work"
    copy_ct(root, pdac, inp, flat=False)
    copy_hl7(root, pdac, inp)
    proc = run_python([str(context / "app")], cwd=tmp_path, env={
        "PYTHONPATH": str(context / "lib"), "HOLOSCAN_INPUT_PATH": str(inp),
        "HOLOSCAN_OUTPUT_PATH": str(out), "HOLOSCAN_MODEL_PATH": str(context / "models"),
        "HOLOSCAN_WORKDIR": str(work), "HOLOSCAN_CONFIG_PATH": str(context / "app.config")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    job = _job(report, pdac["ct"]["study_uid"])
    assert (job["state"], job["pipeline"]) == ("done", "B"), job
    assert report["segmentation_package"] == str(context / "models" / "seg-synthetic")
    numbers = [pydicom.dcmread(out / pdac["ct"]["study_uid"] / f"{n}.dcm",
                               stop_before_pixels=True).SeriesNumber for n in RESULTS]
    assert numbers == [9100, 9101, 9102]  # the configuration was read
    assert work.is_dir() and not any(work.iterdir())  # the state folder was removed


def test_app_yaml_is_read_by_the_packager(tmp_path: Path) -> None:
    config = ApplicationConfiguration()
    config.read(APP_YAML)
    params = _build_parameters(APP_YAML)
    app_json = config.populate_app_manifest(params).data
    pkg_json = config.populate_package_manifest(params).data
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert f'version = "{app_json["version"]}"' in pyproject
    assert app_json["command"] == '["python3", "/opt/holoscan/app"]'
    assert app_json["input"]["formats"] == ["file"] and app_json["output"]["formats"] == ["file"]
    assert app_json["environment"]["HOLOSCAN_CONFIG_PATH"] == "/var/holoscan/app.yaml"
    assert pkg_json["models"] == {name: f"/opt/holoscan/models/{name}" for name in
                                  ("seg-synthetic", "crc-liver-metastasis", "pdac-tsr")}
    assert pkg_json["resources"]["gpu"] == 1
    assert get_shared_memory_size(pkg_json, False, False, "", "config") == 1024 ** 3
    # Inside the package the same file is the app's configuration, and the model
    # folder's layout is the one the one-shot mode looks for.
    assert load_oneshot_config(APP_YAML).wsi is None
    models = REPO_ROOT / "models"
    assert find_seg_package(models, Path("x/seg-synthetic")) == models / "seg-synthetic"
    for task, name in (("crc-liver-metastasis", "crc-liver-metastasis"), ("pdac-tsr", "pdac-tsr")):
        assert find_model_package(models, task, Path(f"x/{name}")) == models / name
        assert find_model_package(models, task, Path("x/other-name")) == models / name
    assert find_model_package(models, "pdac-tsr", None) is None


def test_map_requirements_match_pyproject(tmp_path: Path) -> None:
    context = _stage_map(tmp_path, APP_YAML)
    staged = (context / "pip" / "requirements.txt").read_text().splitlines()
    wanted = [line for line in staged if line and not line.startswith("#")]
    start = (REPO_ROOT / "pyproject.toml").read_text().split("dependencies = [", 1)[1]
    declared = [line.strip().strip('",') for line in start.split("]", 1)[0].splitlines()
                if line.strip().startswith('"')]
    build_only = {"monai-deploy-app-sdk", "holoscan-cli"}
    assert wanted == [d for d in declared if d.split("=")[0].rstrip("<>!~") not in build_only]
    assert (context / "lib" / "app" / "oneshot.py").is_file()
    assert (context / "models" / "seg-synthetic" / "models" / "model.pt").is_file()


def test_oneshot_argv_is_told_from_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOLOSCAN_INPUT_PATH", raising=False)
    assert is_oneshot_argv(["-i", "in", "-o", "out"])
    assert is_oneshot_argv(["--input=in"])
    assert is_oneshot_argv(["-v", "-m", "models"])
    assert not is_oneshot_argv(["-v", "serve", "--config", "x.yaml"])
    assert not is_oneshot_argv([])
    monkeypatch.setenv("HOLOSCAN_INPUT_PATH", "/in")
    assert is_oneshot_argv([])


def test_config_and_model_folder_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("application: {title: t}\nresults: {serie_number_base: 5}\n")
    with pytest.raises(ConfigError, match=r"results\.serie_number_base: Extra inputs"):
        load_oneshot_config(bad)
    with pytest.raises(OneShotError, match="holds 0 segmentation packages"):
        find_seg_package(tmp_path, Path("seg-synthetic"))
    with pytest.raises(OneShotError, match="is not a folder"):
        find_seg_package(bad, Path("seg-synthetic"))


@pytest.mark.slow
def test_missing_input_folder_exits_2_naming_it(tmp_path: Path) -> None:
    proc = run_python(["-m", "app", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
                      cwd=tmp_path)
    assert proc.returncode == 2
    assert f"input path {tmp_path / 'nope'} is not a folder" in proc.stderr
