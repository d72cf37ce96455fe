"""Batches of model A examples: collation, training augmentation, and the forward pass.

A :class:`TileBag` holds each patient's tile pixels; :func:`run_batch` encodes them
with the network's tile encoder (with gradients while training) and fuses them with
the CT crops and clinical fields. Augmentation (training only): random flips of the
CT crops, a random subset of tiles per slide with random flips / rotations and a
per-slide stain shift, and random missing clinical fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from ml.crc.clinical import CrcClinical, clinical_vector
from ml.crc.config import ClinicalStats
from ml.crc.data import CrcExample
from ml.crc.network import CrcInputs, CrcNet, CrcOutput, tiles_to_tensor

STAIN_SHIFT = 12.0 / 255.0
FIELD_DROPOUT = 0.1


@dataclass(frozen=True)
class Augment:
    """Training augmentation settings; ``None`` in place of it means evaluation."""

    tiles_per_slide: int = 32
    rng: np.random.Generator | None = None


@dataclass
class Batch:
    """Collated examples: network inputs (tile embeddings still to compute) and targets."""

    inputs: CrcInputs
    tiles: Tensor  # (B, N, H, W, 3) uint8
    stain_shift: Tensor  # (B, 3) added to each slide's tiles (in [0, 1] units)
    y3: Tensor  # (B,) 0/1, NaN where the 3-year status is unknown
    time_months: Tensor
    event: Tensor


def drop_fields(clinical: CrcClinical, rng: np.random.Generator) -> CrcClinical:
    """``clinical`` with each field group dropped (set to None) with ``FIELD_DROPOUT``."""
    drop = rng.random(6) < FIELD_DROPOUT
    names = (("t_stage", "n_stage"), ("cea_ug_l",), ("ca19_9_u_ml",), ("age_years",), ("sex",),
             ("site",))
    changes: dict[str, None] = {}
    for flag, group in zip(drop, names, strict=True):
        if flag:
            changes.update({name: None for name in group})
    return replace(clinical, **changes) if changes else clinical


def _tiles(example: CrcExample, count: int | None, rng: np.random.Generator | None,
           ) -> np.ndarray:
    tiles = example.tiles
    if rng is None or count is None or tiles.shape[0] <= count:
        chosen = tiles
    else:
        chosen = tiles[np.sort(rng.choice(tiles.shape[0], count, replace=False))]
    if rng is not None and chosen.shape[0]:
        chosen = np.rot90(chosen, k=int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            chosen = chosen[:, :, ::-1]
    return np.ascontiguousarray(chosen)


def collate(examples: Sequence[CrcExample], stats: ClinicalStats,
            augment: Augment | None = None, use_wsi: bool = True,
            use_clinical: bool = True) -> Batch:
    """Stack examples into one :class:`Batch` (``augment`` only while training)."""
    rng = None if augment is None else augment.rng
    count = None if augment is None else augment.tiles_per_slide
    liver = np.stack([e.crop.liver for e in examples])
    tumour = np.stack([e.crop.tumour for e in examples])
    if rng is not None:
        for axis in (2, 3, 4):
            flip = rng.random(len(examples)) < 0.5
            liver[flip] = np.flip(liver[flip], axis=axis)
            tumour[flip] = np.flip(tumour[flip], axis=axis)
    bags = [_tiles(e, count, rng) if use_wsi else e.tiles[:0] for e in examples]
    n = max(1, max(b.shape[0] for b in bags))
    px = examples[0].tiles.shape[1]
    pixels = np.zeros((len(examples), n, px, px, 3), dtype=np.uint8)
    mask = torch.zeros((len(examples), n), dtype=torch.bool)
    for i, bag in enumerate(bags):
        pixels[i, :bag.shape[0]] = bag
        mask[i, :bag.shape[0]] = True
    shift = (torch.from_numpy(rng.uniform(-STAIN_SHIFT, STAIN_SHIFT, (len(examples), 3))).float()
             if rng is not None else torch.zeros((len(examples), 3)))
    clinical = [e.clinical if rng is None else drop_fields(e.clinical, rng) for e in examples]
    inputs = CrcInputs(
        liver=torch.from_numpy(np.ascontiguousarray(liver)),
        tumour=torch.from_numpy(np.ascontiguousarray(tumour)),
        ct_present=torch.ones(len(examples), dtype=torch.bool),
        tile_emb=torch.zeros(0), tile_mask=mask, wsi_present=mask.any(dim=1),
        clinical=torch.from_numpy(np.stack([clinical_vector(c, stats) for c in clinical])),
        clinical_present=torch.full((len(examples),), use_clinical, dtype=torch.bool))
    y3 = torch.tensor([np.nan if e.y3 is None else e.y3 for e in examples], dtype=torch.float32)
    return Batch(inputs, torch.from_numpy(pixels), shift, y3,
                 torch.tensor([e.time_months for e in examples], dtype=torch.float32),
                 torch.tensor([e.event for e in examples], dtype=torch.bool))


def _to(inputs: CrcInputs, device: torch.device) -> CrcInputs:
    return CrcInputs(**{k: v.to(device) for k, v in vars(inputs).items()})


def _embed_tiles(net: CrcNet, batch: Batch, device: torch.device,
                 tile_chunk: int) -> CrcInputs:
    b, n = batch.tiles.shape[:2]
    flat = batch.tiles.flatten(0, 1)
    shift = batch.stain_shift.repeat_interleave(n, dim=0)
    keep = batch.inputs.tile_mask.flatten()
    emb = torch.zeros((b * n, net.sizes.tile_dim), device=device)
    index = keep.nonzero().squeeze(1)
    for start in range(0, index.numel(), tile_chunk):
        part = index[start:start + tile_chunk]
        tiles = tiles_to_tensor(flat[part].to(device))
        tiles = (tiles + shift[part].to(device)[:, :, None, None]).clamp(0.0, 1.0)
        emb[part.to(device)] = net.encode_tiles(tiles)
    return _to(replace(batch.inputs, tile_emb=emb.view(b, n, -1)), device)


def run_batch(net: CrcNet, batch: Batch, device: torch.device,
              tile_chunk: int = 1024) -> CrcOutput:
    """Encode the batch's tiles (``tile_chunk`` at a time) and run the network."""
    out: CrcOutput = net(_embed_tiles(net, batch, device, tile_chunk))
    return out


def run_tokens(net: CrcNet, batch: Batch, device: torch.device,
               tile_chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The batch's ``(B, 3, d)`` modality tokens and ``(B, N)`` tile attention."""
    return net.encode(_embed_tiles(net, batch, device, tile_chunk))
