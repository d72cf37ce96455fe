"""The DICOM Segmentation (SEG) of a label volume on a CT series.

One BINARY segment per structure that has voxels, numbered 1, 2, ... in ascending
label value; structures without voxels are left out (and logged). The SEG joins the CT
study (patient and study modules copied from the CT), is a new series, references the
CT images frame by frame (frames without any voxel of a segment are omitted), and
identifies the model in every segment's Algorithm Identification Sequence and in the
Contributing Equipment Sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from app.results import (
    ModelIdentity,
    ResultsError,
    ResultsSettings,
    check_label_volume,
    sort_slices,
)
from app.results.algorithm import algorithm_identification, contributing_equipment
from app.results.codes import Structure

__all__ = ["build_seg", "segment_descriptions"]

logger = logging.getLogger(__name__)


def segment_descriptions(present: Sequence[Structure],
                         model: ModelIdentity) -> list[hd.seg.SegmentDescription]:
    """Segment descriptions for ``present`` structures, numbered from 1 in that order.

    Each segment's Tracking ID is the structure's name and its Tracking UID is new.
    """
    algorithm = algorithm_identification(model)
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=structure.label,
            segmented_property_category=structure.category,
            segmented_property_type=structure.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=structure.name,
            anatomic_regions=(None if structure.anatomic_region is None
                              else [structure.anatomic_region]),
            display_color=hd.color.CIELabColor.from_rgb(*structure.colour_rgb),
        )
        for number, structure in enumerate(present, start=1)
    ]


def _segment_map(labels: np.ndarray, structures: Mapping[int, Structure],
                 ) -> tuple[np.ndarray, list[Structure]]:
    """Relabel to segment numbers 1..n (structures with voxels, by label value)."""
    counts = np.bincount(labels.ravel(), minlength=256)
    segments = np.zeros(labels.shape, dtype=np.uint8)
    present: list[Structure] = []
    for value in sorted(structures):
        if not 1 <= value <= 255:
            raise ResultsError(f"structure {structures[value].name} has label value {value}; "
                               "label values are 1-255")
        if counts[value] == 0:
            logger.info("structure %s (label %d) has no voxels: no segment written",
                        structures[value].name, value)
            continue
        present.append(structures[value])
        segments[labels == value] = len(present)
    return segments, present


def build_seg(ct: Sequence[Dataset], labels: np.ndarray, structures: Mapping[int, Structure],
              model: ModelIdentity, series_number: int, *,
              settings: ResultsSettings | None = None,
              instance_number: int = 1) -> hd.seg.Segmentation:
    """Build a BINARY SEG of ``labels`` on the CT series ``ct``.

    Parameters
    ----------
    ct
        The segmented CT series (single-frame images, any order; sorted here with
        :func:`app.results.sort_slices`).
    labels
        uint8 ``(slices, rows, cols)`` label volume, slices ascending along the slice
        normal (the order of :func:`app.results.sort_slices`).
    structures
        Structure of each label value to write; other label values are ignored.
    model
        The segmentation model package.
    series_number
        Series Number of the new SEG series.
    settings
        Manufacturer and device serial number; defaults to ``ResultsSettings()``.
    instance_number
        Instance Number of the SEG.

    Returns
    -------
    highdicom.seg.Segmentation
        The SEG, ready to be saved with ``save_as``.

    Raises
    ------
    ResultsError
        If the series or the label volume is unusable, or no structure has voxels.
    """
    settings = settings or ResultsSettings()
    ordered = sort_slices(ct)
    check_label_volume(labels, ordered)
    segments, present = _segment_map(labels, structures)
    if not present:
        raise ResultsError(f"no structure has voxels on series {ordered[0].SeriesInstanceUID}; "
                           "nothing to segment")
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(present, model),
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=settings.device_serial_number,
        content_label="SEGMENTATION",
        content_description=f"{model.name} {model.version}"[:64],
        contributing_equipment=[contributing_equipment(model, settings)],
    )
    seg.SeriesDescription = f"oncopacs SEG {model.name}"[:64]
    if settings.institution_name is not None:
        seg.InstitutionName = settings.institution_name
    logger.info("built SEG %s on series %s: %d segments, %d frames", seg.SOPInstanceUID,
                ordered[0].SeriesInstanceUID, len(present), int(seg.NumberOfFrames))
    return seg
