"""Hounsfield units from stored CT pixels (pure numpy; no torch, no MONAI)."""

import numpy as np
from pydicom import Dataset


def slice_hu(ds: Dataset) -> np.ndarray:
    """One CT slice in HU: stored values times RescaleSlope plus RescaleIntercept.

    The CT Image IOD requires both attributes; 1 and 0 stand in where they are absent.
    """
    slope = float(ds.get("RescaleSlope", 1.0))
    intercept = float(ds.get("RescaleIntercept", 0.0))
    return np.asarray(ds.pixel_array, dtype=np.float32) * slope + intercept
