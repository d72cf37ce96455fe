"""TSR model: training on a tiny synthetic cohort, the package, prediction, scoring, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from ml.errors import ConfigError
from ml.manifest import Patient, load_manifest, split_by_centre
from ml.package import PackageError, read_metadata
from ml.seg.data import load_labels, load_series
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.tsr import cli
from ml.tsr.ablations import COMPARATORS
from ml.tsr.config import TsrError
from ml.tsr.head import HeadSettings
from ml.tsr.predict import PhaseInput, TsrPredictor
from ml.tsr.pretrain import PretrainSettings
from ml.tsr.train import LOG_FILE, TrainResult, TrainSettings, train
from tests.test_tsr_model import SMALL

SEG_PACKAGE = Path(__file__).resolve().parents[1] / "models" / "seg-synthetic"


def _settings(cache: Path, seed: int = 0) -> TrainSettings:
    return TrainSettings(seed=seed, test_centre="C3", val_fraction=0.3, cache=cache,
                         model=SMALL, pretrain=PretrainSettings(epochs=8, batch_size=8),
                         head=HeadSettings(epochs=12, batch_size=8), show_progress=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tsr-cohort")
    generate_cohort(CohortOptions(out=out, patients=48, seed=7, centres=3, size="tiny"))
    return out / "manifest.json"


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    base = tmp_path_factory.mktemp("tsr-train")
    return train(cohort, base / "pkg", _settings(base / "cache"))


def _inputs(patient: Patient) -> tuple[PhaseInput, PhaseInput]:
    arterial = load_series(patient.ct_folder("arterial"))
    venous = load_series(patient.ct_folder("venous"))
    labels = load_labels(patient.labels_path(), venous)
    return (arterial.hu, arterial.spacing_mm, labels), (venous.hu, venous.spacing_mm, labels)


def _held_out(cohort: Path) -> list[Patient]:
    return split_by_centre(load_manifest(cohort).group("PDAC"), "C3", 0.3, 0).test


def test_training_reduces_loss_and_beats_chance(trained: TrainResult, cohort: Path) -> None:
    assert np.mean(trained.pretrain_loss[-2:]) < np.mean(trained.pretrain_loss[:2])
    assert np.mean(trained.head_loss[-3:]) < np.mean(trained.head_loss[:3])
    predictor = TsrPredictor.from_package(trained.out, device="cpu")
    test = _held_out(cohort)
    prob = np.array([predictor.predict(*_inputs(p)).probability for p in test])
    y = np.array([int(p.labels["tsr_high"]) for p in test])
    truth = np.array([p.labels["probability"] for p in test])
    assert roc_auc_score(y, prob) > 0.6
    assert spearmanr(prob, truth).statistic > 0.3


def test_package_contents_and_identical_reload(trained: TrainResult, cohort: Path) -> None:
    meta = read_metadata(trained.out)
    assert meta["task"] == "pdac-tsr" and meta["weights"]["sha256"] == trained.sha256
    assert [i["name"] for i in meta["inputs"]] == ["ct_arterial", "ct_venous"]
    data = meta["training_data"]
    assert data["synthetic"] is True
    assert data["split"]["test"]["per_centre"] == {"C3": 8}
    assert set(data["split"]["train"]["per_centre"]) == {"C1", "C2"}
    assert 0.0 < meta["threshold"] < 1.0
    card = (trained.out / "MODEL_CARD.md").read_text()
    assert "TRAINED ON SYNTHETIC DATA" in card and "RESEARCH USE ONLY" in card
    assert "arterial only" in card
    log = (trained.out / LOG_FILE).read_text()
    assert "pre-train epoch 8/8" in log and "SYN" not in log
    inputs = _inputs(_held_out(cohort)[0])
    first = TsrPredictor.from_package(trained.out, device="cpu").predict(*inputs)
    second = TsrPredictor.from_package(trained.out, device="cpu").predict(*inputs)
    assert first == second
    assert first.tsr_class == ("high TSR" if first.probability >= meta["threshold"]
                               else "low TSR")
    assert first.inputs_used == ["ct_arterial", "ct_venous"] and first.inputs_missing == []
    assert first.crop_source == {"ct_arterial": "tumour", "ct_venous": "tumour"}


def test_same_seed_gives_the_same_package(trained: TrainResult, cohort: Path,
                                          tmp_path: Path) -> None:
    cache = trained.out.parent / "cache"
    again = train(cohort, tmp_path / "pkg", _settings(cache))
    assert again.sha256 == trained.sha256
    assert again.metrics == trained.metrics
    assert again.threshold == trained.threshold


def test_missing_phase_gives_a_result_listing_it(trained: TrainResult, cohort: Path) -> None:
    predictor = TsrPredictor.from_package(trained.out, device="cpu")
    arterial, venous = _inputs(_held_out(cohort)[1])
    only_venous = predictor.predict(None, venous)
    assert only_venous.inputs_used == ["ct_venous"]
    assert only_venous.inputs_missing == ["ct_arterial"]
    assert 0.0 <= only_venous.probability <= 1.0
    shared = predictor.predict((arterial[0], arterial[1], None), venous)
    assert shared == predictor.predict(arterial, venous)
    with pytest.raises(TsrError, match="no CT phase was given"):
        predictor.predict(None, None)
    with pytest.raises(TsrError, match="no segmentation"):
        predictor.predict((arterial[0], arterial[1], None), None)


def test_corrupt_package_is_refused(trained: TrainResult, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for part in ("configs", "models"):
        (bad / part).mkdir()
        for file in (trained.out / part).iterdir():
            (bad / part / file.name).write_bytes(file.read_bytes())
    weights = bad / "models" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(PackageError, match="sha256"):
        TsrPredictor.from_package(bad, device="cpu")


def test_score_tsr_matches_predictions(trained: TrainResult, cohort: Path) -> None:
    from ml.tsr.evaluate import TRUTH, score_tsr

    scored = score_tsr(trained.out, cohort, device="cpu", threads=2,
                       cache=trained.out.parent / "cache")
    test = _held_out(cohort)
    assert scored.task == "pdac-tsr" and scored.n == len(test)
    assert scored.centres == ["C3"] * len(test)
    assert set(scored.comparators) == set(COMPARATORS)
    assert scored.tested == ["arterial only", "venous only"]
    assert scored.time_months is None and TRUTH in scored.reference
    predictor = TsrPredictor.from_package(trained.out, device="cpu")
    direct = [predictor.predict(*_inputs(p)).probability for p in test[:3]]
    np.testing.assert_allclose(scored.prob[:3], direct, atol=0.02)
    held = trained.metrics["auc_held_out"]
    for name in COMPARATORS:
        assert roc_auc_score(scored.y, scored.comparators[name]) == pytest.approx(
            held[name], abs=1e-4)
    with pytest.raises(ConfigError, match="training centre"):
        score_tsr(trained.out, cohort, test_centre="C1", cache=trained.out.parent / "cache")


def test_score_tsr_through_the_segmentation(trained: TrainResult, cohort: Path) -> None:
    """With a segmentation package the test crops come from its output, uncached."""
    from ml.tsr.evaluate import score_tsr

    cache = trained.out.parent / "cache"
    before = sorted(cache.rglob("*.npz"))
    truth = score_tsr(trained.out, cohort, device="cpu", threads=2, cache=cache)
    seg = score_tsr(trained.out, cohort, device="cpu", threads=2, cache=cache,
                    segmentation=SEG_PACKAGE)
    assert sorted(cache.rglob("*.npz")) == before
    assert seg.patient_ids == truth.patient_ids and np.array_equal(seg.y, truth.y)
    assert any("segmentation package seg-synthetic" in n for n in seg.notes)
    assert any("ground-truth labels" in n for n in truth.notes)
    assert not np.allclose(seg.prob, truth.prob)  # other crops, other outputs


def test_cli_maps_arguments_to_settings(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["B", "--manifest", "m.json", "--out", str(tmp_path), "--epochs",
                              "7", "--pretrain-epochs", "3", "--seed", "4", "--test-centre",
                              "C2", "--clip-checkpoint", "site.pt", "--cache", "c"])
    settings = cli.settings_from_args(args)
    assert (settings.head.epochs, settings.pretrain.epochs, settings.seed) == (7, 3, 4)
    assert settings.test_centre == "C2" and settings.cache == Path("c")
    assert settings.model.clip_checkpoint == "site.pt"
    assert args.run is cli.run
    args.epochs = 0
    with pytest.raises(ConfigError, match="epochs"):
        cli.settings_from_args(args)


@pytest.mark.slow
def test_cli_trains_default_model_from_a_site_checkpoint(
        trained: TrainResult, cohort: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from ml.tsr.config import TsrConfig
    from ml.tsr.network import build_clip

    site = tmp_path / "site_clip.pt"
    torch.save(build_clip(TsrConfig().clip).state_dict(), site)
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["B", "--manifest", str(cohort), "--out", str(tmp_path / "pkg"),
                              "--epochs", "3", "--test-centre", "C3", "--clip-checkpoint",
                              str(site), "--cache", str(tmp_path / "cache")])
    assert args.run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["held_out_centre"] == "C3" and summary["held_out_patients"] == 8
    meta = read_metadata(tmp_path / "pkg")
    assert meta["training_data"]["encoder"] == {"source": "site checkpoint",
                                                "file": "site_clip.pt"}
