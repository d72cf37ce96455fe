"""Train model A on a cohort manifest and write its model package.

The CRC patients are split by centre (:func:`ml.manifest.split_by_centre`): one
centre is held out for external testing and never read here; a seeded share of
the others is the internal validation split, used for early stopping and model
selection. The loss is binary cross-entropy on the 3-year status of patients whose
follow-up tells it (an event, or followed to 36 months) plus the censored
discrete-time hazard likelihood of every patient. The decision threshold is fixed
on the training split (Youden). On CPU the run is deterministic for a seed.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.crc.batch import Augment, Batch, collate, run_batch
from ml.crc.card import input_spec, model_card
from ml.crc.clinical import fit_stats
from ml.crc.config import CrcConfig, CrcError
from ml.crc.data import CrcExample, load_examples
from ml.crc.heads import HeadSettings, refit_heads
from ml.crc.loss import LossWeights, total_loss
from ml.crc.metrics import example_metrics, predict_examples
from ml.crc.network import CrcNet, CrcOutput
from ml.errors import ConfigError
from ml.manifest import Manifest, Split, load_manifest, split_by_centre
from ml.package import write_package
from ml.stats.threshold import threshold_from_training
from ml.train_common import log_to, pick_device, progress, seed_everything, torch_threads

log = logging.getLogger(__name__)

TASK = "crc-liver-metastasis"
LOG_FILE = "logs/train.log"


def default_cache_dir() -> Path:
    """Where preprocessed examples are cached unless told otherwise."""
    return Path(tempfile.gettempdir()) / "oncopacs-cache" / "crc"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run besides the cohort."""

    epochs: int = 30
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    test_centre: str = "C3"
    val_fraction: float = 0.2
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 8
    tiles_per_slide: int = 32
    hazard_weight: float = 1.0
    modality_weight: float = 0.5
    heads: HeadSettings = field(default_factory=HeadSettings)
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    name: str = TASK
    version: str = "1.0.0"
    config: CrcConfig = field(default_factory=CrcConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.threads < 1 or self.patience < 1:
            raise ConfigError("epochs, threads and patience must be >= 1 and batch_size >= 2")
        if not self.lr > 0 or self.tiles_per_slide < 1:
            raise ConfigError("lr must be positive and tiles_per_slide at least 1")


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    package: Path
    seconds: float
    epochs_run: int
    best_epoch: int
    train_losses: list[float]
    val_losses: list[float]
    threshold: float
    val_metrics: dict[str, Any]
    split: dict[str, Any]


def loss_weights(s: TrainSettings, modality: bool = True) -> LossWeights:
    """The loss term weights of ``s`` (without the per-modality term if not ``modality``)."""
    return LossWeights(s.hazard_weight, s.modality_weight if modality else 0.0,
                       s.config.network.interval_months)


def compute_loss(out: CrcOutput, batch: Batch, device: torch.device,
                 w: LossWeights) -> torch.Tensor:
    """:func:`ml.crc.loss.total_loss` of a collated batch."""
    present = torch.stack([batch.inputs.ct_present, batch.inputs.wsi_present,
                           batch.inputs.clinical_present], dim=1).to(device)
    return total_loss(out, batch.y3.to(device), batch.time_months.to(device),
                      batch.event.to(device), present, w)


def _epoch(net: CrcNet, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
           examples: list[CrcExample], s: TrainSettings, rng: np.random.Generator,
           device: torch.device, epoch: int) -> float:
    net.train()
    order = rng.permutation(len(examples))
    starts = list(range(0, len(order) - 1, s.batch_size))
    losses = []
    for start in progress(starts, f"epoch {epoch}"):
        chosen = [examples[i] for i in order[start:start + s.batch_size]]
        if len(chosen) < 2:
            continue
        batch = collate(chosen, s.config.clinical, Augment(s.tiles_per_slide, rng))
        loss = compute_loss(run_batch(net, batch, device), batch, device, loss_weights(s))
        opt.zero_grad()
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _val_loss(net: CrcNet, examples: list[CrcExample], s: TrainSettings,
              device: torch.device) -> float:
    net.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), s.batch_size):
            chosen = examples[start:start + s.batch_size]
            batch = collate(chosen, s.config.clinical)
            loss = compute_loss(run_batch(net, batch, device), batch, device,
                                loss_weights(s, modality=False))
            total += float(loss) * len(chosen)
            count += len(chosen)
    return total / max(count, 1)


def fit(train: list[CrcExample], val: list[CrcExample], s: TrainSettings,
        device: torch.device) -> tuple[CrcNet, dict[str, Any]]:
    """Train a network (``s.config`` must hold the training clinical statistics)."""
    seed_everything(s.seed)
    rng = np.random.default_rng(s.seed)
    net = CrcNet(s.config).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    steps = s.epochs * max(1, math.ceil(len(train) / s.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=steps + s.epochs,
                                                pct_start=0.1)
    best, best_epoch, best_state = math.inf, 0, copy.deepcopy(net.state_dict())
    history: dict[str, Any] = {"train_losses": [], "val_losses": []}
    for epoch in range(1, s.epochs + 1):
        train_loss = _epoch(net, opt, sched, train, s, rng, device, epoch)
        val_loss = _val_loss(net, val, s, device) if val else train_loss
        history["train_losses"].append(train_loss)
        history["val_losses"].append(val_loss)
        log.info("epoch %d: train loss %.4f, validation loss %.4f", epoch, train_loss, val_loss)
        if val_loss < best - 1e-4:
            best, best_epoch, best_state = val_loss, epoch, copy.deepcopy(net.state_dict())
        elif epoch - best_epoch >= s.patience:
            log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
            break
    net.load_state_dict(best_state)
    history["best_epoch"] = best_epoch
    if s.heads.epochs > 0 and val:
        history.update(refit_heads(net, train, val, s.config.clinical, loss_weights(s),
                                   s.heads, s.seed, device))
    net.eval()
    return net, history


def _split(manifest_path: Path, s: TrainSettings) -> tuple[Split, Manifest]:
    manifest = load_manifest(manifest_path)
    crc = manifest.group("CRC")
    if not crc:
        raise CrcError(f"cohort {manifest_path} has no CRC patients")
    return split_by_centre(crc, s.test_centre, s.val_fraction, s.seed), manifest


def train(manifest_path: Path, out: Path, settings: TrainSettings | None = None) -> TrainResult:
    """Train model A and write its package to ``out``.

    Raises
    ------
    ml.errors.OncopacsError
        If the cohort, the split or the settings are not usable.
    """
    s = settings or TrainSettings()
    begin = time.monotonic()
    device = pick_device(s.device)
    with log_to(out / LOG_FILE), torch_threads(s.threads):
        split, cohort = _split(manifest_path, s)
        manifest_file = cohort.path
        log.info("model A training: seed %d, test centre %s (not read), device %s, "
                 "settings %s", s.seed, split.test_centre, device,
                 {k: v for k, v in vars(s).items() if k != "config"})
        train_ex = load_examples(split.train, s.config, manifest_file, s.cache_dir, "train")
        val_ex = load_examples(split.val, s.config, manifest_file, s.cache_dir, "validation")
        s = replace(s, config=replace(s.config, clinical=fit_stats([e.clinical
                                                                    for e in train_ex])))
        net, history = fit(train_ex, val_ex, s, device)
        train_pred = predict_examples(net, train_ex, s.config, device)
        known = np.array([e.y3 is not None for e in train_ex])
        y_train = np.array([e.y3 or 0.0 for e in train_ex])[known]
        threshold = threshold_from_training(y_train, train_pred.prob[known])
        metrics = {"validation": example_metrics(val_ex, predict_examples(net, val_ex, s.config,
                                                                          device), threshold),
                   "training": example_metrics(train_ex, train_pred, threshold)}
        training_data = {"synthetic": True, "manifest": manifest_file.name,
                         "cohort": manifest_file.parent.name, "cohort_seed": cohort.seed,
                         "size": cohort.size,
                         "split": split.describe(), "patients_used": len(train_ex),
                         "validation_patients": len(val_ex), "seed": s.seed,
                         "label": "3-year liver metastasis where follow-up tells it; "
                                  "censored discrete-time hazard for all"}
        seconds = time.monotonic() - begin
        log.info("validation: %s; threshold %.4f; %.1f s", metrics["validation"], threshold,
                 seconds)
        write_package(out, name=s.name, version=s.version, task=TASK, config=s.config.to_dict(),
                      state_dict=net.state_dict(), threshold=threshold, inputs=input_spec(s.config),
                      training_data=training_data, metrics=metrics,
                      card=model_card(s, training_data, metrics, threshold))
    return TrainResult(package=out, seconds=seconds, epochs_run=len(history["train_losses"]),
                       best_epoch=int(history["best_epoch"]),
                       train_losses=history["train_losses"], val_losses=history["val_losses"],
                       threshold=threshold, val_metrics=metrics["validation"],
                       split=split.describe())
