"""Segmentation data: venous CT series and ground truth of a synthetic cohort, on one grid.

Volumes are ``(z, y, x)`` arrays in patient LPS order with z ascending (the
most caudal slice first), the order of ``ct/labels.npz``. A CT series is sorted
by ``ImagePositionPatient`` z, so its instance numbers (1 = most cranial) play
no part. ``origin_mm`` is the centre of the first voxel, ``(z, y, x)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from ml.errors import OncopacsError
from ml.hu import slice_hu
from ml.seg import CLASSES
from ml.synth.cohort import load_manifest
from ml.synth.phantom import LABELS

log = logging.getLogger(__name__)

PHASE = "venous"
"""The phase the model reads: portal-venous, where liver, pancreas and tumours all enhance."""
AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
GEOMETRY_TOLERANCE_MM = 0.01


class SegError(OncopacsError):
    """Segmentation data, training or inference cannot go on (names the series or file)."""


@dataclass(frozen=True)
class CtVolume:
    """A CT series as a ``(z, y, x)`` float32 HU volume with its geometry."""

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    series_uid: str


@dataclass(frozen=True)
class Case:
    """One patient's venous CT and its class labels (values index ``CLASSES``) on the CT grid."""

    study_uid: str
    centre: str
    ct: CtVolume
    labels: np.ndarray


def _read_slices(folder: Path) -> list[pydicom.Dataset]:
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise SegError(f"CT series folder {folder} holds no .dcm files")
    slices: list[pydicom.Dataset] = [pydicom.dcmread(path) for path in files]
    for ds in slices:
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise SegError(f"series {ds.get('SeriesInstanceUID', folder)} has no image plane "
                           f"(position/orientation) on instance {ds.get('SOPInstanceUID', '?')}")
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if not np.allclose(iop, AXIAL, atol=1e-3):
            raise SegError(f"series {ds.SeriesInstanceUID} instance {ds.SOPInstanceUID} is not "
                           f"axial (orientation {list(iop)}); only axial CT is supported")
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return slices


def load_series(folder: Path) -> CtVolume:
    """Read one axial CT series folder into a HU volume sorted by z (ascending).

    Parameters
    ----------
    folder
        Folder of the series' single-frame CT files.

    Returns
    -------
    CtVolume
        HU (``RescaleSlope``/``RescaleIntercept`` applied), spacing and origin in mm.

    Raises
    ------
    SegError
        If the folder is empty, a slice lacks its image plane or is not axial, two
        slices share a position, or the slice spacing is not uniform.
    """
    slices = _read_slices(folder)
    uid = str(slices[0].SeriesInstanceUID)
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    steps = np.diff(z)
    if steps.size and steps.min() <= GEOMETRY_TOLERANCE_MM:
        raise SegError(f"series {uid} has two slices at the same position z={z[steps.argmin()]}")
    if steps.size and np.ptp(steps) > max(GEOMETRY_TOLERANCE_MM, 0.01 * steps.mean()):
        raise SegError(f"series {uid} has non-uniform slice spacing "
                       f"({steps.min():.3f}-{steps.max():.3f} mm)")
    hu = np.stack([slice_hu(ds) for ds in slices])
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    dz = float(steps.mean()) if steps.size else float(slices[0].get("SliceThickness", 1.0))
    x0, y0, z0 = (float(v) for v in slices[0].ImagePositionPatient)
    return CtVolume(hu, (dz, row_mm, col_mm), (z0, y0, x0), uid)


def to_classes(phantom_labels: np.ndarray) -> np.ndarray:
    """Map phantom label values (``ml.synth.phantom.LABELS``) to ``CLASSES`` values.

    Liver, pancreas and tumour keep their class; every other structure is background.
    """
    table = np.zeros(max(LABELS.values()) + 1, dtype=np.uint8)
    for value, name in enumerate(CLASSES):
        if value:
            table[LABELS[name]] = value
    out: np.ndarray = table[phantom_labels]
    return out


def load_labels(path: Path, ct: CtVolume) -> np.ndarray:
    """Read ``ct/labels.npz`` and return its class labels on ``ct``'s grid.

    The archive stores ``(z, y, x)`` labels with z ascending from ``origin_mm``,
    the order of a z-sorted series, so the arrays align voxel for voxel once the
    geometry is confirmed.

    Raises
    ------
    SegError
        If the file is missing or its shape, origin or spacing differ from the series'.
    """
    if not path.is_file():
        raise SegError(f"ground-truth labels {path} do not exist")
    with np.load(path, allow_pickle=False) as npz:
        labels, origin, spacing = npz["labels"], npz["origin_mm"], npz["spacing_mm"]
    if labels.shape != ct.hu.shape:
        raise SegError(f"labels {path} have shape {labels.shape}, series {ct.series_uid} "
                       f"has {ct.hu.shape}")
    for what, mine, theirs in (("origin", origin, ct.origin_mm), ("spacing", spacing,
                                                                   ct.spacing_mm)):
        if not np.allclose(mine, theirs, atol=GEOMETRY_TOLERANCE_MM):
            raise SegError(f"labels {path} {what} {list(mine)} mm differs from series "
                           f"{ct.series_uid} {list(theirs)} mm")
    return to_classes(labels)


def venous_series(entry: dict[str, Any], root: Path) -> Path:
    """The venous series folder of one manifest entry.

    Raises
    ------
    SegError
        If the entry lists no venous series.
    """
    for series in entry["ct"]["series"]:
        if series["phase"] == PHASE:
            return root / str(series["folder"])
    raise SegError(f"study {entry['ct']['study_uid']} has no {PHASE} series in the manifest")


def load_case(entry: dict[str, Any], root: Path) -> Case:
    """Load one manifest entry's venous CT and its labels.

    Raises
    ------
    SegError
        If the series or labels are missing or do not share a grid.
    """
    ct = load_series(venous_series(entry, root))
    labels = load_labels(root / entry["ct"]["labels"], ct)
    return Case(str(entry["ct"]["study_uid"]), str(entry["centre"]), ct, labels)


def split_by_centre(manifest_path: Path, holdout: str | None = None,
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Split a cohort's patients into training centres and one held-out centre.

    Parameters
    ----------
    manifest_path
        The cohort manifest or its folder.
    holdout
        The held-out centre code; default the cohort's last centre.

    Returns
    -------
    tuple
        Training entries, held-out entries, the held-out centre code.

    Raises
    ------
    SegError
        If the cohort has a single centre, the centre is unknown, or a side is empty.
    """
    manifest = load_manifest(manifest_path)
    codes = [str(c) for c in manifest["centres"]]
    held = holdout or codes[-1]
    if len(codes) < 2:
        raise SegError(f"cohort {manifest_path} has one centre ({codes[0]}); "
                       "a held-out centre needs at least two")
    if held not in codes:
        raise SegError(f"held-out centre {held} is not in cohort {manifest_path} ({codes})")
    train = [e for e in manifest["patients"] if e["centre"] != held]
    test = [e for e in manifest["patients"] if e["centre"] == held]
    if not train or not test:
        raise SegError(f"cohort {manifest_path} has {len(train)} training and {len(test)} "
                       f"held-out ({held}) patients; both must be non-empty")
    return train, test, held


def cohort_root(manifest_path: Path) -> Path:
    """The folder that manifest paths are relative to."""
    return Path(manifest_path if manifest_path.is_dir() else manifest_path.parent)


def working_shape(shape: tuple[int, ...], spacing_mm: tuple[float, ...],
                  target_mm: tuple[float, ...]) -> tuple[int, int, int]:
    """The shape that covers the same extent as ``shape`` at ``target_mm`` spacing."""
    out = [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing_mm, target_mm,
                                                       strict=True)]
    return out[0], out[1], out[2]


def resize(volume: torch.Tensor, shape: tuple[int, int, int], labels: bool = False,
           ) -> torch.Tensor:
    """Resample a ``(C, z, y, x)`` tensor to ``shape`` over the same extent.

    Voxel centres map as in ``align_corners=False``: the volume's outer faces stay
    in place. Images are interpolated trilinearly, labels by nearest neighbour.
    """
    if tuple(volume.shape[1:]) == shape:
        return volume
    batch = volume.unsqueeze(0)
    if labels:
        out = F.interpolate(batch.float(), size=shape, mode="nearest-exact")
        return out[0].to(volume.dtype)
    return F.interpolate(batch, size=shape, mode="trilinear", align_corners=False)[0]


def normalise(hu: np.ndarray | torch.Tensor, window_hu: tuple[float, float],
              ) -> torch.Tensor:
    """Clip HU to ``window_hu`` and scale it to [0, 1] (float32 tensor)."""
    lo, hi = window_hu
    t = torch.as_tensor(hu, dtype=torch.float32)
    return ((t.clamp(lo, hi) - lo) / (hi - lo)).contiguous()


def to_working(case: Case, spacing_mm: tuple[float, float, float],
               ) -> tuple[np.ndarray, np.ndarray]:
    """A case's HU and labels resampled to ``spacing_mm`` (HU float32, labels uint8)."""
    shape = working_shape(case.ct.hu.shape, case.ct.spacing_mm, spacing_mm)
    hu = resize(torch.from_numpy(case.ct.hu)[None], shape)[0].numpy()
    lab = resize(torch.from_numpy(case.labels)[None], shape, labels=True)[0].numpy()
    return hu.astype(np.float32), lab.astype(np.uint8)
