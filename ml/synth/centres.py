"""Per-centre acquisition styles of the synthetic cohort.

Each centre scans with its own vendor, slice thickness, noise and calibration
shift, names its series the way that vendor's protocols do, and stains its
slides a little differently, so that models meet the site effects real
multi-centre data has.
"""

from dataclasses import dataclass

from ml.errors import SynthError


@dataclass(frozen=True)
class Centre:
    """One synthetic hospital."""

    code: str
    institution: str
    manufacturer: str
    model_name: str
    slice_thickness_mm: float
    kvp: float
    kernel: str
    noise_hu: float
    hu_shift: float
    arterial_description: str
    venous_description: str
    wsi_manufacturer: str
    wsi_model_name: str
    stain_shift: tuple[float, float, float]
    stage_iii_share: float

    def describe(self, phase: str) -> str:
        """Series description of a phase ("arterial" or "venous") in this centre's style."""
        template = self.arterial_description if phase == "arterial" else self.venous_description
        return template.format(mm=self.slice_thickness_mm, kernel=self.kernel)


CENTRES: tuple[Centre, ...] = (
    Centre("C1", "Synthetic Centre 1", "SIEMENS", "SOMATOM Definition AS", 3.0, 120.0, "B30f",
           10.0, 0.0, "Abdomen {mm:.1f} {kernel} ART", "Abdomen {mm:.1f} {kernel} PV",
           "Leica Biosystems", "Aperio GT 450", (0.0, 0.0, 0.0), 0.40),
    Centre("C2", "Synthetic Centre 2", "GE MEDICAL SYSTEMS", "Revolution CT", 2.5, 100.0,
           "STANDARD", 12.0, 4.0, "ARTERIAL {mm:.1f}mm", "PORTAL VENOUS {mm:.1f}mm",
           "Hamamatsu", "NanoZoomer S360", (8.0, -4.0, 6.0), 0.45),
    Centre("C3", "Synthetic Centre 3", "Philips", "IQon Spectral CT", 5.0, 120.0, "B",
           14.0, -3.0, "Art Phase {mm:.0f}mm", "Ven Phase {mm:.0f}mm",
           "3DHISTECH", "Pannoramic 1000", (-6.0, 5.0, -4.0), 0.35),
    Centre("C4", "Synthetic Centre 4", "Canon Medical Systems", "Aquilion ONE", 3.0, 120.0,
           "FC08", 11.0, 2.0, "AP {mm:.1f} {kernel}", "PVP {mm:.1f} {kernel}",
           "Philips", "UFS", (4.0, 6.0, -8.0), 0.40),
    Centre("C5", "Synthetic Centre 5", "SIEMENS", "SOMATOM Force", 2.0, 90.0, "Br40d",
           9.0, -2.0, "Art {mm:.1f} {kernel}", "Ven {mm:.1f} {kernel}",
           "Leica Biosystems", "Aperio AT2", (-3.0, -6.0, 3.0), 0.50),
    Centre("C6", "Synthetic Centre 6", "GE MEDICAL SYSTEMS", "Discovery CT750 HD", 5.0, 120.0,
           "SOFT", 15.0, 5.0, "Late Arterial {mm:.0f}mm", "Portal Venous {mm:.0f}mm",
           "Hamamatsu", "NanoZoomer XR", (10.0, 2.0, 2.0), 0.38),
)


def centres(count: int) -> tuple[Centre, ...]:
    """The first ``count`` synthetic centres.

    Raises
    ------
    SynthError
        If ``count`` is not between 1 and the number of defined centres.
    """
    if not 1 <= count <= len(CENTRES):
        raise SynthError(f"--centers must be between 1 and {len(CENTRES)}, got {count}")
    return CENTRES[:count]
