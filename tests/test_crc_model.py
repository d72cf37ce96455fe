"""Model A building blocks: hazard likelihood, network, crops, clinical encoding, predictor.

No cohort is needed: the predictor tests use an untrained network written as a
package, which is enough to check the input handling (missing modalities, tile
batches consumed one at a time, save/load round trip).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.crc.card import input_spec
from ml.crc.clinical import FIELDS, VALUES, WIDTH, CrcClinical, clinical_vector, fit_stats
from ml.crc.config import ClinicalStats, CrcConfig, CrcError, CtCrops, NetworkSizes, TileReading
from ml.crc.data import crops_from_volume
from ml.crc.network import (
    CrcInputs,
    CrcNet,
    GatedAttention,
    cumulative_incidence,
    discrete_time_nll,
)
from ml.crc.predict import CrcPredictor
from ml.errors import ConfigError
from ml.package import write_package
from ml.wsi_tiles import TileBatch

SMALL = CrcConfig(ct=CtCrops(liver_shape_vox=(8, 10, 12), tumour_shape_vox=(6, 6, 6)),
                  tiles=TileReading(tile_px=16, max_tiles=16),
                  network=NetworkSizes(d_model=16, ct_channels=4, tumour_channels=4, tile_dim=16,
                                       attention_dim=8, clinical_hidden=8))


def _phantom(shift_hu: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 20 x 40 x 40 volume (5 x 4 x 4 mm): a textured liver block and a small tumour."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((20, 40, 40), dtype=np.uint8)
    labels[4:16, 8:30, 6:34] = 1
    labels[8:11, 33:37, 18:22] = 3
    hu = np.full(labels.shape, -100.0, dtype=np.float32)
    hu[labels == 1] = 110.0 + rng.normal(0.0, 15.0, int((labels == 1).sum()))
    hu[labels == 3] = 60.0
    return hu + shift_hu, labels


def _inputs(batch: int, config: CrcConfig, tiles: int = 5) -> CrcInputs:
    g = torch.Generator().manual_seed(0)
    liver = torch.randn((batch, 2, *config.ct.liver_shape_vox), generator=g)
    liver[:, 1] = (liver[:, 1] > -0.5).float()
    tumour = torch.randn((batch, 2, *config.ct.tumour_shape_vox), generator=g)
    tumour[:, 1] = (tumour[:, 1] > 0.5).float()
    return CrcInputs(
        liver=liver, tumour=tumour,
        ct_present=torch.ones(batch, dtype=torch.bool),
        tile_emb=torch.randn((batch, tiles, config.network.tile_dim), generator=g),
        tile_mask=torch.ones((batch, tiles), dtype=torch.bool),
        wsi_present=torch.ones(batch, dtype=torch.bool),
        clinical=torch.randn((batch, WIDTH), generator=g),
        clinical_present=torch.ones(batch, dtype=torch.bool))


def test_hazard_likelihood_on_hand_made_values() -> None:
    logits = torch.tensor([[0.0, 1.0, -1.0, 0.5, 0.0, -2.0]] * 4)
    h = torch.sigmoid(logits[0]).double()
    time = torch.tensor([14.0, 14.0, 36.0, 40.0])
    event = torch.tensor([True, False, False, True])
    # 14 months is interval 2 (12-18): the event patient survived 0 and 1 and failed in 2;
    # censored at 14 months survived 0 and 1 only; followed to 36 survived all six;
    # an event after the horizon counts in the last interval.
    expected = [
        math.log(h[2]) + math.log(1 - h[0]) + math.log(1 - h[1]),
        math.log(1 - h[0]) + math.log(1 - h[1]),
        sum(math.log(1 - v) for v in h.tolist()),
        math.log(h[5]) + sum(math.log(1 - v) for v in h[:5].tolist()),
    ]
    for i in range(4):
        got = discrete_time_nll(logits[i:i + 1], time[i:i + 1], event[i:i + 1], 6.0)
        assert float(got) == pytest.approx(-expected[i], rel=1e-5)
    batch = discrete_time_nll(logits, time, event, 6.0)
    assert float(batch) == pytest.approx(-sum(expected) / 4, rel=1e-5)


def test_censoring_pushes_hazards_down_and_events_up() -> None:
    logits = torch.zeros((1, 6), requires_grad=True)
    torch.autograd.backward(discrete_time_nll(logits, torch.tensor([20.0]),
                                              torch.tensor([False]), 6.0))
    assert logits.grad is not None
    assert (logits.grad[0, :3] > 0).all() and (logits.grad[0, 3:] == 0).all()
    logits.grad = None
    torch.autograd.backward(discrete_time_nll(logits, torch.tensor([20.0]),
                                              torch.tensor([True]), 6.0))
    assert logits.grad is not None
    assert logits.grad[0, 3] < 0 and (logits.grad[0, :3] > 0).all()


def test_cumulative_incidence_is_one_minus_survival() -> None:
    logits = torch.tensor([[-1.0, 0.0, 2.0]])
    h = torch.sigmoid(logits[0])
    expected = [1 - (1 - h[0]), 1 - (1 - h[0]) * (1 - h[1]),
                1 - (1 - h[0]) * (1 - h[1]) * (1 - h[2])]
    assert cumulative_incidence(logits)[0].tolist() == pytest.approx([float(v) for v in expected])


def test_gated_attention_ignores_padding_and_empty_bags() -> None:
    pool = GatedAttention(4, 3)
    h = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    emb, weights = pool(h, mask)
    assert float(weights[0].sum().detach()) == pytest.approx(1.0)
    assert (weights[0, 3:] == 0).all() and (weights[1] == 0).all()
    assert torch.allclose(emb[0], (weights[0, :3, None] * h[0, :3]).sum(0), atol=1e-6)
    assert (emb[1] == 0).all()


@pytest.mark.parametrize("absent", [(), ("wsi",), ("clinical",), ("wsi", "clinical"),
                                    ("ct", "wsi", "clinical")])
def test_any_subset_of_modalities_gives_a_result(absent: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    net = CrcNet(SMALL).eval()
    x = _inputs(3, SMALL)
    for name in absent:
        setattr(x, f"{name}_present", torch.zeros(3, dtype=torch.bool))
    out = net(x)
    assert out.logit.shape == (3,) and out.hazard_logits.shape == (3, 6)
    assert torch.isfinite(out.logit).all()
    # An absent modality's content plays no part: garbage there changes nothing.
    y = _inputs(3, SMALL)
    for name in absent:
        setattr(y, f"{name}_present", torch.zeros(3, dtype=torch.bool))
    y.liver, y.tumour, y.tile_emb = x.liver, x.tumour, x.tile_emb
    y.clinical = x.clinical
    if "ct" in absent:
        y.liver, y.tumour = 100 * torch.ones_like(x.liver), -torch.ones_like(x.tumour)
    if "wsi" in absent:
        y.tile_emb = 5 + x.tile_emb
    if "clinical" in absent:
        y.clinical = 7 + x.clinical
    assert torch.allclose(net(y).logit, out.logit, atol=1e-5)


def test_modality_dropout_only_while_training() -> None:
    torch.manual_seed(0)
    net = CrcNet(SMALL)
    x = _inputs(64, SMALL)
    net.eval()
    assert torch.equal(net(x).logit, net(x).logit)
    net.train()
    torch.manual_seed(1)
    a = net(x).logit
    torch.manual_seed(2)
    assert not torch.allclose(a, net(x).logit)


def test_crops_are_centred_and_invariant_to_hu_shift() -> None:
    hu, labels = _phantom()
    crop = crops_from_volume(hu, (5.0, 4.0, 4.0), labels, CtCrops(liver_spacing_mm=6.0,
                                                                   liver_shape_vox=(16, 20, 24)))
    assert crop.liver.shape == (2, 16, 20, 24) and crop.tumour.shape == (2, 16, 16, 16)
    mask = crop.liver[1] > 0
    # liver 60 x 88 x 112 mm -> about 10 x 15 x 19 voxels of 6 mm, centred in the box
    assert 8 <= mask.any(axis=(1, 2)).sum() <= 12 and 16 <= mask.any(axis=(0, 1)).sum() <= 21
    centre = np.argwhere(mask).mean(axis=0)
    assert np.allclose(centre, [(16 - 1) / 2, (20 - 1) / 2, (24 - 1) / 2], atol=1.0)
    assert abs(float(np.median(crop.liver[0][mask]))) < 0.1  # median liver HU is 0
    assert (crop.liver[0][~mask] == 0).all() and crop.tumour[1].sum() > 0
    shifted = crops_from_volume(*_phantom(shift_hu=25.0)[:1], (5.0, 4.0, 4.0), labels,
                                CtCrops(liver_spacing_mm=6.0, liver_shape_vox=(16, 20, 24)))
    assert np.allclose(shifted.liver, crop.liver, atol=1e-4)


def test_crops_refuse_volumes_without_liver_or_with_bad_geometry() -> None:
    hu, labels = _phantom()
    with pytest.raises(CrcError, match="no liver"):
        crops_from_volume(hu, (5.0, 4.0, 4.0), np.where(labels == 1, 0, labels), SMALL)
    with pytest.raises(CrcError, match="same shape"):
        crops_from_volume(hu, (5.0, 4.0, 4.0), labels[:-1], SMALL)
    with pytest.raises(CrcError, match="spacing"):
        crops_from_volume(hu, (5.0, 0.0, 4.0), labels, SMALL)
    no_tumour = crops_from_volume(hu, (5.0, 4.0, 4.0), np.where(labels == 3, 0, labels), SMALL)
    assert not no_tumour.tumour.any()


def test_clinical_vector_flags_missing_fields() -> None:
    stats = ClinicalStats()
    full = clinical_vector(CrcClinical(3, 1, 2.5, 12.0, 70, "M", "rectum"), stats)
    assert full.shape == (WIDTH,) and not full[VALUES:].any()
    assert full[VALUES - 1] == 1.0  # rectum
    empty = clinical_vector(CrcClinical(), stats)
    assert (empty[:VALUES] == 0).all() and (empty[VALUES:] == 1).all()
    partial = clinical_vector(CrcClinical(cea_ug_l=10.0), stats)
    flags = dict(zip(FIELDS, partial[VALUES:].tolist(), strict=True))
    assert flags["cea"] == 0.0 and flags["tnm"] == 1.0
    assert partial[2] == pytest.approx((math.log(10.0) - stats.log_cea_mean) / stats.log_cea_sd)


@pytest.mark.parametrize("kwargs, field", [({"t_stage": 5}, "t_stage"), ({"n_stage": 3}, "n_stage"),
                                           ({"cea_ug_l": -1.0}, "cea_ug_l"), ({"sex": "X"}, "sex"),
                                           ({"site": "caecum"}, "site")])
def test_clinical_fields_are_validated(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(CrcError, match=field):
        CrcClinical(**kwargs)  # type: ignore[arg-type]


def test_clinical_stats_come_from_the_given_patients() -> None:
    stats = fit_stats([CrcClinical(2, 0, 1.0, 10.0, 60, "F", "rectum"),
                       CrcClinical(4, 2, math.e ** 2, 10.0, 80, None, None), CrcClinical()])
    assert stats.t_mean == 3.0 and stats.age_mean == 70.0 and stats.log_cea_mean == 1.0
    with pytest.raises(CrcError, match="t_stage"):
        fit_stats([CrcClinical(t_stage=2)])


def test_config_round_trips_and_rejects_unknown_sections() -> None:
    assert CrcConfig.from_dict(SMALL.to_dict()) == SMALL
    with pytest.raises(ConfigError, match="unknown section"):
        CrcConfig.from_dict({"optimiser": {}})
    with pytest.raises(ConfigError, match="network"):
        CrcConfig.from_dict({"network": {"width": 3}})
    assert SMALL.preprocessing_hash() != CrcConfig().preprocessing_hash()


@pytest.fixture(scope="module")
def untrained_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    net = CrcNet(SMALL)
    out = tmp_path_factory.mktemp("crc-pkg") / "crc-untrained"
    write_package(out, name="crc-untrained", version="0.0.1", task="crc-liver-metastasis",
                  config=SMALL.to_dict(), state_dict=net.state_dict(), threshold=0.5,
                  inputs=input_spec(SMALL), training_data={"synthetic": True}, metrics={},
                  card="untrained test package")
    return out


def _tile_batches(count: int, size: int, seen: list[int]) -> Iterator[TileBatch]:
    rng = np.random.default_rng(0)
    for start in range(0, count, size):
        n = min(size, count - start)
        seen.append(start)
        yield TileBatch(pixels=rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
                        location_px=np.arange(2 * n, dtype=np.int64).reshape(n, 2) + start,
                        location_mm=np.zeros((n, 2)), size_px=16,
                        tissue_fraction=np.ones(n), level=0, mpp=4.0)


def test_predictor_reports_used_and_missing_inputs(untrained_package: Path) -> None:
    predictor = CrcPredictor.from_package(untrained_package, device="cpu")
    hu, labels = _phantom()
    seen: list[int] = []
    full = predictor.predict(hu, (5.0, 4.0, 4.0), labels, _tile_batches(10, 4, seen),
                             CrcClinical(3, 1, 2.5, 12.0, 70, "M", "rectum"))
    assert seen == [0, 4, 8]  # consumed batch by batch
    assert full.inputs_missing == [] and {"ct", "wsi", "clinical", "tnm"} <= set(full.inputs_used)
    assert full.tile_attention.shape == (10,) and float(full.tile_attention.sum()) == \
        pytest.approx(1.0, rel=1e-5)
    assert full.tile_locations_px is not None and full.tile_locations_px.shape == (10, 2)
    assert full.risk_group == ("high risk" if full.probability >= 0.5 else "low risk")
    assert len(full.cumulative_incidence) == 6 and full.cumulative_incidence_36mo == \
        full.cumulative_incidence[-1]
    ct_only = predictor.predict(hu, (5.0, 4.0, 4.0), labels, None, None)
    assert ct_only.inputs_used == ["ct"]
    assert set(ct_only.inputs_missing) == {"wsi", "clinical", *FIELDS}
    assert ct_only.tile_attention.shape == (0,) and 0.0 <= ct_only.probability <= 1.0
    partial = predictor.predict(None, None, None, [np.zeros((3, 16, 16, 3), np.uint8)],
                                CrcClinical(cea_ug_l=4.0, age_years=60))
    assert set(partial.inputs_used) == {"wsi", "clinical", "cea", "age"}
    assert {"ct", "tnm", "ca19_9", "sex", "site"} == set(partial.inputs_missing)
    assert partial.tile_locations_px is None
    nothing = predictor.predict(None, None, None)
    assert nothing.inputs_used == [] and math.isfinite(nothing.probability)


def test_predictor_refuses_wrong_tiles_and_incomplete_ct(untrained_package: Path) -> None:
    predictor = CrcPredictor.from_package(untrained_package, device="cpu")
    with pytest.raises(CrcError, match="uint8"):
        predictor.predict(None, None, None, [np.zeros((2, 32, 32, 3), np.uint8)])
    hu, labels = _phantom()
    with pytest.raises(CrcError, match="spacing"):
        predictor.predict(hu, None, labels)
