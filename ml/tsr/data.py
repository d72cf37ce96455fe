"""TSR inputs: a 2.5D crop per CT phase around the pancreatic tumour, and a crop cache.

A crop is three axial planes (through the tumour centroid and ``slice_offset_mm``
below and above it) sampled trilinearly at ``spacing_mm`` on an
``image_size`` square, HU-windowed to [0, 1]. At ``spacing_mm`` 3 and 32 px
it spans 96 mm, so the pancreas and vessels around the tumour are in view and
the network can judge the tumour's enhancement against them (each centre has
its own HU calibration shift and noise).

The centre is the centroid of the tumour label; when the tumour label is empty
(the segmentation finds few pancreatic tumours) the centroid of the pancreas.
Training reads the ground-truth labels (``ct/labels.npz``); inference the
segmentation. Both phases of a study share the grid of the label volume.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates

from ml.errors import OncopacsError
from ml.manifest import Patient
from ml.seg import CLASSES as SEG_CLASSES
from ml.seg.data import CtVolume, load_series
from ml.seg.source import LabelFn, ground_truth
from ml.tsr.config import PHASES, TsrConfig, TsrError

log = logging.getLogger(__name__)

TUMOUR = SEG_CLASSES.index("tumour")
PANCREAS = SEG_CLASSES.index("pancreas")


def crop_centre(labels: np.ndarray) -> tuple[np.ndarray, str]:
    """Voxel centroid ``(z, y, x)`` of the tumour label, else of the pancreas.

    Returns
    -------
    tuple
        The centroid (float voxel indices) and ``"tumour"`` or ``"pancreas"``.

    Raises
    ------
    TsrError
        If the labels hold neither a tumour nor a pancreas.
    """
    for value, name in ((TUMOUR, "tumour"), (PANCREAS, "pancreas")):
        where = np.argwhere(labels == value)
        if where.size:
            return where.mean(axis=0), name
    raise TsrError("the label volume holds neither a pancreatic tumour nor a pancreas; "
                   "no TSR crop can be placed")


def phase_crop(volume_hu: np.ndarray, spacing_mm: tuple[float, float, float],
               labels: np.ndarray, config: TsrConfig) -> np.ndarray:
    """The ``(3, S, S)`` float32 crop in [0, 1] of one phase (inference preprocessing).

    Parameters
    ----------
    volume_hu
        ``(z, y, x)`` HU volume, z ascending.
    spacing_mm
        ``(dz, dy, dx)`` voxel spacing.
    labels
        Segmentation classes (``ml.seg.CLASSES`` values) on the same grid.
    config
        The model config (crop spacing, offsets, window, image size).

    Raises
    ------
    TsrError
        If the shapes differ, the spacing is not positive, or no structure places the crop.
    """
    if volume_hu.ndim != 3 or volume_hu.shape != labels.shape:
        raise TsrError(f"CT volume {volume_hu.shape} and labels {labels.shape} must be "
                       "3-D arrays on the same grid")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise TsrError(f"spacing_mm {spacing_mm} must be three positive numbers")
    centre, _ = crop_centre(labels)
    crop = config.crop
    size = config.image_size
    steps = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * crop.spacing_mm
    dz = np.array([-crop.slice_offset_mm, 0.0, crop.slice_offset_mm]) / spacing_mm[0]
    z = centre[0] + dz[:, None, None] + np.zeros((1, size, size))
    y = centre[1] + steps[None, :, None] / spacing_mm[1] + np.zeros((3, 1, size))
    x = centre[2] + steps[None, None, :] / spacing_mm[2] + np.zeros((3, size, 1))
    sampled = map_coordinates(volume_hu.astype(np.float32, copy=False), np.stack([z, y, x]),
                              order=1, mode="nearest")
    lo, hi = crop.window_hu
    out: np.ndarray = ((np.clip(sampled, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    return out


def relative_enhancement(volume_hu: np.ndarray, labels: np.ndarray) -> float:
    """Mean tumour HU minus mean pancreas HU (NaN when either label is empty).

    This is what a radiologist reads as hypo- or hyper-enhancement; it is
    independent of a scanner's calibration shift.
    """
    tumour = labels == TUMOUR
    pancreas = labels == PANCREAS
    if not tumour.any() or not pancreas.any():
        return float("nan")
    return float(volume_hu[tumour].mean() - volume_hu[pancreas].mean())


@dataclass(frozen=True)
class CropSet:
    """Crops and truth of a list of PDAC patients, in the order given.

    ``crops`` is ``(N, 2, 3, S, S)`` float32 (phase order ``PHASES``);
    ``enhancement`` ``(N, 2)`` the measured tumour-minus-pancreas HU per phase.
    """

    patients: list[Patient]
    crops: np.ndarray
    enhancement: np.ndarray

    @property
    def y(self) -> np.ndarray:
        """1 for high tumour-stroma ratio."""
        return np.array([int(bool(p.labels["tsr_high"])) for p in self.patients])

    @property
    def truth(self) -> np.ndarray:
        """The generator's P(high TSR | both phases) (the best achievable score)."""
        return np.array([float(p.labels["probability"]) for p in self.patients])

    def subset(self, rows: np.ndarray) -> CropSet:
        """The patients at ``rows``."""
        return CropSet([self.patients[int(i)] for i in rows], self.crops[rows],
                       self.enhancement[rows])


def patient_crops(patient: Patient, config: TsrConfig, labels_of: LabelFn = ground_truth,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Both phases' crops ``(2, 3, S, S)`` and relative enhancements.

    The labels are the ground truth's on the venous grid unless ``labels_of`` says
    otherwise (a segmentation run on the venous series).

    Raises
    ------
    TsrError
        If a series or the labels cannot be read or do not share a grid.
    """
    try:
        volumes: list[CtVolume] = [load_series(patient.ct_folder(ph)) for ph in PHASES]
        labels = labels_of(patient, volumes[-1])
    except OncopacsError as exc:
        raise TsrError(f"patient {patient.index}: {exc}") from exc
    crops = np.stack([phase_crop(v.hu, v.spacing_mm, labels, config) for v in volumes])
    enhancement = np.array([relative_enhancement(v.hu, labels) for v in volumes])
    return crops, enhancement


def file_digest(path: Path) -> str:
    """Short SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_crops(patients: list[Patient], config: TsrConfig, manifest_path: Path,
               cache_dir: Path | None,
               progress: Callable[[Iterable[Patient], str], Iterable[Patient]] | None = None,
               labels_of: LabelFn | None = None) -> CropSet:
    """Crops of ``patients`` (PDAC), read from the cache or made and cached.

    The cache folder is keyed by the manifest's bytes and the crop settings, one
    ``<index>.npz`` per patient, so a changed cohort or crop never reuses stale crops.
    Crops placed by ``labels_of`` (not the ground truth) are never cached.

    Raises
    ------
    TsrError
        If a patient is not a PDAC patient or its images cannot be read.
    """
    folder = None
    if cache_dir is not None and labels_of is None:
        folder = cache_dir / f"{file_digest(manifest_path)}-{config.crop_key()}"
        folder.mkdir(parents=True, exist_ok=True)
    crops, enhancement = [], []
    items: Iterable[Patient] = patients if progress is None else progress(patients, "crops")
    for patient in items:
        if patient.group != "PDAC":
            raise TsrError(f"patient {patient.index} is a {patient.group} patient; the TSR "
                           "model takes PDAC patients")
        path = None if folder is None else folder / f"{patient.index}.npz"
        if path is not None and path.is_file():
            with np.load(path) as npz:
                c, e = npz["crops"].astype(np.float32), npz["enhancement"]
        else:
            c, e = patient_crops(patient, config, labels_of or ground_truth)
            c = c.astype(np.float16).astype(np.float32)
            if path is not None:
                tmp = path.with_suffix(".tmp.npz")
                np.savez(tmp, crops=c.astype(np.float16), enhancement=e)
                tmp.replace(path)
        crops.append(c)
        enhancement.append(e)
    size = config.image_size
    stack = np.stack(crops) if crops else np.zeros((0, 2, 3, size, size), np.float32)
    return CropSet(list(patients), stack, np.array(enhancement).reshape(-1, 2))
