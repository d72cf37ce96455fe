"""Model packages of the clinical models (A and B): one folder per model.

Layout::

    configs/config.json      how to build the network and prepare its inputs
    configs/metadata.json    name, version, task, weights {path, sha256}, decision
                             threshold (fixed on training data), input specification,
                             training data description, validation metrics, created
    models/model.pt          the network's state_dict
    MODEL_CARD.md            intended use, data, validation, limitations
    logs/train.log           the training log (written by the trainer)

:func:`read_package` checks the weights against their sha256 and the task, so a
corrupt or mismatched package is refused before it produces a result.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ml.errors import OncopacsError

CONFIG = "configs/config.json"
METADATA = "configs/metadata.json"
WEIGHTS = "models/model.pt"
CARD = "MODEL_CARD.md"
TASKS = ("crc-liver-metastasis", "pdac-tsr")


class PackageError(OncopacsError):
    """A model package is missing, incomplete, corrupt or for another task."""


@dataclass(frozen=True)
class LoadedPackage:
    """A package read from disk, its weights verified."""

    root: Path
    config: dict[str, Any]
    metadata: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        """Package name."""
        return str(self.metadata["name"])

    @property
    def version(self) -> str:
        """Package version."""
        return str(self.metadata["version"])

    @property
    def sha256(self) -> str:
        """SHA-256 of the weights file."""
        return str(self.metadata["weights"]["sha256"])

    @property
    def threshold(self) -> float:
        """Decision threshold fixed on the training data."""
        return float(self.metadata["threshold"])

    @property
    def demo(self) -> bool:
        """True when the package was trained on synthetic data."""
        return bool(self.metadata.get("training_data", {}).get("synthetic", False))


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8")


def write_package(out: Path, *, name: str, version: str, task: str, config: dict[str, Any],
                  state_dict: dict[str, torch.Tensor], threshold: float,
                  inputs: list[dict[str, Any]], training_data: dict[str, Any],
                  metrics: dict[str, Any], card: str) -> Path:
    """Write a package folder and return it.

    Raises
    ------
    PackageError
        If the task is unknown or the threshold is not in (0, 1).
    """
    if task not in TASKS:
        raise PackageError(f"task must be one of {TASKS}, got {task!r}")
    if not 0.0 < threshold < 1.0:
        raise PackageError(f"decision threshold must be in (0, 1), got {threshold}")
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buffer)
    weights = buffer.getvalue()
    metadata = {
        "name": name, "version": version, "task": task,
        "weights": {"path": WEIGHTS, "sha256": sha256_bytes(weights)},
        "threshold": float(threshold), "inputs": inputs, "training_data": training_data,
        "metrics": metrics, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "framework": {"torch": torch.__version__.split("+")[0]},
    }
    _atomic_write(out / WEIGHTS, weights)
    _atomic_write(out / CONFIG, _json_bytes(config))
    _atomic_write(out / METADATA, _json_bytes(metadata))
    _atomic_write(out / CARD, card.encode("utf-8"))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PackageError(f"model package file {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(f"model package file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PackageError(f"model package file {path} does not hold a JSON object")
    return data


def read_metadata(path: Path) -> dict[str, Any]:
    """The package's ``configs/metadata.json`` (no weights are read)."""
    if not path.is_dir():
        raise PackageError(f"model package folder {path} does not exist")
    return _read_json(path / METADATA)


def read_package(path: Path, task: str) -> LoadedPackage:
    """Read a package of ``task``, verifying its weights' sha256.

    Raises
    ------
    PackageError
        If the folder or a file is missing, the task differs, or the weights do not
        match their recorded sha256.
    """
    metadata = read_metadata(path)
    if metadata.get("task") != task:
        raise PackageError(f"model package {path} is for task {metadata.get('task')!r}, "
                           f"not {task!r}")
    for key in ("name", "version", "threshold", "weights"):
        if key not in metadata:
            raise PackageError(f"model package {path}: metadata has no {key!r}")
    config = _read_json(path / CONFIG)
    weights_path = path / str(metadata["weights"].get("path", WEIGHTS))
    if not weights_path.is_file():
        raise PackageError(f"model package {path}: weights {weights_path} are missing")
    data = weights_path.read_bytes()
    digest = sha256_bytes(data)
    if digest != metadata["weights"].get("sha256"):
        raise PackageError(f"model package {path}: weights sha256 {digest} does not match "
                           f"the metadata's {metadata['weights'].get('sha256')}")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise PackageError(f"model package {path}: weights are not a state_dict")
    return LoadedPackage(root=path, config=config, metadata=metadata, state_dict=state)
