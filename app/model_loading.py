"""Load the clinical model packages the configuration names (A: ``models.crc``,
B: ``models.tsr``); ``package: null`` turns a model off. A configured package that is
missing or corrupt stops the service at start with the reason, not at the first study."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from app.config import ClinicalModelSettings
from app.results import ModelIdentity
from ml.crc.predict import CrcPredictor
from ml.errors import ConfigError
from ml.package import read_metadata
from ml.tsr.predict import TsrPredictor

log = logging.getLogger(__name__)

P = TypeVar("P", CrcPredictor, TsrPredictor)


@dataclass(frozen=True)
class ClinicalModel(Generic[P]):
    """A loaded predictor and the identity its results carry."""

    predictor: P
    identity: ModelIdentity


def _identity(path: Path) -> ModelIdentity:
    meta = read_metadata(path)
    synthetic = bool(meta.get("training_data", {}).get("synthetic", False))
    return ModelIdentity(str(meta["name"])[:64], str(meta["version"])[:64],
                         str(meta["weights"]["sha256"]), demo=synthetic)


def _package(settings: ClinicalModelSettings, what: str) -> Path | None:
    if settings.package is None:
        log.info("%s is turned off (package: null)", what)
        return None
    if not settings.package.is_dir():
        raise ConfigError(f"{what} package {settings.package} is not a folder; set its "
                          "package path, or null to turn the model off")
    return settings.package


def _load(settings: ClinicalModelSettings, what: str,
          predictor: type[P]) -> ClinicalModel[P] | None:
    path = _package(settings, what)
    if path is None:
        return None
    model = ClinicalModel(predictor.from_package(path, device=settings.device), _identity(path))
    log.info("%s: %s %s on %s", what, model.identity.name, model.identity.version,
             model.predictor.device)
    return model


def load_crc_model(settings: ClinicalModelSettings) -> ClinicalModel[CrcPredictor] | None:
    """Model A, or None when it is turned off."""
    return _load(settings, "model A (models.crc)", CrcPredictor)


def load_tsr_model(settings: ClinicalModelSettings) -> ClinicalModel[TsrPredictor] | None:
    """Model B, or None when it is turned off."""
    return _load(settings, "model B (models.tsr)", TsrPredictor)
