"""The durable spool: layout, idempotent replace, listing, removal, quarantine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.spool import Spool, SpoolError

STUDY, SERIES_A, SERIES_B = "1.2.3", "1.2.3.1", "1.2.3.2"


def test_store_lays_out_study_series_instance(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.store(STUDY, SERIES_A, "1.2.3.1.1", b"first")
    assert path == tmp_path / "spool" / STUDY / SERIES_A / "1.2.3.1.1.dcm"
    assert path.read_bytes() == b"first"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_same_sop_instance_replaces_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.store(STUDY, SERIES_A, "1.2.3.1.1", b"first")
    path = spool.store(STUDY, SERIES_A, "1.2.3.1.1", b"second")
    assert path.read_bytes() == b"second"
    assert spool.instances(STUDY) == [path]


def test_listing_studies_series_instances(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a = [spool.store(STUDY, SERIES_A, f"1.2.3.1.{i}", b"x") for i in (2, 1)]
    b = spool.store(STUDY, SERIES_B, "1.2.3.2.1", b"y")
    spool.store("9.8", "9.8.1", "9.8.1.1", b"z")
    spool.quarantine(b"bad", "reason", "PEER")
    assert spool.studies() == [STUDY, "9.8"]
    assert spool.series(STUDY) == [SERIES_A, SERIES_B]
    assert spool.instances(STUDY, SERIES_A) == sorted(a)
    assert spool.instances(STUDY) == [*sorted(a), b]
    assert spool.instances("7.7") == []


def test_remove_study(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(3):
        spool.store(STUDY, SERIES_A, f"1.2.3.1.{i}", b"x")
    spool.store("9.8", "9.8.1", "9.8.1.1", b"z")
    assert spool.remove_study(STUDY) == 3
    assert spool.studies() == ["9.8"]
    assert not (tmp_path / STUDY).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["9.8", "quarantine"]
    with pytest.raises(SpoolError, match=f"study {STUDY} is not in the spool"):
        spool.remove_study(STUDY)


@pytest.mark.parametrize("bad", ["../../etc", "1.2.3/4", "", "1.02.3", "1." + "2" * 70,
                                 "1.2.3 "])
def test_malformed_uids_never_become_paths(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(SpoolError, match=r"SOPInstanceUID .* is not a valid DICOM UID"):
        spool.store(STUDY, SERIES_A, bad, b"x")
    with pytest.raises(SpoolError, match="StudyInstanceUID"):
        spool.store(bad, SERIES_A, "1.2.3.1.1", b"x")
    assert list((tmp_path / "spool").iterdir()) == [tmp_path / "spool" / "quarantine"]


def test_failed_write_keeps_the_old_copy_and_leaves_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    path = spool.store(STUDY, SERIES_A, "1.2.3.1.1", b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        spool.store(STUDY, SERIES_A, "1.2.3.1.1", b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(path.parent) == [path.name]


def test_opening_removes_what_a_crash_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.store(STUDY, SERIES_A, "1.2.3.1.1", b"x")
    partial = kept.parent / ".tmp-1.2.3.1.2.dcm.abcd"
    partial.write_bytes(b"half")
    half_removed = tmp_path / ".tmp-9.9.1234"
    (half_removed / "9.9.1").mkdir(parents=True)
    Spool(tmp_path)
    assert not partial.exists() and not half_removed.exists()
    assert kept.read_bytes() == b"x"


def test_quarantine_keeps_data_and_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.quarantine(b"\x00broken", "instance 1.2 is truncated", "PACS1")
    assert path.parent == tmp_path / "quarantine" and path.read_bytes() == b"\x00broken"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["reason"] == "instance 1.2 is truncated"
    assert sidecar["calling_aet"] == "PACS1" and sidecar["size_bytes"] == 7
    [record] = spool.quarantined()
    assert record.data_path == path and record.reason == "instance 1.2 is truncated"
    assert spool.studies() == []


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SpoolError, match="is not a folder"):
        Spool(tmp_path / "f")
