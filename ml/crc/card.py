"""Model A's input specification and model card (Markdown), written into its package."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ml.crc.clinical import FIELDS, SITES
from ml.crc.config import CrcConfig

if TYPE_CHECKING:
    from ml.crc.train import TrainSettings


def input_spec(config: CrcConfig) -> list[dict[str, Any]]:
    """The package's ``inputs``: what each modality is and how it is prepared."""
    ct, tiles = config.ct, config.tiles
    return [
        {"name": "ct", "modality": "CT", "phase": config.phase, "required": False,
         "needs": "HU volume (z, y, x), spacing in mm, labels liver=1 tumour=3 (ml.seg.CLASSES)",
         "preprocessing": f"liver box {list(ct.liver_shape_vox)} at {ct.liver_spacing_mm} mm "
                          f"and tumour box {list(ct.tumour_shape_vox)} at "
                          f"{ct.tumour_spacing_mm} mm; HU minus median liver HU, divided by "
                          f"{ct.hu_scale}, clipped to +-{ct.hu_clip}"},
        {"name": "wsi", "modality": "SM", "stain": "H&E", "required": False,
         "needs": "tissue tiles of the resection slide",
         "preprocessing": f"up to {tiles.max_tiles} tiles of {tiles.tile_px} px at "
                          f"{tiles.mpp} um/px with >= {tiles.min_tissue_fraction} tissue"},
        {"name": "clinical", "modality": "HL7 v2 / EHR", "required": False,
         "fields": {"tnm": "pT 1-4 and pN 0-2", "cea": "serum CEA ug/L",
                    "ca19_9": "serum CA19-9 U/mL", "age": "years", "sex": "M or F",
                    "site": " / ".join(SITES)},
         "missing": "any field may be missing (imputed with the training mean + a flag)"},
    ]


def model_card(s: TrainSettings, training_data: dict[str, Any], metrics: dict[str, Any],
               threshold: float) -> str:
    """The Markdown model card of a trained package."""
    split = training_data["split"]
    val = metrics["validation"]
    config = s.config
    return f"""# {s.name} {s.version}: metachronous liver metastasis within 3 years (CRC)

**RESEARCH USE ONLY. NOT A MEDICAL DEVICE. TRAINED ON SYNTHETIC DATA.**
These demo weights were trained on a synthetic cohort made by `oncopacs synth`; they
have never seen a real patient and must not inform any clinical decision. A site
trains its own weights with `oncopacs train A` on its own data.

## Intended use
Patients with stage I-III colorectal cancer after curative resection. The model
estimates the probability of metachronous liver metastasis within 3 years and a
risk group ("high risk" when the probability is >= {threshold:.4f}, a threshold
fixed on the training split by Youden's index), with the discrete-time cumulative
incidence at 6-month intervals up to 36 months. It reports which inputs it used.

## Inputs
- CT (portal-{config.phase} phase) with liver and tumour labels: liver and tumour crops.
- H&E whole-slide image of the resection: up to {config.tiles.max_tiles} tissue tiles of
  {config.tiles.tile_px} px at {config.tiles.mpp} um/px.
- Clinical fields: {", ".join(FIELDS)} (each may be missing).
Any subset works: absent modalities are replaced by learned "missing" tokens
(trained with modality dropout {config.network.modality_dropout}).

## Method
3D CNN on the liver crop pooled with masked mean and log-SD statistics (texture),
plus a small 3D CNN on the tumour crop; `{config.network.tile_arch}` tile encoder (timm,
trained from scratch here) with gated-attention MIL pooling; clinical MLP; a
transformer layer over CLS + modality tokens; heads for the 3-year logit and the
discrete-time hazard ({config.network.intervals} x {config.network.interval_months} months).
Loss: cross-entropy on patients whose 3-year status is known plus the censored
discrete-time likelihood on all patients.

## Training data
Synthetic: {training_data["patients_used"]} training and
{training_data["validation_patients"]} validation CRC patients. Held-out external
centre {split["test_centre"]} ({split["test"]["patients"]} patients) was not read.
Split: `{json.dumps(split)}`
Settings: epochs {s.epochs}, seed {s.seed}, batch {s.batch_size}, lr {s.lr}, tiles per
slide while training {s.tiles_per_slide}.

## Validation (internal validation split, training centres)
`{json.dumps(val)}`
For the held-out centre, run `oncopacs evaluate` (AUC with DeLong tests against
TNM-only and CEA-only models, calibration, decision curve, C-index).

## Limitations
- Synthetic data only: the image signals (liver texture heterogeneity, liver foci,
  tumour stroma share) are planted by the generator and far cleaner than real ones.
- Training crops come from ground-truth labels; at inference they come from the
  segmentation model, whose errors propagate.
- Small cohort, few centres; calibration on a new site must be checked before use.
- Tile attention weights show where the model looked, not why.
"""
