"""A synthetic contrast-enhanced abdominal CT phantom, in plain numpy.

Shapes are laid out in physical millimetres (patient LPS: x to the patient's
left, y posterior, z superior) and rasterised onto any grid, so the same
patient looks the same at 64 or 512 pixels. Heights are fractions ``u`` of the
scanned z extent (0 = pelvis, 1 = liver dome).

Each voxel gets one tissue code (finer than the labels: fat, muscle and bone
are all "body"); a phase's image is a per-tissue HU table, plus the planted
signal, plus the centre's calibration shift and noise:

- CRC: the liver carries a smooth random texture whose standard deviation over
  the liver is exactly ``crc.liver_texture_hu`` (the same field in both
  phases) and ``crc.liver_foci`` hypodense spheres (35 HU below the liver);
  the primary tumour is a mass on the colon wall at ``crc.site``.
- PDAC: the tumour sits in the pancreas at ``pdac.site`` and its mean HU is
  exactly ``pdac.tumour_hu_arterial`` / ``pdac.tumour_hu_venous`` before the
  centre's shift (the noise is made zero-mean over the tumour).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from ml.errors import SynthError
from ml.synth.centres import Centre
from ml.synth.latent import PatientSpec
from ml.synth.sizes import Size

logger = logging.getLogger(__name__)

LABELS: dict[str, int] = {
    "background": 0, "liver": 1, "pancreas": 2, "tumour": 3, "vessels": 4,
    "spleen": 5, "kidneys": 6, "body": 7,
}
"""Ground-truth label values: 0 is outside the body; "vessels" is the aorta (with
the iliac arteries) and the portal vein; "body" is every other tissue (fat, muscle,
bone, bowel and its content)."""

PHASES = ("arterial", "venous")
Z_TOP_MM = -60.0
FOCUS_DROP_HU = 35.0
TEXTURE_SIGMA_MM = 9.0

# Tissue codes, their label and their HU in the (arterial, venous) phase.
AIR, SUBQ_FAT, MUSCLE, FAT, BONE, CSF, AORTA, IVC, KIDNEY, PORTAL = range(10)
PANCREAS, SPLEEN, LIVER, FOCUS, WALL, FLUID, GAS, TUMOUR = range(10, 18)
_TISSUES: dict[int, tuple[str, float, float]] = {
    AIR: ("background", -1000.0, -1000.0), SUBQ_FAT: ("body", -100.0, -100.0),
    MUSCLE: ("body", 55.0, 60.0), FAT: ("body", -100.0, -100.0),
    BONE: ("body", 400.0, 400.0), CSF: ("body", 15.0, 15.0),
    AORTA: ("vessels", 300.0, 160.0), IVC: ("body", 90.0, 150.0),
    KIDNEY: ("kidneys", 180.0, 160.0), PORTAL: ("vessels", 130.0, 170.0),
    PANCREAS: ("pancreas", 120.0, 100.0), SPLEEN: ("spleen", 110.0, 120.0),
    LIVER: ("liver", 70.0, 110.0), FOCUS: ("liver", 70.0 - FOCUS_DROP_HU, 110.0 - FOCUS_DROP_HU),
    WALL: ("body", 60.0, 80.0), FLUID: ("body", 10.0, 12.0), GAS: ("body", -900.0, -900.0),
    TUMOUR: ("tumour", 85.0, 95.0),
}
_LABEL_OF = np.array([LABELS[_TISSUES[t][0]] for t in range(len(_TISSUES))], dtype=np.uint8)

Vec = tuple[float, float, float]
Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """A CT voxel grid: ``(z, y, x)`` shape, centre of the first voxel and spacing in mm."""

    shape: tuple[int, int, int]
    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]

    def axis_mm(self, axis: int) -> np.ndarray:
        """Voxel-centre coordinates along ``axis`` (0 = z, 1 = y, 2 = x)."""
        n = self.shape[axis]
        return (self.origin_mm[axis] + self.spacing_mm[axis] * np.arange(n)).astype(np.float32)


def ct_grid(size: Size, centre: Centre) -> Grid:
    """The grid a centre's scanner reconstructs at ``size``.

    Raises
    ------
    SynthError
        If the slice thickness is not positive or gives fewer than 4 slices.
    """
    thickness = size.slice_thickness_mm(centre.slice_thickness_mm)
    if thickness <= 0:
        raise SynthError(f"centre {centre.code} has slice thickness {thickness} mm at "
                         f"size {size.name}; it must be positive")
    slices = round(size.ct_z_extent_mm / thickness)
    if slices < 4:
        raise SynthError(f"size {size.name} gives {slices} slices of {thickness} mm for "
                         f"centre {centre.code}; at least 4 are needed")
    pixel = size.ct_fov_mm / size.ct_matrix_px
    first = -size.ct_fov_mm / 2.0 + pixel / 2.0
    z0 = Z_TOP_MM - (slices - 1) * thickness
    return Grid((slices, size.ct_matrix_px, size.ct_matrix_px), (z0, first, first),
                (thickness, pixel, pixel))


@dataclass(frozen=True)
class Phantom:
    """One patient's anatomy on a grid, before any phase is rendered."""

    grid: Grid
    tissue: np.ndarray
    texture_hu: np.ndarray | None
    tumour_hu: tuple[float, float]

    @property
    def labels(self) -> np.ndarray:
        """The uint8 ground-truth label volume (values of ``LABELS``)."""
        out: np.ndarray = _LABEL_OF[self.tissue]
        return out


class _Canvas:
    """Paints shapes into a tissue volume; a shape only covers the tissues it may replace."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.tissue = np.zeros(grid.shape, dtype=np.uint8)
        self.axes = [grid.axis_mm(a) for a in range(3)]
        self.z_lo = float(self.axes[0][0])
        self.height = max(float(self.axes[0][-1]) - self.z_lo, 1.0)

    def z(self, u: float) -> float:
        """Physical z (mm) of the height fraction ``u``."""
        return self.z_lo + u * self.height

    def snap(self, point: Vec) -> Vec:
        """The voxel centre nearest ``point`` (x, y, z), so small shapes are never missed."""
        out = []
        for value, axis in zip(point, (2, 1, 0), strict=True):
            coords = self.axes[axis]
            out.append(float(coords[int(np.abs(coords - value).argmin())]))
        return out[0], out[1], out[2]

    def _box(self, lo: Vec, hi: Vec) -> Box | None:
        sl = []
        for axis, (a, b) in zip((0, 1, 2), ((lo[2], hi[2]), (lo[1], hi[1]), (lo[0], hi[0])),
                                strict=True):
            coords = self.axes[axis]
            i0, i1 = int(np.searchsorted(coords, a)), int(np.searchsorted(coords, b, "right"))
            if i0 >= i1:
                return None
            sl.append(slice(i0, i1))
        return sl[0], sl[1], sl[2]

    def _paint(self, box: Box | None, inside: np.ndarray | None, code: int,
               into: Iterable[int] | None) -> None:
        if box is None or inside is None:
            return
        block = self.tissue[box]
        if into is not None:
            inside = inside & np.isin(block, list(into))
        block[inside] = code

    def _coords(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        z = self.axes[0][box[0]][:, None, None]
        y = self.axes[1][box[1]][None, :, None]
        x = self.axes[2][box[2]][None, None, :]
        return x, y, z

    def ellipsoid(self, c: Vec, semi: Vec, code: int, into: Iterable[int] | None = None) -> None:
        """Paint an axis-aligned ellipsoid centred at ``c`` (x, y, z mm)."""
        lo = (c[0] - semi[0], c[1] - semi[1], c[2] - semi[2])
        box = self._box(lo, (c[0] + semi[0], c[1] + semi[1], c[2] + semi[2]))
        inside = None
        if box is not None:
            x, y, z = self._coords(box)
            r2 = ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2
            inside = r2 + ((z - c[2]) / semi[2]) ** 2 <= 1.0
        self._paint(box, inside, code, into)

    def column(self, cx: float, cy: float, a: float, b: float, u0: float, u1: float,
               code: int, into: Iterable[int] | None = None) -> None:
        """Paint an elliptic cylinder along z between heights ``u0`` and ``u1``."""
        box = self._box((cx - a, cy - b, self.z(u0)), (cx + a, cy + b, self.z(u1)))
        inside = None
        if box is not None:
            x, y, _ = self._coords(box)
            disc = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
            inside = np.broadcast_to(disc, self.tissue[box].shape)
        self._paint(box, inside, code, into)

    def tube(self, points: list[Vec], radius: float, code: int,
             into: Iterable[int] | None = None) -> None:
        """Paint capsules of ``radius`` mm along a polyline of (x, y, u) points."""
        pts = [np.array([p[0], p[1], self.z(p[2])], dtype=np.float32) for p in points]
        for a, b in itertools.pairwise(pts):
            lo = np.minimum(a, b) - radius
            hi = np.maximum(a, b) + radius
            box = self._box((lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2]))
            inside = None
            if box is not None:
                x, y, z = self._coords(box)
                d = b - a
                t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / float(d @ d)
                t = np.clip(t, 0.0, 1.0)
                dist2 = (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2
                inside = dist2 + (z - a[2] - t * d[2]) ** 2 <= radius**2
            self._paint(box, inside, code, into)


@dataclass(frozen=True)
class _Body:
    a: float
    b: float
    fat: float
    dx: float
    dy: float
    organ: float


def _draw_body(rng: np.random.Generator) -> _Body:
    return _Body(a=float(rng.uniform(138.0, 158.0)), b=float(rng.uniform(100.0, 118.0)),
                 fat=float(rng.uniform(12.0, 30.0)), dx=float(rng.uniform(-6.0, 6.0)),
                 dy=float(rng.uniform(-6.0, 6.0)), organ=float(rng.uniform(0.92, 1.08)))


def _paint_wall_and_spine(cv: _Canvas, bd: _Body) -> float:
    """Body wall, spine, pelvis, muscles and great vessels; returns the spine's y."""
    cv.column(0.0, 0.0, bd.a, bd.b, -1.0, 2.0, SUBQ_FAT)
    cv.column(0.0, 0.0, bd.a - bd.fat, bd.b - bd.fat, -1.0, 2.0, MUSCLE)
    cv.column(0.0, 0.0, bd.a - bd.fat - 11.0, bd.b - bd.fat - 11.0, -1.0, 2.0, FAT)
    yv = 0.4 * bd.b
    cv.column(0.0, yv, 18.0, 17.0, -1.0, 2.0, BONE)
    cv.column(0.0, yv + 28.0, 12.0, 12.0, -1.0, 2.0, BONE)
    cv.column(0.0, yv + 28.0, 6.0, 6.0, -1.0, 2.0, CSF, into=[BONE])
    for side in (-1.0, 1.0):
        cv.column(side * 34.0, yv + 32.0, 20.0, 14.0, -1.0, 2.0, MUSCLE, into=[FAT, MUSCLE])
        cv.column(side * 32.0, yv - 2.0, 14.0, 13.0, -1.0, 0.5, MUSCLE, into=[FAT])
        cv.tube([(side * 70.0, yv + 12.0, 0.3), (side * 95.0, yv - 30.0, -0.1)], 10.0, BONE,
                into=[FAT, MUSCLE])
        cv.tube([(12.0, yv - 31.0, 0.34), (side * 45.0, yv - 25.0, -0.1)], 7.0, AORTA,
                into=[FAT, MUSCLE])
    cv.column(12.0, yv - 31.0, 11.0, 11.0, 0.33, 2.0, AORTA, into=[FAT])
    cv.column(-22.0 + bd.dx, yv - 30.0, 12.0, 9.0, 0.33, 0.9, IVC, into=[FAT])
    return yv


def _paint_organs(cv: _Canvas, bd: _Body, yv: float) -> None:
    """Kidneys, portal vein, pancreas, spleen, liver, stomach and bowel."""
    s, dx, dy, height = bd.organ, bd.dx, bd.dy, cv.height
    for side, u in ((-1.0, 0.52), (1.0, 0.56)):
        cv.ellipsoid((side * 0.42 * bd.a, yv + 5.0, cv.z(u)), (24.0 * s, 30.0 * s, 0.14 * height),
                     KIDNEY, into=[FAT])
    cv.tube([(-5.0 + dx, -8.0 + dy, 0.63), (-45.0 + dx, -10.0 + dy, 0.78)], 7.0, PORTAL,
            into=[FAT])
    head = (-30.0 + dx, -5.0 + dy, 0.62)
    cv.tube([head, (-3.0 + dx, -22.0 + dy, 0.63)], 15.0 * s, PANCREAS, into=[FAT])
    cv.tube([(-3.0 + dx, -22.0 + dy, 0.63), (37.0 + dx, -15.0 + dy, 0.65),
             (0.5 * bd.a, 18.0 + dy, 0.67)], 11.0 * s, PANCREAS, into=[FAT])
    cv.ellipsoid((0.6 * bd.a, 0.3 * bd.b, cv.z(0.8)), (25.0 * s, 38.0 * s, 0.13 * height),
                 SPLEEN, into=[FAT])
    cv.ellipsoid((-0.42 * bd.a + dx, -0.12 * bd.b + dy, cv.z(0.8)),
                 (0.5 * bd.a * s, 0.62 * bd.b * s, 0.26 * height), LIVER, into=[FAT])
    cv.ellipsoid((8.0 + dx, -0.5 * bd.b + dy, cv.z(0.86)),
                 (0.32 * bd.a * s, 0.22 * bd.b * s, 0.12 * height), LIVER, into=[FAT])
    stomach = (0.3 * bd.a, -0.35 * bd.b, cv.z(0.85))
    cv.ellipsoid(stomach, (0.22 * bd.a, 0.25 * bd.b, 0.1 * height), WALL, into=[FAT])
    cv.ellipsoid(stomach, (0.22 * bd.a - 5.0, 0.25 * bd.b - 5.0, 0.1 * height - 5.0), FLUID,
                 into=[WALL])
    duodenum = [(-52.0 + dx, -15.0 + dy, 0.7), (-52.0 + dx, 0.0 + dy, 0.56)]
    cv.tube(duodenum, 11.0, WALL, into=[FAT])
    cv.tube(duodenum, 6.0, FLUID, into=[WALL])
    for path, radius in _colon_paths(bd):
        cv.tube(path, radius, WALL, into=[FAT])
        cv.tube(path, radius - 5.0, GAS, into=[WALL])


def _colon_paths(bd: _Body) -> list[tuple[list[Vec], float]]:
    right, left = -0.68 * bd.a, 0.7 * bd.a
    return [
        ([(right, -12.0, 0.08), (right, -12.0, 0.52)], 22.0),
        ([(right, -12.0, 0.52), (-40.0, -0.55 * bd.b, 0.55), (40.0, -0.55 * bd.b, 0.57),
          (left, 0.0, 0.62)], 17.0),
        ([(left, 0.0, 0.62), (left, 0.0, 0.12)], 20.0),
        ([(left, 0.0, 0.12), (40.0, -40.0, 0.2), (0.0, 5.0, 0.16), (0.0, 10.0, -0.05)], 18.0),
    ]


def _tumour_centre(spec: PatientSpec, bd: _Body) -> tuple[Vec, float, list[int]]:
    """Centre (x, y, u), radius and replaceable tissues of the primary tumour.

    Raises
    ------
    SynthError
        If the latent's site is not one the phantom knows.
    """
    if spec.group == "CRC":
        crc = spec.crc
        sites: dict[str, Vec] = {
            "right colon": (-0.68 * bd.a + 18.0, -12.0, 0.3),
            "left colon": (0.7 * bd.a - 16.0, 0.0, 0.4),
            "rectum": (0.0, 10.0 - 14.0, 0.06),
        }
        if crc.site not in sites:
            raise SynthError(f"patient {spec.patient_id} has unknown CRC site {crc.site!r}")
        return sites[crc.site], crc.tumour_radius_mm, [FAT, WALL, GAS]
    pdac = spec.pdac
    sites = {
        "head": (-30.0 + bd.dx, -5.0 + bd.dy, 0.62),
        "body": (37.0 + bd.dx, -15.0 + bd.dy, 0.65),
        "tail": (0.46 * bd.a, 14.0 + bd.dy, 0.665),
    }
    if pdac.site not in sites:
        raise SynthError(f"patient {spec.patient_id} has unknown pancreas site {pdac.site!r}")
    return sites[pdac.site], pdac.tumour_radius_mm, [FAT, PANCREAS, WALL, FLUID]


def _paint_foci(cv: _Canvas, count: int, rng: np.random.Generator) -> None:
    """Paint ``count`` hypodense spheres (radius 4-8 mm) centred on random liver voxels."""
    liver = np.flatnonzero(cv.tissue == LIVER)
    if count and liver.size == 0:
        raise SynthError("the phantom has no liver voxels to place liver foci in")
    for _ in range(count):
        flat = int(liver[int(rng.integers(liver.size))])
        k, j, i = np.unravel_index(flat, cv.grid.shape)
        centre = (float(cv.axes[2][i]), float(cv.axes[1][j]), float(cv.axes[0][k]))
        radius = float(rng.uniform(4.0, 8.0))
        cv.ellipsoid(centre, (radius, radius, radius), FOCUS, into=[LIVER])
        cv.tissue[k, j, i] = FOCUS


def _liver_texture(tissue: np.ndarray, grid: Grid, sd_hu: float,
                   rng: np.random.Generator) -> np.ndarray:
    """A smooth field, zero outside the liver, with mean 0 and sd ``sd_hu`` over the liver."""
    liver = _LABEL_OF[tissue] == LABELS["liver"]
    if liver.sum() < 2:
        raise SynthError("the phantom has fewer than 2 liver voxels; no texture can be drawn")
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(liver))
    white = rng.standard_normal(tuple(s.stop - s.start for s in box), dtype=np.float32)
    sigma = [TEXTURE_SIGMA_MM / sp for sp in grid.spacing_mm]
    smooth = gaussian_filter(white, sigma=sigma, mode="reflect")
    mask = liver[box]
    values = smooth[mask].astype(np.float64)
    values = (values - values.mean()) / max(float(values.std()), 1e-12) * sd_hu
    field = np.zeros(grid.shape, dtype=np.float32)
    field[box][mask] = values.astype(np.float32)
    return field


def build_phantom(spec: PatientSpec, grid: Grid, rng: np.random.Generator) -> Phantom:
    """Lay out one patient's abdomen on ``grid``, drawing the anatomy from ``rng``.

    Raises
    ------
    SynthError
        If the latent names an unknown tumour site or the grid leaves no liver.
    """
    bd = _draw_body(rng)
    cv = _Canvas(grid)
    yv = _paint_wall_and_spine(cv, bd)
    _paint_organs(cv, bd, yv)
    centre, radius, into = _tumour_centre(spec, bd)
    c = cv.snap((centre[0], centre[1], cv.z(centre[2])))
    cv.ellipsoid(c, (radius, radius, radius), TUMOUR, into=into)
    k, j, i = (int(np.abs(cv.axes[a] - v).argmin()) for a, v in ((0, c[2]), (1, c[1]), (2, c[0])))
    cv.tissue[k, j, i] = TUMOUR
    texture = None
    if spec.group == "CRC":
        _paint_foci(cv, spec.crc.liver_foci, rng)
        texture = _liver_texture(cv.tissue, grid, spec.crc.liver_texture_hu, rng)
        tumour_hu = (_TISSUES[TUMOUR][1], _TISSUES[TUMOUR][2])
    else:
        tumour_hu = (spec.pdac.tumour_hu_arterial, spec.pdac.tumour_hu_venous)
    logger.debug("phantom for patient %d: %d tumour voxels", spec.index,
                 int((cv.tissue == TUMOUR).sum()))
    return Phantom(grid, cv.tissue, texture, tumour_hu)


def render_phase(phantom: Phantom, phase: str, centre: Centre,
                 rng: np.random.Generator | None) -> np.ndarray:
    """The phase's HU volume (float32, ``(z, y, x)``).

    With ``rng`` the centre's calibration shift and Gaussian noise (sd
    ``centre.noise_hu``, made zero-mean over the tumour) are added; without it
    the image is the noise-free phantom.

    Raises
    ------
    SynthError
        If ``phase`` is neither "arterial" nor "venous".
    """
    if phase not in PHASES:
        raise SynthError(f"CT phase must be one of {PHASES}, got {phase!r}")
    column = 1 + PHASES.index(phase)
    table = np.array([_TISSUES[t][column] for t in range(len(_TISSUES))], dtype=np.float32)
    table[TUMOUR] = phantom.tumour_hu[column - 1]
    hu: np.ndarray = table[phantom.tissue]
    if phantom.texture_hu is not None:
        hu += phantom.texture_hu
    if rng is not None:
        noise = rng.standard_normal(hu.shape, dtype=np.float32)
        tumour = phantom.tissue == TUMOUR
        noise[tumour] -= noise[tumour].mean()
        noise *= np.float32(centre.noise_hu)
        noise += np.float32(centre.hu_shift)
        hu += noise
    return hu
