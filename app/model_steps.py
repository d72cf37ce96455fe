"""The clinical-model steps of a study job: model A (liver-metastasis risk) and model B
(tumour-stroma ratio), each turning what the earlier steps gathered into a
:class:`~app.results.Finding` for the SR and the result card.

Model A reads the portal-venous CT with its segmentation, the slide's tile embeddings
(encoded batch by batch in the WSI step, never the whole slide) and the clinical
fields; any of them may be missing and the finding lists what was. Model A also
writes its tile attention as a SEG on the slide when configured.

Model B reads both phases: the arterial series is loaded here and uses the venous
series' segmentation when the two share a grid, else its own.
"""

from __future__ import annotations

import logging

import numpy as np
import pydicom

from app.context import AttentionMap, JobFailure, PhaseVolume, Services, StudyContext
from app.model_inputs import crc_clinical
from app.pipeline import read_volume, save_result
from app.results import Finding
from app.results.heatmap import build_attention_seg
from ml.seg.infer import segment

log = logging.getLogger(__name__)


def predict_crc(services: Services, ctx: StudyContext) -> StudyContext:
    """Pipeline A: model A's 3-year liver-metastasis risk from CT, slide and clinical fields."""
    model = services.crc_model
    if ctx.pipeline != "A" or model is None:
        return ctx
    if ctx.volume_hu is None or ctx.labels is None:
        raise JobFailure(f"study {ctx.study_uid}: model A needs the segmented CT")
    result = model.predictor.predict(ctx.volume_hu, ctx.spacing_mm, ctx.labels,
                                     slide=ctx.slide_tiles, clinical=crc_clinical(ctx.clinical))
    identity = model.identity
    ctx.findings.append(Finding(
        kind="crc_liver_metastasis_risk", probability=result.probability,
        qualitative=result.risk_group, inputs_used=result.inputs_used,
        inputs_missing=result.inputs_missing, model=identity))
    log.info("job %d: model A %.3f (%s); missing inputs: %s", ctx.job_id, result.probability,
             result.risk_group, ", ".join(result.inputs_missing) or "none")
    if (services.settings.models.attention_map and ctx.slide_tiles is not None
            and ctx.slide_base is not None and result.tile_locations_px is not None
            and len(result.tile_attention)):
        ctx.attention = AttentionMap(result.tile_locations_px, ctx.slide_tiles.size_px,
                                     result.tile_attention, identity)
    return ctx


def write_attention(services: Services, ctx: StudyContext) -> StudyContext:
    """Pipeline A: model A's tile attention as a SEG on the slide (its pathology study)."""
    att = ctx.attention
    if att is None or ctx.slide_base is None:
        return ctx
    number = ctx.series_numbers.card + 1 if ctx.series_numbers is not None else 1
    seg = build_attention_seg(ctx.slide_base, att.locations_px, att.tile_px, att.weights,
                              att.model, number, settings=services.settings.results)
    save_result(services, ctx, "attention", seg)
    return ctx


def _same_grid(a: list[pydicom.Dataset], b: list[pydicom.Dataset]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if (x.Rows, x.Columns) != (y.Rows, y.Columns):
            return False
        if not np.allclose([float(v) for v in x.ImagePositionPatient],
                           [float(v) for v in y.ImagePositionPatient], atol=0.01):
            return False
        if not np.allclose([float(v) for v in x.PixelSpacing],
                           [float(v) for v in y.PixelSpacing], atol=1e-4):
            return False
    return True


def load_arterial(services: Services, ctx: StudyContext) -> PhaseVolume | None:
    """Pipeline B: the arterial series as HU with labels (None when the pair has none)."""
    pair = ctx.decision.pair if ctx.decision is not None else None
    if pair is None or ctx.labels is None:
        return None
    files = services.spool.instances(ctx.study_uid, pair.arterial.series_uid)
    if len(files) < 2:
        log.warning("job %d: arterial series has %d instance(s); model B goes on without it",
                    ctx.job_id, len(files))
        return None
    ordered, volume, spacing = read_volume(files)
    if _same_grid(ordered, ctx.ct):
        labels = ctx.labels
    else:
        labels = segment(volume, spacing, services.seg_package)
    return PhaseVolume(volume, spacing, labels)


def predict_tsr(services: Services, ctx: StudyContext) -> StudyContext:
    """Pipeline B: model B's tumour-stroma ratio class from the arterial and venous CT."""
    model = services.tsr_model
    if ctx.pipeline != "B" or model is None:
        return ctx
    if ctx.volume_hu is None or ctx.labels is None:
        raise JobFailure(f"study {ctx.study_uid}: model B needs the segmented venous CT")
    arterial = load_arterial(services, ctx)
    venous = (ctx.volume_hu, ctx.spacing_mm, ctx.labels)
    result = model.predictor.predict(
        arterial=None if arterial is None else (arterial.volume_hu, arterial.spacing_mm,
                                                arterial.labels),
        venous=venous)
    identity = model.identity
    ctx.findings.append(Finding(
        kind="pdac_tsr", probability=result.probability, qualitative=result.tsr_class,
        inputs_used=result.inputs_used, inputs_missing=result.inputs_missing, model=identity))
    log.info("job %d: model B %.3f (%s); missing inputs: %s", ctx.job_id, result.probability,
             result.tsr_class, ", ".join(result.inputs_missing) or "none")
    return ctx
