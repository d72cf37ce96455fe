"""Model A training, packaging, inference and scoring on a tiny synthetic cohort.

One tiny cohort (120 patients: 60 CRC over 3 centres, 20 of them in the held-out
centre) is made per module; fewer leave the held-out centre too small to rank. The test
config reads every tissue tile of a slide (16 um/px, 16 px tiles, no sampling), so
the cached training examples and the inference path see the same tiles and must
give the same outputs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ml.crc import cli
from ml.crc.batch import collate, run_batch
from ml.crc.card import input_spec
from ml.crc.clinical import CrcClinical, fit_stats
from ml.crc.config import CrcConfig, NetworkSizes, TileReading
from ml.crc.data import CrcExample, load_examples
from ml.crc.evaluate import score_crc
from ml.crc.metrics import predict_examples
from ml.crc.predict import CrcPredictor
from ml.crc.train import LOG_FILE, TrainSettings, fit, train
from ml.errors import ConfigError
from ml.manifest import load_manifest, split_by_centre
from ml.package import read_package, write_package
from ml.seg.data import load_labels, load_series
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.wsi_tiles import read_tissue_tiles

CONFIG = CrcConfig(tiles=TileReading(mpp=16.0, tile_px=16, max_tiles=1024),
                   network=NetworkSizes(d_model=16, ct_channels=6, tumour_channels=4,
                                        tile_dim=16, attention_dim=8, clinical_hidden=16))
CPU = torch.device("cpu")
SEG_PACKAGE = Path(__file__).resolve().parents[1] / "models" / "seg-synthetic"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crc-cohort")
    generate_cohort(CohortOptions(out=out, patients=120, seed=21, centres=3, size="tiny"))
    return out / "manifest.json"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> TrainSettings:
    return TrainSettings(epochs=4, seed=3, threads=2, batch_size=6, tiles_per_slide=16,
                         lr=3e-3, test_centre="C3", patience=10,
                         cache_dir=tmp_path_factory.mktemp("crc-cache"), config=CONFIG)


@pytest.fixture(scope="module")
def examples(cohort: Path, settings: TrainSettings) -> dict[str, list[CrcExample]]:
    split = split_by_centre(load_manifest(cohort).group("CRC"), "C3", 0.2, settings.seed)
    return {name: load_examples(getattr(split, name), CONFIG, cohort, settings.cache_dir)
            for name in ("train", "val", "test")}


@pytest.fixture(scope="module")
def trained(cohort: Path, settings: TrainSettings, tmp_path_factory: pytest.TempPathFactory,
            ) -> tuple[Path, dict[str, object]]:
    out = tmp_path_factory.mktemp("crc-pkg") / "crc-test"
    done = train(cohort, out, settings)
    return out, {"train_losses": done.train_losses, "split": done.split}


def test_training_writes_a_synthetic_package_and_reduces_the_loss(
        trained: tuple[Path, dict[str, object]], cohort: Path) -> None:
    out, result = trained
    losses = result["train_losses"]
    assert isinstance(losses, list) and losses[-1] < losses[0]
    package = read_package(out, "crc-liver-metastasis")
    meta = package.metadata
    assert meta["training_data"]["synthetic"] is True
    assert meta["training_data"]["split"]["test_centre"] == "C3"
    assert meta["training_data"]["cohort_seed"] == 21
    assert set(meta["training_data"]["split"]["train"]["per_centre"]) == {"C1", "C2"}
    assert 0.0 < package.threshold < 1.0
    assert "auc_3y" in meta["metrics"]["validation"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "TRAINED ON SYNTHETIC DATA" in card and "RESEARCH USE ONLY" in card
    log = (out / LOG_FILE).read_text()
    assert "epoch 1" in log
    ids = [p.patient_id for p in load_manifest(cohort).patients]
    assert not any(pid in log for pid in ids)  # no patient identifiers in the log
    with pytest.raises(ConfigError, match="centre C1 was a training centre"):
        score_crc(out, cohort, test_centre="C1")


def test_inference_path_matches_the_training_path(trained: tuple[Path, dict[str, object]],
                                                  cohort: Path,
                                                  examples: dict[str, list[CrcExample]]) -> None:
    out, _ = trained
    predictor = CrcPredictor.from_package(out, device="cpu")
    cached = predict_examples(predictor.net, examples["test"][:3], predictor.config, CPU)
    patients = {p.index: p for p in load_manifest(cohort).patients}
    for i, example in enumerate(examples["test"][:3]):
        p = patients[example.index]
        ct = load_series(p.ct_folder("venous"))
        folder = p.wsi_folder()
        assert folder is not None
        result = predictor.predict(ct.hu, ct.spacing_mm, load_labels(p.labels_path(), ct),
                                   read_tissue_tiles(folder, predictor.tile_spec),
                                   CrcClinical.from_labels(p.labels, p.age_years, p.sex))
        assert result.probability == pytest.approx(cached.prob[i], abs=1e-5)
        assert result.tile_attention.shape == (example.tiles.shape[0],)
        assert result.inputs_missing == []


def test_package_round_trip_gives_identical_outputs(
        examples: dict[str, list[CrcExample]], settings: TrainSettings, tmp_path: Path) -> None:
    s = replace(settings, epochs=1, config=replace(CONFIG, clinical=fit_stats(
        [e.clinical for e in examples["train"]])))
    net, _ = fit(examples["train"], examples["val"], s, CPU)
    write_package(tmp_path / "pkg", name="t", version="1", task="crc-liver-metastasis",
                  config=s.config.to_dict(), state_dict=net.state_dict(), threshold=0.3,
                  inputs=input_spec(s.config), training_data={"synthetic": True}, metrics={},
                  card="test")
    loaded = CrcPredictor.from_package(tmp_path / "pkg", device="cpu").net
    batch = collate(examples["test"], s.config.clinical)
    with torch.no_grad():
        a, b = run_batch(net.eval(), batch, CPU), run_batch(loaded, batch, CPU)
    assert torch.equal(a.logit, b.logit) and torch.equal(a.hazard_logits, b.hazard_logits)


def test_same_seed_gives_the_same_weights(examples: dict[str, list[CrcExample]],
                                          settings: TrainSettings) -> None:
    s = replace(settings, epochs=1, config=replace(CONFIG, clinical=fit_stats(
        [e.clinical for e in examples["train"]])))
    first, _ = fit(examples["train"], examples["val"], s, CPU)
    second, _ = fit(examples["train"], examples["val"], s, CPU)
    other, _ = fit(examples["train"], examples["val"], replace(s, seed=s.seed + 1), CPU)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _planted(examples: list[CrcExample], z_ct: dict[int, float]) -> list[CrcExample]:
    """Outcome = liver texture latent above 0: only the CT shows it."""
    return [replace(e, y3=float(z_ct[e.index] > 0), event=z_ct[e.index] > 0,
                    time_months=10.0 if z_ct[e.index] > 0 else 36.0,
                    clinical=CrcClinical()) for e in examples]


def test_training_learns_the_planted_ct_signal(cohort: Path, settings: TrainSettings,
                                               examples: dict[str, list[CrcExample]]) -> None:
    z_ct = {p.index: float(p.labels["z_ct"]) for p in load_manifest(cohort).group("CRC")}
    train_ex = _planted(examples["train"] + examples["val"], z_ct)
    test_ex = _planted(examples["test"], z_ct)
    s = replace(settings, epochs=12, lr=5e-3, config=replace(CONFIG, clinical=fit_stats(
        [e.clinical for e in examples["train"]])))
    net, _ = fit(train_ex, [], s, CPU)
    pred = predict_examples(net, test_ex, s.config, CPU)
    y = np.array([e.y3 for e in test_ex])
    assert 0 < y.sum() < y.size
    assert roc_auc_score(y, pred.prob) >= 0.8  # held-out centre, never seen in training


@pytest.mark.slow
def test_cli_trains_and_scorer_returns_a_scored_test_set(cohort: Path, settings: TrainSettings,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["A", "--manifest", str(cohort), "--out", str(tmp_path / "pkg"),
                              "--epochs", "1", "--cache", str(settings.cache_dir)])
    assert args.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["split"]["test_centre"] == "C3" and summary["epochs_run"] == 1
    scored = score_crc(tmp_path / "pkg", cohort, device="cpu", threads=1)
    assert scored.n == len([p for p in load_manifest(cohort).group("CRC") if p.centre == "C3"])
    assert set(scored.comparators) == {"TNM stage only", "CEA only", "clinical only"}
    assert scored.has_survival and scored.tested == ["TNM stage only", "CEA only"]
    segmented = score_crc(tmp_path / "pkg", cohort, device="cpu", threads=1,
                          segmentation=SEG_PACKAGE)
    assert segmented.patient_ids == scored.patient_ids
    assert segmented.notes[0].startswith("Crops placed on the output of segmentation package")
    assert not np.allclose(segmented.prob, scored.prob)  # the crops moved
