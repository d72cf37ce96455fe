"""The TSR model's configuration: one validated, frozen object stored in the package.

``TsrConfig`` decides the network (CLIP towers, adapters, fusion, prompts) and
the input preparation (crop size, spacing, HU window). It is written to
``configs/config.json`` as ``TsrConfig.model_dump(mode="json")`` and read back
with :func:`config_from_dict`, so training and inference build the same model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ml.errors import ConfigError, OncopacsError

PHASES: tuple[str, str] = ("arterial", "venous")
"""CT phases in token order."""
INPUT_NAMES: dict[str, str] = {"arterial": "ct_arterial", "venous": "ct_venous"}
"""Input names (as in the package's input specification) of each phase."""
CLASSES: tuple[str, str] = ("low", "high")
"""Prompt classes in logit order: index 1 is high tumour-stroma ratio."""


class TsrError(OncopacsError):
    """TSR data, training or inference cannot go on (names the patient, file or setting)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VisionConfig(_Frozen):
    """The CLIP image tower (an open_clip VisionTransformer)."""

    image_size: int = Field(default=32, ge=16)
    patch_size: int = Field(default=8, ge=2)
    width: int = Field(default=64, ge=16)
    layers: int = Field(default=3, ge=1)
    head_width: int = Field(default=32, ge=8)

    @model_validator(mode="after")
    def _fits(self) -> VisionConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.width % self.head_width:
            raise ValueError(f"width {self.width} is not a multiple of head_width "
                             f"{self.head_width}")
        return self


class TextConfig(_Frozen):
    """The CLIP text tower (an open_clip TextTransformer with the standard BPE tokenizer)."""

    context_length: int = Field(default=32, ge=8, le=77)
    width: int = Field(default=64, ge=16)
    heads: int = Field(default=4, ge=1)
    layers: int = Field(default=2, ge=1)


class ClipConfig(_Frozen):
    """A small CLIP: joint embedding size and both towers."""

    embed_dim: int = Field(default=64, ge=8)
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()


class CropConfig(_Frozen):
    """A 2.5D crop per phase: three axial planes (centre -/+ ``slice_offset_mm``) as channels."""

    spacing_mm: float = Field(default=3.0, gt=0)
    slice_offset_mm: float = Field(default=5.0, ge=0)
    window_hu: tuple[float, float] = (0.0, 200.0)

    @model_validator(mode="after")
    def _window(self) -> CropConfig:
        if self.window_hu[1] <= self.window_hu[0]:
            raise ValueError(f"window_hu {self.window_hu} must rise")
        return self


class HeadConfig(_Frozen):
    """Adapters, fusion and logits on top of the frozen CLIP."""

    phases: tuple[str, ...] = PHASES
    alpha: float = Field(default=0.6, ge=0.0, le=1.0)
    reduction: int = Field(default=2, ge=1)
    fusion: Literal["attention", "mean"] = "attention"
    heads: int = Field(default=4, ge=1)
    logit_scale_init: float = Field(default=20.0, gt=0)
    learn_logit_scale: bool = True

    @model_validator(mode="after")
    def _phases(self) -> HeadConfig:
        if not self.phases or len(set(self.phases)) != len(self.phases) or any(
                p not in PHASES for p in self.phases):
            raise ValueError(f"phases {self.phases} must be distinct names of {PHASES}")
        return self


class PromptConfig(_Frozen):
    """Prompt templates (``{}`` takes a class word) and the words of each class."""

    templates: tuple[str, ...] = (
        "contrast ct of a pancreatic cancer with {} tumour-stroma ratio",
        "pancreatic ductal adenocarcinoma with {} stroma content on ct",
        "a {} tumour-stroma ratio pancreatic tumour",
    )
    low: tuple[str, ...] = ("low",)
    high: tuple[str, ...] = ("high",)

    @model_validator(mode="after")
    def _slots(self) -> PromptConfig:
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("every prompt template needs exactly one '{}'")
        if not self.low or not self.high:
            raise ValueError("both classes need at least one word")
        return self

    def texts(self, name: str) -> list[str]:
        """Every prompt of class ``name`` ("low" or "high")."""
        words = self.low if name == "low" else self.high
        return [t.format(w) for t in self.templates for w in words]


class TsrConfig(_Frozen):
    """Everything that builds the TSR network and prepares its inputs."""

    clip: ClipConfig = ClipConfig()
    crop: CropConfig = CropConfig()
    head: HeadConfig = HeadConfig()
    prompts: PromptConfig = PromptConfig()
    clip_checkpoint: str | None = None

    @property
    def image_size(self) -> int:
        """Crop edge in pixels (the CLIP image size)."""
        return self.clip.vision.image_size

    def with_head(self, **changes: Any) -> TsrConfig:
        """A copy with some head settings changed (for ablations)."""
        return self.model_copy(update={"head": self.head.model_copy(update=changes)})

    def crop_key(self) -> str:
        """Short hash of what decides a crop (for the crop cache)."""
        spec = {"crop": self.crop.model_dump(mode="json"), "size": self.image_size}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def config_from_dict(data: dict[str, Any], where: str = "config") -> TsrConfig:
    """Validate a config dict (e.g. a package's ``configs/config.json``).

    Raises
    ------
    ConfigError
        If a key is unknown or a value is out of range; the message names it.
    """
    try:
        return TsrConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: invalid TSR model config: {exc}") from exc
