"""Model A's training loss: 3-year BCE, censored discrete-time hazard NLL, per-modality BCE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ml.crc.network import CrcOutput, discrete_time_nll


@dataclass(frozen=True)
class LossWeights:
    """Weights of the hazard and per-modality terms, and the hazard interval width."""

    hazard: float = 1.0
    modality: float = 0.5
    interval_months: float = 6.0


def total_loss(out: CrcOutput, y3: torch.Tensor, time_months: torch.Tensor,
               event: torch.Tensor, present: torch.Tensor, w: LossWeights) -> torch.Tensor:
    """The training loss of one batch.

    Parameters
    ----------
    out
        Network outputs.
    y3
        ``(B,)`` 3-year status, NaN where the follow-up does not tell it (then only
        the hazard term uses the patient).
    time_months, event
        ``(B,)`` follow-up time and event indicator.
    present
        ``(B, 3)`` which modalities the patients have (CT, WSI, clinical).
    w
        Term weights.

    Returns
    -------
    torch.Tensor
        ``BCE(fused) + w.hazard * NLL + w.modality * mean BCE(modality logits)``.
    """
    known = ~torch.isnan(y3)
    zero = out.logit.sum() * 0.0
    bce = (F.binary_cross_entropy_with_logits(out.logit[known], y3[known])
           if bool(known.any()) else zero)
    mask = present & known[:, None]
    target = torch.nan_to_num(y3)[:, None].expand_as(out.modality_logits)
    aux = (F.binary_cross_entropy_with_logits(out.modality_logits[mask], target[mask])
           if w.modality > 0 and bool(mask.any()) else zero)
    nll = discrete_time_nll(out.hazard_logits, time_months, event, w.interval_months)
    return bce + w.hazard * nll + w.modality * aux
