"""Cohort sizes: ``tiny`` keeps tests fast, ``default`` looks like a real study."""

from dataclasses import dataclass

from ml.errors import SynthError


@dataclass(frozen=True)
class Size:
    """Image dimensions of one cohort size."""

    name: str
    ct_matrix_px: int
    ct_fov_mm: float
    ct_z_extent_mm: float
    ct_thickness_factor: float
    wsi_base_px: int
    wsi_tile_px: int
    wsi_levels: int
    wsi_base_mpp: float

    def slice_thickness_mm(self, centre_thickness_mm: float) -> float:
        """A centre's slice thickness at this size (``tiny`` uses thicker slices)."""
        return centre_thickness_mm * self.ct_thickness_factor


SIZES = {
    "tiny": Size("tiny", ct_matrix_px=64, ct_fov_mm=380.0, ct_z_extent_mm=200.0,
                 ct_thickness_factor=3.0, wsi_base_px=1024, wsi_tile_px=256, wsi_levels=3,
                 wsi_base_mpp=4.0),
    "default": Size("default", ct_matrix_px=256, ct_fov_mm=380.0, ct_z_extent_mm=240.0,
                    ct_thickness_factor=1.0, wsi_base_px=6144, wsi_tile_px=256, wsi_levels=4,
                    wsi_base_mpp=1.0),
}


def size(name: str) -> Size:
    """The size called ``name``.

    Raises
    ------
    SynthError
        If no size has that name.
    """
    try:
        return SIZES[name]
    except KeyError:
        raise SynthError(f"--size must be one of {sorted(SIZES)}, got {name!r}") from None
