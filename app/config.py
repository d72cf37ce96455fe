"""The service configuration: one validated, frozen object built once at start.

``load_config(path)`` reads a YAML file; every section is a pydantic model
with ``extra="forbid"``, so a misspelt key is an error naming it. Relative
paths are resolved against the configuration file's folder. Loading has no
side effects (nothing is created or opened).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.dicom_listener import ListenerSettings
from app.export import ExportSettings
from app.export_senders import DestinationSettings
from app.hl7_listener import Hl7ListenerSettings
from app.results import ResultsSettings
from app.routing import RoutingSettings
from app.wsi_fetch import WsiArchiveSettings
from ml.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEG_PACKAGE = REPO_ROOT / "models" / "seg-synthetic"
DEFAULT_CRC_PACKAGE = REPO_ROOT / "models" / "crc-liver-metastasis"
DEFAULT_TSR_PACKAGE = REPO_ROOT / "models" / "pdac-tsr"


class Frozen(BaseModel):
    """Base of every settings section: unknown keys are errors, values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSettings(Frozen):
    """Where the service keeps its state: spool, SQLite stores and result files."""

    root: Path

    @property
    def spool(self) -> Path:
        """Received instances, per study and series."""
        return self.root / "spool"

    @property
    def jobs_db(self) -> Path:
        """The job store."""
        return self.root / "jobs.sqlite"

    @property
    def clinical_db(self) -> Path:
        """The clinical store (HL7)."""
        return self.root / "clinical.sqlite"

    @property
    def outbox_db(self) -> Path:
        """The export outbox."""
        return self.root / "outbox.sqlite"

    @property
    def results(self) -> Path:
        """Result objects (SEG, SR, card), kept until the PACS accepts them."""
        return self.root / "results"


class SegmentationSettings(Frozen):
    """The segmentation model package and how to map its labels."""

    package: Path = DEFAULT_SEG_PACKAGE
    label_map: dict[str, str | int] | None = Field(
        default=None, description="oncopacs structure (liver, pancreas, tumour) -> the "
        "bundle's label name or value, for a site's own MONAI bundle")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ClinicalModelSettings(Frozen):
    """One clinical model package (A or B); ``package: null`` turns the model off."""

    package: Path | None
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ModelsSettings(Frozen):
    """Model A (``crc``), model B (``tsr``) and model A's slide attention map."""

    crc: ClinicalModelSettings = ClinicalModelSettings(package=DEFAULT_CRC_PACKAGE)
    tsr: ClinicalModelSettings = ClinicalModelSettings(package=DEFAULT_TSR_PACKAGE)
    attention_map: bool = Field(
        default=True, description="write model A's tile attention as a SEG on the slide")


class HttpSettings(Frozen):
    """The ``/healthz`` and ``/metrics`` endpoint."""

    host: str = "127.0.0.1"
    port: int = Field(default=8090, ge=0, le=65535)


class PipelineSettings(Frozen):
    """What the steps of a study job need, in serve and one-shot mode alike."""

    storage: StorageSettings
    routing: RoutingSettings = RoutingSettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    models: ModelsSettings = ModelsSettings()
    wsi: WsiArchiveSettings | None = None
    results: ResultsSettings = ResultsSettings()
    export: ExportSettings = ExportSettings()


class ServeSettings(PipelineSettings):
    """Everything ``oncopacs serve`` needs: the pipeline, listeners and destinations."""

    dicom: ListenerSettings
    hl7: Hl7ListenerSettings = Hl7ListenerSettings()
    destinations: tuple[DestinationSettings, ...] = Field(min_length=1)
    http: HttpSettings = HttpSettings()
    poll_interval_s: float = Field(default=0.5, gt=0)

    @model_validator(mode="after")
    def _unique_destinations(self) -> ServeSettings:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique, got {names}")
        return self


def resolve_config_paths(data: Any, base: Path, keys: frozenset[str]) -> Any:
    """``data`` with the relative paths under ``keys`` made relative to ``base``."""
    if isinstance(data, dict):
        return {k: (str(base / v) if k in keys and isinstance(v, str) and not Path(v).is_absolute()
                    else resolve_config_paths(v, base, keys)) for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_config_paths(v, base, keys) for v in data]
    return data


PATH_KEYS = frozenset({"root", "package", "cert_path", "key_path", "ca_path", "tls_cert_file",
                       "tls_key_file", "tls_client_ca_file"})


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def validate_settings(model: type[SettingsT], data: Any, where: str) -> SettingsT:
    """Validate ``data`` as ``model``.

    Raises
    ------
    ConfigError
        Naming ``where`` and each wrong field (``dicom.port: Input should be ...``).
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None


def parse_config(data: dict[str, Any], where: str = "configuration") -> ServeSettings:
    """Validate a serve configuration mapping (see :func:`validate_settings`)."""
    return validate_settings(ServeSettings, data, where)


def read_config_file(path: Path, *, empty_ok: bool = False) -> dict[str, Any]:
    """The mapping in the YAML file at ``path`` (``{}`` for an empty file if ``empty_ok``).

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or does not hold a mapping.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration {path} is not valid YAML: {exc}") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"configuration {path} must be a mapping of sections")
    return data


def load_config(path: Path) -> ServeSettings:
    """Read and validate the YAML configuration at ``path``.

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or a field is wrong (each named).
    """
    data = resolve_config_paths(read_config_file(path), path.parent.resolve(), PATH_KEYS)
    return parse_config(data, str(path))
