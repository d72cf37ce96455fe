"""Model A inference on one patient: CT arrays, H&E tile batches and clinical fields.

Tiles are consumed batch by batch: each batch is encoded and only its embeddings are
kept, so a slide is never held in memory. Any input may be absent; the result says
which were used (``"ct"``, ``"wsi"``, ``"clinical"`` and the clinical field groups
``"tnm"``, ``"cea"``, ``"ca19_9"``, ``"age"``, ``"sex"``, ``"site"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ml.crc.clinical import FIELDS, WIDTH, CrcClinical, clinical_vector
from ml.crc.config import CrcConfig, CrcError
from ml.crc.data import crops_from_volume
from ml.crc.network import CrcInputs, CrcNet, cumulative_incidence, tiles_to_tensor
from ml.package import read_package
from ml.train_common import pick_device
from ml.wsi_tiles import TileBatch, Tiles

__all__ = ["CrcClinical", "CrcPrediction", "CrcPredictor", "SlideTiles"]

TASK = "crc-liver-metastasis"


@dataclass(frozen=True)
class CrcPrediction:
    """Model A's result for one patient.

    Attributes
    ----------
    probability
        Probability of liver metastasis within 3 years.
    risk_group
        ``"high risk"`` when ``probability >= threshold``, else ``"low risk"``.
    hazard, cumulative_incidence
        Per interval (``interval_months`` wide): conditional hazard and cumulative
        incidence by the interval's end; the last is ``cumulative_incidence_36mo``.
    inputs_used, inputs_missing
        Names of the inputs that were / were not available.
    tile_attention
        ``(N,)`` attention weight of every tile read (empty without a slide).
    tile_locations_px
        ``(N, 2)`` level-0 ``x, y`` of each tile, or None when the batches had none.
    """

    probability: float
    risk_group: str
    threshold: float
    hazard: list[float]
    cumulative_incidence: list[float]
    cumulative_incidence_36mo: float
    interval_months: float
    inputs_used: list[str]
    inputs_missing: list[str]
    tile_attention: np.ndarray
    tile_locations_px: np.ndarray | None
    model_name: str
    model_version: str
    model_sha256: str


@dataclass(frozen=True)
class SlideTiles:
    """A slide's tiles as model A's tile encoder saw them (the pixels are not kept).

    Attributes
    ----------
    embeddings
        ``(N, tile_dim)`` tile embeddings on the model's device.
    locations_px
        ``(N, 2)`` level-0 ``x, y`` of each tile, or None when the batches had none.
    size_px
        Level-0 pixels per tile side (0 when unknown).
    """

    embeddings: torch.Tensor
    locations_px: np.ndarray | None
    size_px: int

    @property
    def count(self) -> int:
        """Number of tiles encoded."""
        return int(self.embeddings.shape[0])


class CrcPredictor:
    """A loaded model A package, ready to predict."""

    def __init__(self, net: CrcNet, config: CrcConfig, threshold: float, name: str,
                 version: str, sha256: str, device: torch.device) -> None:
        self.net = net.to(device).eval()
        self.config = config
        self.threshold = threshold
        self.name, self.version, self.sha256 = name, version, sha256
        self.device = device

    @classmethod
    def from_package(cls, path: Path, device: str = "auto") -> CrcPredictor:
        """Load and verify a package (``device``: ``"auto"``, ``"cpu"`` or ``"cuda"``).

        Raises
        ------
        ml.package.PackageError
            If the package is missing, corrupt or for another task.
        CrcError
            If its weights do not fit the network its config describes.
        """
        package = read_package(path, TASK)
        config = CrcConfig.from_dict(package.config)
        net = CrcNet(config)
        try:
            net.load_state_dict(package.state_dict)
        except RuntimeError as exc:
            raise CrcError(f"model package {path}: weights do not fit the network: {exc}") from exc
        return cls(net, config, package.threshold, package.name, package.version,
                   package.sha256, pick_device(device))

    @property
    def tile_spec(self) -> Tiles:
        """How to read a slide's tiles for this model (``ml.wsi_tiles.read_tissue_tiles``)."""
        return self.config.tiles.spec()

    def _ct(self, volume_hu: np.ndarray | None, spacing_mm: tuple[float, float, float] | None,
            labels: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        ct = self.config.ct
        if volume_hu is None:
            return (torch.zeros((1, 2, *ct.liver_shape_vox)),
                    torch.zeros((1, 2, *ct.tumour_shape_vox)), False)
        if spacing_mm is None or labels is None:
            raise CrcError("a CT volume needs its spacing_mm and its labels")
        crop = crops_from_volume(volume_hu, spacing_mm, labels, self.config)
        return (torch.from_numpy(crop.liver)[None], torch.from_numpy(crop.tumour)[None], True)

    def encode_tiles(self, tile_batches: Iterable[np.ndarray | TileBatch]) -> SlideTiles:
        """Encode a slide's tiles batch by batch, keeping only their embeddings.

        Raises
        ------
        CrcError
            If a batch has the wrong shape or type.
        """
        with torch.no_grad():
            emb, where, size_px = self._tiles(tile_batches)
        return SlideTiles(emb, where, size_px)

    def _tiles(self, tile_batches: Iterable[np.ndarray | TileBatch] | None,
               ) -> tuple[torch.Tensor, np.ndarray | None, int]:
        embeddings: list[torch.Tensor] = []
        locations: list[np.ndarray] = []
        size_px = 0
        px = self.config.tiles.tile_px
        for item in tile_batches or ():
            pixels = item.pixels if isinstance(item, TileBatch) else np.asarray(item)
            if isinstance(item, TileBatch):
                locations.append(np.asarray(item.location_px))
                size_px = item.size_px
            if pixels.ndim != 4 or pixels.shape[1:] != (px, px, 3) or pixels.dtype != np.uint8:
                raise CrcError(f"tile batch has shape {pixels.shape} {pixels.dtype}; model A "
                               f"reads uint8 (B, {px}, {px}, 3) tiles")
            if pixels.shape[0] == 0:
                continue
            tiles = tiles_to_tensor(torch.from_numpy(np.ascontiguousarray(pixels)))
            embeddings.append(self.net.encode_tiles(tiles.to(self.device)))
        emb = (torch.cat(embeddings) if embeddings
               else torch.zeros((0, self.config.network.tile_dim), device=self.device))
        count = int(emb.shape[0])
        where = np.concatenate(locations) if locations and len(
            np.concatenate(locations)) == count else None
        return emb, where, size_px

    def predict(self, volume_hu: np.ndarray | None, spacing_mm: tuple[float, float, float] | None,
                labels: np.ndarray | None,
                tile_batches: Iterable[np.ndarray | TileBatch] | None = None,
                clinical: CrcClinical | None = None,
                slide: SlideTiles | None = None) -> CrcPrediction:
        """Predict one patient's 3-year risk from whatever inputs are given.

        Parameters
        ----------
        volume_hu, spacing_mm, labels
            Portal-venous CT ``(z, y, x)`` HU, its spacing in mm and its class labels
            (liver and tumour, ``ml.seg.CLASSES``); ``volume_hu`` None means no CT.
        tile_batches
            uint8 ``(B, tile_px, tile_px, 3)`` arrays (or :class:`ml.wsi_tiles.TileBatch`,
            whose locations are then reported), read with :attr:`tile_spec`.
        slide
            The slide's tiles already encoded by :meth:`encode_tiles` (instead of
            ``tile_batches``).
        clinical
            Clinical fields; None or all-missing means no clinical input.

        Raises
        ------
        CrcError
            If the CT lacks its spacing / labels / a liver, or a tile batch has the
            wrong shape or type.
        """
        with torch.no_grad():
            liver, tumour, has_ct = self._ct(volume_hu, spacing_mm, labels)
            if slide is not None:
                emb, where = slide.embeddings.to(self.device), slide.locations_px
            else:
                emb, where, _ = self._tiles(tile_batches)
            fields = (clinical or CrcClinical()).present()
            has_clinical = clinical is not None and (
                any(fields.values()) or clinical.t_stage is not None
                or clinical.n_stage is not None)
            vector = (clinical_vector(clinical, self.config.clinical) if clinical is not None
                      else np.zeros(WIDTH, dtype=np.float32))
            count = int(emb.shape[0])
            if count == 0:
                emb = torch.zeros((1, self.config.network.tile_dim), device=self.device)
            inputs = CrcInputs(
                liver=liver.to(self.device), tumour=tumour.to(self.device),
                ct_present=torch.tensor([has_ct], device=self.device),
                tile_emb=emb[None],
                tile_mask=torch.full((1, emb.shape[0]), count > 0, device=self.device),
                wsi_present=torch.tensor([count > 0], device=self.device),
                clinical=torch.from_numpy(vector)[None].to(self.device),
                clinical_present=torch.tensor([has_clinical], device=self.device))
            out = self.net(inputs)
            prob = float(torch.sigmoid(out.logit)[0])
            hazard = torch.sigmoid(out.hazard_logits)[0].cpu().numpy()
            incidence = cumulative_incidence(out.hazard_logits)[0].cpu().numpy()
            attention = out.attention[0, :count].cpu().numpy()
        used = {"ct": has_ct, "wsi": count > 0, "clinical": has_clinical}
        used.update({name: has_clinical and fields[name] for name in FIELDS})
        return CrcPrediction(
            probability=prob, risk_group="high risk" if prob >= self.threshold else "low risk",
            threshold=self.threshold, hazard=[float(h) for h in hazard],
            cumulative_incidence=[float(c) for c in incidence],
            cumulative_incidence_36mo=float(incidence[-1]),
            interval_months=self.config.network.interval_months,
            inputs_used=[k for k, v in used.items() if v],
            inputs_missing=[k for k, v in used.items() if not v],
            tile_attention=attention, tile_locations_px=where, model_name=self.name,
            model_version=self.version, model_sha256=self.sha256)
