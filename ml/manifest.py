"""A cohort manifest as the model trainers read it: patients, their files and labels,
and the split by centre (training, internal validation, one held-out external centre).

The manifest is the ``manifest.json`` that ``oncopacs synth`` writes; a site that
trains on its own archive writes the same format (see the README). Paths in it are
relative to its folder.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.errors import ConfigError
from ml.synth.cohort import MANIFEST_NAME
from ml.synth.cohort import load_manifest as read_manifest_json


@dataclass(frozen=True)
class Patient:
    """One patient of a cohort manifest.

    Attributes
    ----------
    index, patient_id, group, centre, age_years, sex
        As in the manifest (``group`` is ``"CRC"`` or ``"PDAC"``).
    labels
        The patient's outcome and clinical fields (``labels`` in the manifest).
    root
        The manifest's folder; file paths are relative to it.
    record
        The whole manifest entry.
    """

    index: int
    patient_id: str
    group: str
    centre: str
    age_years: int
    sex: str
    labels: dict[str, Any] = field(repr=False)
    root: Path = field(repr=False)
    record: dict[str, Any] = field(repr=False)

    def ct_folder(self, phase: str) -> Path:
        """The folder of the CT series of ``phase`` (``"arterial"`` or ``"venous"``).

        Raises
        ------
        ConfigError
            If the patient has no CT series of that phase.
        """
        for series in self.record.get("ct", {}).get("series", []):
            if series.get("phase") == phase:
                return self.root / str(series["folder"])
        raise ConfigError(f"patient {self.index} has no {phase} CT series in the manifest")

    def labels_path(self) -> Path:
        """The ground-truth label volume (``ct/labels.npz``).

        Raises
        ------
        ConfigError
            If the manifest names none.
        """
        path = self.record.get("ct", {}).get("labels")
        if not path:
            raise ConfigError(f"patient {self.index} has no CT labels in the manifest")
        return self.root / str(path)

    def wsi_folder(self) -> Path | None:
        """The folder of the patient's H&E slide, or None when the patient has none."""
        wsi = self.record.get("wsi")
        return None if not wsi else self.root / str(wsi["folder"])


@dataclass(frozen=True)
class Manifest:
    """A read manifest: its file, folder, seed, image size and patients."""

    path: Path
    root: Path
    seed: int | None
    size: str | None
    patients: list[Patient]

    def group(self, name: str) -> list[Patient]:
        """The patients of one group (``"CRC"`` or ``"PDAC"``)."""
        return [p for p in self.patients if p.group == name]


@dataclass(frozen=True)
class Split:
    """Training, internal validation and held-out external test patients."""

    train: list[Patient]
    val: list[Patient]
    test: list[Patient]
    test_centre: str

    def describe(self) -> dict[str, Any]:
        """Counts per split and centre, for package metadata and reports."""
        out: dict[str, Any] = {"test_centre": self.test_centre}
        for name, patients in (("train", self.train), ("val", self.val), ("test", self.test)):
            per: dict[str, int] = defaultdict(int)
            for p in patients:
                per[p.centre] += 1
            out[name] = {"patients": len(patients), "per_centre": dict(sorted(per.items()))}
        return out


def load_manifest(path: Path) -> Manifest:
    """Read a manifest (the file or its folder).

    Raises
    ------
    ml.errors.OncopacsError
        If the file is missing, is not a cohort manifest, or an entry lacks a field.
    """
    file = path / MANIFEST_NAME if path.is_dir() else path
    data = read_manifest_json(file)
    root = file.parent
    patients = []
    for entry in data.get("patients", []):
        try:
            patients.append(Patient(
                index=int(entry["index"]), patient_id=str(entry["patient_id"]),
                group=str(entry["group"]), centre=str(entry["centre"]),
                age_years=int(entry["age_years"]), sex=str(entry["sex"]),
                labels=dict(entry.get("labels", {})), root=root, record=entry))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{file}: patient entry {entry.get('index', '?')} lacks or "
                              f"has a bad field: {exc}") from exc
    seed = data.get("seed")
    return Manifest(path=file, root=root, seed=None if seed is None else int(seed),
                    size=data.get("size"), patients=patients)


def split_by_centre(patients: list[Patient], test_centre: str, val_fraction: float = 0.2,
                    seed: int = 0) -> Split:
    """Hold out one centre; draw the internal validation share from every other centre.

    The validation draw is seeded and stratified by centre, so the same patients,
    centre and seed always give the same split.

    Raises
    ------
    ConfigError
        If the centre is unknown, the fraction is not in [0, 1), or a split is empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {val_fraction}")
    centres = sorted({p.centre for p in patients})
    if test_centre not in centres:
        raise ConfigError(f"held-out centre {test_centre!r} is not in the cohort ({centres})")
    if len(centres) < 2:
        raise ConfigError("a held-out centre needs a cohort of at least two centres")
    rng = np.random.default_rng(seed)
    train: list[Patient] = []
    val: list[Patient] = []
    for centre in centres:
        if centre == test_centre:
            continue
        members = sorted((p for p in patients if p.centre == centre), key=lambda p: p.index)
        n_val = round(val_fraction * len(members))
        chosen = set(rng.choice(len(members), size=n_val, replace=False).tolist())
        for i, p in enumerate(members):
            (val if i in chosen else train).append(p)
    test = sorted((p for p in patients if p.centre == test_centre), key=lambda p: p.index)
    if not train or not test or (val_fraction > 0 and not val):
        raise ConfigError(f"split by centre {test_centre} gives {len(train)} training, "
                          f"{len(val)} validation and {len(test)} test patients; "
                          "none may be empty")
    return Split(train=train, val=val, test=test, test_centre=test_centre)


def check_held_out(training_data: dict[str, Any], manifest: Manifest, centre: str,
                   package: Path) -> None:
    """Refuse to score a package on patients it was trained on.

    A centre that was a training centre of the package may be scored only on a
    different cohort: one whose manifest seed differs from the ``cohort_seed`` the
    package recorded. Without a seed on either side the cohorts cannot be told apart,
    so training centres are refused.

    Raises
    ------
    ConfigError
        If ``centre`` was a training centre of the package and the manifest may be its
        training cohort.
    """
    split = training_data.get("split", {})
    trained = set(split.get("train", {}).get("per_centre", {}))
    trained |= set(split.get("val", {}).get("per_centre", {}))
    if centre not in trained:
        return
    seed = training_data.get("cohort_seed")
    if seed is not None and manifest.seed is not None and int(seed) != manifest.seed:
        return
    raise ConfigError(f"centre {centre} was a training centre of package {package} and "
                      f"{manifest.path} may be its training cohort (package cohort seed "
                      f"{seed}, manifest seed {manifest.seed}); score its held-out centre "
                      f"{split.get('test_centre', '?')} or another cohort")
