"""Pushing a synthetic cohort to real peers on loopback.

Peers: hl7apy's MLLP server (fed by the ``mllp_send`` CLI of the ``hl7``
package and by :func:`mllp_send_files`), dcmtk's ``storescp``, pynetdicom
Storage SCPs that fail or reject on purpose, and Orthanc with its DICOMweb
plugin for STOW-RS.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPServer
from hl7apy.parser import parse_message
from PIL import Image
from pydicom import Dataset, FileMetaDataset, dcmread, examples
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt

from app.orthanc import Orthanc
from ml.errors import PeerError
from ml.synth.centres import centres
from ml.synth.hl7gen import write_hl7
from ml.synth.latent import sample_patient
from ml.synth.push import cstore_files, mllp_send_files, stow_files
from tests.tools import dcmtk, free_port

pytestmark = pytest.mark.peers

SEED = 20240611
DEADLINE_S = 20.0
TRAILING_PADDING = 0xFFFCFFFC
VERIFICATION = "1.2.840.10008.1.1"


def _wait_for(ready: Callable[[], bool], what: str) -> None:
    """Poll ``ready`` until it is true or the deadline passes."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if ready():
            return
        threading.Event().wait(0.05)
    raise TimeoutError(f"{what} not ready within {DEADLINE_S} s")


# ---------------------------------------------------------------- HL7 / MLLP


def _ack(message: str, code: str) -> str:
    incoming = parse_message(message) if code != "AR" else None
    ack = Message("ACK", version="2.5", validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = "ONCOPACS"
    ack.msh.msh_7 = "20240101000000"
    ack.msh.msh_9 = "ACK^A01^ACK"
    ack.msh.msh_10 = "ACK1"
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = incoming.msh.msh_10.to_er7() if incoming is not None else "UNKNOWN"
    return f"\x0b{ack.to_er7()}\r\x1c\r"


class RecordingHandler(AbstractHandler):  # type: ignore[misc]
    """Parse the message strictly, keep it, answer AA."""

    def __init__(self, message: str, received: list[str]) -> None:
        super().__init__(message)
        self.received = received

    def reply(self) -> str:
        parsed = parse_message(self.incoming_message,
                               validation_level=VALIDATION_LEVEL.STRICT)
        parsed.validate()
        self.received.append(self.incoming_message)
        return _ack(self.incoming_message, "AA")


class RejectingHandler(AbstractErrorHandler):  # type: ignore[misc]
    """Answer AR to what the server cannot route or parse."""

    def reply(self) -> str:
        return _ack(self.incoming_message, "AR")


@dataclass
class MllpPeer:
    port: int
    received: list[str] = field(default_factory=list)


@pytest.fixture()
def mllp_server() -> Iterator[MllpPeer]:
    peer = MllpPeer(free_port())
    handlers = {
        "ADT^A04^ADT_A01": (RecordingHandler, peer.received),
        "ORU^R01^ORU_R01": (RecordingHandler, peer.received),
        "ERR": (RejectingHandler,),
    }
    server = MLLPServer("127.0.0.1", peer.port, handlers, timeout=5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=DEADLINE_S)


@pytest.fixture(scope="module")
def hl7_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("cohort")
    return write_hl7(sample_patient(SEED, 0, centres(3)), SEED, out)


def test_mllp_send_cli_reaches_hl7apy_server(mllp_server: MllpPeer,
                                             hl7_files: list[Path]) -> None:
    exe = shutil.which("mllp_send")
    assert exe is not None, "mllp_send (from the hl7 package) not on PATH"
    for path in hl7_files:
        proc = subprocess.run([exe, "--loose", "-f", str(path), "-p", str(mllp_server.port),
                               "127.0.0.1"], capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        assert "MSA|AA|" in proc.stdout
    sent = [p.read_bytes().decode("ascii").rstrip("\r") for p in hl7_files]
    assert mllp_server.received == sent


def test_mllp_send_files_gets_aa(mllp_server: MllpPeer, hl7_files: list[Path]) -> None:
    acks = mllp_send_files(hl7_files, "127.0.0.1", mllp_server.port, timeout_s=10.0)
    assert len(acks) == len(hl7_files)
    for ack, path in zip(acks, hl7_files, strict=True):
        control_id = parse_message(path.read_bytes().decode("ascii")).msh.msh_10.to_er7()
        assert f"MSA|AA|{control_id}" in ack
    assert len(mllp_server.received) == len(hl7_files)


def test_mllp_send_files_raises_on_reject(mllp_server: MllpPeer, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.hl7"
    unknown.write_bytes(b"MSH|^~\\&|X|C1|ONCOPACS||20240101||ZZZ^Z01|1|P|2.5\r")
    with pytest.raises(PeerError, match=r"unknown\.hl7.*MSA-1 AR"):
        mllp_send_files([unknown], "127.0.0.1", mllp_server.port, timeout_s=10.0)


def test_mllp_send_files_raises_when_unreachable(hl7_files: list[Path]) -> None:
    port = free_port()
    with pytest.raises(PeerError, match=f"127.0.0.1:{port}"):
        mllp_send_files(hl7_files[:1], "127.0.0.1", port, timeout_s=5.0)


# ---------------------------------------------------------------- DICOM C-STORE


def _ct_file(folder: Path, name: str) -> tuple[Path, Dataset]:
    """pydicom's small CT with a fresh SOP Instance UID, saved as ``folder/name.dcm``.

    Its Data Set Trailing Padding is removed: storescp drops it, and it carries no data.
    """
    ds = examples.ct
    del ds[TRAILING_PADDING]
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def _echo(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    if not assoc.is_established:
        return False
    assoc.release()
    return True


@dataclass
class StorePeer:
    port: int
    folder: Path

    def received(self) -> dict[str, Dataset]:
        files = (dcmread(p) for p in self.folder.iterdir() if p.is_file())
        return {str(ds.SOPInstanceUID): ds for ds in files}


@pytest.fixture()
def storescp(tmp_path: Path) -> Iterator[StorePeer]:
    peer = StorePeer(free_port(), tmp_path / "received")
    peer.folder.mkdir()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", "STORESCP", "+xa", "-od",
                             str(peer.folder), str(peer.port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: proc.poll() is None and _echo(peer.port), "storescp")
        yield peer
    finally:
        proc.terminate()
        proc.wait(timeout=DEADLINE_S)


def test_cstore_files_to_storescp(storescp: StorePeer, tmp_path: Path) -> None:
    sent = [_ct_file(tmp_path / "sent", f"ct{i}") for i in range(3)]
    report = cstore_files([p for p, _ in sent], "127.0.0.1", storescp.port, "STORESCP")
    assert report.sent == 3 and report.failed == []
    received = storescp.received()
    assert set(received) == {str(ds.SOPInstanceUID) for _, ds in sent}
    for _, ds in sent:
        got = received[str(ds.SOPInstanceUID)]
        assert got == ds
        assert got.PixelData == ds.PixelData
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def _jpeg_sm_file(folder: Path) -> tuple[Path, Dataset]:
    """A tiny VL Whole Slide Microscopy instance with one JPEG Baseline frame.

    Only what a Storage SCP needs; this is not a complete WSI IOD.
    """
    frame = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 160)).save(frame, format="JPEG", quality=90)
    ds = Dataset()
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "SYNTEST", "SM"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
    ds.PlanarConfiguration, ds.NumberOfFrames = 0, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame.getvalue()])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sm.dcm"
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_cstore_files_sends_ct_and_jpeg_wsi_together(storescp: StorePeer,
                                                     tmp_path: Path) -> None:
    ct_path, ct = _ct_file(tmp_path / "sent", "ct")
    sm_path, sm = _jpeg_sm_file(tmp_path / "sent")
    report = cstore_files([ct_path, sm_path], "127.0.0.1", storescp.port, "STORESCP")
    assert report.sent == 2 and report.failed == []
    received = storescp.received()
    got = received[str(sm.SOPInstanceUID)]
    assert got.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert got.PixelData == sm.PixelData
    assert received[str(ct.SOPInstanceUID)] == ct


def test_cstore_files_reports_unreadable_files(storescp: StorePeer, tmp_path: Path) -> None:
    good, _ = _ct_file(tmp_path / "sent", "good")
    bad = tmp_path / "sent" / "bad.dcm"
    bad.write_bytes(b"not dicom")
    report = cstore_files([bad, good], "127.0.0.1", storescp.port, "STORESCP")
    assert report.sent == 1
    assert len(report.failed) == 1 and report.failed[0].startswith(f"{bad}: ")


def test_cstore_files_unused_port_raises(tmp_path: Path) -> None:
    path, _ = _ct_file(tmp_path, "ct")
    port = free_port()
    with pytest.raises(PeerError, match=rf"127\.0\.0\.1:{port}.*NOWHERE.*ONCOPACS_SYN"):
        cstore_files([path], "127.0.0.1", port, "NOWHERE")


@pytest.fixture()
def pynetdicom_scp(request: pytest.FixtureRequest) -> Iterator[int]:
    """A pynetdicom Storage SCP (AE STORESCP) whose C-STORE handler is the test's param."""
    handler: Callable[[Any], int] = request.param
    ae = AE(ae_title="STORESCP")
    ae.require_called_aet = True
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handler)])
    assert server is not None
    try:
        yield port
    finally:
        server.shutdown()


def _out_of_resources(event: Any) -> int:
    return 0xA700


@pytest.mark.parametrize("pynetdicom_scp", [_out_of_resources], indirect=True)
def test_cstore_files_failure_status_in_hex(pynetdicom_scp: int, tmp_path: Path) -> None:
    path, _ = _ct_file(tmp_path, "ct")
    report = cstore_files([path], "127.0.0.1", pynetdicom_scp, "STORESCP")
    assert report.sent == 0
    assert report.failed == [f"{path}: C-STORE status 0xA700"]


@pytest.mark.parametrize("pynetdicom_scp", [_out_of_resources], indirect=True)
def test_cstore_files_rejected_association_raises(pynetdicom_scp: int, tmp_path: Path) -> None:
    path, _ = _ct_file(tmp_path, "ct")
    with pytest.raises(PeerError, match=rf"rejected by 127\.0\.0\.1:{pynetdicom_scp}.*WRONG_AET"):
        cstore_files([path], "127.0.0.1", pynetdicom_scp, "WRONG_AET")


_ABORT_CALLS: list[int] = []


def _abort_second(event: Any) -> int:
    _ABORT_CALLS.append(1)
    if len(_ABORT_CALLS) == 2:
        event.assoc.abort()
    return 0x0000


@pytest.mark.parametrize("pynetdicom_scp", [_abort_second], indirect=True)
def test_cstore_files_reopens_a_dropped_association(pynetdicom_scp: int,
                                                    tmp_path: Path) -> None:
    _ABORT_CALLS.clear()
    paths = [_ct_file(tmp_path, f"ct{i}")[0] for i in range(3)]
    report = cstore_files(paths, "127.0.0.1", pynetdicom_scp, "STORESCP")
    assert report.sent == 3 and report.failed == []
    assert len(_ABORT_CALLS) == 4  # the second file was sent again on a new association


# ---------------------------------------------------------------- STOW-RS


def test_stow_files_to_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    path, ds = _ct_file(tmp_path, "ct")
    report = stow_files([path], orthanc.dicomweb_url)
    assert report.sent == 1 and report.failed == []
    assert len(orthanc.find_instances(SOPInstanceUID=str(ds.SOPInstanceUID))) == 1


def test_stow_files_http_error_is_a_failed_file(orthanc: Orthanc, tmp_path: Path) -> None:
    path, _ = _ct_file(tmp_path, "ct")
    report = stow_files([path], f"{orthanc.http_url}/no-such-service", max_attempts=1)
    assert report.sent == 0
    assert report.failed == [f"{path}: HTTP 404"]


def test_stow_files_unreachable_raises(tmp_path: Path) -> None:
    path, _ = _ct_file(tmp_path, "ct")
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PeerError, match=url):
        stow_files([path], url, max_attempts=1)
