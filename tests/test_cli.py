"""The ``oncopacs`` command line, run as a user runs it, against real peers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.orthanc import Orthanc
from tests.mllp import MllpListener
from tests.tools import free_port

TIMEOUT_S = 300


def oncopacs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True,
                          text=True, check=False, timeout=TIMEOUT_S)


@pytest.mark.peers
def test_synth_push_to_orthanc_and_mllp(orthanc: Orthanc, mllp_listener: MllpListener,
                                        tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    proc = oncopacs("synth", "--out", str(out), "--patients", "2", "--seed", "21",
                    "--size", "tiny", "--push", "--pacs", f"127.0.0.1:{orthanc.dicom_port}",
                    "--pacs-aet", orthanc.aet, "--mllp", f"127.0.0.1:{mllp_listener.port}")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    for patient in manifest["patients"]:
        assert orthanc.find_studies(StudyInstanceUID=patient["ct"]["study_uid"])
    wsi = manifest["patients"][0]["wsi"]
    assert orthanc.find_series(SeriesInstanceUID=wsi["series_uid"])
    received = mllp_listener.wait_for_count(5)
    types = sorted(m.message_type for m in received)
    assert types == ["ADT^A04^ADT_A01"] * 2 + ["ORU^R01^ORU_R01"] * 3
    assert "5 messages acknowledged" in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--patients", "2", "--centers", "9"], "--centers must be between 1 and 6, got 9"),
    (["--patients", "0"], "--patients must be at least 1, got 0"),
    (["--patients", "2", "--push"],
     "--push needs exactly one of --pacs HOST:PORT or --stow-url URL"),
    (["--patients", "2", "--push", "--pacs", "nohost"], "--pacs must be HOST:PORT, got 'nohost'"),
])
def test_synth_rejects_bad_arguments_before_writing(args: list[str], message: str,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    proc = oncopacs("synth", "--out", str(out), "--seed", "1", "--size", "tiny", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not out.exists()


def test_synth_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("a file the user keeps")
    proc = oncopacs("synth", "--out", str(tmp_path), "--patients", "1", "--seed", "1")
    assert proc.returncode == 2
    assert f"output folder {tmp_path} is not empty" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.peers
def test_push_to_a_closed_port_names_the_peer(tmp_path: Path) -> None:
    port = free_port()
    proc = oncopacs("synth", "--out", str(tmp_path / "c"), "--patients", "1", "--seed", "1",
                    "--size", "tiny", "--push", "--pacs", f"127.0.0.1:{port}")
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}" in proc.stderr


@pytest.mark.peers
@pytest.mark.slow
def test_demo_round_trip_prints_every_patients_results(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", "-c", f'ulimit -s 32768; exec "{sys.executable}" -m app '
                           f'demo --patients 2 --size tiny --no-wait --workdir "{tmp_path}"'],
                          capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "oncopacs: done A" in out and "oncopacs: done B" in out, out
    assert out.count("segmentation (series 103): Liver, Pancreas") == 2, out
    assert "colorectal_tumour: Volume" in out and "pancreatic_tumour: Volume" in out, out
    assert out.count("view: http://127.0.0.1:") == 2
    assert "no results in Orthanc" not in out
    # the models' findings: probability, risk group / TSR class, inputs, attention map
    assert re.search(r"crc_liver_metastasis_risk: Probability [^\n]* 0\.\d{3}\n", out), out
    assert re.search(r"pdac_tsr: Probability [^\n]* 0\.\d{3}\n", out), out
    assert "crc_liver_metastasis_risk: Liver metastasis risk group: " in out, out
    assert "pdac_tsr: Tumour-stroma ratio class: " in out, out
    assert "pdac_tsr: Model input used: Arterial phase CT" in out, out
    assert out.count("slide attention map (SEG series") == 1, out
