"""Generate a whole synthetic cohort and its manifest.

Layout of a cohort folder::

    manifest.json                   patients, UIDs, files, labels (paths relative to it)
    patients/<patient id>/ct/arterial/*.dcm, ct/venous/*.dcm, ct/labels.npz
    patients/<patient id>/wsi/level-<n>.dcm          (CRC only)
    patients/<patient id>/hl7/*.hl7

Patients are generated independently (one seeded generator per patient), in
parallel worker processes, and the manifest is written last, atomically: a
folder with a manifest is a complete cohort.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.errors import SynthError
from ml.synth import latent
from ml.synth.centres import centres
from ml.synth.ct import write_ct_study
from ml.synth.hl7gen import write_hl7
from ml.synth.sizes import size
from ml.synth.wsi import write_wsi

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "oncopacs-synth-manifest/1"


@dataclass(frozen=True)
class CohortOptions:
    """What to generate: ``patients`` patients of ``seed`` across ``centres`` centres."""

    out: Path
    patients: int
    seed: int
    centres: int = 3
    size: str = "default"
    workers: int = 1

    def check(self) -> None:
        """Validate the options before anything is written.

        Raises
        ------
        SynthError
            If a value is out of range or the output folder is not empty.
        """
        if self.patients < 1:
            raise SynthError(f"--patients must be at least 1, got {self.patients}")
        if self.seed < 0:
            raise SynthError(f"--seed must be non-negative, got {self.seed}")
        if self.workers < 1:
            raise SynthError(f"--workers must be at least 1, got {self.workers}")
        centres(self.centres)
        size(self.size)
        if self.out.exists() and any(self.out.iterdir()):
            raise SynthError(f"output folder {self.out} is not empty; choose a new folder")


def latent_model_description() -> dict[str, Any]:
    """The latent model's coefficients, recorded in every manifest."""
    return {
        "crc_logit": "B0 + B_STAGE*stage_z + B_CEA*cea_z + B_IMAGE*(z_ct + z_wsi)",
        "B0": latent.B0, "B_STAGE": latent.B_STAGE, "B_CEA": latent.B_CEA,
        "B_IMAGE": latent.B_IMAGE, "stage_score_mean": latent.STAGE_SCORE_MEAN,
        "stage_score_sd": latent.STAGE_SCORE_SD, "log_cea_mean": latent.LOG_CEA_MEAN,
        "log_cea_sd": latent.LOG_CEA_SD, "pdac_phase_noise_sd": latent.PHASE_NOISE,
        "pdac_high_tsr": "true ratio >= 0.5",
    }


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def generate_patient(seed: int, index: int, centre_count: int, size_name: str,
                     root: Path) -> dict[str, Any]:
    """Write one patient's CT study, WSI (CRC) and HL7 messages; return its manifest entry."""
    spec = latent.sample_patient(seed, index, centres(centre_count))
    sz = size(size_name)
    folder = root / "patients" / spec.patient_id
    ct = write_ct_study(spec, sz, seed, folder)
    entry: dict[str, Any] = {
        "index": index, "patient_id": spec.patient_id, "issuer": spec.issuer,
        "group": spec.group, "centre": spec.centre.code, "sex": spec.sex,
        "age_years": spec.age_years, "ct_date": spec.ct_date.isoformat(),
        "surgery_date": spec.surgery_date.isoformat(),
        "ct": {
            "study_uid": ct.study_uid, "accession": ct.accession,
            "frame_of_reference_uid": ct.frame_of_reference_uid,
            "labels": _rel(ct.labels_path, root),
            "series": [
                {"phase": s.phase, "series_uid": s.series_uid, "series_number": s.series_number,
                 "description": s.description, "folder": _rel(s.folder, root),
                 "instances": s.instances, "slice_thickness_mm": s.slice_thickness_mm,
                 "pixel_spacing_mm": s.pixel_spacing_mm}
                for s in ct.series
            ],
        },
        "wsi": None,
        "hl7": [_rel(p, root) for p in write_hl7(spec, seed, folder)],
        "labels": spec.labels(),
    }
    if spec.group == "CRC":
        wsi = write_wsi(spec, sz, seed, folder)
        entry["wsi"] = {
            "study_uid": wsi.study_uid, "series_uid": wsi.series_uid,
            "accession": wsi.accession, "folder": _rel(wsi.folder, root),
            "levels": wsi.levels, "base_px": list(wsi.base_px), "base_mpp": wsi.base_mpp,
            "instances": wsi.instances,
        }
    return entry


def _entries(opts: CohortOptions) -> Iterator[dict[str, Any]]:
    args = [(opts.seed, i, opts.centres, opts.size, opts.out) for i in range(opts.patients)]
    if opts.workers == 1:
        for a in args:
            yield generate_patient(*a)
        return
    with ProcessPoolExecutor(max_workers=opts.workers) as pool:
        yield from pool.map(generate_patient, *zip(*args, strict=True))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a fsynced temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def generate_cohort(opts: CohortOptions,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Generate the cohort described by ``opts`` and write its manifest.

    Parameters
    ----------
    opts
        What to generate and where.
    progress
        Called with the number of patients finished so far.

    Returns
    -------
    dict
        The manifest, as written to ``opts.out / "manifest.json"``.

    Raises
    ------
    SynthError
        If the options are invalid.
    """
    opts.check()
    opts.out.mkdir(parents=True, exist_ok=True)
    patients = []
    for done, entry in enumerate(_entries(opts), start=1):
        patients.append(entry)
        if progress is not None:
            progress(done)
    options = asdict(opts)
    options["out"] = str(opts.out)
    manifest = {
        "format": MANIFEST_FORMAT, "seed": opts.seed, "size": opts.size,
        "centres": [c.code for c in centres(opts.centres)], "patients": patients,
        "latent_model": latent_model_description(),
    }
    write_json_atomic(opts.out / MANIFEST_NAME, manifest)
    log.info("cohort written: %d patients, seed %d, size %s", len(patients), opts.seed,
             opts.size)
    return manifest


def load_manifest(path: Path) -> dict[str, Any]:
    """Read a cohort manifest (the file or its folder).

    Raises
    ------
    SynthError
        If the file is missing or is not an oncopacs synthetic-cohort manifest.
    """
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        raise SynthError(f"no cohort manifest at {file}")
    data: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    if data.get("format") != MANIFEST_FORMAT:
        raise SynthError(f"{file} is not a {MANIFEST_FORMAT} file "
                         f"(format {data.get('format')!r})")
    return data


def cohort_files(manifest: dict[str, Any], root: Path) -> tuple[list[Path], list[Path]]:
    """All DICOM files and all HL7 files of a cohort, in patient order."""
    dicom: list[Path] = []
    hl7: list[Path] = []
    for patient in manifest["patients"]:
        for series in patient["ct"]["series"]:
            dicom += sorted((root / series["folder"]).glob("*.dcm"))
        if patient["wsi"] is not None:
            dicom += sorted((root / patient["wsi"]["folder"]).glob("*.dcm"))
        hl7 += [root / p for p in patient["hl7"]]
    return dicom, hl7
