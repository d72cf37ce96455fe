"""The steps of a study job, as plain functions of (services, context).

The operators in ``operators/`` call these one each; the one-shot mode and the
tests call them directly. A step returns the context to pass on, or ``None``
when the job ended (unmatched); it raises :class:`~app.context.JobFailure` (or
any error) when the study cannot be processed.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from app.context import JobFailure, Services, StudyContext
from app.results import result_series_numbers, slice_spacing_mm, sort_slices
from app.results.card import build_card
from app.results.codes import STRUCTURES, Structure
from app.results.seg import build_seg
from app.results.sr import build_sr, structure_volumes_ml
from app.routing import SeriesSummary, clinical_field_names, route
from app.spool import make_dirs_durably, write_durably
from app.wsi_fetch import (
    WsiArchiveError,
    WsiReadError,
    choose_slide,
    find_slides,
    open_slide,
    tissue_tiles,
)
from ml.hu import slice_hu
from ml.seg import CLASSES
from ml.seg.infer import segment

log = logging.getLogger(__name__)


def study_series(services: Services, study_uid: str) -> tuple[list[SeriesSummary], Dataset | None]:
    """One summary per spooled series of a study, and the first series' header
    (headers only, one file read per series)."""
    summaries: list[SeriesSummary] = []
    first: Dataset | None = None
    for series_uid in services.spool.series(study_uid):
        files = services.spool.instances(study_uid, series_uid)
        if not files:
            continue
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        first = first or header
        summaries.append(SeriesSummary.from_dataset(header, len(files)))
    return summaries, first


def route_job(services: Services, ctx: StudyContext) -> StudyContext | None:
    """Choose pipeline A, B or none; an unmatched study's job ends with the reason.

    A job resumed after a crash whose results were already queued for export ends
    here as done, so a study's results are stored once.
    """
    if queued := services.outbox.for_job(str(ctx.job_id)):
        services.jobs.finish(ctx.job_id, "done", f"results already queued before a restart "
                             f"(outbox items {', '.join(str(i.id) for i in queued)})")
        return None
    series, header = study_series(services, ctx.study_uid)
    if header is None:
        raise JobFailure(f"study {ctx.study_uid} has no instances in the spool")
    ctx.series = series
    ctx.patient_id = str(header.get("PatientID", ""))
    ctx.issuer = str(header.get("IssuerOfPatientID", ""))
    ctx.clinical = services.clinical.clinical_fields(ctx.patient_id, ctx.issuer,
                                                     dt.datetime.now())
    decision = route(series, clinical_field_names(ctx.clinical), services.settings.routing)
    ctx.decision = decision
    if decision.pipeline is None:
        log.info("job %d: unmatched: %s", ctx.job_id, decision.reason)
        services.jobs.finish(ctx.job_id, "unmatched", decision.reason)
        return None
    log.info("job %d: pipeline %s (%s)", ctx.job_id, decision.pipeline, decision.rule)
    services.jobs.set_pipeline(ctx.job_id, decision.pipeline)
    return ctx


def segmented_series_uid(ctx: StudyContext) -> str:
    """The series to segment: the venous series of a phase pair, else the routed series."""
    decision = ctx.decision
    if decision is None or not decision.series_uids:
        raise JobFailure(f"study {ctx.study_uid} was not routed to a series")
    if decision.pair is not None:
        return decision.pair.venous.series_uid
    return decision.series_uids[0]


def read_volume(files: list[Path],
                ) -> tuple[list[Dataset], np.ndarray, tuple[float, float, float]]:
    """A series' slices sorted along the slice normal, their HU volume and voxel spacing."""
    ordered = sort_slices([pydicom.dcmread(p) for p in files])
    return ordered, np.stack([slice_hu(ds) for ds in ordered]), slice_spacing_mm(ordered)


def load_ct(services: Services, ctx: StudyContext) -> StudyContext:
    """Read the series to segment into a HU volume sorted along the slice normal."""
    series_uid = segmented_series_uid(ctx)
    files = services.spool.instances(ctx.study_uid, series_uid)
    if len(files) < 2:
        raise JobFailure(f"series {series_uid} has {len(files)} instance(s); a volume needs "
                         "at least 2 slices")
    ctx.ct, ctx.volume_hu, ctx.spacing_mm = read_volume(files)
    return ctx


def segment_ct(services: Services, ctx: StudyContext) -> StudyContext:
    """Segment liver, pancreas and tumour on the loaded volume."""
    if ctx.volume_hu is None:
        raise JobFailure(f"study {ctx.study_uid}: no CT volume was loaded")
    ctx.labels = segment(ctx.volume_hu, ctx.spacing_mm, services.seg_package)
    return ctx


def fetch_slide(services: Services, ctx: StudyContext) -> StudyContext:
    """Pipeline A: find the patient's H&E slide and count its tissue tiles (if configured)."""
    settings = services.settings.wsi
    if ctx.pipeline != "A" or settings is None:
        return ctx
    try:
        ref = choose_slide(settings, find_slides(settings, ctx.patient_id, ctx.issuer or None))
        if ref is None:
            log.info("job %d: no H&E slide in the archive", ctx.job_id)
            return ctx
        with tempfile.TemporaryDirectory(prefix="oncopacs-wsi-") as folder, \
                open_slide(settings, ref, Path(folder)) as slide:
            # Streams the tissue tiles batch by batch (never the whole slide): model A
            # encodes each batch and keeps only the embeddings, read as it was trained.
            model = services.crc_model.predictor if services.crc_model else None
            if model is None:
                ctx.slide_tissue_tiles = sum(len(b.pixels) for b in tissue_tiles(slide, settings))
            else:
                ctx.slide_tiles = model.encode_tiles(tissue_tiles(slide, model.tile_spec))
                ctx.slide_tissue_tiles = ctx.slide_tiles.count
                ctx.slide_base = slide.levels.base_level.default_instance.dataset.as_dataset()
            ctx.slide = ref
    except (WsiArchiveError, WsiReadError) as exc:
        # Model A works without the slide; the SR lists it as a missing input.
        log.warning("job %d: slide unavailable, going on without it: %s", ctx.job_id, exc)
        return ctx
    log.info("job %d: slide %s, %d tissue tiles", ctx.job_id, ref.series_uid,
             ctx.slide_tissue_tiles)
    return ctx


def clinical_inputs(services: Services, ctx: StudyContext) -> StudyContext:
    """Pipeline A: the patient's latest clinical fields (TNM, CEA, CA19-9, age, sex, site),
    each with its source message and date; missing ones stay None for the model."""
    if ctx.pipeline != "A":
        return ctx
    ctx.clinical = services.clinical.clinical_fields(ctx.patient_id, ctx.issuer,
                                                     dt.datetime.now())
    log.info("job %d: clinical fields missing: %s", ctx.job_id,
             ", ".join(ctx.clinical.missing) or "none")
    return ctx


def structures_for(pipeline: str) -> dict[int, Structure]:
    """SEG structures of the segmentation classes; the tumour is named by pipeline."""
    tumour = "colorectal_tumour" if pipeline == "A" else "pancreatic_tumour"
    names = {"liver": "liver", "pancreas": "pancreas", "tumour": tumour}
    return {i: STRUCTURES[names[c]] for i, c in enumerate(CLASSES) if c in names}


def save_result(services: Services, ctx: StudyContext, name: str, ds: pydicom.Dataset) -> None:
    folder = services.results_dir / f"job-{ctx.job_id}"
    make_dirs_durably(folder)
    path = folder / f"{name}.dcm"
    with tempfile.SpooledTemporaryFile() as buffer:
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        write_durably(path, buffer.read())
    ctx.result_files.append(path)


def write_seg(services: Services, ctx: StudyContext) -> StudyContext:
    """Build the SEG of the segmentation and write it durably under the results folder."""
    if ctx.labels is None or not ctx.ct:
        raise JobFailure(f"study {ctx.study_uid}: nothing segmented to report")
    existing = [int(s.series_number) for s in ctx.series if s.series_number is not None]
    ctx.series_numbers = result_series_numbers(existing, services.settings.results)
    structures = structures_for(ctx.pipeline)
    ctx.seg = build_seg(ctx.ct, ctx.labels, structures, services.seg_model,
                        ctx.series_numbers.seg, settings=services.settings.results)
    ctx.volumes_ml = structure_volumes_ml(ctx.labels, ctx.spacing_mm, structures)
    save_result(services, ctx, "seg", ctx.seg)
    return ctx


def write_sr(services: Services, ctx: StudyContext) -> StudyContext:
    """Build the TID 1500 SR (volumes, findings, references to CT and SEG) and write it."""
    if ctx.seg is None or ctx.series_numbers is None:
        raise JobFailure(f"study {ctx.study_uid}: the SR needs the SEG first")
    sr = build_sr(ctx.ct, ctx.seg, ctx.volumes_ml, ctx.findings, observer=services.seg_model,
                  series_number=ctx.series_numbers.sr, settings=services.settings.results)
    save_result(services, ctx, "sr", sr)
    return ctx


def write_card(services: Services, ctx: StudyContext) -> StudyContext:
    """Render the result card (Secondary Capture) for viewers that do not show SR."""
    if ctx.labels is None or ctx.series_numbers is None:
        raise JobFailure(f"study {ctx.study_uid}: the card needs the segmentation first")
    card = build_card(ctx.ct, ctx.labels, structures_for(ctx.pipeline), ctx.volumes_ml,
                      ctx.findings, seg_model=services.seg_model,
                      series_number=ctx.series_numbers.card,
                      settings=services.settings.results)
    save_result(services, ctx, "card", card)
    return ctx


def export_results(services: Services, ctx: StudyContext) -> None:
    """Queue the results for every destination and end the job as done."""
    for destination in services.senders:
        services.outbox.enqueue(str(ctx.job_id), ctx.result_files, destination)
    for stage, seconds in ctx.timings.items():
        services.jobs.record_timing(ctx.job_id, stage, seconds)
    services.jobs.finish(ctx.job_id, "done", f"{len(ctx.result_files)} objects queued for "
                         f"{', '.join(services.senders)}")


def pump_outbox(services: Services, now: float | None = None) -> int:
    """Try every due export once; returns how many items were attempted."""
    due = services.outbox.due(now if now is not None else time.time())
    for item in due:
        after = services.outbox.attempt(item, services.senders[item.destination])
        if after.state == "dead":
            services.metrics.export_dead.inc()
        elif after.state != "accepted":
            services.metrics.export_retries.inc()
    return len(due)
