"""Run ``oncopacs serve`` as a subprocess beside an Orthanc: used by the demo, the
round-trip tests and the turnaround benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import yaml

from app.jobs import Job, JobStore
from app.orthanc import Orthanc
from app.ports import free_port
from ml.errors import OncopacsError

SERVE_AET = "ONCOPACS"
FORWARD_CT_LUA = Path(__file__).resolve().parent.parent / "deploy" / "orthanc" / "forward-ct.lua"
SENDER_AET = "STORESCU"
START_TIMEOUT_S = 120.0


def serve_config(root: Path, orthanc: Orthanc, *, quiet_s: float = 2.0) -> dict[str, Any]:
    """A configuration on free loopback ports that exports to ``orthanc``."""
    return {
        "dicom": {"ae_title": SERVE_AET, "port": free_port(), "quiet_period_s": quiet_s,
                  "allowed_peers": [{"ae_title": SENDER_AET, "host": "127.0.0.1"},
                                    {"ae_title": orthanc.aet, "host": "127.0.0.1"}]},
        "hl7": {"port": free_port()},
        "http": {"port": free_port()},
        "storage": {"root": str(root / "state")},
        "wsi": {"host": orthanc.host, "port": orthanc.dicom_port,
                "called_aet": orthanc.aet, "calling_aet": SERVE_AET,
                "dicomweb_url": orthanc.dicomweb_url},
        "destinations": [{"name": "pacs", "kind": "c-store", "host": orthanc.host,
                          "port": orthanc.dicom_port, "called_aet": orthanc.aet,
                          "calling_aet": SERVE_AET}],
        "export": {"base_delay_s": 1.0, "max_delay_s": 4.0},
        "poll_interval_s": 0.2,
    }


class ServiceError(OncopacsError):
    """The service process exited, or did not reach the awaited state in time."""


class Service:
    """``oncopacs serve`` in a subprocess; its log goes to a file beside the config."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.root = root
        self.config = config
        self.config_path = root / "oncopacs.yaml"
        self.log_path = root / "serve.log"
        self.config_path.write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dicom_port(self) -> int:
        return int(self.config["dicom"]["port"])

    @property
    def hl7_port(self) -> int:
        return int(self.config["hl7"]["port"])

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.config['http']['port']}"

    def start(self) -> Service:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'ulimit -s 32768 2>/dev/null; exec "{sys.executable}" -m app -v '
                 f'serve --config "{self.config_path}"'], stdout=log, stderr=log, env=env)
        self.wait_for(self.healthy, START_TIMEOUT_S, "the service to answer /healthz")
        return self

    def healthy(self) -> bool:
        try:
            return bool(requests.get(f"{self.http_url}/healthz", timeout=2).json()["ok"])
        except (requests.RequestException, ValueError):
            return False

    def wait_for(self, predicate: Any, timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(f"oncopacs serve exited ({self.proc.returncode}) waiting "
                                     f"for {what}:\n{self.log_tail()}")
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise ServiceError(f"timed out after {timeout_s} s waiting for {what}:\n"
                             f"{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a deadline."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def jobs(self, study_uid: str | None = None) -> list[Job]:
        """The service's jobs (of one study when given), read from its job store."""
        with JobStore(Path(self.config["storage"]["root"]) / "jobs.sqlite") as store:
            return [j for j in store.jobs() if study_uid is None or j.study_uid == study_uid]

    def status(self) -> str:
        proc = subprocess.run([sys.executable, "-m", "app", "status", "--config",
                               str(self.config_path)], capture_output=True, text=True,
                              check=True, timeout=60)
        return proc.stdout

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
