"""Segmentation: data alignment, training, model packages, label mapping, the shipped model."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from ml.seg import CLASSES, cli
from ml.seg.data import (
    CtVolume,
    SegError,
    cohort_root,
    load_case,
    load_labels,
    load_series,
    split_by_centre,
    venous_series,
)
from ml.seg.infer import dice, reorient, segment, structure_volumes_ml
from ml.seg.network import NetworkSettings, build_network, network_definition
from ml.seg.package import (
    INFERENCE,
    METADATA,
    WEIGHTS,
    PackageError,
    Preprocessing,
    SegPackage,
    load_package,
    save_package,
)
from ml.seg.train import LOG_FILE, TrainSettings, prepare, train, train_network
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.synth.phantom import LABELS

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "seg-synthetic"
LIVER_VENOUS_HU = 110.0
TINY_NET = NetworkSettings(channels=(4, 8, 16), num_res_units=1)
FAST = TrainSettings(epochs=4, seed=5, spacing_mm=(6.0, 6.0, 6.0), patch_px=(16, 32, 32),
                     batch_size=2, patches_per_case=4, network=TINY_NET, progress=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg-cohort")
    generate_cohort(CohortOptions(out=out, patients=6, seed=11, centres=3, size="tiny"))
    return out


@pytest.fixture(scope="module")
def manifest(cohort: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((cohort / "manifest.json").read_text())
    return data


@pytest.fixture(scope="module")
def trained(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package trained by ``train`` on the tiny cohort (tiny network, few patches)."""
    out = tmp_path_factory.mktemp("pkg") / "seg-test"
    train(cohort, out, FAST)
    return out


def _raw_labels(cohort: Path, entry: dict[str, Any]) -> np.ndarray:
    with np.load(cohort / entry["ct"]["labels"]) as npz:
        raw: np.ndarray = npz["labels"]
    return raw


def test_series_and_labels_align(cohort: Path, manifest: dict[str, Any]) -> None:
    entry = manifest["patients"][0]
    folder = venous_series(entry, cohort)
    ct = load_series(folder)
    first = pydicom.dcmread(folder / "IM00001.dcm")
    assert float(first.ImagePositionPatient[2]) == pytest.approx(ct.origin_mm[0]
                                                                  + (ct.hu.shape[0] - 1)
                                                                  * ct.spacing_mm[0])
    raw = _raw_labels(cohort, entry)
    liver = raw == LABELS["liver"]
    # Aligned: the liver mask covers liver HU on every slice it touches.
    aligned = [float(ct.hu[k][liver[k]].mean()) for k in range(raw.shape[0]) if liver[k].any()]
    assert min(aligned) > LIVER_VENOUS_HU - 40
    # Reversed z (instance order read as ascending) puts the mask on other tissue.
    flipped = liver[::-1]
    wrong = [float(ct.hu[k][flipped[k]].mean()) for k in range(raw.shape[0])
             if flipped[k].any()]
    assert min(wrong) < LIVER_VENOUS_HU - 40
    classes = load_case(entry, cohort).labels
    for value, name in enumerate(CLASSES[1:], start=1):
        assert np.array_equal(classes == value, raw == LABELS[name])
    assert not np.isin(classes, [4, 5, 6, 7]).any()


def test_labels_on_another_grid_are_refused(cohort: Path, manifest: dict[str, Any]) -> None:
    entry = manifest["patients"][1]
    ct = load_series(venous_series(entry, cohort))
    moved = CtVolume(ct.hu, ct.spacing_mm, (ct.origin_mm[0] + 5.0, *ct.origin_mm[1:]),
                     ct.series_uid)
    with pytest.raises(SegError, match=r"labels.npz origin .* differs from series"):
        load_labels(cohort / entry["ct"]["labels"], moved)


def test_split_holds_out_the_last_centre(cohort: Path) -> None:
    train_entries, test_entries, held = split_by_centre(cohort)
    assert held == "C3"
    assert {e["centre"] for e in train_entries} == {"C1", "C2"}
    assert {e["centre"] for e in test_entries} == {"C3"}
    with pytest.raises(SegError, match="C9"):
        split_by_centre(cohort, "C9")


def test_training_reduces_the_loss(cohort: Path) -> None:
    train_entries, _, _ = split_by_centre(cohort)
    cases = prepare(train_entries[:2], cohort_root(cohort), FAST.spacing_mm)
    _, losses = train_network(cases, FAST)
    assert len(losses) == FAST.epochs
    assert losses[-1] < 0.8 * losses[0]
    _, again = train_network(cases, FAST)
    assert again == losses  # fixed seeds, deterministic CPU training


def test_train_writes_a_bundle_with_log_and_evaluation(trained: Path) -> None:
    meta = json.loads((trained / METADATA).read_text())
    assert "not for clinical use" in meta["description"]
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "pancreas", "3": "tumour"}
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spacing_mm"] == list(FAST.spacing_mm)
    assert image["intensity_window_hu"] == list(FAST.window_hu)
    inference = json.loads((trained / INFERENCE).read_text())
    assert inference["network_def"]["_target_"] == "monai.networks.nets.UNet"
    assert "epoch 4/4" in (trained / LOG_FILE).read_text()
    evaluation = json.loads((trained / "docs" / "evaluation.json").read_text())
    assert evaluation["held_out_centre"] == "C3"
    assert set(evaluation["dice_mean"]) == {"liver", "pancreas", "tumour"}
    assert "SYN" not in (trained / LOG_FILE).read_text()  # no patient ids in the log


def test_package_saves_and_loads_to_identical_outputs(trained: Path, cohort: Path,
                                                      manifest: dict[str, Any],
                                                      tmp_path: Path) -> None:
    package = load_package(trained)
    copy = tmp_path / "copy"
    definition = json.loads((trained / INFERENCE).read_text())["network_def"]
    save_package(copy, package.network, definition, package.preprocessing,
                 {"name": "copy", "version": "1"})
    reloaded = load_package(copy)
    x = torch.rand(1, 1, *FAST.patch_px)
    with torch.no_grad():
        assert torch.equal(package.network(x), reloaded.network(x))
    case = load_case(manifest["patients"][4], cohort)
    a = segment(case.ct.hu, case.ct.spacing_mm, package)
    b = segment(case.ct.hu, case.ct.spacing_mm, reloaded)
    assert a.shape == case.ct.hu.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_evaluate_only_command(trained: Path, cohort: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    top = argparse.ArgumentParser()
    cli.add_parser(top.add_subparsers(dest="model"))
    args = top.parse_args(["seg", "--manifest", str(cohort), "--out", str(trained),
                           "--evaluate-only"])
    assert args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["held_out_centre"] == "C3" and out["patients"] == 2


def test_sha256_mismatch_names_the_weights(trained: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    weights = broken / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"model\.pt have sha256 .* records"):
        load_package(broken)


def _threshold_bundle(folder: Path, labels: dict[str, str]) -> None:
    """A foreign bundle in RAS axes whose 1x1x1 network labels HU bands.

    With window [-1000, 1000] -> [0, 1], channels win on v < 0.3 (0), 0.3-0.5 (1),
    0.5-0.6 (2) and v > 0.6 (3): HU < -400, -400..0, 0..200, > 200.
    """
    weight = torch.tensor([0.0, 10.0, 20.0, 30.0]).reshape(4, 1, 1, 1, 1)
    bias = torch.tensor([0.0, -3.0, -8.0, -14.0])
    (folder / "models").mkdir(parents=True)
    torch.save({"weight": weight, "bias": bias}, folder / WEIGHTS)
    (folder / "configs").mkdir()
    (folder / METADATA).write_text(json.dumps({"name": "foreign", "version": "0.3.1",
                                               "network_data_format": {"outputs": {"pred": {
                                                   "channel_def": labels}}}}))
    (folder / INFERENCE).write_text(json.dumps({
        "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 4,
                        "kernel_size": 1},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [3.0, 2.0, 5.0]},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -1000,
             "a_max": 1000, "b_min": 0.0, "b_max": 1.0, "clip": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16]}}))


def test_foreign_bundle_labels_map_to_oncopacs_classes(tmp_path: Path) -> None:
    _threshold_bundle(tmp_path / "b", {"0": "background", "1": "spleen", "2": "liver",
                                       "3": "pancreas"})
    package = load_package(tmp_path / "b", label_map={"liver": "liver", "pancreas": 3})
    assert package.lookup == (0, 0, 1, 2)
    assert package.preprocessing.axcodes == "RAS"
    rng = np.random.default_rng(0)
    hu = rng.choice([-900.0, -200.0, 100.0, 500.0], size=(20, 24, 28)).astype(np.float32)
    out = segment(hu, (5.0, 2.0, 3.0), package)  # (z, y, x) spacing = RAS pixdim reversed
    expected = np.select([hu > 200, hu > 0], [2, 1], 0)  # pancreas band, liver band
    assert np.array_equal(out, expected)


@pytest.mark.parametrize(("labels", "label_map", "message"), [
    ({"0": "background", "1": "organ"}, None, "no label named liver, pancreas or tumour"),
    ({"0": "background", "1": "liver"}, {"liver": "hepar"}, r"'hepar' is not in .* \['back"),
    ({"0": "background", "1": "liver"}, {"kidney": "liver"}, "'kidney' is not one of"),
])
def test_bad_label_maps_are_refused(tmp_path: Path, labels: dict[str, str],
                                    label_map: dict[str, str] | None, message: str) -> None:
    _threshold_bundle(tmp_path / "b", labels | {"2": "x", "3": "y"})
    with pytest.raises(PackageError, match=message):
        load_package(tmp_path / "b", label_map=label_map)


def test_reorient_round_trip() -> None:
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    ras = reorient(a, "SPL", "RAS")
    assert ras.shape == (4, 3, 2)
    # Most-left, most-posterior, most-superior voxel of SPL is R=0, A=0, S=last in RAS.
    assert ras[0, 0, 1] == a[1, 2, 3]
    assert np.array_equal(reorient(ras, "RAS", "SPL"), a)


def test_untrained_network_package_uses_given_preprocessing(tmp_path: Path) -> None:
    definition = network_definition(TINY_NET)
    net = build_network(definition)
    prep = Preprocessing((6.0, 6.0, 6.0), (-200.0, 300.0), roi_size=(16, 32, 32))
    save_package(tmp_path / "p", net, definition, prep, {"name": "p", "version": "2"})
    package = load_package(tmp_path / "p")
    assert package.preprocessing == prep
    assert isinstance(package, SegPackage) and package.version == "2"


def test_shipped_package_segments_a_tiny_patient(cohort: Path, manifest: dict[str, Any],
                                                 ) -> None:
    package = load_package(SHIPPED)
    case = load_case(manifest["patients"][5], cohort)
    pred = segment(case.ct.hu, case.ct.spacing_mm, package)
    scores = dice(pred, case.labels)
    assert scores["liver"] > 0.5, scores
    volumes = structure_volumes_ml(pred, case.ct.spacing_mm)
    assert 500 < volumes["liver"] < 4000, volumes
