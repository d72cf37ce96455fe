"""The TSR network: a small open_clip CLIP with per-phase adapters and phase attention.

Forward pass for a patient with arterial and/or venous crops:

1. The frozen CLIP image tower embeds each phase's crop (L2-normalised ``f``).
2. A residual bottleneck adapter per phase (CLIP-Adapter):
   ``f' = alpha * A(f) + (1 - alpha) * f`` with ``A = Linear-ReLU-Linear``.
3. Phase tokens (``f'`` plus a learned phase embedding) pass one multi-head
   self-attention layer (absent phases are masked out) and are mean-pooled over
   the present phases into one image embedding (``fusion="mean"`` skips the
   attention and the phase embeddings: the "no fusion" ablation).
4. Cosine similarity with the frozen text embeddings of the "low" and "high"
   TSR prompts (each class the mean of its templates), times a logit scale,
   gives two logits; ``softmax[..., 1]`` is the probability of high TSR.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ml.compat import open_clip
from ml.tsr.config import CLASSES, ClipConfig, PromptConfig, TsrConfig, TsrError

log = logging.getLogger(__name__)

PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def build_clip(config: ClipConfig) -> nn.Module:
    """An open_clip ``CLIP`` (ViT image tower, transformer text tower) from ``config``."""
    vision = config.vision
    text = config.text
    model: nn.Module = open_clip.model.CLIP(
        embed_dim=config.embed_dim,
        vision_cfg={"image_size": vision.image_size, "patch_size": vision.patch_size,
                    "width": vision.width, "layers": vision.layers,
                    "head_width": vision.head_width},
        text_cfg={"context_length": text.context_length, "width": text.width,
                  "heads": text.heads, "layers": text.layers})
    return model


def encode_image(clip: nn.Module, images: torch.Tensor, normalize: bool = True,
                 ) -> torch.Tensor:
    """CLIP image embeddings of network-ready images (open_clip is untyped)."""
    out: torch.Tensor = cast(Any, clip).encode_image(images, normalize=normalize)
    return out


def encode_text(clip: nn.Module, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """CLIP text embeddings of token ids."""
    out: torch.Tensor = cast(Any, clip).encode_text(ids, normalize=normalize)
    return out


def clip_logit_scale(clip: nn.Module) -> torch.Tensor:
    """CLIP's own (contrastive) logit scale, ``exp`` of its parameter."""
    out: torch.Tensor = cast(Any, clip).logit_scale.exp()
    return out


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """Token ids of ``texts`` with open_clip's standard BPE tokenizer (shipped, no download)."""
    ids: torch.Tensor = _tokenizer(context_length)(texts)
    return ids


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> Any:
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def load_clip_checkpoint(clip: nn.Module, path: Path) -> None:
    """Load a site's CLIP weights (a ``state_dict`` file for the same architecture config).

    A ``{"state_dict": ...}`` wrapper and ``module.`` prefixes (DataParallel) are accepted.

    Raises
    ------
    TsrError
        If the file is missing, is not a state dict, or does not fit the configured CLIP.
    """
    if not path.is_file():
        raise TsrError(f"CLIP checkpoint {path} does not exist")
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TsrError(f"CLIP checkpoint {path} cannot be read: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise TsrError(f"CLIP checkpoint {path} is not a state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TsrError(f"CLIP checkpoint {path} does not match the configured CLIP "
                       f"architecture: {exc}") from exc
    log.info("loaded the site CLIP checkpoint (%d tensors)", len(state))


class Adapter(nn.Module):
    """Residual bottleneck adapter: ``alpha * A(f) + (1 - alpha) * f``."""

    def __init__(self, dim: int, reduction: int, alpha: float) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.alpha = alpha
        self.block = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Adapted features, same shape as ``features``."""
        if self.alpha == 0.0:
            return features
        out: torch.Tensor = self.alpha * self.block(features) + (1.0 - self.alpha) * features
        return out


class PhaseFusion(nn.Module):
    """Self-attention over the phase tokens (with phase embeddings), mean-pooled."""

    def __init__(self, dim: int, phases: int, heads: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.phase_embedding = nn.Parameter(torch.randn(phases, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Pool ``(B, P, D)`` tokens over the phases marked in ``present`` ``(B, P)``."""
        weights = present.to(tokens.dtype).unsqueeze(-1)
        if self.mode == "attention":
            x = tokens + self.phase_embedding.unsqueeze(0)
            h = self.norm(x)
            attended, _ = self.attention(h, h, h, key_padding_mask=~present,
                                         need_weights=False)
            tokens = x + attended
        pooled: torch.Tensor = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return pooled


class TsrNet(nn.Module):
    """Frozen CLIP towers, per-phase adapters, phase fusion and prompt logits."""

    def __init__(self, config: TsrConfig) -> None:
        super().__init__()
        self.config = config
        self.phases = config.head.phases
        dim = config.clip.embed_dim
        head = config.head
        self.clip = build_clip(config.clip)
        self.adapters = nn.ModuleDict({p: Adapter(dim, head.reduction, head.alpha)
                                       for p in self.phases})
        self.fusion = PhaseFusion(dim, len(self.phases), head.heads, head.fusion)
        scale = torch.tensor(float(head.logit_scale_init)).log()
        self.log_logit_scale = nn.Parameter(scale, requires_grad=head.learn_logit_scale)
        self._prompts: torch.Tensor | None = None

    def freeze_encoders(self) -> None:
        """Freeze both CLIP towers (and CLIP's own logit scale)."""
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()

    def train(self, mode: bool = True) -> TsrNet:
        """Train mode for the head; the CLIP stays in eval mode when frozen."""
        super().train(mode)
        if not any(p.requires_grad for p in self.clip.parameters()):
            self.clip.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters trained on TSR labels (everything outside the CLIP)."""
        return [p for name, p in self.named_parameters()
                if not name.startswith("clip.") and p.requires_grad]

    def load_state_dict(self, state_dict: Any, strict: bool = True,
                        assign: bool = False) -> Any:
        """Load weights and forget the cached prompt embeddings."""
        self._prompts = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_clip(self, path: Path) -> None:
        """Load a site's CLIP checkpoint into the CLIP towers."""
        self._prompts = None
        load_clip_checkpoint(self.clip, path)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP embeddings of ``(N, 3, S, S)`` crops in [0, 1]."""
        x = (images - PIXEL_MEAN) / PIXEL_STD
        return encode_image(self.clip, x)

    def prompt_features(self) -> torch.Tensor:
        """``(2, D)`` normalised text embeddings of the low and high prompts (cached)."""
        if self._prompts is None or self._prompts.device != self.log_logit_scale.device:
            self._prompts = encode_prompts(self.clip, self.config.prompts,
                                           self.config.clip.text.context_length)
        return self._prompts

    def head(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` logits from ``(B, P, D)`` frozen features and a ``(B, P)`` mask.

        Raises
        ------
        TsrError
            If a row has no phase present or the phase count differs from the config.
        """
        if features.shape[1] != len(self.phases):
            raise TsrError(f"the head takes {len(self.phases)} phase tokens "
                           f"({self.phases}), got {features.shape[1]}")
        if not bool(present.any(1).all()):
            raise TsrError("every case needs at least one CT phase")
        tokens = torch.stack([self.adapters[p](features[:, i])
                              for i, p in enumerate(self.phases)], 1)
        pooled = F.normalize(self.fusion(tokens, present), dim=-1)
        logits: torch.Tensor = self.log_logit_scale.exp() * pooled @ self.prompt_features().T
        return logits

    def forward(self, images: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` logits from ``(B, P, 3, S, S)`` crops (absent phases: any values)."""
        b, p = images.shape[:2]
        features = self.image_features(images.flatten(0, 1)).view(b, p, -1)
        return self.head(features, present)


def encode_prompts(clip: nn.Module, prompts: PromptConfig, context_length: int) -> torch.Tensor:
    """Mean normalised text embedding of each class's prompts, renormalised: ``(2, D)``."""
    device = next(clip.parameters()).device
    rows = []
    with torch.no_grad():
        for name in CLASSES:
            ids = tokenize(prompts.texts(name), context_length).to(device)
            emb = encode_text(clip, ids).mean(0)
            rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def build_network(config: TsrConfig, state_dict: dict[str, torch.Tensor] | None = None,
                  ) -> TsrNet:
    """A ``TsrNet`` for ``config``; weights from ``state_dict`` or else ``clip_checkpoint``.

    Raises
    ------
    TsrError
        If the weights do not fit the configured network or the checkpoint is unusable.
    """
    net = TsrNet(config)
    if state_dict is not None:
        try:
            net.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise TsrError(f"weights do not fit the configured TSR network: {exc}") from exc
    elif config.clip_checkpoint:
        net.load_clip(Path(config.clip_checkpoint))
    return net
