"""Segmentation model packages in the MONAI bundle layout.

A package folder holds::

    configs/metadata.json    name, version, description, labels, network_data_format,
                             weights {"path", "sha256"}
    configs/inference.json   network_def (``_target_`` + args), preprocessing
                             (Orientationd, Spacingd, ScaleIntensityRanged) and inferer
    models/model.pt          the network's state_dict

``load_package`` also reads a standard MONAI bundle a site downloaded itself
(for example ``wholeBody_ct_segmentation``): its labels (``metadata.json``
``labels`` or the output ``channel_def``) are mapped to oncopacs's classes by
name or through ``label_map``; its preprocessing is read from the transforms in
``inference.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ml.seg import CLASSES
from ml.seg.data import SegError
from ml.seg.network import build_network

log = logging.getLogger(__name__)

METADATA = "configs/metadata.json"
INFERENCE = "configs/inference.json"
WEIGHTS = "models/model.pt"
ARRAY_AXCODES = "SPL"
"""Anatomical direction each axis of an oncopacs ``(z, y, x)`` volume points to."""
LabelRef = str | int
LabelMap = Mapping[str, LabelRef | Sequence[LabelRef]]


class PackageError(SegError):
    """A model package is incomplete, corrupt or cannot be mapped to oncopacs's classes."""


@dataclass(frozen=True)
class Preprocessing:
    """How a package's network wants its input, in the network's own array axes."""

    spacing_mm: tuple[float, float, float]
    window_hu: tuple[float, float]
    axcodes: str = ARRAY_AXCODES
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.25


@dataclass(frozen=True)
class SegPackage:
    """A loaded package: network in eval mode, preprocessing and label lookup.

    ``lookup[c]`` is the oncopacs class (index of ``CLASSES``) of network output channel ``c``.
    """

    path: Path
    name: str
    version: str
    sha256: str
    network: torch.nn.Module
    preprocessing: Preprocessing
    lookup: tuple[int, ...]
    bundle_labels: dict[int, str]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PackageError(f"model package file {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PackageError(f"model package file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PackageError(f"model package file {path} does not hold a JSON object")
    return data


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def inference_config(definition: dict[str, Any], prep: Preprocessing) -> dict[str, Any]:
    """``configs/inference.json`` for an oncopacs package."""
    lo, hi = prep.window_hu
    return {
        "imports": ["$import torch"],
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": definition,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "EnsureChannelFirstd", "keys": "image", "channel_dim": "no_channel"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": prep.axcodes},
            {"_target_": "Spacingd", "keys": "image", "pixdim": list(prep.spacing_mm),
             "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": list(prep.roi_size),
                    "sw_batch_size": 1, "overlap": prep.overlap, "mode": "gaussian"},
    }


def save_package(out: Path, network: torch.nn.Module, definition: dict[str, Any],
                 prep: Preprocessing, metadata: dict[str, Any]) -> str:
    """Write a package folder; returns the weights' sha256.

    ``metadata`` holds the descriptive fields (name, version, description, ...);
    labels, network_data_format and the weights' hash are added here.
    """
    weights = out / WEIGHTS
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    torch.save(state, weights)
    digest = sha256_file(weights)
    channel_def = {str(i): name for i, name in enumerate(CLASSES)}
    meta = dict(metadata)
    meta["labels"] = channel_def
    meta["network_data_format"] = {
        "inputs": {"image": {
            "type": "image", "format": "hounsfield", "modality": "CT", "phase": "portal-venous",
            "num_channels": 1, "spatial_shape": list(prep.roi_size), "dtype": "float32",
            "value_range": [0, 1], "is_patch_data": True, "channel_def": {"0": "image"},
            "spacing_mm": list(prep.spacing_mm), "axcodes": prep.axcodes,
            "intensity_window_hu": list(prep.window_hu)}},
        "outputs": {"pred": {
            "type": "image", "format": "segmentation", "num_channels": len(CLASSES),
            "spatial_shape": list(prep.roi_size), "dtype": "float32", "value_range": [0, 1],
            "is_patch_data": True, "channel_def": channel_def}},
    }
    meta["weights"] = {"path": WEIGHTS, "sha256": digest}
    _write_json(out / METADATA, meta)
    _write_json(out / INFERENCE, inference_config(definition, prep))
    log.info("model package %s %s written to %s (weights sha256 %s)", meta.get("name"),
             meta.get("version"), out, digest)
    return digest


def _transforms(config: Any) -> Iterator[dict[str, Any]]:
    """Every dict with a ``_target_`` anywhere in a config."""
    if isinstance(config, dict):
        if "_target_" in config:
            yield config
        for value in config.values():
            yield from _transforms(value)
    elif isinstance(config, list):
        for value in config:
            yield from _transforms(value)


def _find(config: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any] | None:
    for item in _transforms(config):
        if str(item["_target_"]).rsplit(".", 1)[-1] in names:
            return item
    return None


def read_preprocessing(config: dict[str, Any], where: Path) -> Preprocessing:
    """Preprocessing from a bundle's ``inference.json`` transforms.

    Reads ``Spacing(d)`` ``pixdim``, ``ScaleIntensityRange(d)`` ``a_min``/``a_max``,
    ``Orientation(d)`` ``axcodes`` (default ``RAS``, MONAI's) and the inferer's
    ``roi_size``.

    Raises
    ------
    PackageError
        If the spacing or the intensity window cannot be found or are not numbers.
    """
    spacing = _find(config, ("Spacingd", "Spacing"))
    scale = _find(config, ("ScaleIntensityRanged", "ScaleIntensityRange"))
    orient = _find(config, ("Orientationd", "Orientation"))
    inferer = _find(config, ("SlidingWindowInferer",))
    if spacing is None or scale is None:
        raise PackageError(f"{where} has no {'Spacingd' if spacing is None else ''}"
                           f"{' ' if spacing is None and scale is None else ''}"
                           f"{'ScaleIntensityRanged' if scale is None else ''} transform; "
                           "pass preprocessing= to load_package")
    try:
        pixdim = spacing["pixdim"]
        pix = [float(pixdim)] * 3 if isinstance(pixdim, int | float) else \
            [float(v) for v in pixdim]
        window = (float(scale["a_min"]), float(scale["a_max"]))
        roi = [int(v) for v in (inferer or {}).get("roi_size", [96, 96, 96])]
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageError(f"{where}: preprocessing value is missing or not a number: "
                           f"{exc}") from exc
    if len(pix) != 3 or len(roi) != 3:
        raise PackageError(f"{where}: pixdim {pix} and roi_size {roi} must have 3 values")
    axcodes = str((orient or {}).get("axcodes", "RAS"))
    return Preprocessing((pix[0], pix[1], pix[2]), window, axcodes,
                         (roi[0], roi[1], roi[2]),
                         float((inferer or {}).get("overlap", 0.25)))


def bundle_labels(meta: dict[str, Any], where: Path) -> dict[int, str]:
    """Output channel -> label name, from ``labels`` or the first output's ``channel_def``.

    Raises
    ------
    PackageError
        If neither is present or an id is not an integer.
    """
    labels = meta.get("labels")
    if not isinstance(labels, dict):
        outputs = meta.get("network_data_format", {}).get("outputs", {})
        first: Any = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
        labels = first.get("channel_def") if isinstance(first, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise PackageError(f"{where} names no labels (neither 'labels' nor "
                           "network_data_format.outputs channel_def)")
    try:
        return {int(k): str(v) for k, v in labels.items()}
    except ValueError as exc:
        raise PackageError(f"{where}: label ids must be integers: {exc}") from exc


def _resolve(ref: LabelRef, labels: dict[int, str], where: Path) -> int:
    if isinstance(ref, int):
        if ref not in labels:
            raise PackageError(f"label id {ref} is not in {where} ({labels})")
        return ref
    by_name = {name.strip().lower(): i for i, name in labels.items()}
    key = ref.strip().lower()
    if key not in by_name:
        raise PackageError(f"label {ref!r} is not in {where}; its labels are "
                           f"{sorted(labels.values())}")
    return by_name[key]


def label_lookup(labels: dict[int, str], label_map: LabelMap | None, where: Path,
                 ) -> tuple[int, ...]:
    """Map each output channel to an oncopacs class; unmapped channels are background.

    Without ``label_map``, bundle labels named like an oncopacs class map to it.

    Raises
    ------
    PackageError
        If ``label_map`` names an unknown class or label, a label is mapped twice,
        or nothing maps to any of liver, pancreas or tumour.
    """
    if label_map is None:
        names = {name.strip().lower() for name in labels.values()}
        label_map = {c: c for c in CLASSES[1:] if c in names}
    lookup = [0] * (max(labels) + 1)
    for cls, refs in label_map.items():
        if cls not in CLASSES[1:]:
            raise PackageError(f"label_map key {cls!r} is not one of {list(CLASSES[1:])}")
        items = [refs] if isinstance(refs, str | int) else list(refs)
        for ref in items:
            channel = _resolve(ref, labels, where)
            if lookup[channel]:
                raise PackageError(f"bundle label {labels[channel]!r} ({channel}) of {where} "
                                   "is mapped to two oncopacs classes")
            lookup[channel] = CLASSES.index(cls)
    if not any(lookup):
        raise PackageError(f"{where} has no label named liver, pancreas or tumour "
                           f"(labels {sorted(labels.values())}); pass label_map=")
    return tuple(lookup)


def _load_state(net: torch.nn.Module, weights: Path) -> None:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise PackageError(f"weights {weights} do not fit the network of its "
                           f"{INFERENCE}: {exc}") from exc


def load_package(path: Path, label_map: LabelMap | None = None,
                 preprocessing: Preprocessing | None = None) -> SegPackage:
    """Load a model package (oncopacs's or a standard MONAI bundle) for ``segment``.

    Parameters
    ----------
    path
        The package folder.
    label_map
        oncopacs class (``liver``, ``pancreas``, ``tumour``) -> the bundle's label
        name(s) or id(s). Default: the bundle's labels with those names.
    preprocessing
        Overrides what ``inference.json``'s transforms say.

    Returns
    -------
    SegPackage
        The network in eval mode on CPU, its preprocessing and label lookup.

    Raises
    ------
    PackageError
        If a file is missing or corrupt, the weights' sha256 differs from the
        recorded one, the network cannot be built or loaded, or labels do not map.
    """
    meta_path, inf_path, weights = path / METADATA, path / INFERENCE, path / WEIGHTS
    meta, config = _read_json(meta_path), _read_json(inf_path)
    if not weights.is_file():
        raise PackageError(f"model package weights {weights} are missing")
    digest = sha256_file(weights)
    recorded = meta.get("weights", {}).get("sha256") if isinstance(meta.get("weights"),
                                                                   dict) else None
    if recorded is None:
        log.warning("package %s records no weights sha256; computed %s", path, digest)
    elif recorded != digest:
        raise PackageError(f"weights {weights} have sha256 {digest}, but {meta_path} "
                           f"records {recorded}: the file is corrupt or was replaced")
    if "network_def" not in config:
        raise PackageError(f"{inf_path} has no network_def")
    net = build_network(config["network_def"], str(inf_path))
    _load_state(net, weights)
    net.eval()
    labels = bundle_labels(meta, meta_path)
    prep = preprocessing or read_preprocessing(config, inf_path)
    return SegPackage(path, str(meta.get("name", path.name)), str(meta.get("version", "0")),
                      digest, net, prep, label_lookup(labels, label_map, meta_path), labels)
