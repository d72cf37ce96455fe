"""The Comprehensive 3D SR of a study's results, with TID 1500 Measurement Report as root.

Content:

- observation context: the model as a device observer (TID 1004);
- procedure reported: LOINC 25045-6 "CT unspecified body region";
- one TID 1411 volumetric group per SEG segment: the segment's Tracking ID and Tracking
  UID, the referenced segment (SEG instance and segment number, CT source series), the
  segment's property type as finding type and its category as finding category, the
  anatomic region as finding site, and the Volume (SCT 118565006) in ml;
- one TID 1501 group per model finding: a tracking identifier and UID, the finding type
  and site, the model (TID 4019), the probability as a NUM (UCUM ``{probability}``), the
  qualitative evaluation (risk group or TSR class), one qualitative evaluation per input
  used ("Model input used") and missing ("Model input missing"), and the CT images as
  source images.

Concepts without a standard code are in the private scheme ``99ONCOPACS``, declared in
the Coding Scheme Identification Sequence (see :mod:`app.results.codes`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.results import Finding, ModelIdentity, ResultsError, ResultsSettings, sort_slices
from app.results.algorithm import (
    contributing_equipment,
    device_observer,
    sr_algorithm_identification,
)
from app.results.codes import (
    FINDING_CODES,
    INPUT_CODES,
    INPUT_MISSING,
    INPUT_USED,
    PROBABILITY_UNIT,
    PROCEDURE_REPORTED,
    VOLUME_UNIT,
    Structure,
    private_coding_scheme,
)

__all__ = ["build_sr", "finding_group", "structure_volumes_ml", "volume_groups"]

logger = logging.getLogger(__name__)

MM3_PER_ML = 1000.0


def structure_volumes_ml(labels: np.ndarray, spacing_mm: Sequence[float],
                         structures: Mapping[int, Structure]) -> dict[str, float]:
    """Volume of each structure: voxel count times voxel volume, in ml.

    Parameters
    ----------
    labels
        Label volume of any shape.
    spacing_mm
        Voxel spacing (three values, any order) in mm.
    structures
        Structure of each label value.

    Returns
    -------
    dict
        ``{structure.name: ml}`` for every structure (0.0 when it has no voxels).

    Raises
    ------
    ResultsError
        If the spacing is not three positive numbers.
    """
    spacing = [float(s) for s in spacing_mm]
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ResultsError(f"voxel spacing {spacing_mm!r} mm is not three positive numbers")
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / MM3_PER_ML
    counts = np.bincount(labels.ravel(), minlength=256)
    return {s.name: float(counts[value]) * voxel_ml for value, s in structures.items()}


def _code(item: Dataset) -> CodedConcept:
    return CodedConcept(str(item.CodeValue), str(item.CodingSchemeDesignator),
                        str(item.CodeMeaning))


def volume_groups(seg: Dataset, source_series_uid: str, volumes_ml: Mapping[str, float],
                  ) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1411 group per segment of ``seg``, with the segment's volume.

    Raises
    ------
    ResultsError
        If a segment has no volume in ``volumes_ml``, or a non-zero volume has no segment.
    """
    groups = []
    names = set()
    for segment in seg.SegmentSequence:
        name = str(segment.TrackingID)
        names.add(name)
        if name not in volumes_ml:
            raise ResultsError(f"SEG {seg.SOPInstanceUID} segment {segment.SegmentNumber} "
                               f"({name}) has no volume")
        sites = [hd.sr.FindingSite(_code(region))
                 for region in segment.get("AnatomicRegionSequence", [])]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=str(segment.TrackingUID),
                                                         identifier=name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=int(segment.SegmentNumber),
                source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid)),
            finding_type=_code(segment.SegmentedPropertyTypeCodeSequence[0]),
            finding_category=_code(segment.SegmentedPropertyCategoryCodeSequence[0]),
            finding_sites=sites or None,
            measurements=[hd.sr.Measurement(name=codes.SCT.Volume,
                                            value=round(float(volumes_ml[name]), 6),
                                            unit=VOLUME_UNIT)],
        ))
    orphans = sorted(n for n, v in volumes_ml.items() if v > 0 and n not in names)
    if orphans:
        raise ResultsError(f"volumes of {orphans} have no segment in SEG {seg.SOPInstanceUID}")
    return groups


def finding_group(finding: Finding, source_images: Sequence[Dataset],
                  ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one model finding."""
    concepts = FINDING_CODES[finding.kind]
    algorithm = sr_algorithm_identification(finding.model)
    evaluations = [hd.sr.QualitativeEvaluation(concepts.qualitative,
                                               concepts.values[finding.qualitative])]
    evaluations += [hd.sr.QualitativeEvaluation(INPUT_USED, INPUT_CODES[name])
                    for name in finding.inputs_used]
    evaluations += [hd.sr.QualitativeEvaluation(INPUT_MISSING, INPUT_CODES[name])
                    for name in finding.inputs_missing]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                     identifier=finding.kind),
        finding_type=concepts.finding_type,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(concepts.finding_site)],
        measurements=[hd.sr.Measurement(name=concepts.probability,
                                        value=round(finding.probability, 6),
                                        unit=PROBABILITY_UNIT, algorithm_id=algorithm)],
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                       for ds in source_images],
    )


def _equipment(models: Sequence[ModelIdentity],
               settings: ResultsSettings) -> list[hd.ContributingEquipment]:
    unique = list(dict.fromkeys(models))
    return [contributing_equipment(m, settings) for m in unique]


def build_sr(ct: Sequence[Dataset], seg: Dataset, volumes_ml: Mapping[str, float],
             findings: Sequence[Finding], *, observer: ModelIdentity, series_number: int,
             settings: ResultsSettings | None = None, instance_number: int = 1,
             models: Sequence[ModelIdentity] = (),
             evidence: Sequence[Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    """Build the Comprehensive 3D SR (TID 1500) of the segmentation and the findings.

    Parameters
    ----------
    ct
        The segmented CT series (any order).
    seg
        The SEG built on it (:func:`app.results.seg.build_seg`).
    volumes_ml
        Volume in ml by structure name (:func:`structure_volumes_ml`); every SEG
        segment needs one.
    findings
        Model findings, one measurement group each (may be empty).
    observer
        The model named as device observer (usually the one that made the findings).
    series_number
        Series Number of the new SR series.
    settings
        Manufacturer and labels; defaults to ``ResultsSettings()``.
    instance_number
        Instance Number of the SR.
    models
        Further models to name in the Contributing Equipment Sequence (the
        segmentation model); the observer and the findings' models are always named.
    evidence
        Other instances of the study the findings used (e.g. the arterial series),
        listed in the Current Requested Procedure Evidence Sequence.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR, ready to be saved with ``save_as``.

    Raises
    ------
    ResultsError
        If the CT series is unusable, the SEG is not on it, or volumes and segments do
        not match.
    """
    settings = settings or ResultsSettings()
    ordered = sort_slices(ct)
    series_uid = str(ordered[0].SeriesInstanceUID)
    referenced = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])}
    if series_uid not in referenced or seg.StudyInstanceUID != ordered[0].StudyInstanceUID:
        raise ResultsError(f"SEG {seg.SOPInstanceUID} does not segment CT series {series_uid}")
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    groups += volume_groups(seg, series_uid, volumes_ml)
    groups += [finding_group(f, ordered) for f in findings]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(observer, settings)),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*ordered, seg, *evidence],
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=settings.manufacturer,
        institution_name=settings.institution_name,
        is_complete=True,
        is_final=True,
        contributing_equipment=_equipment(
            [observer, *models, *(f.model for f in findings)], settings),
        coding_schemes=[private_coding_scheme()],
    )
    sr.SeriesDescription = f"oncopacs SR {observer.name}"[:64]
    logger.info("built SR %s on series %s: %d segment volumes, %d findings",
                sr.SOPInstanceUID, series_uid, len(seg.SegmentSequence), len(findings))
    return sr
