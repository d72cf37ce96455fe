"""Train the segmentation network on a synthetic cohort and evaluate it on a held-out centre.

Training reads the venous series of every patient outside the held-out centre,
resamples image and labels to the working spacing once, and draws random
patches centred on a voxel of a randomly chosen class (background, liver,
pancreas, tumour with ``class_probs``), with a random HU scale and shift so
the network meets the centres' calibration differences. Loss: Dice + cross
entropy; optimiser: Adam with cosine learning-rate decay. Seeds fix the
patches, the augmentation and the initial weights; on CPU the run is
deterministic.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.losses import DiceCELoss
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from ml.seg import CLASSES
from ml.seg.data import (
    SegError,
    cohort_root,
    load_case,
    normalise,
    split_by_centre,
    to_working,
)
from ml.seg.infer import dice, segment
from ml.seg.network import NetworkSettings, build_network, network_definition, weight_count
from ml.seg.package import Preprocessing, load_package, save_package
from ml.synth.cohort import load_manifest

log = logging.getLogger(__name__)

DESCRIPTION = ("Liver, pancreas and tumour segmentation of portal-venous abdominal CT. "
               "Demo weights trained on synthetic data — not for clinical use.")
LOG_FILE = "logs/train.log"
EVALUATION_FILE = "docs/evaluation.json"
AIR_HU = -1000.0


class TrainSettings(BaseModel):
    """Everything that decides a training run (with the cohort, it fixes the weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=40, ge=1)
    seed: int = Field(default=0, ge=0)
    holdout: str | None = None
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    window_hu: tuple[float, float] = (-200.0, 300.0)
    patch_px: tuple[int, int, int] = (48, 80, 80)
    batch_size: int = Field(default=2, ge=1)
    patches_per_case: int = Field(default=2, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    class_probs: tuple[float, float, float, float] = (0.1, 0.3, 0.3, 0.3)
    hu_shift: float = Field(default=15.0, ge=0)
    hu_scale: float = Field(default=0.05, ge=0, lt=1)
    threads: int = Field(default=2, ge=1)
    device: str = Field(default="cpu", pattern="^(cpu|cuda|auto)$")
    max_train_cases: int | None = Field(default=None, ge=1)
    network: NetworkSettings = NetworkSettings()
    version: str = "0.1.0"
    progress: bool = True


@dataclass(frozen=True)
class WorkingCase:
    """A training case at the working spacing, with the voxel indices of each class."""

    hu: np.ndarray
    labels: np.ndarray
    voxels: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` produced."""

    package: Path
    sha256: str
    losses: list[float]
    evaluation: dict[str, Any]
    seconds: float


def prepare(entries: list[dict[str, Any]], root: Path, spacing_mm: tuple[float, float, float],
            ) -> list[WorkingCase]:
    """Load and resample the training cases (see ``ml.seg.data.to_working``).

    Raises
    ------
    SegError
        If a case's series or labels cannot be read.
    """
    out = []
    for entry in entries:
        hu, labels = to_working(load_case(entry, root), spacing_mm)
        voxels = tuple(np.flatnonzero(labels == c) for c in range(len(CLASSES)))
        out.append(WorkingCase(hu, labels, voxels))
    return out


def _crop(array: np.ndarray, centre: tuple[int, ...], patch: tuple[int, int, int],
          fill: float) -> np.ndarray:
    """A ``patch``-shaped box around ``centre``, kept inside the array; padded with ``fill``."""
    pads = [(0, max(0, p - n)) for p, n in zip(patch, array.shape, strict=True)]
    if any(after for _, after in pads):
        array = np.pad(array, pads, constant_values=fill)
    starts = [min(max(0, c - p // 2), n - p) for c, p, n in zip(centre, patch, array.shape,
                                                               strict=True)]
    box = tuple(slice(s, s + p) for s, p in zip(starts, patch, strict=True))
    return array[box]


def sample_patch(case: WorkingCase, rng: np.random.Generator, settings: TrainSettings,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One augmented, normalised image patch and its labels."""
    cls = int(rng.choice(len(CLASSES), p=np.asarray(settings.class_probs) /
                         sum(settings.class_probs)))
    voxels = case.voxels[cls]
    if voxels.size:
        flat = int(voxels[int(rng.integers(voxels.size))])
    else:
        flat = int(rng.integers(case.labels.size))
    centre = tuple(int(v) for v in np.unravel_index(flat, case.labels.shape))
    hu = _crop(case.hu, centre, settings.patch_px, AIR_HU)
    lab = _crop(case.labels, centre, settings.patch_px, 0)
    scale = 1.0 + rng.uniform(-settings.hu_scale, settings.hu_scale)
    shift = rng.uniform(-settings.hu_shift, settings.hu_shift)
    image = normalise(hu * scale + shift, settings.window_hu).numpy()
    return image, lab


def _batches(cases: list[WorkingCase], rng: np.random.Generator, settings: TrainSettings,
             count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(count):
        pairs = [sample_patch(cases[int(rng.integers(len(cases)))], rng, settings)
                 for _ in range(settings.batch_size)]
        image = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))[:, None]
        yield image, labels


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SegError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


@contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic algorithms and a thread count for the duration of a run."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


def train_network(cases: list[WorkingCase], settings: TrainSettings,
                  ) -> tuple[torch.nn.Module, list[float]]:
    """Train a fresh network on ``cases``; returns it (on CPU) and the mean loss per epoch.

    Raises
    ------
    SegError
        If there are no cases, a patch edge is not a multiple of the network's
        downsampling, or CUDA is asked for and absent.
    """
    if not cases:
        raise SegError("no training cases")
    div = settings.network.divisor()
    if any(p % div for p in settings.patch_px):
        raise SegError(f"patch {settings.patch_px} px: every edge must be a multiple of {div}")
    device = _device(settings.device)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    net = build_network(network_definition(settings.network)).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    per_epoch = math.ceil(len(cases) * settings.patches_per_case / settings.batch_size)
    total = per_epoch * settings.epochs
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total,
                                                          eta_min=settings.learning_rate / 20)
    losses: list[float] = []
    bar = tqdm(total=total, desc="train seg", unit="it", disable=not settings.progress)
    net.train()
    for epoch in range(settings.epochs):
        running = 0.0
        for image, labels in _batches(cases, rng, settings, per_epoch):
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(image.to(device)), labels.to(device))
            loss.backward()
            optimiser.step()
            schedule.step()
            running += float(loss.item())
            bar.update(1)
        losses.append(running / per_epoch)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        log.info("epoch %d/%d: mean loss %.4f", epoch + 1, settings.epochs, losses[-1])
    bar.close()
    return net.cpu().eval(), losses


def evaluate(package_path: Path, entries: list[dict[str, Any]], root: Path,
             ) -> dict[str, Any]:
    """Dice per structure of a package on ``entries``, on each study's original grid.

    Raises
    ------
    SegError
        If the package or a case cannot be loaded.
    """
    package = load_package(package_path)
    rows = []
    for entry in entries:
        case = load_case(entry, root)
        start = time.perf_counter()
        pred = segment(case.ct.hu, case.ct.spacing_mm, package)
        row: dict[str, Any] = {"study_uid": case.study_uid, "centre": case.centre,
                               "seconds": round(time.perf_counter() - start, 3)}
        row.update({k: round(v, 4) for k, v in dice(pred, case.labels).items()})
        log.info("study %s: Dice %s", case.study_uid,
                 ", ".join(f"{c} {row[c]:.3f}" for c in CLASSES[1:]))
        rows.append(row)
    mean = {c: round(float(np.nanmean([r[c] for r in rows])), 4) for c in CLASSES[1:]}
    return {"package_sha256": package.sha256, "patients": len(rows), "dice_mean": mean,
            "studies": rows}


def _metadata(name: str, settings: TrainSettings, manifest: dict[str, Any], held: str,
              train_count: int, losses: list[float], net: torch.nn.Module) -> dict[str, Any]:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
                  "0.8.1/meta_schema_20220324.json",
        "name": name, "version": settings.version,
        "changelog": {settings.version: "demo weights trained on the synthetic cohort"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": {},
        "task": "Segmentation of liver, pancreas and tumour on portal-venous CT",
        "description": DESCRIPTION, "authors": "oncopacs",
        "copyright": "Apache-2.0", "intended_use": "demonstration and testing only; "
                     "trained on synthetic data — not for clinical use",
        "training": {
            "data": "oncopacs synthetic cohort", "cohort_seed": manifest["seed"],
            "cohort_size": manifest["size"], "cohort_patients": len(manifest["patients"]),
            "cohort_centres": manifest["centres"], "held_out_centre": held,
            "training_patients": train_count, "weights": weight_count(net),
            "final_loss": round(losses[-1], 4),
            "settings": settings.model_dump(mode="json", exclude={"progress"}),
        },
    }


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Copy ``ml.seg`` log records (info and up) to ``path`` for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("ml.seg")
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def train(manifest_path: Path, out: Path, settings: TrainSettings) -> TrainResult:
    """Train on all centres but one, write the package to ``out``, evaluate the held-out one.

    Writes ``out/configs``, ``out/models/model.pt``, ``out/logs/train.log`` and
    ``out/docs/evaluation.json`` (Dice per structure on the held-out centre).

    Raises
    ------
    SegError
        If the cohort cannot be split or read, or training cannot start.
    """
    start = time.perf_counter()
    train_entries, test_entries, held = split_by_centre(manifest_path, settings.holdout)
    if settings.max_train_cases is not None:
        train_entries = train_entries[:settings.max_train_cases]
    root = cohort_root(manifest_path)
    manifest = load_manifest(manifest_path)
    with _log_to(out / LOG_FILE), _deterministic(settings.threads):
        log.info("training on %d studies (centres %s), holding out centre %s (%d studies)",
                 len(train_entries), sorted({e["centre"] for e in train_entries}), held,
                 len(test_entries))
        cases = prepare(train_entries, root, settings.spacing_mm)
        log.info("loaded and resampled %d studies in %.1f s", len(cases),
                 time.perf_counter() - start)
        net, losses = train_network(cases, settings)
        definition = network_definition(settings.network)
        prep = Preprocessing(settings.spacing_mm, settings.window_hu,
                             roi_size=settings.patch_px)
        meta = _metadata(out.resolve().name, settings, manifest, held, len(cases), losses, net)
        digest = save_package(out, net, definition, prep, meta)
        evaluation = evaluate(out, test_entries, root)
        evaluation["held_out_centre"] = held
        (out / EVALUATION_FILE).parent.mkdir(parents=True, exist_ok=True)
        (out / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n",
                                           encoding="utf-8")
        seconds = time.perf_counter() - start
        log.info("held-out centre %s Dice %s; %.0f s in all", held, evaluation["dice_mean"],
                 seconds)
    return TrainResult(out, digest, losses, evaluation, seconds)
