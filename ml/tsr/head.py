"""Training the TSR head (adapters, phase fusion, logit scale) on frozen CLIP features.

The CLIP towers are frozen, so every crop's image embedding is computed once
(:func:`embed`) and the head trains on those in seconds. Phase dropout hides one
of two phases of a case at random, so that the fused model also works when a
study has one phase only. The epoch with the lowest internal-validation loss
is kept.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ml.train_common import torch_threads
from ml.tsr.config import PHASES, TsrError
from ml.tsr.network import TsrNet

log = logging.getLogger(__name__)

Progress = Callable[[Iterable[int], str], Iterable[int]]


class HeadSettings(BaseModel):
    """Settings of the head training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=64, ge=2)
    learning_rate: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    phase_dropout: float = Field(default=0.3, ge=0, lt=1)


@dataclass(frozen=True)
class HeadResult:
    """Loss per epoch on training and validation data, and the epoch kept (1-based)."""

    train_loss: list[float]
    val_loss: list[float]
    best_epoch: int


def embed(net: TsrNet, crops: np.ndarray, device: torch.device, batch: int = 256,
          ) -> np.ndarray:
    """Frozen CLIP embeddings ``(N, 2, D)`` of ``(N, 2, 3, S, S)`` crops."""
    n = crops.shape[0]
    flat = crops.reshape(n * len(PHASES), *crops.shape[2:])
    out = []
    net.eval()
    with torch.no_grad():
        for start in range(0, flat.shape[0], batch):
            images = torch.from_numpy(flat[start:start + batch]).float().to(device)
            out.append(net.image_features(images).cpu().numpy())
    dim = net.config.clip.embed_dim
    feats = np.concatenate(out) if out else np.zeros((0, dim), np.float32)
    return feats.reshape(n, len(PHASES), dim)


def _columns(net: TsrNet) -> list[int]:
    return [PHASES.index(p) for p in net.phases]


def _tensors(net: TsrNet, feats: np.ndarray, present: np.ndarray | None,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cols = _columns(net)
    x = torch.from_numpy(np.ascontiguousarray(feats[:, cols])).float().to(device)
    mask = (np.ones((feats.shape[0], len(cols)), bool) if present is None
            else np.asarray(present, bool)[:, cols])
    if not mask.any(1).all():
        raise TsrError(f"a case has none of the phases {net.phases} this model reads")
    return x, torch.from_numpy(mask).to(device)


def head_probabilities(net: TsrNet, feats: np.ndarray, device: torch.device,
                       present: np.ndarray | None = None) -> np.ndarray:
    """P(high TSR) per case from ``(N, 2, D)`` features (``present``: ``(N, 2)`` mask)."""
    x, mask = _tensors(net, feats, present, device)
    net.eval()
    with torch.no_grad():
        prob = torch.softmax(net.head(x, mask), dim=1)[:, 1]
    out: np.ndarray = prob.cpu().numpy().astype(np.float64)
    return out


def _dropout_mask(b: int, phases: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    mask = torch.ones(b, phases, dtype=torch.bool)
    if phases < 2 or rate == 0:
        return mask
    drop = torch.rand(b, generator=gen) < rate
    which = torch.randint(0, phases, (b,), generator=gen)
    mask[drop, which[drop]] = False
    return mask


def fit_head(net: TsrNet, feats: np.ndarray, y: np.ndarray, val_feats: np.ndarray,
             val_y: np.ndarray, settings: HeadSettings, seed: int, device: torch.device,
             progress: Progress | None = None) -> HeadResult:
    """Train ``net``'s head on frozen features; ``net`` ends with the best validation epoch.

    Raises
    ------
    TsrError
        If the training or validation set is empty or holds one class only.
    """
    for name, labels in (("training", y), ("validation", val_y)):
        if len(np.unique(labels)) < 2:
            raise TsrError(f"the {name} set needs both TSR classes, has "
                           f"{len(labels)} patients with {int(np.sum(labels))} high")
    with torch_threads(1):  # tiny tensors: more threads only add synchronisation
        return _fit(net, feats, y, val_feats, val_y, settings, seed, device, progress)


def _fit(net: TsrNet, feats: np.ndarray, y: np.ndarray, val_feats: np.ndarray,
         val_y: np.ndarray, settings: HeadSettings, seed: int, device: torch.device,
         progress: Progress | None) -> HeadResult:
    net.freeze_encoders()
    x, _ = _tensors(net, feats, None, device)
    vx, vmask = _tensors(net, val_feats, None, device)
    target = torch.as_tensor(y, dtype=torch.long, device=device)
    val_target = torch.as_tensor(val_y, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(seed)
    params = net.head_parameters()
    optimiser = torch.optim.AdamW(params, lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.epochs)
    train_loss: list[float] = []
    val_loss: list[float] = []
    best = (float("inf"), 0, copy.deepcopy(net.state_dict()))
    epochs: Iterable[int] = range(settings.epochs)
    for epoch in progress(epochs, "train TSR head") if progress else epochs:
        net.train()
        order = torch.randperm(x.shape[0], generator=gen)
        losses = []
        for start in range(0, x.shape[0], settings.batch_size):
            rows = order[start:start + settings.batch_size]
            mask = _dropout_mask(rows.numel(), x.shape[1], settings.phase_dropout, gen)
            loss = F.cross_entropy(net.head(x[rows], mask.to(device)), target[rows])
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            losses.append(float(loss.detach()) * rows.numel())
        schedule.step()
        net.eval()
        with torch.no_grad():
            val = float(F.cross_entropy(net.head(vx, vmask), val_target))
        train_loss.append(sum(losses) / x.shape[0])
        val_loss.append(val)
        if val < best[0]:
            best = (val, epoch + 1, copy.deepcopy(net.state_dict()))
        log.debug("head epoch %d: train %.4f val %.4f", epoch + 1, train_loss[-1], val)
    net.load_state_dict(best[2])
    net.freeze_encoders()
    log.info("head (%s, phases %s): best validation loss %.4f at epoch %d/%d",
             net.config.head.fusion, ",".join(net.phases), best[0], best[1], settings.epochs)
    return HeadResult(train_loss, val_loss, best[1])
