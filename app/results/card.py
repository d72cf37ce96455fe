"""A result card: an RGB Secondary Capture image for viewers that do not render SR.

The card shows, on the left, a key image (the CT slice with the most tumour, or else
the most segmented tissue, windowed W400/L40, with the contour of each segmented
structure in its colour) and, on the right, the findings (probability, risk group or
TSR class, inputs used and missing, model), the structure volumes, the segmentation
model, and "Research use only - demo models trained on synthetic data" when any model
is a demo. Text is drawn with Pillow's built-in font (no font files). The card carries
no patient identifier in its pixels (Burned In Annotation NO).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy.ndimage import binary_erosion

from app.results import (
    RESEARCH_USE_LINE,
    Finding,
    ModelIdentity,
    ResultsSettings,
    check_label_volume,
    sort_slices,
)
from app.results.algorithm import contributing_equipment
from app.results.codes import INPUT_CODES, Structure
from ml.hu import slice_hu

__all__ = ["build_card", "card_lines", "key_slice_index", "render_card", "render_key_image"]

logger = logging.getLogger(__name__)

CARD_PX = (1024, 640)
KEY_PX = 448
MARGIN_PX = 24
WINDOW_HU = (40.0, 400.0)
TEXT_RGB = (235, 235, 235)
DIM_RGB = (170, 170, 170)
WARN_RGB = (255, 200, 0)
KIND_TITLE = {"crc_liver_metastasis_risk": "Liver metastasis risk (3 years, CRC)",
              "pdac_tsr": "Tumour-stroma ratio (PDAC)"}
PROBABILITY_TEXT = {"crc_liver_metastasis_risk": "probability of metastasis",
                    "pdac_tsr": "probability of high TSR"}


@dataclass(frozen=True)
class Line:
    """One line of card text: words, colour and font size in pixels."""

    text: str
    rgb: tuple[int, int, int] = TEXT_RGB
    size_px: int = 17


def key_slice_index(labels: np.ndarray, structures: Mapping[int, Structure]) -> int:
    """The slice with the most abnormal-structure voxels, else the most structure voxels."""
    abnormal = [v for v, s in structures.items()
                if s.category == codes.SCT.MorphologicallyAbnormalStructure]
    for values in (abnormal, list(structures)):
        per_slice = np.isin(labels, values).sum(axis=(1, 2))
        if values and per_slice.max() > 0:
            return int(np.argmax(per_slice))
    return int(labels.shape[0]) // 2


def render_key_image(ordered: Sequence[Dataset], labels: np.ndarray,
                     structures: Mapping[int, Structure], index: int,
                     size_px: int = KEY_PX) -> Image.Image:
    """Slice ``index`` of the sorted series, windowed, with structure contours, square."""
    ds = ordered[index]
    hu = slice_hu(ds)
    level, width = WINDOW_HU
    grey = np.clip((hu - (level - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").resize((size_px, size_px), Image.Resampling.BILINEAR)
    rgb = np.asarray(image.convert("RGB")).copy()
    layer = Image.fromarray(labels[index]).resize((size_px, size_px), Image.Resampling.NEAREST)
    upsampled = np.asarray(layer)
    for value, structure in structures.items():
        mask = upsampled == value
        edge = mask & ~binary_erosion(mask, iterations=2)
        rgb[edge] = structure.colour_rgb
    return Image.fromarray(rgb, mode="RGB")


def _percent(p: float) -> str:
    return f"{100.0 * p:.1f} %"


def _model_text(model: ModelIdentity) -> str:
    return f"{model.name} {model.version} (sha256 {model.sha256[:12]})"


def _inputs(names: Sequence[str]) -> str:
    return ", ".join(INPUT_CODES[n].meaning for n in names)


def card_lines(findings: Sequence[Finding], volumes_ml: Mapping[str, float],
               structures: Mapping[int, Structure], seg_model: ModelIdentity) -> list[Line]:
    """The text of the card, top to bottom."""
    lines = [Line("oncopacs AI result", size_px=26)]
    for f in findings:
        lines.append(Line(KIND_TITLE[f.kind], size_px=21))
        lines.append(Line(f"{f.qualitative.upper()}: {PROBABILITY_TEXT[f.kind]} "
                          f"{_percent(f.probability)}", WARN_RGB if "high" in f.qualitative
                          else TEXT_RGB, 19))
        lines.append(Line("Inputs used: " + (_inputs(f.inputs_used) or "none")))
        if f.inputs_missing:
            lines.append(Line("Inputs missing: " + _inputs(f.inputs_missing), WARN_RGB))
        lines.append(Line("Model: " + _model_text(f.model), DIM_RGB, 15))
    lines.append(Line("Segmented volumes", size_px=21))
    for structure in structures.values():
        if volumes_ml.get(structure.name, 0.0) > 0:
            lines.append(Line(f"{structure.label}: {volumes_ml[structure.name]:.1f} ml",
                              structure.colour_rgb))
    lines.append(Line("Segmentation: " + _model_text(seg_model), DIM_RGB, 15))
    if seg_model.demo or any(f.model.demo for f in findings):
        # Pillow's built-in font has no em dash.
        lines.append(Line(RESEARCH_USE_LINE.replace("\u2014", "-"), WARN_RGB, 19))
    return lines


def _wrap(draw: ImageDraw.ImageDraw, line: Line, font: ImageFont.FreeTypeFont
          | ImageFont.ImageFont, width_px: int) -> list[str]:
    out: list[str] = []
    current = ""
    for word in line.text.split(" "):
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width_px:
            out.append(current)
            current = word
        else:
            current = trial
    return [*out, current]


def render_card(key_image: Image.Image, caption: str, lines: Sequence[Line],
                size_px: tuple[int, int] = CARD_PX) -> Image.Image:
    """Compose the key image and its caption (left) and the text (right) on a black card."""
    card = Image.new("RGB", size_px, (0, 0, 0))
    card.paste(key_image, (MARGIN_PX, MARGIN_PX))
    draw = ImageDraw.Draw(card)
    small = ImageFont.load_default(size=15)
    draw.text((MARGIN_PX, MARGIN_PX * 2 + key_image.height), caption, fill=DIM_RGB, font=small)
    x = MARGIN_PX * 2 + key_image.width
    y = MARGIN_PX
    width = size_px[0] - x - MARGIN_PX
    for line in lines:
        font = ImageFont.load_default(size=line.size_px)
        for part in _wrap(draw, line, font, width):
            if y + line.size_px > size_px[1] - MARGIN_PX:
                logger.warning("result card text truncated at %r", part)
                return card
            draw.text((x, y), part, fill=line.rgb, font=font)
            y += int(line.size_px * 1.3)
        y += 4
    return card


def build_card(ct: Sequence[Dataset], labels: np.ndarray, structures: Mapping[int, Structure],
               volumes_ml: Mapping[str, float], findings: Sequence[Finding], *,
               seg_model: ModelIdentity, series_number: int,
               settings: ResultsSettings | None = None,
               instance_number: int = 1) -> hd.sc.SCImage:
    """Build the result card of a study as an RGB Secondary Capture image.

    Parameters
    ----------
    ct
        The segmented CT series (any order).
    labels
        Its uint8 label volume, in :func:`app.results.sort_slices` order.
    structures
        Structure of each label value (contours and volume lines).
    volumes_ml
        Volume in ml by structure name.
    findings
        Model findings to show (may be empty).
    seg_model
        The segmentation model.
    series_number
        Series Number of the new card series.
    settings
        Manufacturer and labels; defaults to ``ResultsSettings()``.
    instance_number
        Instance Number of the card.

    Returns
    -------
    highdicom.sc.SCImage
        The card, in the CT's study, ready to be saved with ``save_as``.

    Raises
    ------
    ResultsError
        If the series or the label volume is unusable.
    """
    settings = settings or ResultsSettings()
    ordered = sort_slices(ct)
    check_label_volume(labels, ordered)
    index = key_slice_index(labels, structures)
    key = render_key_image(ordered, labels, structures, index)
    caption = (f"Key image: series {ordered[index].get('SeriesNumber', '?')}, "
               f"image {ordered[index].get('InstanceNumber', '?')}, with contours")
    card = render_card(key, caption, card_lines(findings, volumes_ml, structures, seg_model))
    models = list(dict.fromkeys([seg_model, *(f.model for f in findings)]))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ordered[0],
        pixel_array=np.asarray(card),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=settings.manufacturer,
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        contributing_equipment=[contributing_equipment(m, settings) for m in models],
    )
    sc.copy_patient_and_study_information(ordered[0])
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "NO"
    sc.SeriesDescription = "oncopacs result card"
    if ordered[0].get("BodyPartExamined"):
        sc.BodyPartExamined = ordered[0].BodyPartExamined
    else:  # General Series Laterality is 2C: present but empty means "unknown"
        sc.Laterality = ""
    logger.info("built result card %s for series %s", sc.SOPInstanceUID,
                ordered[0].SeriesInstanceUID)
    return sc
