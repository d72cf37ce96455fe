"""Train the PDAC tumour-stroma ratio model and write its package.

Step 1 pre-trains the small CLIP contrastively on the training patients' crops
and report sentences (:mod:`ml.tsr.pretrain`), or loads a site's CLIP checkpoint
by path. Step 2 freezes both towers and trains the adapters, the phase
attention and the logit scale on ``labels.tsr_high`` (:mod:`ml.tsr.head`),
keeping the epoch with the best internal-validation loss. The decision
threshold is fixed on the training patients (Youden). The held-out centre is
only scored, for the model card, together with the ablations.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import roc_auc_score

from ml.manifest import Split, load_manifest, split_by_centre
from ml.package import read_metadata, write_package
from ml.stats.threshold import threshold_from_training
from ml.train_common import log_to, pick_device, progress, seed_everything, torch_threads
from ml.tsr.ablations import fit_comparators
from ml.tsr.card import model_card
from ml.tsr.config import INPUT_NAMES, PHASES, TsrConfig, TsrError
from ml.tsr.data import CropSet, load_crops
from ml.tsr.head import HeadSettings, embed, fit_head, head_probabilities
from ml.tsr.network import TsrNet, build_network
from ml.tsr.pretrain import PretrainSettings, describe, grade_edges, pretrain_clip, reports

log = logging.getLogger(__name__)

TASK = "pdac-tsr"
LOG_FILE = "logs/train.log"
T = TypeVar("T")


def default_cache() -> Path:
    """The crop cache folder: ``$XDG_CACHE_HOME/oncopacs/tsr`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oncopacs" / "tsr"


class TrainSettings(BaseModel):
    """Everything that decides a training run (with the cohort, it fixes the weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, ge=0)
    test_centre: str = "C3"
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    threads: int = Field(default=1, ge=1)
    device: str = Field(default="cpu", pattern="^(cpu|cuda|auto)$")
    cache: Path | None = None
    model: TsrConfig = TsrConfig()
    pretrain: PretrainSettings = PretrainSettings()
    head: HeadSettings = HeadSettings()
    name: str = "pdac-tsr"
    version: str = "1.0.0"
    show_progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    """A finished run: the package, its weights' hash, time and figures."""

    out: Path
    sha256: str
    seconds: float
    threshold: float
    metrics: dict[str, Any]
    pretrain_loss: list[float]
    head_loss: list[float]


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    return round(float(roc_auc_score(y, score)), 4)


def _counts(split: Split) -> dict[str, Any]:
    out = split.describe()
    for name, patients in (("train", split.train), ("val", split.val), ("test", split.test)):
        out[name]["high_tsr"] = int(sum(bool(p.labels["tsr_high"]) for p in patients))
    return out


def _encoder(net: TsrNet, train: CropSet, settings: TrainSettings, device: torch.device,
             ) -> tuple[list[float], dict[str, Any]]:
    """Step 1: the site's CLIP checkpoint, or contrastive pre-training on the training split."""
    checkpoint = settings.model.clip_checkpoint
    if checkpoint:
        log.info("step 1: site CLIP checkpoint given; no pre-training")
        return [], {"source": "site checkpoint", "file": Path(checkpoint).name}
    edges = grade_edges(train.enhancement)
    sites = [str(p.labels.get("site")) if settings.pretrain.report_site else None
             for p in train.patients]
    texts = [t for row in reports(train.enhancement, sites, edges) for t in row]
    log.info("step 1: contrastive pre-training on %d crop/report pairs (%d distinct reports)",
             len(texts), len(set(texts)))
    crops = train.crops.reshape(-1, *train.crops.shape[2:])
    history = pretrain_clip(net.clip, crops, texts, settings.model.clip.text.context_length,
                            settings.pretrain, settings.seed, device, _bar(settings))
    return history, {"source": "contrastive pre-training on the training split",
                     "pairs": len(texts), "reports": describe(edges),
                     "final_loss": round(history[-1], 4) if history else None}


def _bar(settings: TrainSettings) -> Any:
    if not settings.show_progress:
        return None

    def bar(items: Iterable[T], desc: str) -> Iterable[T]:
        return progress(items, desc)

    return bar


def train(manifest_path: Path, out: Path, settings: TrainSettings | None = None,
          ) -> TrainResult:
    """Train the TSR model on a cohort manifest and write the package to ``out``.

    Raises
    ------
    ml.errors.OncopacsError
        If the cohort, the split, a checkpoint or the settings are not usable.
    """
    settings = settings or TrainSettings()
    start = time.monotonic()
    with log_to(out / LOG_FILE), torch_threads(settings.threads):
        seed_everything(settings.seed)
        device = pick_device(settings.device)
        manifest = load_manifest(manifest_path)
        pdac = manifest.group("PDAC")
        if not pdac:
            raise TsrError(f"cohort {manifest.path} has no PDAC patients")
        split = split_by_centre(pdac, settings.test_centre, settings.val_fraction,
                                settings.seed)
        counts = _counts(split)
        log.info("split: %s", counts)
        cache = settings.cache or default_cache()
        bar = _bar(settings)
        sets = [load_crops(s, settings.model, manifest.path, cache, bar)
                for s in (split.train, split.val, split.test)]
        train_set, val_set = sets[0], sets[1]
        net = build_network(settings.model).to(device)
        pre_loss, encoder = _encoder(net, train_set, settings, device)
        net.freeze_encoders()
        feats = [embed(net, s.crops, device) for s in sets]
        log.info("step 2: training adapters and phase attention (frozen CLIP)")
        result = fit_head(net, feats[0], train_set.y, feats[1], val_set.y, settings.head,
                          settings.seed, device, bar)
        train_prob = head_probabilities(net, feats[0], device)
        threshold = threshold_from_training(train_set.y, train_prob)
        metrics = _metrics(net, feats, sets, settings, device)
        metrics["threshold_rule"] = "youden on the training split"
        log.info("figures: %s", metrics)
        config = settings.model.model_copy(update={"clip_checkpoint": None})
        training_data = {
            "synthetic": True, "cohort": manifest.path.parent.name, "cohort_seed": manifest.seed,
            "size": manifest.size, "group": "PDAC", "split": counts,
            "split_seed": settings.seed, "val_fraction": settings.val_fraction,
            "label": "labels.tsr_high (tumour-stroma ratio >= 0.5)", "encoder": encoder,
            "settings": {"pretrain": settings.pretrain.model_dump(mode="json"),
                         "head": settings.head.model_dump(mode="json"),
                         "seed": settings.seed, "best_head_epoch": result.best_epoch},
        }
        write_package(out, name=settings.name, version=settings.version, task=TASK,
                      config=config.model_dump(mode="json"), state_dict=net.state_dict(),
                      threshold=threshold, inputs=input_spec(), training_data=training_data,
                      metrics=metrics, card=model_card(settings.name, settings.version,
                                                       config, training_data, metrics))
        seconds = time.monotonic() - start
        log.info("package written in %.0f s", seconds)
    sha = str(read_metadata(out)["weights"]["sha256"])
    return TrainResult(out, sha, seconds, threshold, metrics, pre_loss, result.train_loss)


def _metrics(net: TsrNet, feats: list[np.ndarray], sets: list[CropSet],
             settings: TrainSettings, device: torch.device) -> dict[str, Any]:
    """Internal-validation and held-out AUCs of the model, its ablations and the truth."""
    (train_f, val_f, test_f), (train_s, val_s, test_s) = feats, sets
    test_y = test_s.y
    only = {ph: np.tile([ph == p for p in PHASES], (len(test_y), 1)) for ph in PHASES}
    comparators = fit_comparators(settings.model, net.clip.state_dict(), train_f, train_s.y,
                                  val_f, val_s.y, settings.head, settings.seed, device, test_f)
    held_out: dict[str, Any] = {
        "model (both phases)": _auc(test_y, head_probabilities(net, test_f, device)),
        "model given the arterial phase only": _auc(
            test_y, head_probabilities(net, test_f, device, only["arterial"])),
        "model given the venous phase only": _auc(
            test_y, head_probabilities(net, test_f, device, only["venous"])),
    }
    held_out.update({name: _auc(test_y, prob) for name, prob in comparators.items()})
    held_out["generator truth (best achievable)"] = _auc(test_y, test_s.truth)
    return {
        "auc_internal_validation": _auc(val_s.y, head_probabilities(net, val_f, device)),
        "held_out_centre": settings.test_centre, "held_out_patients": len(test_y),
        "auc_held_out": held_out,
    }


def input_spec() -> list[dict[str, Any]]:
    """The package's input specification: arterial and portal-venous CT (either may be absent)."""
    return [{"name": INPUT_NAMES[ph], "modality": "CT", "phase": ph, "required": False,
             "description": f"contrast-enhanced abdominal CT, {ph} phase, axial, with a "
                            "pancreas/tumour segmentation on its grid"}
            for ph in PHASES]
