"""The export outbox against real peers: Orthanc (C-STORE, STOW-RS) and a scripted SCP."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.export import (
    CStoreSender,
    DestinationSettings,
    ExportError,
    ExportSettings,
    Item,
    Outbox,
    Sender,
    StowSender,
    make_sender,
)
from app.orthanc import Orthanc
from tests.export_helpers import Results, scripted_scp, write_results
from tests.tools import free_port

HOST = "127.0.0.1"
T0 = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _outbox(tmp_path: Path, clock: FakeClock, **settings: float) -> Outbox:
    return Outbox(tmp_path / "outbox.sqlite", ExportSettings.model_validate(settings), clock=clock,
                  rng=random.Random(1))


def _deliver(box: Outbox, sender: Sender) -> list[Item]:
    return [box.attempt(item, sender) for item in box.due()]


# ------------------------------------------------------------------ no peers


def test_backoff_is_exponential_and_bounded(tmp_path: Path, clock: FakeClock) -> None:
    with _outbox(tmp_path, clock, base_delay_s=2.0, max_delay_s=30.0, jitter=0.5) as box:
        for attempts, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (9, 30.0)]:
            delays = [box.delay_s(attempts) for _ in range(200)]
            assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempts, delays[:5])
            assert max(delays) - min(delays) > ceiling / 4  # jittered, not constant


def test_enqueue_checks_files_and_is_idempotent(tmp_path: Path, clock: FakeClock) -> None:
    first, second = tmp_path / "a.dcm", tmp_path / "b.dcm"
    first.write_bytes(b"x")
    with _outbox(tmp_path, clock) as box:
        with pytest.raises(ExportError, match=r"job J1: result files \['b.dcm'\] do not exist"):
            box.enqueue("J1", [first, second], "pacs")
        with pytest.raises(ExportError, match="no files"):
            box.enqueue("J1", [], "pacs")
        item = box.enqueue("J1", [first], "pacs")
        assert box.enqueue("J1", [first], "pacs") == item
        second.write_bytes(b"y")
        with pytest.raises(ExportError, match=f"already has outbox item {item.id}"):
            box.enqueue("J1", [second], "pacs")
        assert box.counts() == {"pending": 1, "accepted": 0, "dead": 0}
        assert box.due(T0 - 1) == [] and box.due() == [item]


def test_missing_result_file_is_a_dead_letter(tmp_path: Path, clock: FakeClock) -> None:
    result = tmp_path / "sr.dcm"
    result.write_bytes(b"x")
    with _outbox(tmp_path, clock) as box:
        item = box.enqueue("J2", [result], "pacs")
        result.unlink()
        after = box.attempt(item, CStoreSender(HOST, free_port(), "NOBODY"))
        assert after.state == "dead"
        assert after.last_error is not None and "result file sr.dcm is missing" in after.last_error


def test_destinations_build_their_senders() -> None:
    store = make_sender(DestinationSettings(name="pacs", kind="c-store", host=HOST, port=104,
                                            called_aet="PACS"))
    assert isinstance(store, CStoreSender) and store.description == f"C-STORE PACS@{HOST}:104"
    web = make_sender(DestinationSettings(name="web", kind="stow-rs", url="http://h/dicom-web"))
    assert isinstance(web, StowSender) and web.description == "STOW-RS http://h/dicom-web"
    with pytest.raises(ValidationError, match=r"destination 'pacs' \(c-store\) needs \['port'"):
        DestinationSettings(name="pacs", kind="c-store", host=HOST, called_aet="PACS")
    with pytest.raises(ValidationError, match="extra"):
        DestinationSettings.model_validate({"name": "w", "kind": "stow-rs", "url": "u", "tls": 1})


# ------------------------------------------------------------------ real peers


@pytest.mark.peers
def test_orthanc_outage_and_recovery(tmp_path: Path, clock: FakeClock,
                                     orthanc_factory: Callable[..., Orthanc]) -> None:
    pacs = orthanc_factory()
    sender = CStoreSender(HOST, pacs.dicom_port, pacs.aet, timeout_s=10)
    first, second = write_results(tmp_path / "job1"), write_results(tmp_path / "job2")
    with _outbox(tmp_path, clock, base_delay_s=30.0, max_delay_s=600.0) as box:
        # 1. the PACS is up: CT, SEG and Secondary Capture are all accepted
        box.enqueue("job1", first.all, "orthanc")
        [done] = _deliver(box, sender)
        assert done.state == "accepted" and done.attempts == 1 and done.last_error is None
        _assert_once(pacs, first)
        baseline = pacs.instance_count()
        # 2. the PACS is killed: the attempt fails clearly and the item waits
        item = box.enqueue("job2", second.all, "orthanc")
        pacs.kill()
        [failed] = _deliver(box, sender)
        assert failed.state == "pending" and failed.attempts == 1
        assert failed.last_error is not None
        assert f"C-STORE {pacs.aet}@{HOST}:{pacs.dicom_port}" in failed.last_error
        assert "not established" in failed.last_error
        assert failed.next_attempt_at is not None
        assert T0 + 15.0 <= failed.next_attempt_at <= T0 + 30.0
        assert box.due() == []
        # 3. the PACS comes back: the next due attempt succeeds, each instance stored once
        pacs.restart(graceful=False)
        clock.now = failed.next_attempt_at
        [recovered] = _deliver(box, sender)
        assert recovered.id == item.id and recovered.state == "accepted"
        assert recovered.attempts == 2
        assert pacs.instance_count() == baseline + len(second.all)
        _assert_once(pacs, second)
        # 4. sending accepted instances again does not duplicate them (same SOP UIDs)
        box.enqueue("job2-again", second.all, "orthanc")
        assert [i.state for i in _deliver(box, sender)] == ["accepted"]
        assert pacs.instance_count() == baseline + len(second.all)
        assert box.counts() == {"pending": 0, "accepted": 3, "dead": 0}


def _assert_once(pacs: Orthanc, results: Results) -> None:
    for uid in results.uids.values():
        assert len(pacs.find_instances(SOPInstanceUID=uid)) == 1, uid
    seg = pacs.dataset(results.uids[results.seg])
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    card = pacs.dataset(results.uids[results.sc])
    assert card.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture


@pytest.mark.peers
def test_dead_letter_after_max_attempts(tmp_path: Path, clock: FakeClock) -> None:
    results = write_results(tmp_path / "job")
    port = free_port()  # nothing listens here
    sender = CStoreSender(HOST, port, "CLOSED", timeout_s=5)
    with _outbox(tmp_path, clock, max_attempts=3, base_delay_s=1.0, max_delay_s=4.0) as box:
        item = box.enqueue("job-dead", [results.seg, results.sc], "closed")
        states = []
        for _ in range(3):
            [current] = box.due(clock.now)
            states.append(box.attempt(current, sender).state)
            later = box.get(item.id).next_attempt_at
            clock.now = later if later is not None else clock.now
        assert states == ["pending", "pending", "dead"]
        [dead] = box.dead_letters()
        assert dead.id == item.id and dead.attempts == 3 and dead.next_attempt_at is None
        assert dead.last_error is not None
        assert dead.last_error.startswith(f"3 attempts: C-STORE CLOSED@{HOST}:{port}")
        assert "not established" in dead.last_error
        assert box.counts() == {"pending": 0, "accepted": 0, "dead": 1}
        assert box.due(clock.now + 10_000) == []
        again = box.requeue(item.id)
        assert (again.state, again.attempts) == ("pending", 0)
        assert box.due() == [again]


@pytest.mark.peers
def test_outbox_survives_reopening_and_kill(tmp_path: Path, clock: FakeClock) -> None:
    results = write_results(tmp_path / "job")
    sender = CStoreSender(HOST, free_port(), "CLOSED", timeout_s=5)
    with _outbox(tmp_path, clock) as box:
        failed = box.attempt(box.enqueue("job-r", results.all, "pacs"), sender)
    with _outbox(tmp_path, clock) as reopened:
        assert reopened.get(failed.id) == failed
        assert reopened.due(failed.next_attempt_at) == [failed]
    # a process killed with SIGKILL right after enqueueing leaves its item committed
    script = ("import os, signal, sys; from pathlib import Path; from app.export import Outbox; "
              "box = Outbox(Path(sys.argv[1])); box.enqueue('job-k', [Path(sys.argv[2])], 'pacs');"
              " os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "outbox.sqlite"),
                           str(results.sc)], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -9, proc.stderr
    with _outbox(tmp_path, clock) as reopened:
        assert reopened.counts() == {"pending": 2, "accepted": 0, "dead": 0}
        assert any(i.job_id == "job-k" for i in reopened.due(T0 + 10**10))


@pytest.mark.peers
def test_statuses_retry_only_what_was_not_accepted(tmp_path: Path, clock: FakeClock) -> None:
    results = write_results(tmp_path / "job")
    ct1, ct2, ct3 = results.ct
    uid = results.uids
    script = {uid[ct1]: [0xA700], uid[ct2]: [0xB000], uid[results.seg]: [0xA900]}
    with scripted_scp(script) as scp, _outbox(tmp_path, clock) as box:
        sender = CStoreSender(HOST, scp.port, "SCRIPTED", timeout_s=10)
        item = box.enqueue("job-s", [ct1, ct2, ct3], "scp")
        first = box.attempt(item, sender)
        assert first.state == "pending" and first.accepted == {ct2, ct3}
        assert first.last_error is not None and "0xA700 (out of resources)" in first.last_error
        assert first.remaining == (ct1,)
        clock.now = first.next_attempt_at or clock.now
        second = box.attempt(first, sender)
        assert second.state == "accepted"
        assert scp.received == [uid[ct1], uid[ct2], uid[ct3], uid[ct1]]
        # 0xA900 (data set does not match SOP class) is permanent: dead at once
        seg_item = box.attempt(box.enqueue("job-seg", [results.seg], "scp"), sender)
        assert seg_item.state == "dead" and seg_item.attempts == 1
        assert seg_item.last_error is not None
        assert seg_item.last_error.startswith("permanent failure: C-STORE SCRIPTED@")
        assert f"SOP instance {uid[results.seg]}: status 0xA900" in seg_item.last_error


@pytest.mark.peers
def test_no_presentation_context_is_permanent(tmp_path: Path, clock: FakeClock) -> None:
    results = write_results(tmp_path / "job")
    with scripted_scp(only_ct=True) as scp, _outbox(tmp_path, clock) as box:
        sender = CStoreSender(HOST, scp.port, "SCRIPTED", timeout_s=10)
        item = box.attempt(box.enqueue("job-c", [results.ct[0], results.sc], "scp"), sender)
        assert item.state == "dead" and item.accepted == {results.ct[0]}
        assert item.last_error is not None
        assert "accepted no presentation context for SOP class 1.2.840.10008.5.1.4.1.1.7" \
            in item.last_error


@pytest.mark.peers
def test_stow_rs_to_orthanc(tmp_path: Path, clock: FakeClock, orthanc: Orthanc) -> None:
    results = write_results(tmp_path / "job")
    with _outbox(tmp_path, clock) as box:
        closed = StowSender(f"http://{HOST}:{free_port()}/dicom-web", timeout_s=5)
        item = box.enqueue("job-w", [results.seg, results.sc], "dicomweb")
        down = box.attempt(item, closed)
        assert down.state == "pending" and down.last_error is not None
        assert "unreachable (ConnectionError)" in down.last_error
        clock.now = down.next_attempt_at or clock.now
        up = box.attempt(down, StowSender(orthanc.dicomweb_url, timeout_s=10))
        assert up.state == "accepted", up.last_error
    for path in (results.seg, results.sc):
        assert len(orthanc.find_instances(SOPInstanceUID=results.uids[path])) == 1
