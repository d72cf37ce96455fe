"""Contrastive (CLIP InfoNCE) pre-training of the small CLIP on CT crops and report text.

No CLIP weights can be downloaded here, so the demo encoder learns from the
synthetic training cohort: each phase crop is paired with the sentence a
radiologist would write about it, e.g. ``"arterial phase ct: moderately
hypoenhancing mass in the pancreatic head"``. The enhancement word comes from the
crop's measured tumour-minus-pancreas HU (ground-truth masks), graded by the
quantiles of that measurement per phase over the TRAINING patients only; the
site comes from the manifest. The TSR label is never used.

Identical reports are common, so the loss is InfoNCE over the distinct reports
of a batch: image-to-text is cross-entropy over the batch's distinct texts, and
text-to-image spreads its target evenly over the images sharing that text.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ml.tsr.config import PHASES, TsrError
from ml.tsr.network import (
    PIXEL_MEAN,
    PIXEL_STD,
    clip_logit_scale,
    encode_image,
    encode_text,
    tokenize,
)

log = logging.getLogger(__name__)

GRADES: tuple[str, ...] = (
    "markedly hypoenhancing", "moderately hypoenhancing", "mildly hypoenhancing",
    "slightly hypoenhancing", "subtly hypoenhancing", "nearly isoenhancing",
    "isoenhancing", "relatively hyperenhancing",
)
"""Enhancement grades, from the most hypo- to the most hyperenhancing tumour."""

Progress = Callable[[Iterable[int], str], Iterable[int]]


class PretrainSettings(BaseModel):
    """Settings of the contrastive pre-training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=40, ge=0)
    batch_size: int = Field(default=64, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    shift_px: int = Field(default=4, ge=0)
    intensity_shift: float = Field(default=0.05, ge=0)
    noise: float = Field(default=0.03, ge=0)
    report_site: bool = True


def grade_edges(enhancement: np.ndarray) -> np.ndarray:
    """``(2, len(GRADES) - 1)`` quantile edges of the training enhancement, per phase.

    Raises
    ------
    TsrError
        If a phase has too few measured values to grade.
    """
    edges = []
    for i, phase in enumerate(PHASES):
        values = enhancement[:, i][np.isfinite(enhancement[:, i])]
        if values.size < len(GRADES):
            raise TsrError(f"only {values.size} {phase} crops have a measurable tumour; "
                           f"grading needs at least {len(GRADES)}")
        edges.append(np.quantile(values, np.linspace(0, 1, len(GRADES) + 1)[1:-1]))
    return np.array(edges)


def report(phase: str, enhancement: float, edges: np.ndarray, site: str | None) -> str:
    """The radiologist's sentence for one phase crop (``site`` None: not mentioned)."""
    where = "pancreatic" if site is None else f"pancreatic {site}"
    if not math.isfinite(enhancement):
        return f"{phase} phase ct: {where} mass, enhancement not assessable"
    grade = GRADES[int(np.searchsorted(edges, enhancement))]
    return f"{phase} phase ct: {grade} {where} mass"


def reports(enhancement: np.ndarray, sites: list[str | None], edges: np.ndarray,
            ) -> list[list[str]]:
    """Sentences ``[patient][phase]`` for ``(N, 2)`` enhancements."""
    return [[report(ph, float(enhancement[n, i]), edges[i], sites[n])
             for i, ph in enumerate(PHASES)] for n in range(len(sites))]


def augment(images: torch.Tensor, gen: torch.Generator, settings: PretrainSettings,
            ) -> torch.Tensor:
    """Random flips, translation (edge-padded) and intensity shift of ``(B, 3, S, S)``."""
    b, _, s, _ = images.shape
    t = settings.shift_px
    out = F.pad(images, (t, t, t, t), mode="replicate") if t else images
    offsets = torch.randint(0, 2 * t + 1, (b, 2), generator=gen)
    flips = torch.rand(b, 2, generator=gen) < 0.5
    shift = (torch.rand(b, generator=gen) * 2 - 1) * settings.intensity_shift
    noise_sd = torch.rand(b, generator=gen) * settings.noise
    rows = []
    for i in range(b):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        x = out[i, :, dy:dy + s, dx:dx + s]
        dims = [d for d, flip in zip((1, 2), flips[i].tolist(), strict=True) if flip]
        rows.append(x.flip(dims) if dims else x)
    noise = torch.randn(b, *images.shape[1:], generator=gen) * noise_sd.view(b, 1, 1, 1)
    return (torch.stack(rows) + shift.view(b, 1, 1, 1) + noise).clamp(0.0, 1.0)


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, text_index: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE between ``(B, D)`` images and ``(U, D)`` distinct texts (both normalised).

    ``text_index[b]`` is the row of ``text`` that describes image ``b``.
    """
    logits = scale * image @ text.T
    to_text = F.cross_entropy(logits, text_index)
    target = F.one_hot(text_index, text.shape[0]).T.float()
    target = target / target.sum(1, keepdim=True)
    to_image = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (to_text + to_image)


def _batches(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for start in range(0, n - size + 1 if n >= size else 1, size):
        yield order[start:start + size]


def pretrain_clip(clip: nn.Module, crops: np.ndarray, texts: list[str], context_length: int,
                  settings: PretrainSettings, seed: int, device: torch.device,
                  progress: Progress | None = None) -> list[float]:
    """Train ``clip`` (both towers) on ``(M, 3, S, S)`` crops and their ``M`` reports.

    Returns
    -------
    list of float
        Mean loss per epoch.

    Raises
    ------
    TsrError
        If crops and texts differ in number or there are fewer than two pairs.
    """
    if len(texts) != crops.shape[0] or len(texts) < 2:
        raise TsrError(f"pre-training needs matching crops and reports (at least 2), got "
                       f"{crops.shape[0]} crops and {len(texts)} reports")
    vocab = sorted(set(texts))
    index = torch.tensor([vocab.index(t) for t in texts])
    tokens = tokenize(vocab, context_length).to(device)
    images = torch.from_numpy(crops)
    gen = torch.Generator().manual_seed(seed)
    size = min(settings.batch_size, len(texts))
    steps_per_epoch = max(1, len(texts) // size)
    total = max(1, settings.epochs * steps_per_epoch)
    warmup = settings.warmup_epochs * steps_per_epoch
    optimiser = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad],
                                  lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1.0, total - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    clip.train()
    history: list[float] = []
    epochs: Iterable[int] = range(settings.epochs)
    for epoch in progress(epochs, "pre-train CLIP") if progress else epochs:
        losses = []
        for rows in _batches(len(texts), size, gen):
            batch = augment(images[rows].float(), gen, settings).to(device)
            used, local = torch.unique(index[rows], return_inverse=True)
            image_emb = encode_image(clip, (batch - PIXEL_MEAN) / PIXEL_STD)
            text_emb = encode_text(clip, tokens[used])
            scale = clip_logit_scale(clip).clamp(max=100.0)
            loss = contrastive_loss(image_emb, text_emb, local.to(device), scale)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            lr_schedule.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
        log.info("pre-train epoch %d/%d: contrastive loss %.4f", epoch + 1, settings.epochs,
                 history[-1])
    clip.eval()
    return history


def describe(edges: np.ndarray) -> dict[str, Any]:
    """The grading rule, for the package metadata."""
    return {"grades": list(GRADES),
            "edges_hu": {ph: [round(float(v), 1) for v in edges[i]]
                         for i, ph in enumerate(PHASES)},
            "source": "tumour minus pancreas mean HU on ground-truth masks, "
                      "quantiles of the training split"}
