"""Tissue detection on a low-resolution RGB image of a slide (numpy + scipy.ndimage).

H&E-stained tissue is coloured; the glass around it is close to grey-white. The
mask is therefore a threshold on HSV saturation, chosen per slide with Otsu's
method (a numpy histogram, no scikit-image) and never below a floor, so that a
slide with no tissue does not split its background noise in two. Dark pixels
(pen marks, dust, the black border some scanners add) are excluded by a value
ceiling. The binary result is cleaned up with scipy.ndimage: an opening removes
specks, holes inside tissue (gland lumina, fat) are filled, and connected pieces
smaller than ``min_area_mm2`` are dropped.

:func:`tile_coverage` then gives, for any rectangle in level-0 pixels, the share of
mask pixels inside it that are tissue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ml.errors import OncopacsError

U8 = NDArray[np.uint8]
BoolArray = NDArray[np.bool_]
F64 = NDArray[np.float64]

MIN_SATURATION = 0.05  # floor of the Otsu threshold; glass is about 0.01
MIN_VALUE = 0.12  # darker pixels (pen, dust, borders) are not tissue
MIN_AREA_MM2 = 0.01  # smaller connected pieces are dropped
OPEN_RADIUS_UM = 20.0  # opening radius, clamped to 1-3 mask pixels
HIST_BINS = 256


class TissueMaskError(OncopacsError):
    """An image cannot be turned into a tissue mask (wrong shape, type or scale)."""


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and its scale.

    Attributes
    ----------
    mask
        ``(rows, cols)`` booleans, True where there is tissue.
    mpp
        Micrometres per mask pixel.
    downsample
        Level-0 pixels per mask pixel (``mpp`` over the slide's base mpp), in x and y.
    threshold
        The saturation threshold that was used, in ``[0, 1]``.
    """

    mask: BoolArray
    mpp: float
    downsample: tuple[float, float]
    threshold: float

    @property
    def tissue_fraction(self) -> float:
        """Share of the whole image that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def saturation_value(rgb: U8) -> tuple[F64, F64]:
    """HSV saturation and value, each in ``[0, 1]``, of an ``(rows, cols, 3)`` uint8 image.

    Raises
    ------
    TissueMaskError
        If ``rgb`` is not a uint8 array with three channels.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise TissueMaskError(f"expected an RGB uint8 image (rows, cols, 3), got shape "
                              f"{rgb.shape} and dtype {rgb.dtype}")
    high = rgb.max(axis=2).astype(np.float64)
    low = rgb.min(axis=2).astype(np.float64)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return saturation, high / 255.0


def otsu_threshold(values: F64, bins: int = HIST_BINS) -> float:
    """Otsu's threshold of values in ``[0, 1]``: the cut maximising between-class variance.

    When an empty gap between the classes makes the optimum flat, the cut is in the
    middle of the gap. A constant image gives its own value (nothing lies above it).
    """
    flat = values.ravel()
    if flat.size == 0 or float(flat.min()) == float(flat.max()):
        return float(flat.max()) if flat.size else 1.0
    counts, edges = np.histogram(flat, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    mean_low = np.divide(mass_low, weight_low, out=np.zeros_like(mass_low),
                         where=weight_low > 0)
    mean_high = np.divide(mass_low[-1] - mass_low, weight_high, out=np.zeros_like(mass_low),
                          where=weight_high > 0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    best = np.flatnonzero(between >= between.max())
    middle = (int(best[0]) + int(best[-1])) // 2  # a flat optimum (a gap) is cut in its middle
    return float(edges[middle + 1])


def _disk(radius_px: int) -> BoolArray:
    grid = np.arange(-radius_px, radius_px + 1)
    disk: BoolArray = (grid[:, None] ** 2 + grid[None, :] ** 2) <= radius_px ** 2
    return disk


def clean_mask(raw: BoolArray, mpp: float, min_area_mm2: float = MIN_AREA_MM2) -> BoolArray:
    """Open, fill holes, and drop pieces smaller than ``min_area_mm2``."""
    radius = int(np.clip(round(OPEN_RADIUS_UM / mpp), 1, 3))
    mask = ndimage.binary_opening(raw, structure=_disk(radius))
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count:
        areas_mm2 = np.bincount(labels.ravel())[1:] * (mpp / 1000.0) ** 2
        keep = np.concatenate(([False], areas_mm2 >= min_area_mm2))
        mask = keep[labels]
    out: BoolArray = np.asarray(mask, dtype=bool)
    return out


def tissue_mask(rgb: U8, mpp: float, base_mpp: float, *,
                min_saturation: float = MIN_SATURATION,
                min_area_mm2: float = MIN_AREA_MM2) -> TissueMask:
    """Detect tissue in a low-resolution RGB image of a whole slide.

    Parameters
    ----------
    rgb
        ``(rows, cols, 3)`` uint8 image of the whole slide (a thumbnail or low level).
    mpp
        Micrometres per pixel of ``rgb``.
    base_mpp
        Micrometres per pixel of the slide's level 0 (to map mask pixels to level 0).
    min_saturation
        Floor of the saturation threshold.
    min_area_mm2
        Connected tissue pieces smaller than this are dropped.

    Returns
    -------
    TissueMask
        The cleaned mask, its scale and the threshold used.

    Raises
    ------
    TissueMaskError
        If ``rgb`` is not an RGB uint8 image or a scale is not positive.
    """
    if mpp <= 0 or base_mpp <= 0:
        raise TissueMaskError(f"mask scale {mpp} mpp and base scale {base_mpp} mpp "
                              "must both be positive")
    saturation, value = saturation_value(rgb)
    threshold = max(otsu_threshold(saturation), min_saturation)
    raw = (saturation > threshold) & (value > MIN_VALUE)
    mask = clean_mask(raw, mpp, min_area_mm2)
    scale = mpp / base_mpp
    return TissueMask(mask=mask, mpp=mpp, downsample=(scale, scale), threshold=threshold)


def tile_coverage(tissue: TissueMask, boxes_px: NDArray[np.int64]) -> F64:
    """Share of tissue in each level-0 rectangle, from the mask pixels inside it.

    A mask pixel counts when its centre lies in the rectangle; a rectangle smaller
    than a mask pixel takes the pixel under its centre.

    Parameters
    ----------
    tissue
        The mask.
    boxes_px
        ``(N, 4)`` level-0 rectangles ``x, y, width, height`` in pixels.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` tissue fractions in ``[0, 1]``.
    """
    mask = tissue.mask
    rows, cols = mask.shape
    integral = np.zeros((rows + 1, cols + 1), dtype=np.int64)
    integral[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    boxes = boxes_px.astype(np.float64)
    sx, sy = tissue.downsample
    x0, x1 = boxes[:, 0] / sx, (boxes[:, 0] + boxes[:, 2]) / sx
    y0, y1 = boxes[:, 1] / sy, (boxes[:, 1] + boxes[:, 3]) / sy
    # mask pixel i (centre i + 0.5) is inside [a, b) when ceil(a - 0.5) <= i < ceil(b - 0.5)
    c0 = np.clip(np.ceil(x0 - 0.5), 0, cols).astype(np.int64)
    c1 = np.clip(np.ceil(x1 - 0.5), 0, cols).astype(np.int64)
    r0 = np.clip(np.ceil(y0 - 0.5), 0, rows).astype(np.int64)
    r1 = np.clip(np.ceil(y1 - 0.5), 0, rows).astype(np.int64)
    thin_x, thin_y = c1 <= c0, r1 <= r0
    cx = np.clip(((x0 + x1) / 2).astype(np.int64), 0, cols - 1)
    cy = np.clip(((y0 + y1) / 2).astype(np.int64), 0, rows - 1)
    c0, c1 = np.where(thin_x, cx, c0), np.where(thin_x, cx + 1, c1)
    r0, r1 = np.where(thin_y, cy, r0), np.where(thin_y, cy + 1, r1)
    inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = (r1 - r0) * (c1 - c0)
    out: F64 = inside / area
    return out


MPP_TOLERANCE = 0.01  # a level within 1 % of the target counts as the target


def choose_level(level_mpps: list[float], target_mpp: float) -> int:
    """Index of the pyramid level to read tiles of ``target_mpp`` from.

    The rule: the coarsest level whose mpp is not coarser than the target (within
    1 %), so tiles are only ever reduced, never enlarged; if every level is
    coarser than the target, the finest level.

    Raises
    ------
    TissueMaskError
        If there is no level or the target is not positive.
    """
    if not level_mpps or target_mpp <= 0:
        raise TissueMaskError(f"cannot choose a level for {target_mpp} mpp among "
                              f"levels of {level_mpps} mpp")
    fine_enough = [i for i, mpp in enumerate(level_mpps)
                   if mpp <= target_mpp * (1.0 + MPP_TOLERANCE)]
    if not fine_enough:
        return min(range(len(level_mpps)), key=lambda i: level_mpps[i])
    return max(fine_enough, key=lambda i: level_mpps[i])


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping square tiles covering one pyramid level, and their tissue shares.

    Attributes
    ----------
    read_px
        Tile side read at the level, in that level's pixels.
    base_px
        Tile side in level-0 pixels.
    level_xy
        ``(N, 2)`` top-left ``x, y`` of each tile in the level's pixels.
    base_xy
        ``(N, 2)`` the same in level-0 pixels.
    coverage
        ``(N,)`` tissue share of each tile.
    """

    read_px: int
    base_px: int
    level_xy: NDArray[np.int64]
    base_xy: NDArray[np.int64]
    coverage: F64

    @property
    def candidates(self) -> int:
        return int(self.coverage.size)


def tile_grid(tissue: TissueMask, level_size_px: tuple[int, int], level_downsample: float,
              tile_px: int, level_mpp: float, target_mpp: float) -> TileGrid:
    """The full tiles of a level, row-major, with each tile's tissue share.

    A tile of ``tile_px`` at ``target_mpp`` spans ``round(tile_px * target_mpp /
    level_mpp)`` level pixels (``tile_px`` when the level is within 1 % of the target
    or coarser). Tiles that would cross the level's right or bottom edge are left out.

    Parameters
    ----------
    tissue
        The slide's tissue mask.
    level_size_px
        Width and height of the level.
    level_downsample
        Level-0 pixels per level pixel.
    tile_px, level_mpp, target_mpp
        Output tile side, the level's scale and the wanted scale.
    """
    ratio = target_mpp / level_mpp
    read_px = round(tile_px * ratio) if ratio > 1.0 + MPP_TOLERANCE else tile_px
    width, height = level_size_px
    xs = np.arange(0, width - read_px + 1, read_px, dtype=np.int64)
    ys = np.arange(0, height - read_px + 1, read_px, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    level_xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    base_xy = np.rint(level_xy * level_downsample).astype(np.int64)
    base_px = round(read_px * level_downsample)
    boxes = np.concatenate([base_xy, np.full_like(base_xy, base_px)], axis=1)
    coverage = tile_coverage(tissue, boxes) if len(boxes) else np.zeros(0)
    return TileGrid(read_px=read_px, base_px=base_px, level_xy=level_xy, base_xy=base_xy,
                    coverage=coverage)
