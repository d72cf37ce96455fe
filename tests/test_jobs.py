"""The SQLite job store: idempotent recording, quiet-period completion, claiming,
resume after a crash, and survival of kill -9 (a writer subprocess killed mid-way)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from app.jobs import Job, JobStore, JobStoreError

T0 = 1_000.0
QUIET_S = 30.0
DEADLINE_S = 30.0


def _record(store: JobStore, study: str, n: int, now: float, first: int = 0) -> None:
    for i in range(first, first + n):
        store.record_instance(study, f"{study}.1", f"{study}.1.{i}", "PACS", now + i)


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.db")


def test_wal_and_full_sync(store: JobStore) -> None:
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_record_instance_is_idempotent_per_sop(store: JobStore) -> None:
    assert store.record_instance("1.2", "1.2.1", "1.2.1.1", "PACS", T0)
    assert not store.record_instance("1.2", "1.2.1", "1.2.1.1", "PACS", T0 + 5)
    store.record_instance("1.2", "1.2.2", "1.2.2.1", "OTHER", T0 + 7)
    study = store.study("1.2")
    assert study is not None
    assert (study.instance_count, study.first_instance_at, study.last_instance_at,
            study.calling_aet) == (2, T0, T0 + 7, "OTHER")
    assert [j.state for j in store.jobs()] == ["received"]
    assert store.study("9.9") is None


def test_quiet_study_becomes_a_job_exactly_once(store: JobStore) -> None:
    _record(store, "1.2", 4, T0)
    last = T0 + 3
    assert store.complete_quiet_studies(QUIET_S, last + QUIET_S - 0.1) == []
    [job] = store.complete_quiet_studies(QUIET_S, last + QUIET_S)
    assert (job.study_uid, job.state) == ("1.2", "complete")
    assert store.complete_quiet_studies(QUIET_S, last + 10 * QUIET_S) == []
    assert store.counts_by_state()["complete"] == 1


def test_only_quiet_studies_complete(store: JobStore) -> None:
    _record(store, "1.2", 2, T0)
    _record(store, "1.3", 2, T0 + 100)
    done = store.complete_quiet_studies(QUIET_S, T0 + 1 + QUIET_S)
    assert [j.study_uid for j in done] == ["1.2"]
    assert [j.study_uid for j in store.jobs("received")] == ["1.3"]


def test_new_instance_after_a_job_opens_a_new_job(store: JobStore) -> None:
    _record(store, "1.2", 3, T0)
    [first] = store.complete_quiet_studies(QUIET_S, T0 + 100)
    store.enqueue(first.id, "B")
    claimed = store.claim_next()
    assert claimed is not None
    store.finish(first.id, "done")
    _record(store, "1.2", 1, T0 + 200, first=3)
    _record(store, "1.2", 2, T0 + 200)  # re-sent instances change nothing
    [second] = store.complete_quiet_studies(QUIET_S, T0 + 300)
    assert second.id != first.id and second.study_uid == "1.2"
    study = store.study("1.2")
    assert study is not None and study.instance_count == 4
    assert [j.state for j in store.jobs()] == ["done", "complete"]


def test_resent_study_after_release_opens_a_new_job(store: JobStore) -> None:
    _record(store, "1.2", 3, T0)
    store.complete_quiet_studies(QUIET_S, T0 + 100)
    _record(store, "1.2", 3, T0 + 200)
    assert store.jobs("received") == []
    assert store.release_study("1.2") == 3
    _record(store, "1.2", 3, T0 + 300)
    assert len(store.jobs("received")) == 1


def test_claim_finish_and_state_errors(store: JobStore) -> None:
    _record(store, "1.2", 1, T0)
    _record(store, "1.3", 1, T0)
    a, b = store.complete_quiet_studies(QUIET_S, T0 + 100)
    assert store.claim_next() is None
    with pytest.raises(JobStoreError, match=f"job {a.id} cannot become done: it is complete"):
        store.finish(a.id, "done")
    store.enqueue(a.id, "A", now=T0 + 101)
    store.finish(b.id, "unmatched", "no rule matched modality MR")
    job = store.claim_next(now=T0 + 102)
    assert job is not None and (job.id, job.state, job.pipeline) == (a.id, "running", "A")
    assert store.claim_next() is None
    store.record_timing(a.id, "segmentation", 1.5)
    store.record_timing(a.id, "export", 0.25)
    failed = store.finish(a.id, "failed", "PACS refused the SEG")
    assert (failed.state, failed.reason, failed.timings) == (
        "failed", "PACS refused the SEG", {"segmentation": 1.5, "export": 0.25})
    with pytest.raises(JobStoreError, match="needs one of"):
        store.finish(a.id, "queued")
    with pytest.raises(JobStoreError, match="no such job"):
        store.enqueue(999, "A")
    with pytest.raises(JobStoreError, match="job 999 does not exist"):
        store.record_timing(999, "x", 1.0)
    with pytest.raises(JobStoreError, match="unknown job state 'bogus'"):
        store.jobs("bogus")
    assert store.counts_by_state() == {"received": 0, "complete": 0, "queued": 0, "running": 0,
                                       "done": 0, "failed": 1, "unmatched": 1, "dead": 0}


def test_claim_next_is_atomic_across_threads(store: JobStore) -> None:
    for s in range(20):
        _record(store, f"1.{s}", 1, T0)
    for job in store.complete_quiet_studies(QUIET_S, T0 + 100):
        store.enqueue(job.id, "B")
    claimed: list[Job] = []
    lock = threading.Lock()

    def worker() -> None:
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert sorted(j.id for j in claimed) == [j.id for j in store.jobs()]
    assert store.counts_by_state()["running"] == 20


def test_resume_requeues_running_and_kills_poison_jobs(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db", max_attempts=2)
    _record(store, "1.2", 1, T0)
    [job] = store.complete_quiet_studies(QUIET_S, T0 + 100)
    store.enqueue(job.id, "B")
    store.claim_next()
    [again] = store.resume()
    assert (again.state, again.attempts) == ("queued", 1)
    assert store.resume() == []
    store.claim_next()
    [dead] = store.resume()
    assert (dead.state, dead.attempts, dead.reason) == ("dead", 2, "interrupted 2 times")


def test_store_reopens_with_its_data(tmp_path: Path) -> None:
    with JobStore(tmp_path / "jobs.db") as store:
        _record(store, "1.2", 3, T0)
    with JobStore(tmp_path / "jobs.db") as store:
        study = store.study("1.2")
        assert study is not None and study.instance_count == 3
        assert len(store.jobs("received")) == 1


def _read_until(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"writer never printed {prefix!r}; exit {proc.poll()}")


def test_survives_kill_9_mid_write(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    proc = subprocess.Popen([sys.executable, "-m", "tests.listener_helpers", "write-jobs",
                             str(db)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        running_id = int(_read_until(proc, "RUNNING").split()[1])
        _read_until(proc, "WROTE 20")
        proc.send_signal(signal.SIGKILL)
        proc.wait(DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    store = JobStore(db)
    assert store.integrity_check() == "ok"
    study = store.study("1.3.1")
    assert study is not None and study.instance_count >= 20  # every printed WROTE is durable
    assert store.counts_by_state()["running"] == 1
    [resumed] = store.resume()
    assert (resumed.id, resumed.state, resumed.attempts) == (running_id, "queued", 1)
    assert resumed.timings["segmentation"] >= 20.0
    assert store.counts_by_state()["queued"] == 3
