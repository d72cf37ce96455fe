"""Segment a HU volume with a model package; labels come back on the volume's own grid."""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ml.seg import CLASSES
from ml.seg.data import SegError, normalise, resize, working_shape
from ml.seg.package import ARRAY_AXCODES, SegPackage

log = logging.getLogger(__name__)

_ABSENT = -1.0e4
"""Logit of a class no channel maps to (finite, so interpolation stays defined)."""
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def axes_transform(src: str, dst: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Permutation and flips that turn an array with axcodes ``src`` into ``dst``.

    ``out = flip(transpose(a, perm), axes where flips[i])``; axcodes name the
    anatomical direction each axis points to (``"RAS"``, ``"SPL"``, ...).

    Raises
    ------
    SegError
        If ``dst`` is not a valid permutation of ``src``'s three anatomical axes.
    """
    perm: list[int] = []
    flips: list[bool] = []
    for code in dst.upper():
        hits = [i for i, c in enumerate(src.upper()) if c in (code, _OPPOSITE.get(code))]
        if len(hits) != 1 or hits[0] in perm:
            raise SegError(f"axcodes {dst!r} cannot be reached from {src!r}")
        perm.append(hits[0])
        flips.append(src.upper()[hits[0]] != code)
    if len(perm) != 3:
        raise SegError(f"axcodes {dst!r} must name three axes")
    return (perm[0], perm[1], perm[2]), (flips[0], flips[1], flips[2])


def reorient(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """``array`` (axcodes ``src``) viewed with axcodes ``dst``."""
    perm, flips = axes_transform(src, dst)
    out = np.transpose(array, perm)
    axes = tuple(i for i, f in enumerate(flips) if f)
    return np.flip(out, axes) if axes else out


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def group_logits(logits: torch.Tensor, lookup: tuple[int, ...]) -> torch.Tensor:
    """``(C, ...)`` network logits -> ``(len(CLASSES), ...)``: each class's best channel.

    The argmax over the result equals mapping the argmax channel through ``lookup``.
    """
    table = list(lookup) + [0] * max(0, logits.shape[0] - len(lookup))
    groups = []
    for cls in range(len(CLASSES)):
        channels = [c for c in range(logits.shape[0]) if table[c] == cls]
        if channels:
            groups.append(logits[channels].amax(dim=0))
        else:
            groups.append(torch.full_like(logits[0], _ABSENT))
    return torch.stack(groups)


def segment(volume_hu: np.ndarray, spacing_mm: tuple[float, float, float],
            package: SegPackage, device: torch.device | None = None) -> np.ndarray:
    """Segment liver, pancreas and tumour in a portal-venous CT volume.

    Parameters
    ----------
    volume_hu
        ``(z, y, x)`` HU volume, z ascending (patient LPS, as ``ml.seg.data.load_series``).
    spacing_mm
        Voxel spacing ``(z, y, x)`` in mm.
    package
        A loaded model package.
    device
        Where to run; default CUDA if available, else CPU.

    Returns
    -------
    numpy.ndarray
        uint8 labels (values index ``ml.seg.CLASSES``) with ``volume_hu``'s shape.

    Raises
    ------
    SegError
        If the volume is not 3-D or a spacing is not positive.
    """
    if volume_hu.ndim != 3 or min(spacing_mm) <= 0:
        raise SegError(f"segment needs a 3-D volume and positive spacing, got shape "
                       f"{volume_hu.shape} and spacing {spacing_mm} mm")
    prep = package.preprocessing
    dev = device or pick_device()
    perm, _ = axes_transform(ARRAY_AXCODES, prep.axcodes)
    oriented = np.ascontiguousarray(reorient(volume_hu, ARRAY_AXCODES, prep.axcodes))
    spacing = tuple(spacing_mm[p] for p in perm)
    shape = working_shape(oriented.shape, spacing, prep.spacing_mm)
    hu = torch.from_numpy(oriented.astype(np.float32)).to(dev)[None]
    image = normalise(resize(hu, shape), prep.window_hu)[None]
    net = package.network.to(dev).eval()
    with torch.inference_mode():
        logits = sliding_window_inference(image, prep.roi_size, 1, net, overlap=prep.overlap,
                                          mode="gaussian")
        if not isinstance(logits, torch.Tensor):
            raise SegError(f"network of {package.path} returned {type(logits).__name__}, "
                           "not one tensor")
        grouped = group_logits(logits[0].float(), package.lookup)
        full = resize(grouped, (oriented.shape[0], oriented.shape[1], oriented.shape[2]))
        labels = full.argmax(dim=0).to(torch.uint8).cpu().numpy()
    log.debug("segmented %s voxels on %s (working grid %s)", volume_hu.shape, dev, shape)
    return np.ascontiguousarray(reorient(labels, prep.axcodes, ARRAY_AXCODES))


def structure_volumes_ml(labels: np.ndarray, spacing_mm: tuple[float, float, float],
                         ) -> dict[str, float]:
    """Volume in millilitres of each non-background class in ``labels``."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=len(CLASSES))
    return {name: float(counts[i]) * voxel_ml for i, name in enumerate(CLASSES) if i}


def dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice per non-background class; NaN where the class is absent from both."""
    out = {}
    for i, name in enumerate(CLASSES):
        if i:
            p, t = pred == i, truth == i
            total = int(p.sum()) + int(t.sum())
            out[name] = 2.0 * float((p & t).sum()) / total if total else float("nan")
    return out
