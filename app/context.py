"""What travels through the graph (one :class:`StudyContext` per job) and the
long-lived services every step uses (:class:`Services`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset

from ml.errors import OncopacsError

if TYPE_CHECKING:
    from app.clinical import ClinicalFields, ClinicalStore
    from app.config import PipelineSettings
    from app.export import Outbox, Sender
    from app.health import Metrics
    from app.jobs import JobStore
    from app.model_loading import ClinicalModel
    from app.results import Finding, ModelIdentity, SeriesNumbers
    from app.routing import RoutingDecision, SeriesSummary
    from app.spool import Spool
    from app.wsi_fetch import SlideRef
    from ml.crc.predict import CrcPredictor, SlideTiles
    from ml.seg.package import SegPackage
    from ml.tsr.predict import TsrPredictor


class JobFailure(OncopacsError):
    """A study cannot be processed; the message is the reason recorded on its job."""


@dataclass
class Services:
    """Long-lived objects shared by the steps of every job."""

    settings: PipelineSettings
    spool: Spool
    jobs: JobStore
    clinical: ClinicalStore
    outbox: Outbox
    metrics: Metrics
    seg_package: SegPackage
    seg_model: ModelIdentity
    senders: dict[str, Sender]
    crc_model: ClinicalModel[CrcPredictor] | None = None
    tsr_model: ClinicalModel[TsrPredictor] | None = None

    @property
    def results_dir(self) -> Path:
        """Where result objects wait until every destination accepted them."""
        return self.settings.storage.results


@dataclass(frozen=True)
class PhaseVolume:
    """One CT phase as HU ``(z, y, x)``, its spacing in mm and its class labels."""

    volume_hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    labels: np.ndarray


@dataclass(frozen=True)
class AttentionMap:
    """Model A's attention over the slide's tiles, for the SEG on the slide."""

    locations_px: np.ndarray
    tile_px: int
    weights: np.ndarray
    model: ModelIdentity


@dataclass
class StudyContext:
    """One study job on its way through the graph."""

    job_id: int
    study_uid: str
    series: list[SeriesSummary] = field(default_factory=list)
    decision: RoutingDecision | None = None
    patient_id: str = ""
    issuer: str = ""
    ct: list[Dataset] = field(default_factory=list)
    volume_hu: np.ndarray | None = None
    spacing_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    labels: np.ndarray | None = None
    clinical: ClinicalFields | None = None
    slide: SlideRef | None = None
    slide_tissue_tiles: int = 0
    slide_tiles: SlideTiles | None = None
    slide_base: Dataset | None = None
    attention: AttentionMap | None = None
    findings: list[Finding] = field(default_factory=list)
    seg: Dataset | None = None
    series_numbers: SeriesNumbers | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    result_files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def pipeline(self) -> str:
        """The routed pipeline ("A" or "B").

        Raises
        ------
        JobFailure
            If the study was not routed to a pipeline.
        """
        if self.decision is None or self.decision.pipeline is None:
            raise JobFailure(f"study {self.study_uid} has no pipeline")
        return self.decision.pipeline
