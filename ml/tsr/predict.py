"""TSR inference from a model package: probability and class of high tumour-stroma ratio.

``TsrPredictor.from_package(path).predict(arterial, venous)`` takes, per phase,
``(volume_hu, spacing_mm, labels)`` or None for an absent phase. ``labels`` is
the segmentation (``ml.seg.CLASSES`` values) on that phase's grid; it may be
None when the other phase's labels share the grid (the phases of a study are
usually reconstructed on one grid).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ml.package import read_package
from ml.train_common import pick_device
from ml.tsr.config import INPUT_NAMES, PHASES, TsrError, config_from_dict
from ml.tsr.data import crop_centre, phase_crop
from ml.tsr.network import TsrNet, build_network

log = logging.getLogger(__name__)

TASK = "pdac-tsr"
PhaseInput = tuple[np.ndarray, tuple[float, float, float], np.ndarray | None]


@dataclass(frozen=True)
class TsrPrediction:
    """One study's result."""

    probability: float
    tsr_class: str
    threshold: float
    inputs_used: list[str]
    inputs_missing: list[str]
    crop_source: dict[str, str]
    model_name: str
    model_version: str
    model_sha256: str


class TsrPredictor:
    """A loaded TSR package on a device."""

    def __init__(self, net: TsrNet, threshold: float, name: str, version: str, sha256: str,
                 device: torch.device) -> None:
        self.net = net.to(device).eval()
        self.threshold = threshold
        self.name = name
        self.version = version
        self.sha256 = sha256
        self.device = device

    @classmethod
    def from_package(cls, path: Path, device: str = "auto") -> TsrPredictor:
        """Load and verify a ``pdac-tsr`` package (GPU when present with ``"auto"``).

        Raises
        ------
        ml.package.PackageError
            If the package is missing, corrupt or for another task.
        ml.errors.ConfigError
            If its config is not a valid TSR config.
        """
        package = read_package(path, TASK)
        config = config_from_dict(package.config, where=str(path))
        net = build_network(config, package.state_dict)
        net.freeze_encoders()
        return cls(net, package.threshold, package.name, package.version, package.sha256,
                   pick_device(device))

    def predict(self, arterial: PhaseInput | None, venous: PhaseInput | None,
                ) -> TsrPrediction:
        """Probability of high TSR from whichever phases are given.

        Raises
        ------
        TsrError
            If no phase the model reads is given, a phase has no labels and none are
            shared, or a volume and its labels do not fit.
        """
        given = {"arterial": arterial, "venous": venous}
        shared = next((g[2] for g in given.values() if g is not None and g[2] is not None),
                      None)
        size = self.net.config.image_size
        images = np.zeros((1, len(PHASES), 3, size, size), np.float32)
        present = np.zeros((1, len(PHASES)), bool)
        sources: dict[str, str] = {}
        for i, phase in enumerate(PHASES):
            item = given[phase]
            if item is None or phase not in self.net.phases:
                continue
            volume, spacing, labels = item
            labels = shared if labels is None else labels
            if labels is None:
                raise TsrError(f"the {phase} CT has no segmentation and no other phase "
                               "shares one; the crop cannot be placed")
            if labels.shape != volume.shape:
                raise TsrError(f"the {phase} CT {volume.shape} and the segmentation "
                               f"{labels.shape} are not on one grid")
            images[0, i] = phase_crop(volume, spacing, labels, self.net.config)
            sources[INPUT_NAMES[phase]] = crop_centre(labels)[1]
            present[0, i] = True
        if not present.any():
            raise TsrError(f"no CT phase was given; the model reads {list(self.net.phases)}")
        cols = [PHASES.index(p) for p in self.net.phases]
        with torch.no_grad():
            logits = self.net(torch.from_numpy(images[:, cols]).to(self.device),
                              torch.from_numpy(present[:, cols]).to(self.device))
            prob = float(torch.softmax(logits, dim=1)[0, 1])
        used = [INPUT_NAMES[p] for i, p in enumerate(PHASES) if present[0, i]]
        missing = [INPUT_NAMES[p] for p in PHASES if INPUT_NAMES[p] not in used]
        return TsrPrediction(
            probability=prob, tsr_class="high TSR" if prob >= self.threshold else "low TSR",
            threshold=self.threshold, inputs_used=used, inputs_missing=missing,
            crop_source=sources, model_name=self.name, model_version=self.version,
            model_sha256=self.sha256)
