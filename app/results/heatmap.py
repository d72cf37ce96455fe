"""Model A's attention over the H&E slide as a DICOM Segmentation on the slide.

The gated-attention pooling of model A gives each tissue tile it read a weight.
:func:`build_attention_seg` writes them as a FRACTIONAL (probability) SEG on the
slide's total pixel matrix, one SEG pixel per tile (the weights scaled so the
largest is 1; tiles not read are 0), TILED_FULL like the slide. The SEG joins the
slide's pathology study and references the slide's base level, so pathology
viewers that overlay SEG on slides (for example Slim) show it over the tissue.
It passes dciodvfy with no errors (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.results import ModelIdentity, ResultsError, ResultsSettings
from app.results.algorithm import algorithm_identification, contributing_equipment
from app.results.codes import ATTENTION_PROPERTY

__all__ = ["attention_grid", "build_attention_seg"]

FRAME_PX = 64
"""Rows and columns of each SEG frame (the SEG is tiled like the slide)."""


def attention_grid(shape_px: tuple[int, int], tile_px: int, location_px: npt.ArrayLike,
                   weights: npt.ArrayLike) -> np.ndarray:
    """The ``(rows, cols)`` grid of attention, one cell per ``tile_px`` of level 0.

    Parameters
    ----------
    shape_px
        Level-0 total pixel matrix ``(rows, columns)`` of the slide.
    tile_px
        Level-0 pixels per tile side; tiles start on multiples of it.
    location_px
        ``(N, 2)`` level-0 ``x, y`` of each tile's top-left corner.
    weights
        ``(N,)`` attention weights (non-negative).

    Raises
    ------
    ResultsError
        If the shapes disagree, a weight is negative or not finite, or a tile lies
        outside the slide.
    """
    xy = np.asarray(location_px, dtype=np.int64).reshape(-1, 2)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if len(xy) != len(w) or len(w) == 0:
        raise ResultsError(f"{len(xy)} tile locations and {len(w)} attention weights; "
                           "both must be equal and non-zero")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ResultsError("attention weights must be finite and non-negative")
    if tile_px < 1:
        raise ResultsError(f"tile size must be at least 1 px, got {tile_px}")
    rows, cols = (-(-shape_px[0] // tile_px), -(-shape_px[1] // tile_px))
    r, c = xy[:, 1] // tile_px, xy[:, 0] // tile_px
    if np.any((r < 0) | (r >= rows) | (c < 0) | (c >= cols)):
        raise ResultsError(f"a tile lies outside the {shape_px[1]} x {shape_px[0]} px slide")
    grid = np.zeros((rows, cols), dtype=np.float32)
    top = float(w.max())
    grid[r, c] = (w / top).astype(np.float32) if top > 0 else 0.0
    return grid


def _pixel_spacing(source: Dataset) -> list[float]:
    try:
        measures = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        return [float(v) for v in measures.PixelSpacing]
    except (AttributeError, IndexError) as exc:
        raise ResultsError("the slide's base level has no shared Pixel Measures") from exc


def build_attention_seg(source: Dataset, location_px: npt.ArrayLike, tile_px: int,
                        weights: npt.ArrayLike, model: ModelIdentity, series_number: int,
                        *, settings: ResultsSettings | None = None) -> hd.seg.Segmentation:
    """A FRACTIONAL SEG of tile attention on the slide whose base level is ``source``.

    Raises
    ------
    ResultsError
        If ``source`` is not a tiled VL whole-slide image or the tiles do not fit it.
    """
    settings = settings or ResultsSettings()
    if source.get("Modality") != "SM" or "TotalPixelMatrixRows" not in source:
        raise ResultsError("the attention map needs the slide's base level (a tiled SM image)")
    grid = attention_grid((int(source.TotalPixelMatrixRows),
                           int(source.TotalPixelMatrixColumns)), tile_px, location_px, weights)
    spacing = _pixel_spacing(source)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Model A attention",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=ATTENTION_PROPERTY,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
        tracking_uid=generate_uid(), tracking_id="model_a_attention")
    orientation: Sequence[float] = [float(v) for v in source.ImageOrientationSlide]
    return hd.seg.Segmentation(
        source_images=[source], pixel_array=grid[np.newaxis],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=255, segment_descriptions=[description],
        series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=settings.manufacturer, manufacturer_model_name=model.name,
        software_versions=model.version, device_serial_number=settings.device_serial_number,
        content_label="ATTENTION",
        content_description=f"{model.name} {model.version} tile attention"[:64],
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=[s * tile_px for s in spacing], slice_thickness=1.0),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE, image_orientation=orientation),
        omit_empty_frames=False, tile_pixel_array=True, tile_size=(FRAME_PX, FRAME_PX),
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_FULL,
        contributing_equipment=[contributing_equipment(model, settings)],
    )
