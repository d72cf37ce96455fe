"""The clinical-model steps of a job: model A's finding from whatever inputs the job
has (none missing, no slide, no HL7) and the clinical store's fields as model A reads
them. The end-to-end path (PACS, slide archive, HL7, SR in Orthanc) is in test_serve."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import Dataset

from app.clinical import ClinicalFields, Observed
from app.config import ModelsSettings
from app.context import StudyContext
from app.model_inputs import _T as T_CATEGORY
from app.model_inputs import crc_clinical, stage_number, tumour_site
from app.model_loading import ClinicalModel, _identity
from app.model_steps import predict_crc
from app.routing import RoutingDecision
from ml.crc.predict import CrcPredictor
from tests.test_crc_model import _phantom, _tile_batches, untrained_package  # noqa: F401

NOW = dt.datetime(2025, 1, 1)


def _seen(value: Any) -> Observed[Any]:
    return Observed(value, NOW, "MSG1")


def _context(with_slide: CrcPredictor | None) -> StudyContext:
    hu, labels = _phantom()
    ctx = StudyContext(job_id=1, study_uid="1.2.3",
                       decision=RoutingDecision("A", "rule", ("1.2.3.4",), "test"))
    ctx.volume_hu, ctx.labels, ctx.spacing_mm = hu, labels, (5.0, 4.0, 4.0)
    if with_slide is not None:
        ctx.slide_tiles = with_slide.encode_tiles(_tile_batches(6, 4, []))
    return ctx


def _services(package: Path) -> Any:
    model = ClinicalModel(CrcPredictor.from_package(package, device="cpu"), _identity(package))
    return SimpleNamespace(crc_model=model, settings=SimpleNamespace(models=ModelsSettings()))


def test_model_a_finding_lists_missing_slide_and_clinical_fields(
        untrained_package: Path) -> None:  # noqa: F811
    services = _services(untrained_package)
    bare = predict_crc(services, _context(None))
    (finding,) = bare.findings
    assert finding.kind == "crc_liver_metastasis_risk" and finding.model.demo
    assert finding.inputs_used == ("ct",)
    assert {"wsi", "clinical", "tnm", "cea"} <= set(finding.inputs_missing)
    full = _context(services.crc_model.predictor)
    full.clinical = ClinicalFields(t=_seen("pT3"), n=_seen("pN1a"), cea_ug_l=_seen(4.2),
                                   age_years=_seen(70), sex=_seen("F"), site=_seen("C18.2"))
    full.slide_base = Dataset()  # the slide's base level, as the WSI step keeps it
    (finding,) = predict_crc(services, full).findings
    assert {"ct", "wsi", "clinical", "tnm", "cea", "site"} <= set(finding.inputs_used)
    assert set(finding.inputs_missing) == {"ca19_9"}
    assert full.attention is not None and full.attention.weights.shape == (6,)
    assert full.attention.weights.sum() == pytest.approx(1.0, rel=1e-5)


def test_clinical_store_fields_as_model_a_reads_them() -> None:
    assert crc_clinical(None) is None and crc_clinical(ClinicalFields()) is None
    record = crc_clinical(ClinicalFields(t=_seen("ypT4b"), n=_seen("pNX"), site=_seen("rectum"),
                                         sex=_seen("U"), ca19_9_u_ml=_seen(-1.0)))
    assert record is not None
    assert (record.t_stage, record.n_stage, record.site, record.sex) == (4, None, "rectum", None)
    assert record.ca19_9_u_ml == 0.0
    assert stage_number("pTis", T_CATEGORY) is None
    assert [tumour_site(v) for v in ("C18.6", "C20", "Left colon", "C50.1")] == [
        "left colon", "rectum", "left colon", None]
