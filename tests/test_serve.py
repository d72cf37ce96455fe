"""The PACS round trip: ``oncopacs serve`` between dcmtk, an HL7 sender and a real Orthanc.

A study sent with storescu comes back into Orthanc's copy of the study as SEG,
SR and result card; bad input is refused with a reason while the service stays
up; a crash in the middle of a study and a PACS outage during export lose
nothing and duplicate nothing.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from pydicom import examples
from pydicom.uid import generate_uid

from app.export import Outbox
from app.orthanc import Orthanc
from app.service_process import FORWARD_CT_LUA, SENDER_AET, Service, serve_config
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.synth.push import cstore_files, mllp_send_files
from tests.tools import dciodvfy, dcmtk, run_dcmtk

pytestmark = [pytest.mark.peers, pytest.mark.slow]

RESULT_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("serve-cohort") / "c"
    return out, generate_cohort(CohortOptions(out=out, patients=2, seed=77, size="default",
                                              workers=2))




@pytest.fixture
def service(tmp_path: Path, orthanc_factory: Callable[..., Orthanc],
            cohort: tuple[Path, dict[str, Any]]) -> Iterator[tuple[Service, Orthanc]]:
    pacs = orthanc_factory(stable_age_s=1, extra_config={"LuaScripts": [str(FORWARD_CT_LUA)]})
    root, manifest = cohort
    wsi = manifest["patients"][0]["wsi"]
    cstore_files(sorted((root / wsi["folder"]).glob("*.dcm")), pacs.host, pacs.dicom_port,
                 pacs.aet)
    svc = Service(tmp_path, serve_config(tmp_path, pacs)).start()
    pacs.add_modality("oncopacs", "ONCOPACS", "127.0.0.1", svc.dicom_port)
    hl7 = [root / h for p in manifest["patients"] for h in p["hl7"]]
    assert len(mllp_send_files(hl7, "127.0.0.1", svc.hl7_port)) == len(hl7)
    yield svc, pacs
    svc.stop()


def send_study(port: int, called_aet: str, root: Path, patient: dict[str, Any]) -> None:
    folders = [str(root / s["folder"]) for s in patient["ct"]["series"]]
    run_dcmtk("storescu", "-aet", SENDER_AET, "-aec", called_aet, "+sd", "127.0.0.1",
              str(port), *folders)


def results_in(pacs: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for series in pacs.find_series(StudyInstanceUID=study_uid):
        modality = series["MainDicomTags"].get("Modality", "")
        found.setdefault(modality, []).append(series)
    return found


def wait_results(svc: Service, pacs: Orthanc, study_uid: str) -> dict[str, list[Any]]:
    return dict(svc.wait_for(lambda: (r := results_in(pacs, study_uid)) and
                             all(m in r for m in ("SEG", "SR", "OT")) and r,
                             RESULT_TIMEOUT_S, f"SEG, SR and card in study {study_uid}"))


def job_states(svc: Service, study_uid: str) -> list[tuple[str, str | None]]:
    """(state, pipeline) of each job of a study."""
    return [(j.state, j.pipeline) for j in svc.jobs(study_uid)]


def check_objects(pacs: Orthanc, series: list[dict[str, Any]], tmp_path: Path) -> list[Path]:
    paths = []
    for s in series:
        for instance in s["Instances"]:
            data = requests.get(f"{pacs.http_url}/instances/{instance}/file", timeout=30).content
            path = tmp_path / f"{instance}.dcm"
            path.write_bytes(data)
            report = dciodvfy(path)
            assert not report.errors, str(report)
            paths.append(path)
    return paths


def test_study_round_trip_writes_seg_sr_and_card(
        service: tuple[Service, Orthanc], cohort: tuple[Path, dict[str, Any]],
        tmp_path: Path) -> None:
    svc, pacs = service
    root, manifest = cohort
    crc, pdac = manifest["patients"]
    # The CRC study: the PACS holds it, and a modality also sends it to oncopacs directly.
    send_study(pacs.dicom_port, pacs.aet, root, crc)
    send_study(svc.dicom_port, "ONCOPACS", root, crc)
    # The PDAC study reaches oncopacs through Orthanc's own auto-forward rule.
    send_study(pacs.dicom_port, pacs.aet, root, pdac)
    for patient, pipeline in ((crc, "A"), (pdac, "B")):
        study_uid = patient["ct"]["study_uid"]
        found = wait_results(svc, pacs, study_uid)
        assert {len(found[m]) for m in ("SEG", "SR", "OT")} == {1}
        sr_path = check_objects(pacs, found["SR"], tmp_path)[0]
        check_objects(pacs, found["SEG"] + found["OT"], tmp_path)
        dump = subprocess.run([dcmtk("dsrdump"), str(sr_path)],
                                            capture_output=True, text=True, check=True).stdout
        assert "Imaging Measurement Report" in dump and "Volume" in dump
        # The model's finding: probability, class, and the inputs it used.
        finding = {"A": "Probability of metachronous liver metastasis within 3 years",
                   "B": "Probability of high tumour-stroma ratio"}[pipeline]
        assert finding in dump, dump
        assert ("Whole Slide Imaging" in dump) == (pipeline == "A")
        sr = pydicom.dcmread(sr_path)
        assert sr.StudyInstanceUID == study_uid and sr.PatientID == patient["patient_id"]
        answers = tmp_path / f"find-{pipeline}"
        answers.mkdir()
        run_dcmtk("findscu", "-S", "-aec", pacs.aet, "-k", "QueryRetrieveLevel=SERIES",
                  "-k", f"StudyInstanceUID={study_uid}", "-k", "Modality", "-k",
                  "SeriesInstanceUID", "-X", "-od", str(answers), pacs.host,
                  str(pacs.dicom_port))
        modalities = sorted(pydicom.dcmread(p).Modality for p in answers.glob("rsp*.dcm"))
        assert modalities == ["CT", "CT", "OT", "SEG", "SR"]
        svc.wait_for(lambda uid=study_uid, pipe=pipeline: job_states(svc, uid) == [("done", pipe)],
                     30, f"the job of study {study_uid} done in pipeline {pipeline}")
    # Model A's tile attention joins the slide's pathology study as a SEG that validates.
    slide_study = crc["wsi"]["study_uid"]
    attention = svc.wait_for(lambda: results_in(pacs, slide_study).get("SEG"), RESULT_TIMEOUT_S,
                             f"the attention SEG in slide study {slide_study}")
    assert len(attention) == 1
    check_objects(pacs, attention, tmp_path)


def test_bad_input_gets_a_reason_and_the_service_stays_up(
        service: tuple[Service, Orthanc], tmp_path: Path) -> None:
    svc, _ = service
    mr = examples.mr
    mr.StudyInstanceUID, mr.SeriesInstanceUID = generate_uid(), generate_uid()
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mr.save_as(tmp_path / "mr.dcm", enforce_file_format=True)
    ct = examples.ct
    ct.StudyInstanceUID, ct.SeriesInstanceUID = generate_uid(), generate_uid()
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    for name in ("mr.dcm", "ct.dcm"):
        run_dcmtk("storescu", "-aet", SENDER_AET, "-aec", "ONCOPACS", "127.0.0.1",
                  str(svc.dicom_port), str(tmp_path / name))
    status = svc.wait_for(lambda: (s := svc.status()).count("unmatched ") >= 2 and s, 60,
                          "two unmatched jobs")
    assert f"study {mr.StudyInstanceUID}" in status and f"study {ct.StudyInstanceUID}" in status
    assert "no rule matched" in status
    refused = subprocess.run(
        [dcmtk("storescu"), "-aet", "INTRUDER", "-aec", "ONCOPACS", "127.0.0.1",
         str(svc.dicom_port), str(tmp_path / "ct.dcm")], capture_output=True, text=True,
        check=False, timeout=60)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert svc.healthy()
    metrics = requests.get(f"{svc.http_url}/metrics", timeout=10).text
    assert "oncopacs_instances_received_total 2.0" in metrics
    assert 'oncopacs_hl7_messages_total{ack="AA"} 5.0' in metrics
    assert 'oncopacs_jobs{state="unmatched"} 2.0' in metrics


def test_kill_9_mid_study_then_restart_stores_results_once(
        service: tuple[Service, Orthanc], cohort: tuple[Path, dict[str, Any]]) -> None:
    svc, pacs = service
    root, manifest = cohort
    crc = manifest["patients"][0]
    study_uid = crc["ct"]["study_uid"]
    send_study(pacs.dicom_port, pacs.aet, root, crc)  # the PACS forwards it to oncopacs
    svc.wait_for(lambda: any(j.state == "running" for j in svc.jobs(study_uid)), 120,
                 "the job running")
    svc.kill()
    assert not results_in(pacs, study_uid).get("SR")  # killed before it exported
    svc.start()
    found = wait_results(svc, pacs, study_uid)
    svc.wait_for(lambda: [j.state for j in svc.jobs(study_uid)] == ["done"],
                 60, "the resumed job done")
    jobs = [j.id for j in svc.jobs(study_uid)]
    with Outbox(Path(svc.config["storage"]["root"]) / "outbox.sqlite") as outbox:
        # Orthanc shows the instances a moment before the outbox records the acceptance.
        states = svc.wait_for(
            lambda: (s := [i.state for j in jobs for i in outbox.for_job(str(j))]) and
            "pending" not in s and s, 30, "the export accepted")
    assert states == ["accepted"]  # one export, no second after the restart
    found = results_in(pacs, study_uid)
    assert [len(found[m]) for m in ("SEG", "SR", "OT")] == [1, 1, 1]
    assert all(len(s["Instances"]) == 1 for m in ("SEG", "SR", "OT") for s in found[m])


def test_pacs_down_during_export_then_back_gets_the_results(
        service: tuple[Service, Orthanc], cohort: tuple[Path, dict[str, Any]]) -> None:
    svc, pacs = service
    root, manifest = cohort
    pdac = manifest["patients"][1]
    study_uid = pdac["ct"]["study_uid"]
    pacs.kill()
    send_study(svc.dicom_port, "ONCOPACS", root, pdac)
    with Outbox(Path(svc.config["storage"]["root"]) / "outbox.sqlite") as outbox:
        svc.wait_for(lambda: any(i.attempts >= 2 and i.state == "pending"
                                 for i in outbox.for_job(str(svc.jobs()[-1].id))),
                     180, "two failed export attempts")
    pacs.restart()
    found = wait_results(svc, pacs, study_uid)
    assert [len(found[m]) for m in ("SEG", "SR", "OT")] == [1, 1, 1]
    assert svc.healthy()
