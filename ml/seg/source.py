"""Where a scorer's structure labels come from.

``oncopacs evaluate`` places the model crops on the cohort's ground-truth labels by
default: that validates the model alone. With ``--segmentation PKG`` it runs that
segmentation package on the portal-venous series instead, as the service does, so
the figures cover the segmentation in front of the model too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ml.manifest import Patient
from ml.seg.data import CtVolume, load_labels
from ml.seg.infer import segment
from ml.seg.package import load_package

LabelFn = Callable[[Patient, CtVolume], np.ndarray]
"""Labels (``ml.seg.CLASSES`` values) of a patient on the grid of one of its CT series."""


def ground_truth(patient: Patient, ct: CtVolume) -> np.ndarray:
    """The cohort's ground-truth labels, checked to lie on ``ct``'s grid."""
    return load_labels(patient.labels_path(), ct)


@dataclass(frozen=True)
class LabelSource:
    """A label function and the sentence the evaluation report says about it."""

    labels: LabelFn
    note: str
    segmented: bool


def label_source(segmentation: Path | None, device: torch.device) -> LabelSource:
    """Ground truth when ``segmentation`` is None, else that package's output.

    Raises
    ------
    ml.seg.package.PackageError
        If the segmentation package cannot be loaded.
    """
    if segmentation is None:
        return LabelSource(ground_truth, "Crops placed on the cohort's ground-truth labels "
                           "(this validates the model, not the segmentation in front of "
                           "it).", segmented=False)
    package = load_package(segmentation)

    def segmented(patient: Patient, ct: CtVolume) -> np.ndarray:
        return segment(ct.hu, ct.spacing_mm, package, device)

    return LabelSource(segmented, f"Crops placed on the output of segmentation package "
                       f"{package.name} (sha256 {package.sha256[:16]}) on the portal-venous "
                       "series, as in the service (image comparators see the same "
                       "crops).", segmented=True)
