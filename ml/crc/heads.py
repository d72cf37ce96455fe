"""Second training phase: refit the fusion and heads on frozen CT and WSI tokens.

After the end-to-end phase, the CT and WSI tokens of every patient are computed once
(eval mode, every cached tile), and the clinical MLP, the fusion transformer and the
heads are trained further on them for many cheap epochs, with modality dropout and
random missing clinical fields. The readout from a few hundred binary outcomes is
the noisiest part of the model; this phase gives it many more passes than the
end-to-end phase can afford, with early stopping on the validation split.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ml.crc.batch import collate, drop_fields, run_tokens
from ml.crc.clinical import clinical_vector
from ml.crc.config import ClinicalStats
from ml.crc.data import CrcExample
from ml.crc.loss import LossWeights, total_loss
from ml.crc.network import CrcNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSettings:
    """Epochs, learning rate, batch size and patience of the head phase."""

    epochs: int = 60
    lr: float = 1e-3
    batch_size: int = 64
    patience: int = 15
    weight_decay: float = 1e-3


@dataclass
class _Tokens:
    ct: torch.Tensor
    wsi: torch.Tensor
    wsi_present: torch.Tensor
    y3: torch.Tensor
    time: torch.Tensor
    event: torch.Tensor


def _frozen(net: CrcNet, examples: list[CrcExample], stats: ClinicalStats,
            device: torch.device) -> _Tokens:
    net.eval()
    ct, wsi, present, y3, time, event = [], [], [], [], [], []
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            batch = collate(examples[start:start + 32], stats)
            tokens, _ = run_tokens(net, batch, device)
            ct.append(tokens[:, 0])
            wsi.append(tokens[:, 1])
            present.append(batch.inputs.wsi_present.to(device))
            y3.append(batch.y3)
            time.append(batch.time_months)
            event.append(batch.event)
    return _Tokens(torch.cat(ct), torch.cat(wsi), torch.cat(present), torch.cat(y3).to(device),
                   torch.cat(time).to(device), torch.cat(event).to(device))


def _loss(net: CrcNet, t: _Tokens, index: np.ndarray, clinical: torch.Tensor,
          w: LossWeights) -> torch.Tensor:
    idx = torch.from_numpy(index).to(t.ct.device)
    tokens = torch.stack([t.ct[idx], t.wsi[idx], net.clinical(clinical)], dim=1)
    present = torch.stack([torch.ones_like(t.wsi_present[idx]), t.wsi_present[idx],
                           torch.ones_like(t.wsi_present[idx])], dim=1)
    out = net.fuse(tokens, present, torch.zeros((idx.numel(), 1), device=t.ct.device))
    return total_loss(out, t.y3[idx], t.time[idx], t.event[idx], present, w)


def refit_heads(net: CrcNet, train: list[CrcExample], val: list[CrcExample],
                stats: ClinicalStats, w: LossWeights, hs: HeadSettings, seed: int,
                device: torch.device) -> dict[str, Any]:
    """Train the head parameters of ``net`` in place; returns the loss history."""
    rng = np.random.default_rng(seed + 1)
    torch.manual_seed(seed + 1)
    t_train, t_val = _frozen(net, train, stats, device), _frozen(net, val, stats, device)
    val_clinical = torch.from_numpy(np.stack([clinical_vector(e.clinical, stats)
                                              for e in val])).to(device)
    params = net.head_parameters()
    opt = torch.optim.AdamW(params, lr=hs.lr, weight_decay=hs.weight_decay)
    val_w = LossWeights(w.hazard, 0.0, w.interval_months)

    def val_loss() -> float:
        net.eval()
        with torch.no_grad():
            return float(_loss(net, t_val, np.arange(len(val)), val_clinical, val_w))

    best, best_epoch = val_loss(), 0
    best_state = copy.deepcopy(net.state_dict())
    history: list[float] = []
    for epoch in range(1, hs.epochs + 1):
        net.train()
        order = rng.permutation(len(train))
        for start in range(0, len(order), hs.batch_size):
            index = order[start:start + hs.batch_size]
            clinical = torch.from_numpy(np.stack([
                clinical_vector(drop_fields(train[i].clinical, rng), stats) for i in index]))
            loss = _loss(net, t_train, index, clinical.to(device), w)
            opt.zero_grad()
            torch.autograd.backward(loss)
            opt.step()
        current = val_loss()
        history.append(current)
        if current < best - 1e-4:
            best, best_epoch, best_state = current, epoch, copy.deepcopy(net.state_dict())
        elif epoch - best_epoch >= hs.patience:
            break
    net.load_state_dict(best_state)
    net.eval()
    log.info("head phase: %d epochs, best validation loss %.4f at epoch %d", len(history),
             best, best_epoch)
    return {"head_val_losses": history, "head_best_epoch": best_epoch}
