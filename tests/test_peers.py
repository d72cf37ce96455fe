"""The real-peer harness itself: Orthanc with its plugins, dcmtk, DICOMweb, MLLP."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import examples
from pydicom.uid import generate_uid

from app.orthanc import Orthanc
from tests.mllp import MllpListener
from tests.tools import run_dcmtk

pytestmark = pytest.mark.peers

def fresh_ct(folder: Path) -> tuple[pydicom.Dataset, Path]:
    """pydicom's example CT with new Study/Series/SOP Instance UIDs, saved in ``folder``.

    Returns the dataset as read back from the file, and the file.
    """
    ds = examples.ct
    del ds[0xFFFCFFFC]  # Data Set Trailing Padding, which DICOMweb metadata leaves out
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path


def test_orthanc_loads_dicomweb_and_wsi_plugins(orthanc: Orthanc) -> None:
    plugins = orthanc.plugins()
    assert "dicom-web" in plugins
    assert "wsi" in plugins
    assert orthanc.system()["DicomAet"] == orthanc.aet


def test_echoscu(orthanc: Orthanc) -> None:
    run_dcmtk("echoscu", "-aec", orthanc.aet, orthanc.host, str(orthanc.dicom_port))


def test_storescu_findscu_and_dicomweb(orthanc: Orthanc, tmp_path: Path) -> None:
    ds, path = fresh_ct(tmp_path)
    before = orthanc.instance_count()
    run_dcmtk("storescu", "-R", "-aec", orthanc.aet, orthanc.host, str(orthanc.dicom_port),
              str(path))
    orthanc.wait_for_instance_count(before + 1)
    assert ds.StudyInstanceUID in orthanc.study_uids()

    responses = tmp_path / "find"
    responses.mkdir()
    run_dcmtk("findscu", "-S", "-aec", orthanc.aet, "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", "PatientID",
              "-X", "-od", str(responses), orthanc.host, str(orthanc.dicom_port))
    found = [pydicom.dcmread(p) for p in sorted(responses.glob("rsp*.dcm"))]
    assert [r.StudyInstanceUID for r in found] == [ds.StudyInstanceUID]
    assert found[0].PatientID == ds.PatientID

    client = DICOMwebClient(url=orthanc.dicomweb_url, timeout=10)
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    metadata = client.retrieve_instance_metadata(*uids)
    expected = ds.to_json_dict(bulk_data_threshold=1 << 30)
    assert metadata.keys() == expected.keys()
    for tag, element in metadata.items():
        if "BulkDataURI" in element:  # binary values come by reference
            assert element["vr"] == expected[tag]["vr"], tag
            assert element["BulkDataURI"].startswith(orthanc.dicomweb_url), element
        else:
            assert element == expected[tag], tag
    retrieved = client.retrieve_instance(*uids)
    assert retrieved == ds
    assert retrieved.PixelData == ds.PixelData


def test_mllp_send_gets_aa(mllp_listener: MllpListener, tmp_path: Path) -> None:
    exe = shutil.which("mllp_send")
    assert exe is not None, "mllp_send (from the hl7 package) not on PATH"
    control_id = generate_uid()[-20:]
    segments = [
        f"MSH|^~\\&|LIS|HOSP|ONCOPACS|HOSP|20240102120000||ADT^A04^ADT_A01|{control_id}|P|2.5",
        "EVN|A04|20240102120000",
        "PID|1||P12345^^^HOSP^MR||Doe^Jane||19600101|F",
        "PV1|1|O",
    ]
    message = tmp_path / "a04.hl7"
    message.write_text("\n".join(segments) + "\n")
    proc = subprocess.run([exe, "--loose", "-f", str(message), "-p", str(mllp_listener.port),
                           mllp_listener.host], capture_output=True, check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr

    (received,) = mllp_listener.wait_for_count(1)
    assert received.control_id == control_id
    assert received.message_type.startswith("ADT^A04")
    assert str(received.message.pid.pid_3.pid_3_1.value) == "P12345"
    assert mllp_listener.rejected == []
    # bytes, not text: text mode would turn the segment separator \r into \n
    ack_segments = proc.stdout.decode().strip("\x0b\x1c\r\n").split("\r")
    assert ack_segments[1].split("|")[:3] == ["MSA", "AA", control_id]


def test_mllp_listener_rejects_garbage_with_ae(mllp_listener: MllpListener) -> None:
    ack = mllp_listener.receive("this is not HL7")
    assert ack.split("\r")[1].startswith("MSA|AE|")
    assert len(mllp_listener.rejected) == 1
    assert mllp_listener.messages == []


def test_orthanc_restart_keeps_ports_and_data(orthanc_factory: Callable[..., Orthanc],
                                              tmp_path: Path) -> None:
    server = orthanc_factory(stable_age_s=1)
    ds, path = fresh_ct(tmp_path)
    server.upload(path)
    ports = (server.http_port, server.dicom_port)
    server.restart(graceful=False)
    assert (server.http_port, server.dicom_port) == ports
    assert server.dataset(ds.SOPInstanceUID).SOPInstanceUID == ds.SOPInstanceUID
    server.wait_stable(ds.StudyInstanceUID)
    series = server.find_series(SeriesInstanceUID=ds.SeriesInstanceUID)
    assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in series] == [ds.SeriesInstanceUID]
