"""Inputs of model A: CT crops, H&E tiles and clinical fields, for training and inference.

:func:`crops_from_volume` is the one CT preprocessing step, used on arrays at
inference and on the cohort's venous series (with its ground-truth labels) at
training. :func:`load_examples` builds one :class:`CrcExample` per CRC patient of
a manifest and caches the image part (crops and tiles) as one ``.npz`` per patient
under ``cache_dir/<manifest hash>-<preprocessing hash>/``, because training reads
the cohort many times.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from ml.crc.clinical import CrcClinical
from ml.crc.config import CrcConfig, CrcError, CtCrops, TileReading
from ml.manifest import Patient
from ml.seg import CLASSES
from ml.seg.data import load_labels, load_series
from ml.train_common import progress
from ml.wsi_tiles import read_tissue_tiles

log = logging.getLogger(__name__)

LIVER = CLASSES.index("liver")
TUMOUR = CLASSES.index("tumour")
HORIZON_MONTHS = 36.0


@dataclass(frozen=True)
class CtCrop:
    """``(2, D, H, W)`` float32 liver and tumour crops (normalised HU, structure mask)."""

    liver: np.ndarray
    tumour: np.ndarray


@dataclass(frozen=True)
class CrcExample:
    """One CRC patient, ready for the network.

    ``tiles`` may hold zero tiles (no slide); ``y3`` is the 3-year status where the
    follow-up tells it (an event, or followed to 36 months), else None.
    """

    index: int
    patient_id: str
    centre: str
    crop: CtCrop
    tiles: np.ndarray
    tile_xy: np.ndarray
    clinical: CrcClinical
    y3: float | None
    met_3y: bool
    probability: float
    time_months: float
    event: bool


def _antialias(volume: torch.Tensor, spacing_mm: tuple[float, float, float],
               target_mm: float) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Box-average axes whose spacing is at least 2x finer than ``target_mm``."""
    factors = [max(1, int(target_mm // s)) for s in spacing_mm]
    if all(f == 1 for f in factors):
        return volume, spacing_mm
    pooled = F.avg_pool3d(volume, kernel_size=factors, stride=factors, ceil_mode=True,
                          count_include_pad=False)
    new = tuple(s * f for s, f in zip(spacing_mm, factors, strict=True))
    return pooled, (new[0], new[1], new[2])


def _sample_box(volume: np.ndarray, spacing_mm: tuple[float, float, float],
                centre_mm: np.ndarray, step_mm: float, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear samples of ``volume`` on a ``shape`` box of ``step_mm`` around ``centre_mm``.

    Positions are in mm from the centre of voxel (0, 0, 0); outside the volume is 0.
    """
    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    t, spacing = _antialias(t, spacing_mm, step_mm)
    grid_shape = t.shape[2:]
    axes = []
    for axis in range(3):
        offsets = (np.arange(shape[axis]) - (shape[axis] - 1) / 2.0) * step_mm
        # Voxel centre i of the pooled volume sits at (i + 0.5) * spacing - 0.5 * original.
        first = spacing[axis] / 2.0 - spacing_mm[axis] / 2.0
        pos = (centre_mm[axis] + offsets - first) / spacing[axis]
        axes.append(torch.tensor(2.0 * pos / max(grid_shape[axis] - 1, 1) - 1.0,
                                 dtype=torch.float32))
    gz, gy, gx = torch.meshgrid(axes[0], axes[1], axes[2], indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None]  # grid_sample wants (x, y, z)
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    result: np.ndarray = out[0, 0].numpy()
    return result


def _largest_component_centre(mask: np.ndarray) -> np.ndarray | None:
    """Voxel coordinates of the centroid of the largest connected component, or None."""
    if not mask.any():
        return None
    lab, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, count + 1))
        mask = lab == int(np.argmax(sizes)) + 1
    return np.asarray(ndimage.center_of_mass(mask), dtype=np.float64)


def _crop(norm: np.ndarray, mask: np.ndarray, spacing_mm: tuple[float, float, float],
          centre_vox: np.ndarray, step_mm: float, shape: tuple[int, int, int]) -> np.ndarray:
    """Normalised HU inside ``mask`` and the mask, resampled without mixing in the outside.

    The values are resampled as ``sample(norm * mask) / sample(mask)`` (normalised
    convolution), so voxels at the structure's edge are not pulled towards the fat or
    gas around it, whatever the slice thickness.
    """
    centre_mm = centre_vox * np.asarray(spacing_mm)
    inside = mask.astype(np.float32)
    weight = _sample_box(inside, spacing_mm, centre_mm, step_mm, shape)
    total = _sample_box(norm * inside, spacing_mm, centre_mm, step_mm, shape)
    m = weight >= 0.5
    v = np.where(m, total / np.maximum(weight, 1e-6), 0.0)
    return np.stack([v, m.astype(np.float32)]).astype(np.float32)


def crops_from_volume(volume_hu: np.ndarray, spacing_mm: tuple[float, float, float],
                      labels: np.ndarray, config: CrcConfig | CtCrops) -> CtCrop:
    """The liver and tumour crops of one portal-venous CT.

    Parameters
    ----------
    volume_hu
        ``(z, y, x)`` HU volume.
    spacing_mm
        Voxel spacing ``(z, y, x)`` in mm.
    labels
        ``(z, y, x)`` class labels on the same grid (values index ``ml.seg.CLASSES``).
    config
        The model config (or its ``ct`` section).

    Returns
    -------
    CtCrop
        The liver box centred on the liver's bounding box and the tumour box
        centred on the largest tumour component (all zeros if there is no tumour).
        Channel 0 is ``(HU - median liver HU) / hu_scale`` clipped, inside the
        structure; channel 1 is the structure's mask.

    Raises
    ------
    CrcError
        If the arrays are not 3-D, their shapes differ, the spacing is not positive,
        or the labels hold no liver.
    """
    spec = config.ct if isinstance(config, CrcConfig) else config
    if volume_hu.ndim != 3 or labels.shape != volume_hu.shape:
        raise CrcError(f"CT volume {volume_hu.shape} and labels {labels.shape} must be "
                       "3-D arrays of the same shape")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0 or not all(map(math.isfinite, spacing_mm)):
        raise CrcError(f"CT spacing must be three positive mm values, got {spacing_mm}")
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    liver = labels == LIVER
    if not liver.any():
        raise CrcError("the CT labels hold no liver; model A needs the liver segmentation")
    hu = np.asarray(volume_hu, dtype=np.float32)
    median = float(np.median(hu[liver]))
    norm = np.clip((hu - median) / spec.hu_scale, -spec.hu_clip, spec.hu_clip)
    coords = np.nonzero(liver)
    bbox_centre = np.array([(c.min() + c.max()) / 2.0 for c in coords])
    liver_crop = _crop(norm, liver, spacing, bbox_centre, spec.liver_spacing_mm,
                       spec.liver_shape_vox)
    tumour = labels == TUMOUR
    centre = _largest_component_centre(tumour)
    if centre is None:
        tumour_crop = np.zeros((2, *spec.tumour_shape_vox), dtype=np.float32)
    else:
        tumour_crop = _crop(norm, tumour, spacing, centre, spec.tumour_spacing_mm,
                            spec.tumour_shape_vox)
    return CtCrop(liver_crop, tumour_crop)


def _read_tiles(folder: Path | None, spec: TileReading,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    if folder is None:
        return (np.zeros((0, spec.tile_px, spec.tile_px, 3), dtype=np.uint8),
                np.zeros((0, 2), dtype=np.int64))
    pixels, xy = [], []
    for batch in read_tissue_tiles(folder, spec.spec(seed)):
        pixels.append(batch.pixels)
        xy.append(batch.location_px)
    if not pixels:
        return (np.zeros((0, spec.tile_px, spec.tile_px, 3), dtype=np.uint8),
                np.zeros((0, 2), dtype=np.int64))
    return np.concatenate(pixels), np.concatenate(xy).astype(np.int64)


def _build_images(patient: Patient, config: CrcConfig) -> dict[str, np.ndarray]:
    ct = load_series(patient.ct_folder(config.phase))
    labels = load_labels(patient.labels_path(), ct)
    crop = crops_from_volume(ct.hu, ct.spacing_mm, labels, config)
    tiles, xy = _read_tiles(patient.wsi_folder(), config.tiles, patient.index)
    return {"liver": crop.liver.astype(np.float16), "tumour": crop.tumour.astype(np.float16),
            "tiles": tiles, "tile_xy": xy}


def cache_folder(cache_dir: Path, manifest_path: Path, config: CrcConfig) -> Path:
    """The cache folder of one manifest (path, size and mtime) and preprocessing config."""
    stat = manifest_path.stat()
    key = f"{manifest_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    manifest_hash = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / f"{manifest_hash}-{config.preprocessing_hash()}"


def _outcome(labels: dict[str, object], patient: Patient) -> tuple[float | None, float, bool]:
    try:
        time = float(labels["observed_months"])  # type: ignore[arg-type]
        event = bool(labels["event_observed"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CrcError(f"patient {patient.index} lacks a follow-up label: {exc}") from exc
    if event and time <= HORIZON_MONTHS:
        return 1.0, time, event
    return (0.0 if time >= HORIZON_MONTHS else None), time, event


def load_example(patient: Patient, config: CrcConfig, folder: Path | None) -> CrcExample:
    """Build (or read from the cache ``folder``) one CRC patient's example.

    Raises
    ------
    CrcError
        If the patient is not a CRC patient or lacks outcome labels.
    ml.errors.OncopacsError
        If the CT, labels or slide cannot be read.
    """
    if patient.group != "CRC":
        raise CrcError(f"patient {patient.index} is a {patient.group} patient, not CRC")
    path = None if folder is None else folder / f"{patient.index:06d}.npz"
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    else:
        arrays = _build_images(patient, config)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, liver=arrays["liver"], tumour=arrays["tumour"],
                     tiles=arrays["tiles"], tile_xy=arrays["tile_xy"])
            tmp.replace(path)
    labels = patient.labels
    y3, time, event = _outcome(labels, patient)
    return CrcExample(
        index=patient.index, patient_id=patient.patient_id, centre=patient.centre,
        crop=CtCrop(arrays["liver"].astype(np.float32), arrays["tumour"].astype(np.float32)),
        tiles=arrays["tiles"], tile_xy=arrays["tile_xy"],
        clinical=CrcClinical.from_labels(labels, patient.age_years, patient.sex), y3=y3,
        met_3y=bool(labels.get("met_3y", False)),
        probability=float(labels.get("probability", math.nan)), time_months=time, event=event)


def load_examples(patients: list[Patient], config: CrcConfig, manifest_path: Path,
                  cache_dir: Path | None, desc: str = "CRC examples") -> list[CrcExample]:
    """One example per CRC patient in ``patients`` (others are skipped), cached if asked."""
    folder = None if cache_dir is None else cache_folder(cache_dir, manifest_path, config)
    crc = [p for p in patients if p.group == "CRC"]
    out = [load_example(p, config, folder) for p in progress(crc, desc, total=len(crc))]
    log.info("%s: %d CRC patients (cache %s)", desc, len(out), folder)
    return out
