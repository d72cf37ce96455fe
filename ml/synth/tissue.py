"""Procedural H&E tissue of a colorectal resection slide (pure numpy).

A slide is planned once (:func:`plan_slide`) from the patient's ``wsi``
generator: one or two irregular tissue pieces on a white background, a
tumour inside the largest piece, and normal mucosa or muscularis propria in
the rest. Any window of level-0 pixels is then rendered on its own
(:func:`render_window`) from smooth value-noise fields sampled at the window's
pixel centres, so a slide of any size is made tile by tile in bounded memory
and every tile is the same whichever order it is drawn in.

The tumour is a mix of gland-forming epithelium (haematoxylin-dense, purple,
with a basal row of nuclei and a pale lumen) and stroma (eosin pink with
fibre streaks and spindle nuclei). The area share of stroma in the tumour
region equals the latent ``stroma_fraction``: the signal a tile model has to
recover. Thresholds are quantiles of the gland field over the tumour region,
so the share holds whatever the slide size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from ml.errors import SynthError
from ml.synth.latent import PatientSpec, patient_rng
from ml.synth.sizes import Size

logger = logging.getLogger(__name__)

F32 = NDArray[np.float32]
U8 = NDArray[np.uint8]

# Region labels of region_labels().
BACKGROUND, MUCOSA, MUSCLE, TUMOUR = 0, 1, 2, 3

# Pixel classes and their H&E colours (RGB), then the texture modulation per class.
_BG, _LUMEN, _EPI, _EPI_NUC, _STROMA, _STROMA_NUC = 0, 1, 2, 3, 4, 5
_MUSCLE, _MUSCLE_NUC, _LAMINA, _LYMPH, _CRYPT, _CRYPT_NUC = 6, 7, 8, 9, 10, 11
_PALETTE = np.array([
    (241, 240, 243),  # background glass
    (236, 222, 232),  # lumen
    (142, 92, 170),   # tumour epithelium cytoplasm
    (84, 46, 128),    # tumour nuclei
    (232, 160, 196),  # stroma (eosin)
    (150, 96, 160),   # fibroblast nuclei
    (214, 118, 150),  # smooth muscle
    (140, 80, 140),   # muscle nuclei
    (205, 150, 200),  # lamina propria
    (96, 60, 140),    # lymphocytes
    (222, 196, 226),  # crypt epithelium (goblet cells)
    (110, 70, 150),   # crypt nuclei
], dtype=np.float32)
_TEXTURE = np.array([
    (2, 2, 2), (4, 4, 4), (10, 8, 8), (8, 6, 8), (14, 18, 10), (6, 6, 6),
    (12, 16, 12), (6, 6, 6), (8, 10, 8), (6, 6, 6), (6, 6, 6), (6, 6, 6),
], dtype=np.float32)

# Physical scales of the procedural fields, in micrometres.
_GLAND_UM = 70.0
_GLAND_FINE_UM = 28.0
_NUCLEUS_UM = 4.0
_FIBRE_LONG_UM = 60.0
_FIBRE_SHORT_UM = 5.0
_CRYPT_PERIOD_UM = 80.0
_EDGE_UM = 30.0
_LUMEN_SHARE = 0.15  # of tumour epithelium area
_RIM_SHARE = 0.35  # nuclear rim, of tumour epithelium area
_QUANTILE_STRIDE_UM = 8.0
_SHADES = 32  # texture levels per pixel class
_EDGE_AMPLITUDE = np.float32(0.02)
_EDGE_MARGIN = 0.12


@dataclass(frozen=True)
class Field:
    """A smooth random field: a lattice of values with a spacing in level-0 pixels.

    Lattice point ``(i, j)`` sits at pixel position ``(i * spacing_y, j * spacing_x)``;
    values between points are interpolated with a smoothstep weight.
    """

    values: F32
    spacing_y_px: float
    spacing_x_px: float

    def sample(self, ys: F32, xs: F32) -> F32:
        """The field on the grid ``ys`` x ``xs`` (pixel coordinates, ascending)."""
        wy, y0, y1 = _weights(ys, self.spacing_y_px, self.values.shape[0])
        wx, x0, x1 = _weights(xs, self.spacing_x_px, self.values.shape[1])
        rows_lo, rows_hi = int(y0.min()), int(y1.max()) + 1
        band = self.values[rows_lo:rows_hi]
        across = band[:, x0] * (1.0 - wx) + band[:, x1] * wx
        top = across[y0 - rows_lo]
        bottom = across[y1 - rows_lo]
        out: F32 = top + (bottom - top) * wy[:, None]
        return out

    def window(self, y0: int, y1: int, x0: int, x1: int) -> F32:
        """The field at the pixel centres of rows ``y0:y1`` and columns ``x0:x1``."""
        return self.sample(_centres(y0, y1), _centres(x0, x1))

    def bound(self, y0: int, y1: int, x0: int, x1: int) -> tuple[float, float]:
        """Lower and upper bounds of the field over a pixel window (lattice extremes)."""
        i0 = max(int(y0 / self.spacing_y_px) - 1, 0)
        i1 = int(y1 / self.spacing_y_px) + 2
        j0 = max(int(x0 / self.spacing_x_px) - 1, 0)
        j1 = int(x1 / self.spacing_x_px) + 2
        block = self.values[i0:i1, j0:j1]
        return float(block.min()), float(block.max())


def _centres(start: int, stop: int) -> F32:
    return np.arange(start, stop, dtype=np.float32) + np.float32(0.5)


def _weights(coords: F32, spacing: float,
             count: int) -> tuple[F32, NDArray[np.intp], NDArray[np.intp]]:
    u = coords / np.float32(spacing)
    lo = np.clip(np.floor(u).astype(np.intp), 0, count - 2)
    f = np.clip(u - lo, 0.0, 1.0).astype(np.float32)
    return (f * f * (3.0 - 2.0 * f)).astype(np.float32), lo, lo + 1


def _noise(rng: np.random.Generator, extent_px: int, spacing_y_px: float,
           spacing_x_px: float) -> Field:
    rows = math.ceil(extent_px / spacing_y_px) + 2
    cols = math.ceil(extent_px / spacing_x_px) + 2
    values = rng.standard_normal((rows, cols), dtype=np.float32)
    return Field(values, spacing_y_px, spacing_x_px)


@dataclass(frozen=True)
class SlideLayout:
    """Everything needed to render any window of one slide's level 0."""

    extent_px: int
    mpp: float
    tissue: Field  # > 0 inside tissue
    tumour: Field  # > 0 inside the tumour (where also tissue)
    muscle: Field  # > 0 muscle, else mucosa (outside the tumour)
    gland: Field  # tumour epithelium where gland + gland_fine >= stroma_cut
    gland_fine: Field
    nuclei: Field
    fibre: Field
    edge: Field
    stroma_cut: float
    rim_cut: float
    lumen_cut: float
    crypt_period_px: float
    crypt_phase: tuple[float, float]
    stain: tuple[float, float, float]
    lut: U8  # colour_table(stain)
    stroma_fraction: float
    scan_delay_days: int  # slide scanned this many days after surgery
    scan_minute: int  # minutes after 09:00 on that day


def _blob(rng: np.random.Generator, ys: F32, xs: F32, centre: tuple[float, float],
          radius: float) -> F32:
    """1 - normalised distance to an irregular, rotated ellipse (all in slide units)."""
    aspect = float(rng.uniform(0.6, 1.0))
    turn = float(rng.uniform(0.0, math.pi))
    dy = ys[:, None] - centre[0]
    dx = xs[None, :] - centre[1]
    u = dx * math.cos(turn) + dy * math.sin(turn)
    v = (-dx * math.sin(turn) + dy * math.cos(turn)) / aspect
    theta = np.arctan2(v, u)
    wobble = np.ones_like(theta)
    for k in (2, 3, 5):
        wobble += float(rng.uniform(0.03, 0.12)) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    out: F32 = (1.0 - np.hypot(u, v) / (radius * wobble)).astype(np.float32)
    return out


def _coarse_fields(rng: np.random.Generator, n: int) -> tuple[F32, F32, F32]:
    """Tissue, tumour and muscle fields on an n x n lattice over the unit slide."""
    grid = (np.arange(n + 2) / n).astype(np.float32)  # lattice point i at i / n of the slide
    pieces = 1 if rng.random() < 0.5 else 2
    if pieces == 1:
        centres = [(float(rng.uniform(0.42, 0.58)), float(rng.uniform(0.42, 0.58)))]
    else:
        off = float(rng.uniform(0.2, 0.26))
        centres = [(0.5 - off * 0.3, 0.5 - off), (0.5 + off * 0.3, 0.5 + off)]
    blobs = [_blob(rng, grid, grid, c, 0.38 if pieces == 1 else 0.26) for c in centres]
    tissue = np.max(np.stack(blobs), axis=0)
    tissue += 0.12 * _smooth_noise(rng, n + 2, 6)
    tissue -= np.quantile(tissue[:n, :n], 1.0 - float(rng.uniform(0.44, 0.56)))
    ty = centres[0][0] + float(rng.uniform(-0.06, 0.06))
    tx = centres[0][1] + float(rng.uniform(-0.06, 0.06))
    tumour = _blob(rng, grid, grid, (ty, tx), 0.2) + 0.1 * _smooth_noise(rng, n + 2, 8)
    inside = tissue[:n, :n] > 0
    tumour -= np.quantile(tumour[:n, :n][inside], 1.0 - float(rng.uniform(0.35, 0.5)))
    turn = float(rng.uniform(0.0, 2 * math.pi))
    ramp = math.cos(turn) * grid[None, :] + math.sin(turn) * grid[:, None]
    muscle = (ramp + 0.15 * _smooth_noise(rng, n + 2, 5)).astype(np.float32)
    rest = inside & (tumour[:n, :n] <= 0)
    if rest.any():
        muscle -= np.quantile(muscle[:n, :n][rest], 0.6)
    return tissue.astype(np.float32), tumour.astype(np.float32), muscle


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> F32:
    """Smooth noise on an n x n grid with about ``cells`` bumps across."""
    coarse = Field(rng.standard_normal((cells + 3, cells + 3), dtype=np.float32),
                   n / cells, n / cells)
    return coarse.sample(_centres(0, n), _centres(0, n))


def plan_slide(spec: PatientSpec, size: Size, seed: int) -> SlideLayout:
    """Lay out the slide of a CRC patient: pieces, regions, fields and thresholds.

    Raises
    ------
    SynthError
        If the patient is not a CRC patient or the size gives no pixels.
    """
    if spec.group != "CRC":
        raise SynthError(f"patient {spec.patient_id} is {spec.group}; only CRC has a slide")
    extent, mpp = size.wsi_base_px, size.wsi_base_mpp
    if extent < 64 or mpp <= 0:
        raise SynthError(f"size {size.name!r} has a slide of {extent} px at {mpp} mpp")
    rng = patient_rng(seed, spec.index, "wsi")
    n = 64
    tissue, tumour, muscle = _coarse_fields(rng, n)
    cell = extent / n
    um = 1.0 / mpp
    gland = _noise(rng, extent, _GLAND_UM * um, _GLAND_UM * um)
    gland_fine = _noise(rng, extent, _GLAND_FINE_UM * um, _GLAND_FINE_UM * um)
    gland_fine = Field(gland_fine.values * np.float32(0.45), gland_fine.spacing_y_px,
                       gland_fine.spacing_x_px)
    long_um, short_um = (_FIBRE_LONG_UM, _FIBRE_SHORT_UM)
    if rng.random() < 0.5:
        long_um, short_um = short_um, long_um
    stain = _stain(rng, spec)
    layout = SlideLayout(
        extent_px=extent, mpp=mpp,
        tissue=Field(tissue, cell, cell), tumour=Field(tumour, cell, cell),
        muscle=Field(muscle, cell, cell), gland=gland, gland_fine=gland_fine,
        nuclei=_noise(rng, extent, _NUCLEUS_UM * um, _NUCLEUS_UM * um),
        fibre=_noise(rng, extent, short_um * um, long_um * um),
        edge=_noise(rng, extent, _EDGE_UM * um, _EDGE_UM * um),
        stroma_cut=0.0, rim_cut=0.0, lumen_cut=0.0,
        crypt_period_px=_CRYPT_PERIOD_UM * um,
        crypt_phase=(float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi))),
        stain=stain, lut=colour_table(stain), stroma_fraction=spec.crc.stroma_fraction,
        scan_delay_days=int(rng.integers(2, 8)), scan_minute=int(rng.integers(0, 480)),
    )
    return _with_cuts(layout)


def _stain(rng: np.random.Generator, spec: PatientSpec) -> tuple[float, float, float]:
    red, green, blue = (s + float(j) for s, j in zip(spec.centre.stain_shift,
                                                      rng.uniform(-2.0, 2.0, size=3),
                                                      strict=True))
    return red, green, blue


def _with_cuts(layout: SlideLayout) -> SlideLayout:
    """Set the gland thresholds so that stroma covers ``stroma_fraction`` of the tumour."""
    stride = max(_QUANTILE_STRIDE_UM / layout.mpp, 1.0)
    coords = np.arange(stride / 2, layout.extent_px, stride, dtype=np.float32)
    inside = (layout.tumour.sample(coords, coords) > 0) & (
        layout.tissue.sample(coords, coords) > 0)
    if inside.sum() < 50:
        raise SynthError(f"slide of {layout.extent_px} px has no room for a tumour region")
    values = (layout.gland.sample(coords, coords)
              + layout.gland_fine.sample(coords, coords))[inside]
    s = layout.stroma_fraction
    epithelium = 1.0 - s
    cuts = np.quantile(values, [s, 1.0 - epithelium * (1.0 - _RIM_SHARE),
                                1.0 - epithelium * _LUMEN_SHARE])
    return replace(layout, stroma_cut=float(cuts[0]), rim_cut=float(cuts[1]),
                   lumen_cut=float(cuts[2]))


def _bounded(field: Field, y0: int, y1: int, x0: int, x1: int,
             margin: float = 0.0) -> bool | None:
    """True or False where the field is above or below 0 on the whole window, else None."""
    low, high = field.bound(y0, y1, x0, x1)
    if low > margin:
        return True
    if high < -margin:
        return False
    return None


def region_window(layout: SlideLayout, y0: int, y1: int, x0: int, x1: int) -> U8:
    """Region labels (BACKGROUND, MUCOSA, MUSCLE, TUMOUR) of a level-0 pixel window."""
    shape = (y1 - y0, x1 - x0)
    in_tissue = _bounded(layout.tissue, y0, y1, x0, x1, _EDGE_MARGIN)
    if in_tissue is False:
        return np.zeros(shape, dtype=np.uint8)
    region = np.full(shape, MUCOSA, dtype=np.uint8)
    for field, label in ((layout.muscle, MUSCLE), (layout.tumour, TUMOUR)):
        inside = _bounded(field, y0, y1, x0, x1)
        if inside is None:
            region[field.window(y0, y1, x0, x1) > 0] = label
        elif inside:
            region[...] = label
    if in_tissue is None:
        tissue = layout.tissue.window(y0, y1, x0, x1)
        tissue += _EDGE_AMPLITUDE * layout.edge.window(y0, y1, x0, x1)
        region[tissue <= 0] = BACKGROUND
    return region


def region_labels(layout: SlideLayout, downsample: int) -> U8:
    """Region labels of the whole slide, one per ``downsample`` x ``downsample`` block.

    Each label is the region at the block's centre; meant for tests and QA at a
    low pyramid level.
    """
    coords = (np.arange(0, layout.extent_px, downsample, dtype=np.float32)
              + np.float32(downsample / 2))
    tissue = layout.tissue.sample(coords, coords)
    tissue += _EDGE_AMPLITUDE * layout.edge.sample(coords, coords)
    region = np.full(tissue.shape, MUCOSA, dtype=np.uint8)
    region[layout.muscle.sample(coords, coords) > 0] = MUSCLE
    region[layout.tumour.sample(coords, coords) > 0] = TUMOUR
    region[tissue <= 0] = BACKGROUND
    return region


def render_window(layout: SlideLayout, y0: int, y1: int, x0: int, x1: int) -> U8:
    """RGB pixels (rows, cols, 3) of the level-0 window ``y0:y1`` x ``x0:x1``.

    Raises
    ------
    SynthError
        If the window is empty or reaches outside the slide.
    """
    if not (0 <= y0 < y1 <= layout.extent_px and 0 <= x0 < x1 <= layout.extent_px):
        raise SynthError(f"window rows {y0}:{y1}, cols {x0}:{x1} is outside the "
                         f"{layout.extent_px} px slide")
    region = region_window(layout, y0, y1, x0, x1)
    if not region.any():
        flat: U8 = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        flat[...] = layout.lut[_BG * _SHADES + _SHADES // 2]
        return flat
    nuclei = layout.nuclei.window(y0, y1, x0, x1)
    fibre = layout.fibre.window(y0, y1, x0, x1)
    classes = np.zeros(region.shape, dtype=np.uint8)
    if (region == TUMOUR).any():
        np.copyto(classes, _tumour(layout, y0, y1, x0, x1, nuclei), where=region == TUMOUR)
    if (region == MUSCLE).any():
        muscle = np.full(region.shape, _MUSCLE, dtype=np.uint8)
        muscle[(nuclei > 1.8) & (fibre > 0.5)] = _MUSCLE_NUC
        np.copyto(classes, muscle, where=region == MUSCLE)
    if (region == MUCOSA).any():
        np.copyto(classes, _mucosa(layout, y0, y1, x0, x1, nuclei), where=region == MUCOSA)
    fibre *= np.float32(_SHADES / 5.0)
    fibre += np.float32(_SHADES / 2.0)
    np.clip(fibre, 0, _SHADES - 1, out=fibre)
    index = classes.astype(np.uint16) * _SHADES + fibre.astype(np.uint16)
    index[region == BACKGROUND] = _BG * _SHADES + _SHADES // 2
    out: U8 = layout.lut[index]
    return out


def _tumour(layout: SlideLayout, y0: int, y1: int, x0: int, x1: int, nuclei: F32) -> U8:
    """Tumour: gland-forming epithelium (nuclear rim, lumen) in fibrous stroma."""
    gland = layout.gland.window(y0, y1, x0, x1)
    gland += layout.gland_fine.window(y0, y1, x0, x1)
    out = np.full(gland.shape, _STROMA, dtype=np.uint8)
    out[nuclei > 1.9] = _STROMA_NUC
    epithelium = gland >= layout.stroma_cut
    out[epithelium] = _EPI
    out[epithelium & ((gland < layout.rim_cut) | (nuclei > 1.2))] = _EPI_NUC
    out[gland >= layout.lumen_cut] = _LUMEN
    return out


def _mucosa(layout: SlideLayout, y0: int, y1: int, x0: int, x1: int, nuclei: F32) -> U8:
    """Normal mucosa: a regular array of crypts in lamina propria with lymphocytes."""
    k = np.float32(2 * math.pi / layout.crypt_period_px)
    cy = np.cos(_centres(y0, y1) * k + np.float32(layout.crypt_phase[0]))
    cx = np.cos(_centres(x0, x1) * k + np.float32(layout.crypt_phase[1]))
    crypt = cy[:, None] + cx[None, :]
    crypt += np.float32(0.5) * layout.gland_fine.window(y0, y1, x0, x1)
    out = np.full(crypt.shape, _LAMINA, dtype=np.uint8)
    out[nuclei > 1.3] = _LYMPH
    out[crypt > 0.5] = _CRYPT_NUC
    out[crypt > 0.8] = _CRYPT
    out[crypt > 1.55] = _LUMEN
    return out


def colour_table(stain: tuple[float, float, float]) -> U8:
    """The colour of every (pixel class, shade) pair, with a stain shift, as uint8 RGB."""
    steps = (np.arange(_SHADES, dtype=np.float32) - _SHADES / 2.0) * np.float32(5.0 / _SHADES)
    rgb = _PALETTE[:, None, :] + _TEXTURE[:, None, :] * steps[None, :, None]
    rgb += np.asarray(stain, dtype=np.float32)
    table: U8 = np.clip(rgb + np.float32(0.5), 0, 255).astype(np.uint8).reshape(-1, 3)
    return table
