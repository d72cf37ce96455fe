"""The synthetic contrast CT study of one patient: arterial and portal-venous series.

``write_ct_study`` renders the patient's phantom (``ml.synth.phantom``) in both
phases and writes one CT Image Storage file per slice, explicit VR little
endian, as the centre's scanner would: patient, study, series, frame of
reference, equipment, image plane, CT image, contrast/bolus and VOI LUT
modules. Both series share the study and the frame of reference; their
acquisition times are 35 s and 70 s after the bolus start.

Everything comes from ``patient_rng(seed, index, "ct")`` and ``synth_uid``, so
the same seed writes byte-identical files. Instance 1 is the most cranial
slice; z decreases with the instance number. The ground truth goes to
``ct/labels.npz`` (see ``write_labels``).
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ml.errors import SynthError
from ml.synth.latent import PatientSpec, patient_rng
from ml.synth.phantom import LABELS, PHASES, Grid, build_phantom, ct_grid, render_phase
from ml.synth.sizes import Size
from ml.synth.uids import synth_uid

logger = logging.getLogger(__name__)

SERIES_NUMBER = {"arterial": 2, "venous": 3}
BOLUS_DELAY_S = {"arterial": 35, "venous": 70}
WINDOWS = {  # (explanations, centres, widths) per phase
    "arterial": (["ABDOMEN", "ANGIO"], [40, 150], [400, 600]),
    "venous": (["ABDOMEN", "LIVER"], [40, 80], [400, 150]),
}
STUDY_DESCRIPTION = {
    "C1": "CT ABDOMEN PELVIS WITH CONTRAST", "C2": "CT ABD/PELVIS W CONTRAST",
    "C3": "CT Abdomen Pelvis IV contrast", "C4": "CT ABDOMEN+PELVIS C+",
    "C5": "Abdomen^Pelvis Biphasic", "C6": "CT ABD PEL W IV CON",
}
SOFTWARE = {
    "SIEMENS": "syngo CT VB20A", "GE MEDICAL SYSTEMS": "revo_ct_22mw.40",
    "Philips": "5.0.1", "Canon Medical Systems": "V10.6ER005",
}
CONTRAST_AGENT = "Iohexol 350 mg I/mL"
CHARSET = "ISO_IR 100"
PIXEL_DATA = Tag("PixelData")
_VARYING = frozenset(Tag(k) for k in ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient",
                                      "SliceLocation", "PixelData"))
HU_OFFSET = 1024
HU_MAX_STORED = 4095


@dataclass(frozen=True)
class CtSeriesRecord:
    """One written CT series."""

    phase: str
    series_uid: str
    series_number: int
    description: str
    folder: Path
    instances: int
    slice_thickness_mm: float
    pixel_spacing_mm: float


@dataclass(frozen=True)
class CtStudyRecord:
    """One written two-phase CT study and its ground-truth labels."""

    study_uid: str
    accession: str
    frame_of_reference_uid: str
    series: tuple[CtSeriesRecord, ...]
    labels_path: Path


@dataclass(frozen=True)
class _Timing:
    """Clock of one examination, drawn from the patient's CT generator."""

    study: dt.datetime
    bolus: dt.datetime
    volume_ml: int
    flow_ml_s: float
    tube_ma: tuple[int, int]
    study_id: str


def _draw_timing(spec: PatientSpec, rng: np.random.Generator) -> _Timing:
    start = dt.time(int(rng.integers(7, 18)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
    study = dt.datetime.combine(spec.ct_date, start)
    bolus = study + dt.timedelta(seconds=int(rng.integers(180, 420)))
    volume = 5 * int(rng.integers(16, 25))
    tube = (int(rng.integers(180, 360)), int(rng.integers(180, 360)))
    return _Timing(study, bolus, volume, 4.0, tube, str(int(rng.integers(1000, 99999))))


def _age(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    if not 0 <= years <= 999:
        raise SynthError(f"patient age {years} on {on} is outside 0-999 years")
    return f"{years:03d}Y"


def _da(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _tm(moment: dt.datetime) -> str:
    return moment.strftime("%H%M%S")


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _study_header(spec: PatientSpec, seed: int, timing: _Timing, accession: str) -> Dataset:
    """Patient, general study, SOP common and frame of reference: shared by both series."""
    centre = spec.centre
    ds = Dataset()
    ds.SpecificCharacterSet = CHARSET
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = _da(spec.ct_date)
    ds.StudyTime = _tm(timing.study)
    ds.AccessionNumber = accession
    ds.Modality = "CT"
    ds.Manufacturer = centre.manufacturer
    ds.InstitutionName = centre.institution
    ds.ReferringPhysicianName = ""
    ds.StationName = f"{centre.code}CT01"
    ds.StudyDescription = STUDY_DESCRIPTION.get(centre.code, "CT ABDOMEN PELVIS WITH CONTRAST")
    ds.ManufacturerModelName = centre.model_name
    ds.PatientName = spec.name
    ds.PatientID = spec.patient_id
    ds.IssuerOfPatientID = spec.issuer
    ds.PatientBirthDate = _da(spec.birth_date)
    ds.PatientSex = spec.sex
    ds.PatientAge = _age(spec.birth_date, spec.ct_date)
    ds.BodyPartExamined = "ABDOMEN"
    ds.DeviceSerialNumber = f"{zlib.crc32(f'{centre.code}{centre.model_name}'.encode()):010d}"
    ds.SoftwareVersions = SOFTWARE.get(centre.manufacturer, "1.0")
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = synth_uid(seed, spec.index, "ct", "study")
    ds.StudyID = timing.study_id
    ds.FrameOfReferenceUID = synth_uid(seed, spec.index, "ct", "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    return ds


def _contrast(ds: Dataset, timing: _Timing) -> None:
    ds.ContrastBolusAgent = CONTRAST_AGENT
    agent = _code(codes.SCT.Iohexol.value, "SCT", codes.SCT.Iohexol.meaning)
    route = _code(codes.SCT.IntravenousRoute.value, "SCT", codes.SCT.IntravenousRoute.meaning)
    ds.ContrastBolusAgentSequence = [agent]
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusAdministrationRouteSequence = [route]
    ds.ContrastBolusVolume = timing.volume_ml
    ds.ContrastBolusStartTime = _tm(timing.bolus)
    ds.ContrastBolusStopTime = _tm(timing.bolus + dt.timedelta(
        seconds=round(timing.volume_ml / timing.flow_ml_s)))
    ds.ContrastBolusTotalDose = timing.volume_ml
    ds.ContrastFlowRate = [timing.flow_ml_s]
    ds.ContrastFlowDuration = [round(timing.volume_ml / timing.flow_ml_s, 1)]
    ds.ContrastBolusIngredient = "IODINE"
    ds.ContrastBolusIngredientConcentration = 350


def _series_header(base: Dataset, spec: PatientSpec, seed: int, phase: str, grid: Grid,
                   timing: _Timing) -> Dataset:
    """One phase's dataset, complete except for the per-slice attributes."""
    centre, ds = spec.centre, copy.deepcopy(base)
    acquired = timing.bolus + dt.timedelta(seconds=BOLUS_DELAY_S[phase])
    created = acquired + dt.timedelta(seconds=40)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = \
        ds.StudyDate
    ds.InstanceCreationTime = ds.ContentTime = _tm(created)
    ds.SeriesTime = ds.AcquisitionTime = _tm(acquired)
    ds.SeriesDescription = centre.describe(phase)
    ds.ProtocolName = f"Abdomen biphasic {phase}"
    _contrast(ds, timing)
    ds.SliceThickness = grid.spacing_mm[0]
    ds.KVP = centre.kvp
    ds.DataCollectionDiameter = 500.0
    ds.ReconstructionDiameter = grid.spacing_mm[1] * grid.shape[1]
    ds.GantryDetectorTilt = 0.0
    ds.TableHeight = 160.0
    ds.RotationDirection = "CW"
    ds.ExposureTime = 500
    ds.XRayTubeCurrent = timing.tube_ma[PHASES.index(phase)]
    ds.Exposure = ds.XRayTubeCurrent // 2
    ds.FilterType = "BODY FILTER"
    ds.ConvolutionKernel = centre.kernel
    ds.SeriesInstanceUID = synth_uid(seed, spec.index, "ct", phase, "series")
    ds.SeriesNumber = SERIES_NUMBER[phase]
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.ImagesInAcquisition = grid.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = grid.shape[1], grid.shape[2]
    ds.PixelSpacing = [grid.spacing_mm[1], grid.spacing_mm[2]]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    explain, centres, widths = WINDOWS[phase]
    ds.WindowCenter, ds.WindowWidth = centres, widths
    ds.RescaleIntercept, ds.RescaleSlope = -HU_OFFSET, 1
    ds.RescaleType = "HU"
    ds.WindowCenterWidthExplanation = explain
    return ds


class _SliceEncoder:
    """Encodes one series' files, re-encoding only the attributes that change per slice.

    The output is byte for byte what ``Dataset.save_as(..., enforce_file_format=True)``
    writes, about ten times faster: the constant runs of elements are encoded once.
    """

    def __init__(self, ds: Dataset) -> None:
        self.parts: list[bytes | BaseTag] = []
        run = Dataset()
        for elem in ds:
            if elem.tag in _VARYING:
                self.parts.append(_encode(run))
                self.parts.append(elem.tag)
                run = Dataset()
            else:
                run.add(elem)
        self.parts.append(_encode(run))

    def encode(self, ds: Dataset) -> bytes:
        """The file (preamble, file meta and data set) for ``ds``'s varying attributes."""
        fp = _bytes_io()
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
        for part in self.parts:
            if isinstance(part, bytes):
                fp.write(part)
            else:
                write_data_element(fp, ds[part], CHARSET)
        return bytes(fp.getvalue())


def _bytes_io() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _encode(ds: Dataset) -> bytes:
    fp = _bytes_io()
    write_dataset(fp, ds, parent_encoding=CHARSET)
    return bytes(fp.getvalue())


def _write_series(ds: Dataset, stored: np.ndarray, grid: Grid, folder: Path, seed: int,
                  spec: PatientSpec, phase: str) -> int:
    """Write one file per slice, cranial first; returns the number written."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    x0, y0 = grid.origin_mm[2], grid.origin_mm[1]
    count = grid.shape[0]
    ds.SOPInstanceUID = ds.InstanceNumber = ds.ImagePositionPatient = ds.SliceLocation = None
    ds.add_new(PIXEL_DATA, "OW", b"")
    encoder = _SliceEncoder(ds)
    for number in range(1, count + 1):
        k = count - number
        z = grid.origin_mm[0] + k * grid.spacing_mm[0]
        uid = synth_uid(seed, spec.index, "ct", phase, "instance", number)
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [round(x0, 6), round(y0, 6), round(z, 6)]
        ds.SliceLocation = round(z, 6)
        ds[PIXEL_DATA].value = stored[k].tobytes()
        (folder / f"IM{number:05d}.dcm").write_bytes(encoder.encode(ds))
    return count


def write_labels(path: Path, labels: np.ndarray, grid: Grid) -> None:
    """Write the label volume as an ``.npz`` whose bytes depend only on its content.

    The archive holds ``labels`` (uint8, ``(z, y, x)``), ``origin_mm`` and
    ``spacing_mm`` (``(z, y, x)``, centre of the first voxel) and ``names``
    (``names[v]`` is label value ``v``). Members carry a fixed timestamp, unlike
    ``numpy.savez``.
    """
    names = sorted(LABELS, key=LABELS.__getitem__)
    arrays = {
        "labels": labels.astype(np.uint8),
        "origin_mm": np.array(grid.origin_mm, dtype=np.float64),
        "spacing_mm": np.array(grid.spacing_mm, dtype=np.float64),
        "names": np.array(names),
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array),
                                          allow_pickle=False)


def write_ct_study(spec: PatientSpec, size: Size, seed: int, out_dir: Path) -> CtStudyRecord:
    """Write the patient's arterial and venous CT series and label volume under ``out_dir/ct``.

    Parameters
    ----------
    spec
        The patient (identity, centre and latent features).
    size
        Matrix, field of view and z extent.
    seed
        The cohort seed; with ``spec.index`` it fixes every pixel, time and UID.
    out_dir
        The patient's folder; ``ct/arterial``, ``ct/venous`` and ``ct/labels.npz``
        are written inside it.

    Returns
    -------
    CtStudyRecord
        UIDs, accession, the series written (arterial first) and the labels' path.

    Raises
    ------
    SynthError
        If the size and centre give an unusable grid, the latent names an unknown
        tumour site, or the patient's dates give an impossible age.
    """
    rng = patient_rng(seed, spec.index, "ct")
    grid = ct_grid(size, spec.centre)
    timing = _draw_timing(spec, rng)
    accession = f"ACC{seed % 1000:03d}{spec.index:07d}"
    base = _study_header(spec, seed, timing, accession)
    phantom = build_phantom(spec, grid, rng)
    ct_dir = out_dir / "ct"
    ct_dir.mkdir(parents=True, exist_ok=True)
    series = []
    for phase in PHASES:
        hu = render_phase(phantom, phase, spec.centre, rng)
        stored = np.clip(np.rint(hu) + HU_OFFSET, 0, HU_MAX_STORED).astype(np.uint16)
        ds = _series_header(base, spec, seed, phase, grid, timing)
        folder = ct_dir / phase
        count = _write_series(ds, stored, grid, folder, seed, spec, phase)
        series.append(CtSeriesRecord(phase, str(ds.SeriesInstanceUID), SERIES_NUMBER[phase],
                                     str(ds.SeriesDescription), folder, count,
                                     grid.spacing_mm[0], grid.spacing_mm[1]))
    labels_path = ct_dir / "labels.npz"
    write_labels(labels_path, phantom.labels, grid)
    logger.info("wrote CT study %s: %d slices per phase", base.StudyInstanceUID, grid.shape[0])
    return CtStudyRecord(str(base.StudyInstanceUID), accession, str(base.FrameOfReferenceUID),
                         tuple(series), labels_path)
