"""Model A predictions on prepared examples, and the figures the package records.

Used by training (threshold on the training split, validation figures) on the
cached examples; the held-out evaluation goes through :mod:`ml.crc.predict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ml.crc.batch import collate, run_batch
from ml.crc.config import CrcConfig
from ml.crc.data import CrcExample
from ml.crc.network import CrcNet, cumulative_incidence
from ml.stats.inputs import StatsError
from ml.stats.survival import harrell_c
from ml.stats.threshold import threshold_metrics


@dataclass(frozen=True)
class Predictions:
    """``prob`` ``(n,)`` 3-year probability; ``incidence`` ``(n, K)`` cumulative incidence."""

    prob: np.ndarray
    incidence: np.ndarray


def predict_examples(net: CrcNet, examples: list[CrcExample], config: CrcConfig,
                     device: torch.device, batch_size: int = 32, use_wsi: bool = True,
                     use_clinical: bool = True) -> Predictions:
    """Run ``net`` (eval mode, every cached tile) on the examples."""
    net.eval()
    probs, incidence = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], config.clinical,
                            use_wsi=use_wsi, use_clinical=use_clinical)
            out = run_batch(net, batch, device)
            probs.append(torch.sigmoid(out.logit).cpu().numpy())
            incidence.append(cumulative_incidence(out.hazard_logits).cpu().numpy())
    if not probs:
        return Predictions(np.zeros(0), np.zeros((0, config.network.intervals)))
    return Predictions(np.concatenate(probs).astype(np.float64),
                       np.concatenate(incidence).astype(np.float64))


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    if y.size == 0 or y.min() == y.max():
        return None
    return round(float(roc_auc_score(y, score)), 4)


def example_metrics(examples: list[CrcExample], pred: Predictions,
                    threshold: float) -> dict[str, Any]:
    """AUC (known 3-year status), C-index, Brier score and threshold figures."""
    known = np.array([e.y3 is not None for e in examples], dtype=bool)
    y = np.array([e.y3 or 0.0 for e in examples])[known].astype(int)
    out: dict[str, Any] = {"patients": len(examples), "known_3y_status": int(known.sum()),
                           "events_3y": int(y.sum()), "auc_3y": _auc(y, pred.prob[known])}
    truth = np.array([e.met_3y for e in examples], dtype=int)
    best = np.array([e.probability for e in examples])
    if np.all(np.isfinite(best)):
        out["auc_3y_all_patients_generator_outcome"] = _auc(truth, pred.prob)
        out["best_achievable_auc_generator_probability"] = _auc(truth, best)
    if y.size:
        out["brier_3y"] = round(float(np.mean((pred.prob[known] - y) ** 2)), 4)
        m = threshold_metrics(y, pred.prob[known], threshold)
        out["sensitivity"] = round(m.sensitivity.estimate, 4)
        out["specificity"] = round(m.specificity.estimate, 4)
    try:
        c = harrell_c([e.time_months for e in examples], [e.event for e in examples],
                      pred.incidence[:, -1])
        out["c_index"] = round(c.c_index, 4)
    except StatsError:
        out["c_index"] = None
    return out
