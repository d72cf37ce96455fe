"""The pieces models A and B share: manifest split, model packages, tile reading,
and importing timm/open_clip on a CPU-only torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ml.errors import ConfigError
from ml.manifest import check_held_out, load_manifest, split_by_centre
from ml.package import PackageError, read_metadata, read_package, write_package
from ml.seg import CLASSES
from ml.seg.data import load_labels, load_series
from ml.seg.source import label_source
from ml.synth.cohort import CohortOptions, generate_cohort
from ml.wsi_tiles import Tiles, WsiReadError, read_tissue_tiles

SEG_PACKAGE = Path(__file__).resolve().parents[1] / "models" / "seg-synthetic"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(CohortOptions(out=out, patients=24, seed=515, size="tiny", centres=3,
                                  workers=1))
    return out / "manifest.json"


def test_split_holds_out_one_centre_and_is_seeded(cohort: Path) -> None:
    manifest = load_manifest(cohort)
    assert len(manifest.patients) == 24 and len(manifest.group("CRC")) == 12
    split = split_by_centre(manifest.patients, "C2", val_fraction=0.25, seed=3)
    assert {p.centre for p in split.test} == {"C2"}
    assert "C2" not in {p.centre for p in split.train + split.val}
    assert len(split.train) + len(split.val) + len(split.test) == 24
    ids = {p.patient_id for p in split.train} | {p.patient_id for p in split.val}
    assert len(ids) == 16
    again = split_by_centre(manifest.patients, "C2", val_fraction=0.25, seed=3)
    assert [p.index for p in again.val] == [p.index for p in split.val]
    assert split.describe()["test"] == {"patients": 8, "per_centre": {"C2": 8}}
    with pytest.raises(ConfigError, match="C9"):
        split_by_centre(manifest.patients, "C9")



def test_a_training_centre_is_scored_only_on_another_cohort(cohort: Path) -> None:
    manifest = load_manifest(cohort)
    split = split_by_centre(manifest.patients, "C2", val_fraction=0.25, seed=3).describe()
    same = {"cohort_seed": 515, "split": split}
    check_held_out(same, manifest, "C2", Path("pkg"))  # the held-out centre
    with pytest.raises(ConfigError, match="centre C1 was a training centre of package pkg"):
        check_held_out(same, manifest, "C1", Path("pkg"))
    with pytest.raises(ConfigError, match="C3"):
        check_held_out(same, manifest, "C3", Path("pkg"))  # its validation share too
    check_held_out({"cohort_seed": 2026, "split": split}, manifest, "C1", Path("pkg"))
    with pytest.raises(ConfigError, match="seed None"):  # no seed: cannot tell the cohorts
        check_held_out({"split": split}, manifest, "C1", Path("pkg"))


def test_label_sources_ground_truth_and_segmentation(cohort: Path) -> None:
    patient = load_manifest(cohort).group("CRC")[0]
    ct = load_series(patient.ct_folder("venous"))
    truth = label_source(None, torch.device("cpu"))
    assert not truth.segmented and "ground-truth" in truth.note
    assert np.array_equal(truth.labels(patient, ct), load_labels(patient.labels_path(), ct))
    seg = label_source(SEG_PACKAGE, torch.device("cpu"))
    assert seg.segmented and "seg-synthetic" in seg.note
    labels = seg.labels(patient, ct)
    assert labels.shape == ct.hu.shape and labels.max() < len(CLASSES)
    liver = CLASSES.index("liver")
    assert (labels == liver).sum() > 0.5 * (truth.labels(patient, ct) == liver).sum()

def test_patients_point_at_their_files(cohort: Path) -> None:
    manifest = load_manifest(cohort.parent)
    crc, pdac = manifest.group("CRC")[0], manifest.group("PDAC")[0]
    assert crc.ct_folder("venous").is_dir() and crc.labels_path().is_file()
    assert crc.wsi_folder() is not None and crc.wsi_folder().is_dir()  # type: ignore[union-attr]
    assert pdac.wsi_folder() is None
    with pytest.raises(ConfigError, match="delayed"):
        crc.ct_folder("delayed")


def test_tissue_tiles_come_in_batches_at_the_asked_resolution(cohort: Path) -> None:
    crc = load_manifest(cohort).group("CRC")[0]
    folder = crc.wsi_folder()
    assert folder is not None
    spec = Tiles(target_mpp=8.0, tile_px=16, max_tiles=50, batch_size=20, sample_seed=1)
    batches = list(read_tissue_tiles(folder, spec))
    assert [len(b.pixels) for b in batches] == [20, 20, 10]
    assert batches[0].pixels.dtype == np.uint8 and batches[0].pixels.shape[1:] == (16, 16, 3)
    assert batches[0].mpp == pytest.approx(8.0)
    again = np.concatenate([b.pixels for b in read_tissue_tiles(folder, spec)])
    assert np.array_equal(again, np.concatenate([b.pixels for b in batches]))
    with pytest.raises(WsiReadError, match="no files"):
        list(read_tissue_tiles(folder.parent / "nothing-here", spec))


def test_package_round_trip_and_refusals(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    out = write_package(tmp_path / "pkg", name="demo", version="1.0.0",
                        task="pdac-tsr", config={"width": 3}, state_dict=net.state_dict(),
                        threshold=0.4, inputs=[{"name": "ct_arterial"}],
                        training_data={"synthetic": True}, metrics={"auc": 0.9},
                        card="# card\n")
    loaded = read_package(out, "pdac-tsr")
    assert loaded.threshold == 0.4 and loaded.demo and loaded.config == {"width": 3}
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in net.state_dict().items())
    assert read_metadata(out)["weights"]["sha256"] == loaded.sha256
    with pytest.raises(PackageError, match="crc-liver-metastasis"):
        read_package(out, "crc-liver-metastasis")
    weights = out / "models/model.pt"
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(PackageError, match="sha256"):
        read_package(out, "pdac-tsr")
    (out / "configs/metadata.json").write_text("{", encoding="utf-8")
    with pytest.raises(PackageError, match="not valid JSON"):
        read_metadata(out)
    with pytest.raises(PackageError, match="threshold"):
        write_package(tmp_path / "bad", name="x", version="1", task="pdac-tsr", config={},
                      state_dict={}, threshold=1.0, inputs=[], training_data={},
                      metrics={}, card="")
    assert json.loads((out / "configs/config.json").read_text()) == {"width": 3}


def test_timm_and_open_clip_import_on_cpu_torch() -> None:
    from ml.compat import open_clip, timm

    encoder = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    assert encoder(torch.zeros(1, 3, 32, 32)).shape == (1, 512)
    tokens = open_clip.get_tokenizer("RN50")(["high tumour-stroma ratio"])
    assert tokens.shape == (1, 77) and int(tokens[0, 0]) == 49406
