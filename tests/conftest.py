"""Shared fixtures: real peers on loopback (Orthanc, an MLLP listener).

Tests that use them carry ``pytest.mark.peers``. The logic lives in ``app/orthanc.py``
and ``tests/mllp.py``; this file only scopes and tears down.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.orthanc import ORTHANC_EXE, Orthanc
from tests.mllp import MllpListener


def _require_orthanc() -> None:
    if not os.access(ORTHANC_EXE, os.X_OK):
        pytest.fail(f"{ORTHANC_EXE} not installed: run scripts/setup.sh (Debian packages "
                    "orthanc, orthanc-dicomweb, orthanc-wsi)")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the whole run; tests share it, so use fresh UIDs."""
    _require_orthanc()
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.close(graceful=False)


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory,
                    ) -> Iterator[Callable[..., Orthanc]]:
    """Start extra Orthancs: ``orthanc_factory(modalities=..., stable_age_s=...)``.

    Keyword arguments go to :class:`app.orthanc.Orthanc`; each is started, and
    killed at teardown.
    """
    started: list[Orthanc] = []

    def make(**kwargs: Any) -> Orthanc:
        _require_orthanc()
        workdir: Path = kwargs.pop("workdir", None) or tmp_path_factory.mktemp("orthanc")
        server = Orthanc(workdir, **kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.close(graceful=False)


@pytest.fixture
def mllp_listener() -> Iterator[MllpListener]:
    """An HL7 MLLP listener on a free loopback port that ACKs everything it can parse."""
    with MllpListener() as listener:
        yield listener
