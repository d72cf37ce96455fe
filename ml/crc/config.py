"""Configuration of model A: crop geometry, tile reading, network sizes, clinical statistics.

One frozen :class:`CrcConfig` decides how inputs are prepared and how the network is
built. It is stored in the package (``configs/config.json``) with the clinical
standardisation statistics of the training split, so inference prepares inputs
exactly as training did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ml.errors import ConfigError, OncopacsError
from ml.wsi_tiles import Tiles

PREPROCESSING_VERSION = 2
"""Bumped whenever the crop or tile preparation code changes (invalidates caches)."""


class CrcError(OncopacsError):
    """Model A cannot prepare its inputs, train, load or predict (names what is wrong)."""


@dataclass(frozen=True)
class CtCrops:
    """Liver and tumour crops from the portal-venous CT and its labels.

    Attributes
    ----------
    liver_spacing_mm, liver_shape_vox
        Isotropic spacing and ``(z, y, x)`` shape (voxels) of the box centred on the
        liver's bounding box.
    tumour_spacing_mm, tumour_shape_vox
        The same for the box centred on the primary tumour.
    hu_scale, hu_clip
        HU are taken relative to the median liver HU, divided by ``hu_scale`` and
        clipped to ``[-hu_clip, hu_clip]`` (a window of +-``hu_scale * hu_clip`` HU).
    """

    liver_spacing_mm: float = 6.0
    liver_shape_vox: tuple[int, int, int] = (20, 28, 36)
    tumour_spacing_mm: float = 5.0
    tumour_shape_vox: tuple[int, int, int] = (16, 16, 16)
    hu_scale: float = 40.0
    hu_clip: float = 4.0

    def __post_init__(self) -> None:
        for name in ("liver_shape_vox", "tumour_shape_vox"):
            shape = tuple(int(v) for v in getattr(self, name))
            if len(shape) != 3 or min(shape) < 1:
                raise ConfigError(f"model A ct.{name} must be three positive sizes, got {shape}")
            object.__setattr__(self, name, shape)
        if self.liver_spacing_mm <= 0 or self.tumour_spacing_mm <= 0 or self.hu_scale <= 0:
            raise ConfigError("model A ct spacings and hu_scale must be positive")


@dataclass(frozen=True)
class TileReading:
    """Which H&E tiles the model reads (see :class:`ml.wsi_tiles.Tiles`)."""

    mpp: float = 8.0
    tile_px: int = 32
    max_tiles: int = 128
    min_tissue_fraction: float = 0.5
    batch_size: int = 64

    def spec(self, seed: int = 0) -> Tiles:
        """The :class:`ml.wsi_tiles.Tiles` to read a slide with."""
        return Tiles(target_mpp=self.mpp, tile_px=self.tile_px,
                     min_tissue_fraction=self.min_tissue_fraction, max_tiles=self.max_tiles,
                     sample_seed=seed, batch_size=self.batch_size)


@dataclass(frozen=True)
class ClinicalStats:
    """Means and SDs (training split) that standardise the clinical fields."""

    t_mean: float = 2.8
    t_sd: float = 0.9
    n_mean: float = 0.6
    n_sd: float = 0.75
    log_cea_mean: float = 0.92
    log_cea_sd: float = 0.8
    log_ca19_9_mean: float = 2.48
    log_ca19_9_sd: float = 0.7
    age_mean: float = 67.0
    age_sd: float = 10.0


@dataclass(frozen=True)
class NetworkSizes:
    """Widths of the encoders and the fusion block.

    Attributes
    ----------
    tile_arch
        timm architecture of the tile encoder (created with ``pretrained=False``).
    tile_checkpoint
        Optional local path of tile-encoder weights (a ``state_dict``) loaded at build.
    """

    d_model: int = 32
    ct_channels: int = 8
    tumour_channels: int = 8
    tile_arch: str = "test_byobnet"
    tile_checkpoint: str | None = None
    tile_dim: int = 64
    attention_dim: int = 32
    clinical_hidden: int = 32
    heads: int = 4
    fusion_layers: int = 1
    dropout: float = 0.1
    modality_dropout: float = 0.2
    intervals: int = 6
    interval_months: float = 6.0


@dataclass(frozen=True)
class CrcConfig:
    """Everything that decides how model A prepares inputs and is built."""

    ct: CtCrops = field(default_factory=CtCrops)
    tiles: TileReading = field(default_factory=TileReading)
    clinical: ClinicalStats = field(default_factory=ClinicalStats)
    network: NetworkSizes = field(default_factory=NetworkSizes)
    phase: str = "venous"

    @property
    def horizon_months(self) -> float:
        """End of the last hazard interval (the 3-year horizon)."""
        return self.network.intervals * self.network.interval_months

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the package's ``configs/config.json``)."""
        return dataclasses.asdict(self)

    def preprocessing_hash(self) -> str:
        """Short hash of what decides a cached example (crops, tiles, phase)."""
        blob = json.dumps({"version": PREPROCESSING_VERSION, "ct": dataclasses.asdict(self.ct),
                           "tiles": dataclasses.asdict(self.tiles), "phase": self.phase},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrcConfig:
        """Build from :meth:`to_dict` output.

        Raises
        ------
        ConfigError
            If a section or field is unknown or has the wrong type.
        """
        parts: dict[str, Any] = {}
        sections = {"ct": CtCrops, "tiles": TileReading, "clinical": ClinicalStats,
                    "network": NetworkSizes}
        for key, value in data.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise ConfigError(f"model A config section {key!r} must be an object")
                try:
                    parts[key] = sections[key](**value)
                except TypeError as exc:
                    raise ConfigError(f"model A config section {key!r}: {exc}") from exc
            elif key == "phase":
                parts[key] = str(value)
            else:
                raise ConfigError(f"model A config has an unknown section {key!r}")
        return cls(**parts)
