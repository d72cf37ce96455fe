"""Score a TSR package on the held-out centre, with its ablations, for ``ml.evaluate``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ml.evaluate.scored import Scored
from ml.manifest import check_held_out, load_manifest, split_by_centre
from ml.package import read_package
from ml.seg.source import label_source
from ml.train_common import pick_device, seed_everything, torch_threads
from ml.tsr.ablations import COMPARATORS, fit_comparators
from ml.tsr.config import config_from_dict
from ml.tsr.data import load_crops
from ml.tsr.head import HeadSettings, embed, head_probabilities
from ml.tsr.network import build_network
from ml.tsr.train import TASK, default_cache

log = logging.getLogger(__name__)

OUTCOME = "high tumour-stroma ratio"
TRUTH = "generator truth (best achievable)"


def score_tsr(package: Path, manifest: Path, *, test_centre: str | None = None,
              device: str = "cpu", threads: int = 2, cache: Path | None = None,
              segmentation: Path | None = None) -> Scored:
    """The package's P(high TSR) on the held-out centre's PDAC patients, with comparators.

    The split (validation share, seed) and head settings are those recorded in the
    package, so the comparators are trained exactly like the packaged model's head;
    the test centre defaults to the package's held-out centre. Crops come from the
    ground-truth labels, or for the test patients from ``segmentation`` (a
    segmentation package run on the venous series, as in the service) when given.

    Raises
    ------
    ml.errors.OncopacsError
        If the package or cohort is unusable, or the test centre was a training
        centre of the package in its training cohort.
    """
    loaded = read_package(package, TASK)
    config = config_from_dict(loaded.config, where=str(package))
    data = loaded.metadata.get("training_data", {})
    trained_on = data.get("split", {})
    centre = test_centre or str(trained_on.get("test_centre", "C3"))
    settings = data.get("settings", {})
    seed = int(settings.get("seed", data.get("split_seed", 0)))
    head_settings = HeadSettings.model_validate(settings.get("head", {}))
    with torch_threads(threads):
        seed_everything(seed)
        dev = pick_device(device)
        cohort = load_manifest(manifest)
        check_held_out(data, cohort, centre, package)
        split = split_by_centre(cohort.group("PDAC"), centre,
                                float(data.get("val_fraction", 0.2)), seed)
        source = label_source(segmentation, dev)
        sets = [load_crops(s, config, cohort.path, cache or default_cache())
                for s in (split.train, split.val)]
        sets.append(load_crops(split.test, config, cohort.path, cache or default_cache(),
                               labels_of=source.labels if source.segmented else None))
        net = build_network(config, loaded.state_dict).to(dev)
        net.freeze_encoders()
        feats = [embed(net, s.crops, dev) for s in sets]
        prob = head_probabilities(net, feats[2], dev)
        comparators = fit_comparators(config, net.clip.state_dict(), feats[0], sets[0].y,
                                      feats[1], sets[1].y, head_settings, seed, dev, feats[2])
    test = sets[2]
    return Scored(
        model_name=f"{loaded.name} {loaded.version}", task=TASK, outcome_name=OUTCOME,
        patient_ids=[p.patient_id for p in test.patients],
        centres=[p.centre for p in test.patients], y=test.y, prob=prob,
        threshold=loaded.threshold, comparators=comparators, tested=list(COMPARATORS[:2]),
        reference={TRUTH: test.truth}, time_months=None, event=None, risk_for_survival=None,
        split={**split.describe(), "seed": seed, "group": "PDAC"},
        notes=[
            source.note,
            "Comparators trained on the training split with the package's frozen CLIP "
            "encoder and head settings; the linear probe is a logistic regression on both "
            "phases' image embeddings.",
            f"Package weights sha256 {loaded.sha256[:16]}; trained on synthetic data: "
            f"{bool(data.get('synthetic', False))}.",
            f"Held-out positives: {int(np.sum(test.y))} of {len(test.y)}.",
        ])
