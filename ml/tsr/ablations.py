"""The comparators of the TSR model, each trained on the training split with the same frozen CLIP.

- "arterial only" / "venous only": adapter and head on one phase's token;
- "no fusion": both adapted phase tokens averaged, no self-attention;
- "image-only linear probe": logistic regression on the frozen image embeddings
  of both phases, no text.

The fused model and its ablations differ only in the part named, so the
figures show what the second phase and the attention add.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ml.tsr.config import TsrConfig
from ml.tsr.head import HeadSettings, fit_head, head_probabilities
from ml.tsr.network import TsrNet

HEAD_ABLATIONS: dict[str, dict[str, object]] = {
    "arterial only": {"phases": ("arterial",)},
    "venous only": {"phases": ("venous",)},
    "no fusion": {"fusion": "mean"},
}
PROBE = "image-only linear probe"
COMPARATORS: tuple[str, ...] = (*HEAD_ABLATIONS, PROBE)


def linear_probe(train_feats: np.ndarray, y: np.ndarray, seed: int) -> object:
    """Standardised logistic regression on the concatenated phase embeddings."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000,
                                                               random_state=seed))
    model.fit(train_feats.reshape(len(train_feats), -1), y)
    return model


def fit_comparators(config: TsrConfig, clip_state: dict[str, torch.Tensor],
                    train_feats: np.ndarray, y: np.ndarray, val_feats: np.ndarray,
                    val_y: np.ndarray, settings: HeadSettings, seed: int,
                    device: torch.device, test_feats: np.ndarray) -> dict[str, np.ndarray]:
    """Train every comparator and return its P(high TSR) on ``test_feats``.

    Parameters
    ----------
    config
        The fused model's config; each ablation changes one head setting.
    clip_state
        The frozen CLIP's weights (``TsrNet.clip.state_dict()``).
    train_feats, val_feats, test_feats
        ``(N, 2, D)`` frozen embeddings.
    y, val_y
        0/1 high-TSR labels of the training and validation patients.
    settings, seed, device
        As for the fused model's head.
    """
    out: dict[str, np.ndarray] = {}
    for name, change in HEAD_ABLATIONS.items():
        torch.manual_seed(seed)
        net = TsrNet(config.with_head(**change))
        net.clip.load_state_dict(clip_state)
        net.to(device)
        fit_head(net, train_feats, y, val_feats, val_y, settings, seed, device)
        out[name] = head_probabilities(net, test_feats, device)
    probe = linear_probe(train_feats, y, seed)
    out[PROBE] = probe.predict_proba(  # type: ignore[attr-defined]
        test_feats.reshape(len(test_feats), -1))[:, 1].astype(np.float64)
    return out
