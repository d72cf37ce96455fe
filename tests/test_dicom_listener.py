"""The DICOM listener against real peers on loopback: dcmtk storescu/echoscu and
pynetdicom SCUs sending good, truncated, incomplete and unauthorised data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom import Dataset, dcmread
from pydicom.uid import UID, CTImageStorage
from pynetdicom import AE, _config

from app.dicom_listener import DicomListener, ListenerError, ListenerSettings, TlsSettings
from app.jobs import JobStore
from app.spool import Spool
from ml.synth.cohort import CohortOptions, generate_cohort
from tests.listener_helpers import (
    CALLING_AET,
    LISTENER_AET,
    FakeClock,
    dataset_bytes,
    echoscu,
    self_signed_cert,
    storescu,
)
from tests.tools import free_port

pytestmark = pytest.mark.peers

QUIET_S = 30.0
PY_SCU = "PYSCU"


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny CRC patient (two CT series and a JPEG WSI pyramid) and its folder."""
    root = tmp_path_factory.mktemp("cohort") / "cohort"
    manifest = generate_cohort(CohortOptions(out=root, patients=1, seed=11, size="tiny"))
    entry: dict[str, Any] = manifest["patients"][0]
    entry["root"] = root
    return entry


def _ct_files(patient: dict[str, Any]) -> list[Path]:
    root: Path = patient["root"]
    return sorted(p for s in patient["ct"]["series"] for p in (root / s["folder"]).glob("*.dcm"))


def _settings(**kw: Any) -> ListenerSettings:
    base: dict[str, Any] = {
        "ae_title": LISTENER_AET, "port": free_port(), "quiet_period_s": QUIET_S,
        "allowed_peers": [{"ae_title": CALLING_AET}, {"ae_title": PY_SCU, "host": "127.0.0.1"}]}
    return ListenerSettings(**{**base, **kw})


class Running:
    """A started listener with its spool, job store and fake clock."""

    def __init__(self, folder: Path, settings: ListenerSettings) -> None:
        self.clock = FakeClock()
        self.spool = Spool(folder / "spool")
        self.jobs = JobStore(folder / "jobs.db")
        self.listener = DicomListener(settings, self.spool, self.jobs, clock=self.clock).start()
        self.port = self.listener.port

    def close(self) -> None:
        self.listener.stop()
        self.jobs.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path, _settings())
    yield r
    r.close()


def _send(port: int, item: Dataset | Path, *, tls: Any = None) -> Dataset:
    """Send one data set (or a file's bytes as they are) with a pynetdicom SCU."""
    if isinstance(item, Path):
        meta = dcmread(item, stop_before_pixels=True).file_meta
        sop_class, ts = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    else:
        sop_class, ts = item.SOPClassUID, item.file_meta.TransferSyntaxUID
    ae = AE(ae_title=PY_SCU)
    ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AET, tls_args=tls)
    assert assoc.is_established, "association not established"
    try:
        status: Dataset = assoc.send_c_store(item)
    finally:
        assoc.release()
    return status


def _assert_still_serving(r: Running, patient: dict[str, Any]) -> None:
    series = patient["ct"]["series"][0]
    proc = storescu(r.port, patient["root"] / series["folder"])
    assert proc.returncode == 0, proc.stderr
    assert len(r.spool.instances(patient["ct"]["study_uid"], series["series_uid"])) == \
        series["instances"]


def test_storescu_study_is_spooled_and_becomes_one_job(running: Running,
                                                       patient: dict[str, Any]) -> None:
    r, ct = running, patient["ct"]
    proc = storescu(r.port, *[patient["root"] / s["folder"] for s in ct["series"]])
    assert proc.returncode == 0, proc.stderr
    wsi = patient["root"] / patient["wsi"]["folder"]
    proc = storescu(r.port, wsi, extra=("-xy",))
    assert proc.returncode == 0, proc.stderr

    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
            for p in [*_ct_files(patient), *sorted(wsi.glob("*.dcm"))]}
    spooled = {p.stem: p for study in r.spool.studies() for p in r.spool.instances(study)}
    assert set(spooled) == set(sent)
    for uid, path in sent.items():
        assert dataset_bytes(spooled[uid]) == dataset_bytes(path), uid
    assert r.spool.series(ct["study_uid"]) == sorted(s["series_uid"] for s in ct["series"])

    study = r.jobs.study(ct["study_uid"])
    assert study is not None
    assert study.instance_count == sum(s["instances"] for s in ct["series"])
    assert study.calling_aet == CALLING_AET
    r.clock.now += QUIET_S - 1
    assert r.listener.poll_completed() == []
    r.clock.now += 1
    jobs = r.listener.poll_completed()
    assert sorted(j.study_uid for j in jobs) == sorted([ct["study_uid"],
                                                        patient["wsi"]["study_uid"]])
    assert r.listener.poll_completed(r.clock.now + 3600) == []

    proc = storescu(r.port, patient["root"] / ct["series"][0]["folder"])  # a re-send
    assert proc.returncode == 0, proc.stderr
    assert r.jobs.counts_by_state()["received"] == 0
    assert len(r.spool.instances(ct["study_uid"])) == study.instance_count


def test_echoscu(running: Running) -> None:
    proc = echoscu(running.port)
    assert proc.returncode == 0, proc.stderr


def test_unknown_calling_ae_is_rejected(running: Running, patient: dict[str, Any]) -> None:
    proc = storescu(running.port, _ct_files(patient)[0], calling="INTRUDER")
    assert proc.returncode != 0
    assert "Association Rejected" in proc.stderr
    assert "Calling AE Title Not Recognized" in proc.stderr
    assert echoscu(running.port, calling="INTRUDER").returncode != 0
    assert running.spool.studies() == []
    _assert_still_serving(running, patient)


def test_known_ae_from_another_host_is_rejected(tmp_path: Path,
                                                patient: dict[str, Any]) -> None:
    r = Running(tmp_path, _settings(allowed_peers=[{"ae_title": CALLING_AET,
                                                    "host": "192.0.2.7"}]))
    try:
        proc = storescu(r.port, _ct_files(patient)[0])
        assert proc.returncode != 0 and "Calling AE Title Not Recognized" in proc.stderr
    finally:
        r.close()


def test_open_listener_accepts_any_peer(tmp_path: Path, patient: dict[str, Any]) -> None:
    r = Running(tmp_path, _settings(require_known_peers=False, allowed_peers=[]))
    try:
        assert storescu(r.port, _ct_files(patient)[0], calling="ANYONE").returncode == 0
        assert len(r.spool.studies()) == 1
    finally:
        r.close()


@pytest.mark.parametrize("cut_bytes", [100, 3000])
def test_truncated_file_is_refused_and_quarantined(
        running: Running, patient: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, cut_bytes: int) -> None:
    source = _ct_files(patient)[0]
    data = source.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-cut_bytes])
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send bytes as they are
    status = _send(running.port, truncated)
    assert status.Status == 0xC210
    assert status.ErrorComment.startswith("truncated: ")
    [record] = running.spool.quarantined()
    uid = dcmread(source, stop_before_pixels=True).SOPInstanceUID
    assert record.reason.startswith(f"instance {uid} is truncated")
    assert record.calling_aet == PY_SCU
    assert record.data_path.read_bytes()[-100:] == data[-cut_bytes - 100:-cut_bytes]
    assert running.spool.studies() == [] and running.jobs.jobs() == []
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    _assert_still_serving(running, patient)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_jpeg_wsi_is_refused(running: Running, patient: dict[str, Any],
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    level = patient["root"] / patient["wsi"]["folder"] / "level-2.dcm"
    truncated = tmp_path / "wsi.dcm"
    truncated.write_bytes(level.read_bytes()[:-500])
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status = _send(running.port, truncated)
    assert status.Status == 0xC210
    assert len(running.spool.quarantined()) == 1 and running.spool.studies() == []


@pytest.mark.parametrize("missing", ["PixelData", "ImagePositionPatient",
                                     "ImageOrientationPatient", "StudyInstanceUID"])
def test_incomplete_ct_gets_a900_with_reason(running: Running, patient: dict[str, Any],
                                             missing: str) -> None:
    ds = dcmread(_ct_files(patient)[0])
    del ds[missing]
    status = _send(running.port, ds)
    assert status.Status == 0xA900
    [record] = running.spool.quarantined()
    assert record.reason == f"CT Image Storage instance {ds.SOPInstanceUID} has no {missing}"
    assert status.ErrorComment == f"CT Image Storage has no {missing}"
    sidecar = json.loads(record.data_path.with_suffix(".json").read_text())
    assert sidecar["reason"] == record.reason
    assert running.spool.studies() == []
    _assert_still_serving(running, patient)


def test_request_and_data_set_disagree_gets_a900(running: Running, patient: dict[str, Any],
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ds = dcmread(_ct_files(patient)[0])
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")  # the request takes the file meta's
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    status = _send(running.port, path)
    assert status.Status == 0xA900
    [record] = running.spool.quarantined()
    assert record.reason == (f"instance 1.2.3.4: data set says SOP Class {CTImageStorage} / "
                             f"Instance {ds.SOPInstanceUID}, the request {CTImageStorage} / "
                             "1.2.3.4")


def test_disk_write_failure_gets_a700(running: Running, patient: dict[str, Any]) -> None:
    study_uid = patient["ct"]["study_uid"]
    obstacle = running.spool.root / study_uid
    obstacle.write_text("a file where the study folder should be")
    status = _send(running.port, dcmread(_ct_files(patient)[0]))
    assert status.Status == 0xA700
    assert running.jobs.jobs() == []
    obstacle.unlink()
    _assert_still_serving(running, patient)


def test_tls(tmp_path: Path, patient: dict[str, Any]) -> None:
    import ssl

    cert, key = self_signed_cert(tmp_path)
    r = Running(tmp_path, _settings(tls=TlsSettings(cert_path=cert, key_path=key)))
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        status = _send(r.port, dcmread(_ct_files(patient)[0]), tls=(client, "localhost"))
        assert status.Status == 0x0000
        assert len(r.spool.studies()) == 1
        plain = AE(ae_title=PY_SCU)
        plain.add_requested_context(CTImageStorage)
        plain.acse_timeout = plain.network_timeout = 5
        assert not plain.associate("127.0.0.1", r.port, ae_title=LISTENER_AET).is_established
    finally:
        r.close()


def test_bad_tls_files_raise(tmp_path: Path) -> None:
    missing = tmp_path / "none.pem"
    listener = DicomListener(_settings(tls=TlsSettings(cert_path=missing, key_path=missing)),
                             Spool(tmp_path / "s"), JobStore(tmp_path / "j.db"))
    with pytest.raises(ListenerError, match=r"none\.pem"):
        listener.start()


def test_port_in_use_raises(running: Running, tmp_path: Path) -> None:
    other = DicomListener(_settings(port=running.port), Spool(tmp_path / "s2"),
                          JobStore(tmp_path / "j2.db"))
    with pytest.raises(ListenerError, match=f"cannot listen on 127.0.0.1:{running.port}"):
        other.start()


def test_settings_are_strict() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        ListenerSettings(port=1, colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="not a valid DICOM UID"):
        ListenerSettings(port=1, sop_classes=("1.2.x",))
    settings = ListenerSettings(port=1)
    with pytest.raises(ValidationError):
        settings.port = 2
    assert "1.2.840.10008.5.1.4.1.1.77.1.6" in settings.sop_classes  # VL WSI
    assert "1.2.840.10008.5.1.4.1.1.88.34" in settings.sop_classes  # Comprehensive 3D SR
    assert "1.2.840.10008.1.2.4.50" in settings.transfer_syntaxes  # JPEG Baseline
