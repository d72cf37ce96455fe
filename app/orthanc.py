"""A real Orthanc PACS on loopback, with the DICOMweb and WSI plugins.

Used by the demo (``oncopacs demo``) and by the tests.

Each :class:`Orthanc` owns a folder holding its JSON configuration, its storage and
index, and its log. Ports come from :func:`app.ports.free_port`. The server can be
stopped and started again on the same ports and storage (:meth:`Orthanc.restart`), which
the fault-injection tests use to take the PACS away in the middle of an export.

Orthanc 1.10 has no option to choose the address it binds to: the HTTP server refuses
connections from other hosts (``RemoteAccessAllowed`` false) and the DICOM server only
accepts associations that name its AE title, but both listen on every interface.
"""

from __future__ import annotations

import ctypes
import io
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import requests

from app.ports import free_port

ORTHANC_EXE = "/usr/sbin/Orthanc"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"
WSI_PLUGIN = PLUGIN_DIR / "libOrthancWSI.so"
PYTHON_PLUGIN = PLUGIN_DIR / "libOrthancPython.so"

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

T = TypeVar("T")

Modality = Sequence[str | int]


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the thread that started it ends.

    So an Orthanc never outlives a test run that was killed (pytest-timeout, Ctrl-C).
    Start Orthanc from a thread that lives as long as it should (the main thread).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class OrthancError(RuntimeError):
    """Orthanc did not start, stopped unexpectedly, or answered a REST call with an error."""


class Orthanc:
    """One Orthanc process on loopback; a context manager.

    Parameters
    ----------
    workdir:
        Folder for the configuration, storage, index and log. A temporary folder
        (removed by :meth:`close`) when omitted.
    modalities:
        ``DicomModalities``: name -> ``[aet, host, port]``.
    stable_age_s:
        ``StableAge``: seconds without a new instance before a study is stable.
    python_script:
        Loads the Python plugin with this script (``PythonScript``) when given.
    aet:
        Orthanc's own AE title.
    extra_config:
        Keys merged over the generated configuration last.
    verbose:
        Start Orthanc with ``--verbose`` (more detail in the log).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        modalities: Mapping[str, Modality] | None = None,
        stable_age_s: int = 2,
        python_script: Path | None = None,
        aet: str = "ORTHANC",
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = False,
        start_timeout_s: float = 30.0,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.storage_dir = self.workdir / "storage"  # storage area and SQLite index
        self.modalities: dict[str, list[str | int]] = {
            name: list(value) for name, value in (modalities or {}).items()}
        self.stable_age_s = stable_age_s
        self.python_script = python_script
        self.aet = aet
        self.extra_config = dict(extra_config or {})
        self.verbose = verbose
        self.start_timeout_s = start_timeout_s
        self.http_port = 0
        self.dicom_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: io.BufferedWriter | None = None
        self._http = requests.Session()

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -------------------------------------------------------------- lifecycle
    def config(self) -> dict[str, Any]:
        """The configuration written to :attr:`config_path` at each start."""
        plugins = [str(DICOMWEB_PLUGIN), str(WSI_PLUGIN)]
        config: dict[str, Any] = {
            "Name": f"oncopacs-test-{self.aet}",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 10,
            "HttpTimeout": 10,
            "KeepAlive": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomThreadsCount": 4,
            "DicomScuTimeout": 5,
            "DicomAssociationCloseDelay": 0,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "StableAge": self.stable_age_s,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
            "OverwriteInstances": True,
            "Plugins": plugins,
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                # dicomweb-client sends "Host: 127.0.0.1" without the port, from which
                # the plugin would build BulkDataURIs that lack it
                "Host": f"{self.host}:{self.http_port}",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        if self.python_script is not None:
            plugins.append(str(PYTHON_PLUGIN))
            config["PythonScript"] = str(self.python_script)
            config["PythonVerbose"] = False
        config.update(self.extra_config)
        return config

    def start(self) -> Orthanc:
        """Start Orthanc and wait until its REST API answers.

        Ports are chosen on the first start and kept by later ones. When a freshly
        chosen port was taken in the meantime, new ports are tried (first start only).

        Raises
        ------
        OrthancError
            If Orthanc exits or does not answer ``GET /system`` within the deadline.
        """
        if self.running:
            return self
        first_start = self.http_port == 0
        attempts = 3 if first_start else 1
        for attempt in range(attempts):
            if first_start:
                self.http_port, self.dicom_port = free_port(), free_port()
                while self.dicom_port == self.http_port:
                    self.dicom_port = free_port()
            try:
                self._launch()
                return self
            except OrthancError:
                if attempt == attempts - 1 or "address already in use" not in \
                        self.log_tail().lower():
                    raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self.storage_dir.mkdir(exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"==== starting Orthanc at {time.ctime()}\n".encode())
        self._log_file.flush()
        args = [ORTHANC_EXE, str(self.config_path)]
        if self.verbose:
            args.insert(1, "--verbose")
        self._proc = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=self.workdir,
                                      preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._cleanup_process()
                raise OrthancError(f"Orthanc exited with status {code} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                if self._http.get(f"{self.http_url}/system", timeout=1).ok:
                    self._check_plugins()
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        raise OrthancError(f"Orthanc did not answer GET /system within "
                           f"{self.start_timeout_s} s; log tail:\n{self.log_tail()}")

    def _check_plugins(self) -> None:
        """Orthanc 1.10 only logs a plugin it cannot load; fail the start instead."""
        wanted = {"dicom-web", "wsi"} | ({"python"} if self.python_script else set())
        if missing := wanted - set(self.plugins()):
            tail = self.log_tail()
            self.stop()
            raise OrthancError(f"Orthanc started without plugins {sorted(missing)}; "
                               f"log tail:\n{tail}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate Orthanc (SIGTERM), killing it when it has not exited after ``timeout_s``."""
        proc = self._proc
        self._http.close()  # idle keep-alive connections slow the HTTP server's shutdown
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self._cleanup_process()

    def kill(self) -> None:
        """Kill Orthanc at once (SIGKILL), as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._cleanup_process()

    def restart(self, *, graceful: bool = True) -> Orthanc:
        """Stop (or kill, when not ``graceful``), then start on the same ports and storage.

        A graceful stop of Orthanc 1.10 takes about 3.5 s (internal threads poll slowly).
        """
        if graceful:
            self.stop()
        else:
            self.kill()
        return self.start()

    def close(self, *, graceful: bool = True) -> None:
        """Stop Orthanc and remove its folder when this object created it.

        ``graceful=False`` kills it instead, which is quicker when its data are not kept.
        """
        if graceful:
            self.stop()
        else:
            self.kill()
        self._http.close()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _cleanup_process(self) -> None:
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Orthanc(aet={self.aet!r}, http={self.http_url}, dicom_port={self.dicom_port}, "
                f"workdir={str(self.workdir)!r})")

    # ------------------------------------------------------------------- REST
    def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the REST API (``path`` like ``/studies``) and return the parsed JSON.

        Keyword arguments go to :meth:`requests.Session.request` (``json=``, ``data=``,
        ``params=``, ``headers=``). An empty body gives ``None``, a body that is not JSON
        its text.

        Raises
        ------
        OrthancError
            If the answer's status is not 2xx.
        """
        kwargs.setdefault("timeout", 30)
        response = self._http.request(method, f"{self.http_url}{path}", **kwargs)
        if not response.ok:
            raise OrthancError(f"{method} {path}: HTTP {response.status_code}: "
                               f"{response.text[:2000]}")
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def wait_for(self, predicate: Callable[[], T | None], timeout_s: float = 10.0, *,
                 interval_s: float = 0.05, what: str = "condition") -> T:
        """Poll ``predicate`` until it returns something truthy, and return that.

        Raises
        ------
        TimeoutError
            If the deadline passes first; the message holds Orthanc's log tail.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} not reached within {timeout_s} s on {self!r}; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(interval_s)

    # ---------------------------------------------------------------- helpers
    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.rest("GET", "/system")
        return result

    def plugins(self) -> list[str]:
        """Identifiers of the loaded plugins (``dicom-web``, ``wsi``, ``python`` ...)."""
        result: list[str] = self.rest("GET", "/plugins")
        return result

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def wait_for_instance_count(self, count: int, timeout_s: float = 10.0) -> int:
        """Wait until Orthanc holds at least ``count`` instances; return the count."""
        self.wait_for(lambda: self.instance_count() >= count, timeout_s,
                      what=f"{count} instances")
        return self.instance_count()

    def studies(self) -> list[dict[str, Any]]:
        """Every study, expanded (``MainDicomTags``, ``IsStable``, ``Series`` ...)."""
        result: list[dict[str, Any]] = self.rest("GET", "/studies", params={"expand": ""})
        return result

    def study_uids(self) -> list[str]:
        return [s["MainDicomTags"]["StudyInstanceUID"] for s in self.studies()]

    def find(self, level: str, **tags: str) -> list[dict[str, Any]]:
        """``/tools/find`` at ``level`` (Patient, Study, Series, Instance), expanded.

        ``tags`` are DICOM keywords with Orthanc's wildcard syntax,
        e.g. ``find("Series", Modality="SM", PatientID="P1")``.
        """
        body = {"Level": level, "Query": tags, "Expand": True}
        result: list[dict[str, Any]] = self.rest("POST", "/tools/find", json=body)
        return result

    def find_studies(self, **tags: str) -> list[dict[str, Any]]:
        return self.find("Study", **tags)

    def find_series(self, **tags: str) -> list[dict[str, Any]]:
        return self.find("Series", **tags)

    def find_instances(self, **tags: str) -> list[dict[str, Any]]:
        return self.find("Instance", **tags)

    def orthanc_id(self, uid: str) -> str | None:
        """Orthanc's identifier for a Study/Series/SOP Instance UID, or None if absent."""
        hits = self.rest("POST", "/tools/lookup", data=uid)
        return str(hits[0]["ID"]) if hits else None

    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through REST (``POST /instances``)."""
        result: dict[str, Any] = self.rest("POST", "/instances", data=path.read_bytes())
        return result

    def dataset(self, sop_instance_uid: str) -> pydicom.Dataset:
        """The stored file of one instance, read with pydicom.

        Raises
        ------
        KeyError
            If Orthanc holds no instance with that UID.
        """
        ident = self.orthanc_id(sop_instance_uid)
        if ident is None:
            raise KeyError(f"instance {sop_instance_uid} is not in {self!r}")
        response = self._http.get(f"{self.http_url}/instances/{ident}/file", timeout=30)
        response.raise_for_status()
        return pydicom.dcmread(io.BytesIO(response.content))

    def wait_stable(self, study_instance_uid: str, timeout_s: float | None = None) -> None:
        """Wait until the study exists and Orthanc marks it stable (``StableAge``)."""
        def stable() -> bool:
            ident = self.orthanc_id(study_instance_uid)
            return ident is not None and bool(self.rest("GET", f"/studies/{ident}")["IsStable"])
        self.wait_for(stable, timeout_s if timeout_s is not None else self.stable_age_s + 10,
                      interval_s=0.2, what=f"study {study_instance_uid} stable")

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer now (REST) and in the configuration of later starts."""
        self.modalities[name] = [aet, host, port]
        if self.running:
            self.rest("PUT", f"/modalities/{name}",
                      json={"AET": aet, "Host": host, "Port": port})

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for ident in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{ident}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
