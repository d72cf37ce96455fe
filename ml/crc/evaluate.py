"""Score model A on a held-out centre for ``oncopacs evaluate``.

Every test patient goes through :class:`ml.crc.predict.CrcPredictor`, the inference
path the service uses: the venous CT series and its labels, the slide's tissue
tiles read batch by batch, and the clinical fields of the manifest. Comparators
are logistic regressions fitted on the patients of the training centres (the
model's training and validation splits) whose 3-year status the follow-up tells.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ml.crc.clinical import SITES, CrcClinical
from ml.crc.config import CrcError
from ml.crc.predict import CrcPredictor
from ml.evaluate.scored import Scored
from ml.manifest import Patient, check_held_out, load_manifest
from ml.package import read_metadata
from ml.seg.data import load_series
from ml.seg.source import LabelFn, label_source
from ml.train_common import progress, seed_everything, torch_threads
from ml.wsi_tiles import read_tissue_tiles

HORIZON_MONTHS = 36.0
COMPARATORS = ("TNM stage only", "CEA only", "clinical only")


def _features(p: Patient, kind: str) -> list[float]:
    c = CrcClinical.from_labels(p.labels, p.age_years, p.sex)
    if c.t_stage is None or c.n_stage is None or c.cea_ug_l is None:
        raise CrcError(f"patient {p.index} lacks T, N or CEA for the comparator models")
    tnm = [float(c.t_stage == t) for t in (2, 3, 4)] + [float(c.n_stage == n) for n in (1, 2)]
    cea = [math.log(max(c.cea_ug_l, 1e-3))]
    if kind == "TNM stage only":
        return tnm
    if kind == "CEA only":
        return cea
    return tnm + cea + [math.log(max(c.ca19_9_u_ml or 1.0, 1e-3)), float(c.age_years or 0),
                        float(c.sex == "M")] + [float(c.site == s) for s in SITES[1:]]


def _known_status(p: Patient) -> float | None:
    time, event = float(p.labels["observed_months"]), bool(p.labels["event_observed"])
    if event and time <= HORIZON_MONTHS:
        return 1.0
    return 0.0 if time >= HORIZON_MONTHS else None


def comparator_probabilities(train: list[Patient], test: list[Patient],
                             ) -> dict[str, np.ndarray]:
    """Fit each comparator on ``train`` (known 3-year status) and score ``test``."""
    known = [(p, s) for p in train if (s := _known_status(p)) is not None]
    y = np.array([v for _, v in known], dtype=int)
    out = {}
    for kind in COMPARATORS:
        x = np.array([_features(p, kind) for p, _ in known])
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(x, y)
        out[kind] = model.predict_proba(np.array([_features(p, kind) for p in test]))[:, 1]
    return out


def _predict(predictor: CrcPredictor, p: Patient, labels_of: LabelFn) -> tuple[float, float]:
    ct = load_series(p.ct_folder(predictor.config.phase))
    labels = labels_of(p, ct)
    folder = p.wsi_folder()
    tiles = None if folder is None else read_tissue_tiles(folder, predictor.tile_spec)
    result = predictor.predict(ct.hu, ct.spacing_mm, labels, tiles,
                               CrcClinical.from_labels(p.labels, p.age_years, p.sex))
    return result.probability, result.cumulative_incidence_36mo


def score_crc(package: Path, manifest: Path, *, test_centre: str | None = None,
              device: str = "cpu", threads: int = 2,
              segmentation: Path | None = None) -> Scored:
    """Model A's probabilities on the held-out centre, with comparators and the truth.

    Parameters
    ----------
    package
        Model A package folder.
    manifest
        Cohort manifest (or its folder).
    test_centre
        Centre to test on; default the package's held-out centre.
    device, threads
        Where the model runs and how many CPU threads torch uses.
    segmentation
        Segmentation package whose output places the CT crops (the service's path);
        default the cohort's ground-truth labels.

    Raises
    ------
    CrcError
        If the centre has no CRC patients or a patient lacks a field.
    ml.errors.OncopacsError
        If the package, manifest or images cannot be read, or the centre was a
        training centre of the package in its training cohort.
    """
    metadata = read_metadata(package)
    split_info = metadata.get("training_data", {}).get("split", {})
    centre = test_centre or split_info.get("test_centre")
    if not centre:
        raise CrcError(f"package {package} names no held-out centre; pass test_centre")
    cohort = load_manifest(manifest)
    check_held_out(metadata.get("training_data", {}), cohort, centre, package)
    crc = cohort.group("CRC")
    test = sorted((p for p in crc if p.centre == centre), key=lambda p: p.index)
    train = [p for p in crc if p.centre != centre]
    if not test or not train:
        raise CrcError(f"cohort {manifest} has {len(test)} CRC patients in centre {centre} "
                       f"and {len(train)} elsewhere; both must be non-empty")
    seed_everything(0)
    with torch_threads(threads):
        predictor = CrcPredictor.from_package(package, device)
        source = label_source(segmentation, predictor.device)
        scores = [_predict(predictor, p, source.labels) for p in progress(test, f"scoring {centre}",
                                                           total=len(test))]
    prob = np.array([s[0] for s in scores])
    comparators = comparator_probabilities(train, test)
    return Scored(
        model_name=f"{predictor.name} {predictor.version}", task="crc-liver-metastasis",
        outcome_name="liver metastasis within 3 years",
        patient_ids=[p.patient_id for p in test], centres=[p.centre for p in test],
        y=np.array([bool(p.labels["met_3y"]) for p in test], dtype=int), prob=prob,
        threshold=predictor.threshold, comparators=comparators,
        tested=["TNM stage only", "CEA only"],
        reference={"generator truth (best achievable)":
                   np.array([float(p.labels["probability"]) for p in test])},
        time_months=np.array([float(p.labels["observed_months"]) for p in test]),
        event=np.array([bool(p.labels["event_observed"]) for p in test]),
        risk_for_survival=np.array([s[1] for s in scores]),
        split={"test_centre": centre, "test_patients": len(test),
               "comparator_training_patients": len(train),
               "package_split": split_info, "package_sha256": predictor.sha256},
        notes=[source.note,
               "Outcome y: the generator's 3-year liver-metastasis status of every test "
               "patient; the model and comparators were trained only on patients whose "
               "follow-up tells it.",
               "Comparators: logistic regressions on the training centres' patients.",
               "Risk for survival: cumulative incidence at 36 months (hazard head)."])
