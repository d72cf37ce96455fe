"""The H&E slide of a CRC resection as a DICOM VL Whole Slide Microscopy Image series.

One instance per pyramid level (``wsi/level-0.dcm`` ...), each TILED_FULL with
baseline JPEG tiles (YBR_FULL_422) in an encapsulated pixel data element with
a basic offset table. Pathology is its own study (own Study Instance UID and
Accession Number, dated a few days after surgery) of the same patient as the CT.

Level 0 is rendered tile row by tile row (:mod:`ml.synth.tissue`); every lower
level is the 2 x 2 mean of the level above, built as the rows arrive, so raw
pixels in memory never exceed a few tile rows per level.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from highdicom import (
    SpecimenCollection,
    SpecimenDescription,
    SpecimenPreparationStep,
    SpecimenStaining,
)
from highdicom.sr.coding import CodedConcept
from PIL import Image, ImageCms
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage

from ml.errors import SynthError
from ml.synth.latent import PatientSpec
from ml.synth.sizes import Size
from ml.synth.tissue import U8, SlideLayout, plan_slide, render_window
from ml.synth.uids import synth_uid

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90
SECTION_THICKNESS_UM = 4.0
SOFTWARE_VERSION = "oncopacs-synth 0.1"
_ICC_DATE = bytes.fromhex("07e800010008000000000000")  # 2024-01-08 00:00:00


@dataclass(frozen=True)
class WsiRecord:
    """Where one patient's slide was written and what it is."""

    study_uid: str
    series_uid: str
    accession: str
    folder: Path
    levels: int
    base_px: tuple[int, int]
    base_mpp: float
    instances: int


def accession_number(seed: int, index: int) -> str:
    """The pathology accession number of patient ``index`` (SH, 11 characters)."""
    return f"PA{seed % 10000:04d}{index:05d}"


def write_wsi(spec: PatientSpec, size: Size, seed: int, out_dir: Path) -> WsiRecord:
    """Render a CRC patient's resection slide and write it as ``out_dir/wsi/level-N.dcm``.

    Parameters
    ----------
    spec
        The patient; must be a CRC patient.
    size
        Cohort size: base pixels, tile size, levels and micrometres per pixel.
    seed
        Cohort seed; the same seed gives byte-identical files.
    out_dir
        The patient's folder; ``wsi/`` is created inside it.

    Returns
    -------
    WsiRecord
        UIDs, accession number, folder and geometry of the written series.

    Raises
    ------
    SynthError
        If the patient is not a CRC patient, or the size's pyramid does not halve
        evenly down to its last level.
    """
    if spec.group != "CRC":
        raise SynthError(f"patient {spec.patient_id} is {spec.group}; only CRC patients "
                         "have a resection slide")
    extent, levels, tile = size.wsi_base_px, size.wsi_levels, size.wsi_tile_px
    if levels < 1 or tile < 16 or tile % 8 or extent % (1 << (levels - 1)):
        raise SynthError(f"size {size.name!r}: {extent} px base, {levels} levels and "
                         f"{tile} px tiles do not make an even pyramid")
    layout = plan_slide(spec, size, seed)
    frames = pyramid_frames(layout, levels, tile)
    folder = out_dir / "wsi"
    folder.mkdir(parents=True, exist_ok=True)
    base = base_dataset(spec, size, seed, layout)
    for level, level_frames in enumerate(frames):
        ds = level_dataset(base, spec, size, seed, level, level_frames)
        ds.save_as(folder / f"level-{level}.dcm", enforce_file_format=True)
    logger.info("wrote slide %s: %d levels, %d frames", base.SeriesInstanceUID, levels,
                sum(map(len, frames)))
    return WsiRecord(
        study_uid=str(base.StudyInstanceUID), series_uid=str(base.SeriesInstanceUID),
        accession=str(base.AccessionNumber), folder=folder, levels=levels,
        base_px=(extent, extent), base_mpp=size.wsi_base_mpp, instances=levels,
    )


def encode_tile(pixels: U8) -> bytes:
    """Baseline JPEG (4:2:2 chroma, fixed quality) of one RGB tile; deterministic."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY,
                                        subsampling="4:2:2", optimize=False)
    return buffer.getvalue()


def halve(pixels: U8) -> U8:
    """The 2 x 2 mean, rounded half up, of an RGB block with even height and width."""
    out: U8 = np.asarray(Image.fromarray(pixels, "RGB").reduce(2))
    return out


def _tile_row(rows: U8, tile: int, fill: U8) -> list[bytes]:
    """Encode one row of tiles, padding the right and bottom edges with ``fill``."""
    height, width = rows.shape[:2]
    out = []
    for x in range(0, width, tile):
        block = rows[:, x:x + tile]
        if block.shape[0] != tile or block.shape[1] != tile:
            padded = np.empty((tile, tile, 3), dtype=np.uint8)
            padded[...] = fill
            padded[:height, :block.shape[1]] = block
            block = padded
        out.append(encode_tile(np.ascontiguousarray(block)))
    return out


def pyramid_frames(layout: SlideLayout, levels: int, tile: int) -> list[list[bytes]]:
    """JPEG frames of every level, row-major tiles, rendering level 0 one tile row at a time.

    Raises
    ------
    SynthError
        If a level's height is odd before the last level (the pyramid cannot halve).
    """
    heights = [layout.extent_px >> k for k in range(levels)]
    if any(layout.extent_px % (1 << k) for k in range(levels)):
        raise SynthError(f"a {layout.extent_px} px slide does not halve {levels - 1} times")
    fill = render_window(layout, 0, 1, 0, 1)[0, 0]
    frames: list[list[bytes]] = [[] for _ in range(levels)]
    pending: list[list[U8]] = [[] for _ in range(levels)]
    received = [0] * levels

    def push(level: int, rows: U8) -> None:
        pending[level].append(rows)
        received[level] += rows.shape[0]
        held = sum(part.shape[0] for part in pending[level])
        finished = received[level] == heights[level]
        while held >= tile or (finished and held):
            block = np.concatenate(pending[level]) if len(pending[level]) > 1 \
                else pending[level][0]
            take, rest = block[:tile], block[tile:]
            pending[level] = [rest] if rest.shape[0] else []
            held = rest.shape[0]
            frames[level].extend(_tile_row(take, tile, fill))
            if level + 1 < levels:
                push(level + 1, halve(take))

    extent = layout.extent_px
    for y in range(0, extent, tile):
        y1 = min(y + tile, extent)
        strip = np.concatenate([render_window(layout, y, y1, x, min(x + tile, extent))
                                for x in range(0, extent, tile)], axis=1)
        push(0, strip)
    return frames


def _srgb_icc() -> bytes:
    """An sRGB ICC profile with a fixed creation date (LittleCMS stamps the current time)."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile[:24] + _ICC_DATE + profile[36:]


def _code(code: object) -> Dataset:
    concept: Dataset = CodedConcept.from_code(code)  # type: ignore[arg-type]
    return concept


def _scan_date(spec: PatientSpec, layout: SlideLayout) -> dt.datetime:
    day = spec.surgery_date + dt.timedelta(days=layout.scan_delay_days)
    return dt.datetime.combine(day, dt.time(9, 0)) + dt.timedelta(
        minutes=layout.scan_minute)


def base_dataset(spec: PatientSpec, size: Size, seed: int, layout: SlideLayout) -> Dataset:
    """The attributes every level of the slide shares (patient to optical path)."""
    when = _scan_date(spec, layout)
    ds = Dataset()
    _patient_study_series(ds, spec, seed, when)
    centre = spec.centre
    ds.FrameOfReferenceUID = synth_uid(seed, spec.index, "wsi", "frame-of-reference")
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.Manufacturer = centre.wsi_manufacturer
    ds.ManufacturerModelName = centre.wsi_model_name
    ds.InstitutionName = centre.institution
    ds.DeviceSerialNumber = f"{centre.code}-WSI-0001"
    ds.SoftwareVersions = SOFTWARE_VERSION
    ds.AcquisitionContextSequence = Sequence()
    _specimen(ds, spec, seed, size)
    _optical_path(ds)
    return ds


def _patient_study_series(ds: Dataset, spec: PatientSpec, seed: int,
                          when: dt.datetime) -> None:
    ds.PatientName = spec.name
    ds.PatientID = spec.patient_id
    ds.IssuerOfPatientID = spec.issuer
    ds.PatientBirthDate = spec.birth_date.strftime("%Y%m%d")
    ds.PatientSex = spec.sex
    ds.PatientAge = f"{spec.age_years:03d}Y"
    ds.StudyInstanceUID = synth_uid(seed, spec.index, "wsi", "study")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "PATH1"
    ds.AccessionNumber = accession_number(seed, spec.index)
    ds.StudyDescription = "Colorectal resection, H&E"
    ds.Modality = "SM"
    ds.SeriesInstanceUID = synth_uid(seed, spec.index, "wsi", "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = "H&E resection slide"


def _specimen(ds: Dataset, spec: PatientSpec, seed: int, size: Size) -> None:
    container = f"{accession_number(seed, spec.index)}-A1-1"
    specimen_id = f"{accession_number(seed, spec.index)}-A1"
    staining = SpecimenPreparationStep(
        specimen_id, SpecimenStaining([codes.SCT.HematoxylinStain,
                                       codes.SCT.WaterSolubleEosinStain]),
        processing_description="H&E stain")
    collection = SpecimenPreparationStep(
        specimen_id, SpecimenCollection(procedure=codes.SCT.Excision),
        processing_description="Surgical resection")
    description = SpecimenDescription(
        specimen_id=specimen_id,
        specimen_uid=synth_uid(seed, spec.index, "wsi", "specimen"),
        specimen_preparation_steps=[collection, staining],
        primary_anatomic_structures=[codes.SCT.Colon],
        specimen_short_description=f"CRC resection, {spec.crc.site}, H&E",
    )
    ds.ContainerIdentifier = container
    ds.IssuerOfTheContainerIdentifierSequence = Sequence()
    ds.ContainerTypeCodeSequence = Sequence([_code(codes.SCT.MicroscopeSlide)])
    ds.ContainerDescription = f"{size.name} synthetic slide"
    ds.SpecimenDescriptionSequence = Sequence([description])


def _optical_path(ds: Dataset) -> None:
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.OpticalPathDescription = "Brightfield, full spectrum"
    path.IlluminationTypeCodeSequence = Sequence([_code(codes.DCM.BrightfieldIllumination)])
    path.IlluminationColorCodeSequence = Sequence([_code(codes.SCT.FullSpectrum)])
    path.ICCProfile = _srgb_icc()
    path.ColorSpace = "SRGB"
    ds.NumberOfOpticalPaths = 1
    ds.OpticalPathSequence = Sequence([path])


def level_dataset(base: Dataset, spec: PatientSpec, size: Size, seed: int, level: int,
                  frames: list[bytes]) -> Dataset:
    """One level's instance: the shared attributes plus geometry, frames and pixel data."""
    ds = Dataset()
    ds.update(base)
    tile = size.wsi_tile_px
    extent = size.wsi_base_px >> level
    mpp = size.wsi_base_mpp * (1 << level)
    image_type = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else \
        ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = synth_uid(seed, spec.index, "wsi", "level", level)
    ds.InstanceNumber = level + 1
    ds.ImageType = image_type
    _geometry(ds, extent, tile, mpp, image_type)
    _pixels(ds, tile, frames)
    if level > 0:
        ds.DerivationDescription = f"Downsampled by {1 << level} (2 x 2 mean per level)"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta = meta
    return ds


def _geometry(ds: Dataset, extent: int, tile: int, mpp: float, image_type: list[str]) -> None:
    spacing_mm = mpp / 1000.0
    measures = Dataset()
    measures.PixelSpacing = [spacing_mm, spacing_mm]
    measures.SliceThickness = SECTION_THICKNESS_UM / 1000.0
    frame_type = Dataset()
    frame_type.FrameType = image_type
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    shared.OpticalPathIdentificationSequence = Sequence([optical])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.TotalPixelMatrixColumns = extent
    ds.TotalPixelMatrixRows = extent
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 20.0
    origin.YOffsetInSlideCoordinateSystem = 40.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.ImagedVolumeWidth = extent * spacing_mm
    ds.ImagedVolumeHeight = extent * spacing_mm
    ds.ImagedVolumeDepth = SECTION_THICKNESS_UM
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.SpecimenLabelInImage = "NO"
    ds.BurnedInAnnotation = "NO"
    organisation = Dataset()
    organisation.DimensionOrganizationUID = synth_uid(0, 0, "wsi", "tiled-full-dimensions")
    ds.DimensionOrganizationSequence = Sequence([organisation])
    ds.DimensionIndexSequence = Sequence(_dimension_index(organisation))


def _dimension_index(organisation: Dataset) -> list[Dataset]:
    out = []
    for pointer in ("RowPositionInTotalImagePixelMatrix",
                    "ColumnPositionInTotalImagePixelMatrix"):
        item = Dataset()
        item.DimensionOrganizationUID = organisation.DimensionOrganizationUID
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = "PlanePositionSlideSequence"
        out.append(item)
    return out


def _pixels(ds: Dataset, tile: int, frames: list[bytes]) -> None:
    ds.Rows = ds.Columns = tile
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = len(frames)
    raw = len(frames) * tile * tile * 3
    stored = sum(map(len, frames))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{raw / stored:.2f}"[:16]
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"

