"""TSR model: config, network (adapter, fusion, frozen CLIP, site checkpoint) and crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ml.errors import ConfigError
from ml.seg import CLASSES
from ml.tsr.config import (
    ClipConfig,
    CropConfig,
    TextConfig,
    TsrConfig,
    TsrError,
    VisionConfig,
    config_from_dict,
)
from ml.tsr.data import crop_centre, phase_crop, relative_enhancement
from ml.tsr.network import Adapter, TsrNet, build_clip, build_network
from ml.tsr.pretrain import PretrainSettings, augment, contrastive_loss, grade_edges, report

SMALL = TsrConfig(
    clip=ClipConfig(embed_dim=32,
                    vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1,
                                        head_width=16),
                    text=TextConfig(context_length=24, width=32, heads=2, layers=1)),
    crop=CropConfig(spacing_mm=6.0, slice_offset_mm=5.0, window_hu=(0.0, 200.0)))
TUMOUR = CLASSES.index("tumour")
PANCREAS = CLASSES.index("pancreas")


def _phantom(tumour_hu: float, with_tumour: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A 20 x 40 x 40 volume: pancreas (110 HU) block holding a tumour cube, fat around."""
    hu = np.full((20, 40, 40), -100.0, np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    hu[6:14, 10:30, 8:34] = 110.0
    labels[6:14, 10:30, 8:34] = PANCREAS
    if with_tumour:
        hu[8:12, 14:20, 22:28] = tumour_hu
        labels[8:12, 14:20, 22:28] = TUMOUR
    return hu, labels


def test_config_round_trip_and_errors() -> None:
    data = SMALL.model_dump(mode="json")
    assert config_from_dict(data) == SMALL
    with pytest.raises(ConfigError, match="unknown_key"):
        config_from_dict({**data, "unknown_key": 1})
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        config_from_dict({"clip": {"vision": {"image_size": 30, "patch_size": 8}}})
    with pytest.raises(ConfigError, match="phases"):
        config_from_dict({"head": {"phases": ["delayed"]}})
    assert SMALL.prompts.texts("high")[0] == (
        "contrast ct of a pancreatic cancer with high tumour-stroma ratio")


def test_adapter_alpha_zero_leaves_frozen_features_unchanged() -> None:
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    assert torch.equal(Adapter(32, 2, alpha=0.0)(features), features)
    assert not torch.allclose(Adapter(32, 2, alpha=0.5)(features), features)
    net = TsrNet(SMALL.with_head(alpha=0.0))
    images = torch.rand(3, 3, 16, 16)
    frozen = net.image_features(images)
    for adapter in net.adapters.values():
        assert torch.equal(adapter(frozen), frozen)


def test_encoders_frozen_and_head_trains() -> None:
    torch.manual_seed(1)
    net = TsrNet(SMALL)
    net.freeze_encoders()
    clip_before = {k: v.clone() for k, v in net.clip.state_dict().items()}
    names = {n for n, p in net.named_parameters() if any(p is q for q in net.head_parameters())}
    assert names and not any(n.startswith("clip.") for n in names)
    assert "log_logit_scale" in names
    optimiser = torch.optim.SGD(net.head_parameters(), lr=0.5)
    net.train()
    assert not net.clip.training
    logits = net(torch.rand(4, 2, 3, 16, 16), torch.ones(4, 2, dtype=torch.bool))
    assert logits.shape == (4, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()  # type: ignore[no-untyped-call]
    optimiser.step()
    for key, value in net.clip.state_dict().items():
        assert torch.equal(value, clip_before[key]), key


def test_missing_phase_token_is_masked() -> None:
    torch.manual_seed(2)
    net = TsrNet(SMALL).eval()
    feats = torch.nn.functional.normalize(torch.randn(2, 2, 32), dim=-1)
    only_arterial = torch.tensor([[True, False], [True, False]])
    with torch.no_grad():
        a = net.head(feats, only_arterial)
        changed = feats.clone()
        changed[:, 1] = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
        b = net.head(changed, only_arterial)
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(TsrError, match="at least one CT phase"):
        net.head(feats, torch.zeros(2, 2, dtype=torch.bool))


def test_site_clip_checkpoint_loads_by_path(tmp_path: Path) -> None:
    torch.manual_seed(3)
    site_clip = build_clip(SMALL.clip)
    path = tmp_path / "site_clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in site_clip.state_dict().items()}},
               path)
    net = build_network(SMALL.model_copy(update={"clip_checkpoint": str(path)}))
    for key, value in site_clip.state_dict().items():
        assert torch.equal(net.clip.state_dict()[key], value), key
    assert not torch.equal(TsrNet(SMALL).clip.state_dict()["visual.proj"],
                           site_clip.state_dict()["visual.proj"])
    other = SMALL.model_copy(update={"clip": SMALL.clip.model_copy(update={"embed_dim": 16}),
                                     "clip_checkpoint": str(path)})
    with pytest.raises(TsrError, match="does not match the configured CLIP"):
        build_network(other)
    with pytest.raises(TsrError, match="does not exist"):
        build_network(SMALL.model_copy(update={"clip_checkpoint": str(tmp_path / "no.pt")}))


def test_phase_crop_centres_on_tumour_and_falls_back_to_pancreas() -> None:
    hu, labels = _phantom(tumour_hu=40.0)
    crop = phase_crop(hu, (5.0, 6.0, 6.0), labels, SMALL)
    assert crop.shape == (3, 16, 16) and crop.dtype == np.float32
    assert crop.min() >= 0.0 and crop.max() <= 1.0
    assert crop[1, 7:9, 7:9] == pytest.approx(40.0 / 200.0, abs=1e-3)
    assert relative_enhancement(hu, labels) == pytest.approx(-70.0)
    hu2, labels2 = _phantom(tumour_hu=40.0, with_tumour=False)
    assert crop_centre(labels2)[1] == "pancreas"
    centre = phase_crop(hu2, (5.0, 6.0, 6.0), labels2, SMALL)
    assert centre[1, 7:9, 7:9] == pytest.approx(110.0 / 200.0, abs=1e-3)
    assert np.isnan(relative_enhancement(hu2, labels2))
    with pytest.raises(TsrError, match="neither a pancreatic tumour nor a pancreas"):
        phase_crop(hu, (5.0, 6.0, 6.0), np.zeros_like(labels), SMALL)
    with pytest.raises(TsrError, match="same grid"):
        phase_crop(hu, (5.0, 6.0, 6.0), labels[:-1], SMALL)


def test_reports_grade_enhancement_by_training_quantiles() -> None:
    rng = np.random.default_rng(0)
    enhancement = np.stack([rng.normal(-40, 20, 200), rng.normal(-20, 15, 200)], 1)
    edges = grade_edges(enhancement)
    assert edges.shape == (2, 7) and np.all(np.diff(edges, axis=1) > 0)
    assert report("arterial", -200.0, edges[0], "head") == (
        "arterial phase ct: markedly hypoenhancing pancreatic head mass")
    assert report("venous", 50.0, edges[1], None) == (
        "venous phase ct: relatively hyperenhancing pancreatic mass")
    with pytest.raises(TsrError, match="grading needs"):
        grade_edges(enhancement[:3])


def test_contrastive_loss_prefers_matching_pairs() -> None:
    torch.manual_seed(4)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    index = torch.tensor([0, 1, 2, 0])
    matched = contrastive_loss(text[index], text, index, torch.tensor(10.0))
    shuffled = contrastive_loss(text[torch.tensor([1, 2, 0, 1])], text, index,
                                torch.tensor(10.0))
    assert float(matched) < float(shuffled)
    images = torch.rand(4, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    out = augment(images, gen, PretrainSettings())
    assert out.shape == images.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
