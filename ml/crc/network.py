"""The multimodal network of model A (pure torch; the tile backbone comes from timm).

- CT: a small 3D CNN on the liver crop, pooled with masked first- and second-order
  statistics (mean and log SD of every feature map over the eroded liver), which is
  what liver texture heterogeneity asks for; a smaller 3D CNN on the tumour crop.
- WSI: a timm backbone encodes each tile; gated attention (Ilse et al. 2018,
  ``a = w^T (tanh(V h) * sigmoid(U h))``) pools the tiles into one slide embedding
  and gives every tile its attention weight.
- Clinical: an MLP on the encoded fields with their missing flags.
- Fusion: a transformer encoder over a CLS token and one token per modality; an
  absent modality is replaced by its learned "missing" token, and during training
  modalities are dropped at random, so any subset of inputs gives a result.
- Heads: the 3-year log-odds and discrete-time hazard logits (one per interval), each
  the sum of a head on the fused CLS token and an additive linear term per present
  modality (the log-odds of independent risk factors add up).
- Each modality token also has its own 3-year logit, trained with an auxiliary loss
  so that every encoder gets a direct signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ml.compat import timm
from ml.crc.clinical import WIDTH
from ml.crc.config import CrcConfig, CrcError, NetworkSizes

MODALITIES: tuple[str, ...] = ("ct", "wsi", "clinical")


@dataclass
class CrcInputs:
    """One batch of prepared inputs (absent parts are zeros with ``*_present`` False).

    Attributes
    ----------
    liver, tumour
        ``(B, 2, D, H, W)`` crops: normalised HU and the structure's mask.
    ct_present, wsi_present, clinical_present
        ``(B,)`` booleans.
    tile_emb, tile_mask
        ``(B, N, E)`` tile embeddings and ``(B, N)`` which of them are real tiles.
    clinical
        ``(B, WIDTH)`` encoded clinical fields (see :mod:`ml.crc.clinical`).
    """

    liver: Tensor
    tumour: Tensor
    ct_present: Tensor
    tile_emb: Tensor
    tile_mask: Tensor
    wsi_present: Tensor
    clinical: Tensor
    clinical_present: Tensor


@dataclass
class CrcOutput:
    """Network outputs.

    Attributes
    ----------
    logit
        ``(B,)`` 3-year log-odds from the fused CLS token.
    hazard_logits
        ``(B, K)`` discrete-time hazard logits.
    attention
        ``(B, N)`` tile attention weights.
    modality_logits
        ``(B, 3)`` 3-year log-odds from each modality token alone (CT, WSI, clinical),
        for the auxiliary per-modality loss that trains each encoder directly.
    """

    logit: Tensor
    hazard_logits: Tensor
    attention: Tensor
    modality_logits: Tensor


def masked_stats(features: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean and log SD of each channel: ``(B, C, ...)`` -> ``(B, 2C)``."""
    total = weight.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)
    w = weight / total
    mean = (features * w).sum(dim=(2, 3, 4), keepdim=True)
    var = ((features - mean) ** 2 * w).sum(dim=(2, 3, 4))
    return torch.cat([mean.flatten(1), 0.5 * torch.log(var + 1e-4)], dim=1)


def masked_smooth(values: Tensor, mask: Tensor, size: int = 3) -> Tensor:
    """Mean of ``values`` over the masked voxels of each ``size``-cube (0 outside the mask)."""
    pad = size // 2
    num = F.avg_pool3d(values * mask, size, stride=1, padding=pad, count_include_pad=True)
    den = F.avg_pool3d(mask, size, stride=1, padding=pad, count_include_pad=True)
    return num / den.clamp_min(1e-3) * mask


class CtEncoder(nn.Module):
    """3D CNN on the liver and tumour crops -> one CT token.

    The liver branch sees the normalised HU, a fixed masked 3x3x3 mean of it (the
    smooth texture with the white noise damped) and the mask. Its pooled features
    are the mean and log SD of both fixed channels over the liver and of the learned
    feature maps over the eroded liver (whose receptive field stays inside).
    """

    def __init__(self, sizes: NetworkSizes) -> None:
        super().__init__()
        c, tc = sizes.ct_channels, sizes.tumour_channels
        self.liver = nn.Sequential(nn.Conv3d(3, c, 3, padding=1), nn.GELU(),
                                   nn.Conv3d(c, c, 3, padding=1), nn.GELU())
        self.tumour = nn.Sequential(nn.Conv3d(2, tc, 3, stride=2, padding=1), nn.GELU(),
                                    nn.Conv3d(tc, tc, 3, stride=2, padding=1), nn.GELU(),
                                    nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * (c + 2) + tc, sizes.d_model), nn.GELU(),
                                  nn.Linear(sizes.d_model, sizes.d_model))

    def forward(self, liver: Tensor, tumour: Tensor) -> Tensor:
        """``(B, 2, D, H, W)`` liver and tumour crops -> ``(B, d_model)``."""
        mask = liver[:, 1:2].clamp(0.0, 1.0)
        values = liver[:, 0:1] * mask
        fixed = torch.cat([values, masked_smooth(values, mask)], dim=1)
        inner = -F.max_pool3d(-mask, kernel_size=3, stride=1, padding=1)  # eroded liver
        learned = self.liver(torch.cat([fixed, mask], dim=1))
        pooled = torch.cat([masked_stats(fixed, mask), masked_stats(learned, inner),
                            self.tumour(tumour)], dim=1)
        out: Tensor = self.head(pooled)
        return out


def tiles_to_tensor(pixels: Tensor) -> Tensor:
    """``(N, H, W, 3)`` uint8 RGB -> ``(N, 3, H, W)`` float in [0, 1]."""
    return pixels.permute(0, 3, 1, 2).float().div(255.0)


class TileEncoder(nn.Module):
    """A timm backbone (random init or a local checkpoint) and a projection per tile."""

    def __init__(self, sizes: NetworkSizes) -> None:
        super().__init__()
        try:
            self.backbone = timm.create_model(sizes.tile_arch, pretrained=False, num_classes=0)
        except RuntimeError as exc:  # timm's "Unknown model"
            raise CrcError(f"tile encoder architecture {sizes.tile_arch!r}: {exc}") from exc
        if sizes.tile_checkpoint:
            path = Path(sizes.tile_checkpoint)
            if not path.is_file():
                raise CrcError(f"tile encoder checkpoint {path} does not exist")
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.backbone.load_state_dict(state, strict=False)
        width = int(self.backbone.num_features)
        self.proj = nn.Sequential(nn.Linear(width, sizes.tile_dim), nn.GELU())

    def forward(self, tiles: Tensor) -> Tensor:
        """``(N, 3, H, W)`` tiles in [0, 1] -> ``(N, tile_dim)`` embeddings."""
        out: Tensor = self.proj(self.backbone((tiles - 0.5) / 0.25))
        return out


class GatedAttention(nn.Module):
    """Gated-attention MIL pooling (ABMIL / CLAM): slide embedding and tile weights."""

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, attention_dim)
        self.u = nn.Linear(dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, N, E)`` embeddings, ``(B, N)`` mask -> ``(B, E)`` and ``(B, N)`` weights.

        A bag with no tile gets a zero embedding and zero weights.
        """
        scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1).nan_to_num(0.0)
        return torch.bmm(weights.unsqueeze(1), h).squeeze(1), weights


class CrcNet(nn.Module):
    """The model A network (see the module docstring)."""

    def __init__(self, config: CrcConfig) -> None:
        super().__init__()
        s = config.network
        d = s.d_model
        self.sizes = s
        self.ct = CtEncoder(s)
        self.tiles = TileEncoder(s)
        self.pool = GatedAttention(s.tile_dim, s.attention_dim)
        self.wsi_head = nn.Sequential(nn.Linear(s.tile_dim, d), nn.GELU(), nn.Linear(d, d))
        self.clinical = nn.Sequential(nn.Linear(WIDTH, s.clinical_hidden), nn.GELU(),
                                      nn.Linear(s.clinical_hidden, d))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.missing = nn.Parameter(0.02 * torch.randn(len(MODALITIES), d))
        self.modality = nn.Parameter(0.02 * torch.randn(len(MODALITIES), d))
        layer = nn.TransformerEncoderLayer(d, s.heads, dim_feedforward=2 * d, dropout=s.dropout,
                                           batch_first=True, norm_first=True)
        self.fusion = nn.TransformerEncoder(layer, s.fusion_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.risk_head = nn.Linear(d, 1)
        self.hazard_head = nn.Linear(d, s.intervals)
        self.modality_weight = nn.Parameter(torch.zeros(len(MODALITIES), d))
        self.modality_bias = nn.Parameter(torch.zeros(len(MODALITIES)))
        self.additive = nn.Parameter(torch.zeros(len(MODALITIES), d))
        self.hazard_scale = nn.Parameter(torch.ones(1))

    def encode_tiles(self, tiles: Tensor) -> Tensor:
        """``(N, 3, H, W)`` tiles in [0, 1] -> ``(N, tile_dim)`` embeddings."""
        out: Tensor = self.tiles(tiles)
        return out

    def encode(self, x: CrcInputs) -> tuple[Tensor, Tensor]:
        """``(B, 3, d_model)`` modality tokens (CT, WSI, clinical) and ``(B, N)`` attention."""
        wsi_emb, attention = self.pool(x.tile_emb, x.tile_mask)
        tokens = torch.stack([self.ct(x.liver, x.tumour), self.wsi_head(wsi_emb),
                              self.clinical(x.clinical)], dim=1)
        return tokens, attention

    def fuse(self, tokens: Tensor, present: Tensor, attention: Tensor) -> CrcOutput:
        """Fuse ``(B, 3, d)`` tokens where ``present`` ``(B, 3)`` into the heads.

        During training each present modality is dropped with probability
        ``modality_dropout`` (replaced by its missing token).
        """
        batch = tokens.shape[0]
        modality_logits = (tokens * self.modality_weight).sum(-1) + self.modality_bias
        if self.training and self.sizes.modality_dropout > 0:
            keep = torch.rand(present.shape, device=present.device) >= self.sizes.modality_dropout
            present = present & keep
        # Additive path: each present modality adds its own linear term to the log-odds;
        # the transformer over the tokens adds interactions and absorbs missing ones.
        additive = ((tokens * self.additive).sum(-1) * present).sum(1)
        tokens = torch.where(present.unsqueeze(-1), tokens, self.missing.unsqueeze(0))
        tokens = tokens + self.modality.unsqueeze(0)
        h = self.fusion(torch.cat([self.cls.expand(batch, -1, -1), tokens], dim=1))
        z = self.norm(h[:, 0])
        logit = self.risk_head(z).squeeze(-1) + additive
        hazard = self.hazard_head(z) + self.hazard_scale * additive.unsqueeze(1)
        return CrcOutput(logit, hazard, attention, modality_logits)

    def forward(self, x: CrcInputs) -> CrcOutput:
        """Fuse whatever modalities are present into the two heads."""
        tokens, attention = self.encode(x)
        present = torch.stack([x.ct_present, x.wsi_present, x.clinical_present], dim=1)
        return self.fuse(tokens, present, attention)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters after the CT and WSI tokens (clinical MLP, fusion, heads)."""
        frozen = {id(p) for m in (self.ct, self.tiles, self.pool, self.wsi_head)
                  for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in frozen]


def interval_index(time_months: Tensor, interval_months: float, intervals: int) -> Tensor:
    """The interval each time falls in (``floor(t / width)``; may equal ``intervals``)."""
    return torch.clamp(torch.floor(time_months / interval_months), 0, intervals).long()


def discrete_time_nll(hazard_logits: Tensor, time_months: Tensor, event: Tensor,
                      interval_months: float) -> Tensor:
    """Mean negative log-likelihood of the censored discrete-time hazard model.

    With ``h_j = sigmoid(logit_j)`` and ``j`` the interval of the patient's time: an
    event contributes ``log h_j + sum_{i<j} log(1 - h_i)``; a censored patient
    survived the intervals completed before ``j`` and contributes
    ``sum_{i<j} log(1 - h_i)`` (all ``K`` intervals when followed to the horizon).
    Events at or after the horizon count in the last interval.
    """
    k = hazard_logits.shape[1]
    j = interval_index(time_months, interval_months, k)
    idx = torch.arange(k, device=hazard_logits.device).unsqueeze(0)
    ev = event.bool().unsqueeze(1)
    j_event = torch.clamp(j, max=k - 1).unsqueeze(1)
    survived = torch.where(ev, idx < j_event, idx < j.unsqueeze(1))
    at_event = ev & (idx == j_event)
    ll = (F.logsigmoid(-hazard_logits) * survived).sum(1) + \
        (F.logsigmoid(hazard_logits) * at_event).sum(1)
    return -ll.mean()


def cumulative_incidence(hazard_logits: Tensor) -> Tensor:
    """``(B, K)`` hazard logits -> ``(B, K)`` probability of the event by each interval end."""
    return 1.0 - torch.exp(torch.cumsum(F.logsigmoid(-hazard_logits), dim=1))
