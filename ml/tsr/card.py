"""The TSR package's model card (MODEL_CARD.md)."""

from __future__ import annotations

from typing import Any

from ml.tsr.config import TsrConfig


def _table(rows: dict[str, Any]) -> str:
    lines = ["| | AUC |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows.items()]
    return "\n".join(lines)


def _counts(split: dict[str, Any]) -> str:
    lines = ["| split | patients | high TSR | per centre |", "|---|---|---|---|"]
    for name in ("train", "val", "test"):
        part = split[name]
        per = ", ".join(f"{c}: {n}" for c, n in part["per_centre"].items())
        lines.append(f"| {name} | {part['patients']} | {part['high_tsr']} | {per} |")
    return "\n".join(lines)


def model_card(name: str, version: str, config: TsrConfig, training_data: dict[str, Any],
               metrics: dict[str, Any]) -> str:
    """Markdown model card: use, inputs, method, data, validation, limitations."""
    clip = config.clip
    encoder = training_data["encoder"]
    return f"""# {name} {version}: PDAC tumour-stroma ratio from dual-phase CT

**RESEARCH USE ONLY. TRAINED ON SYNTHETIC DATA.** These demo weights were trained on a
synthetic cohort (`oncopacs synth`); they have never seen a real patient and must not
inform any clinical decision. A site trains its own package with `oncopacs train B`.

## Intended use
Pre-operative pancreatic ductal adenocarcinoma: estimate whether the tumour-stroma
ratio (TSR) is high (>= 0.5) from contrast-enhanced CT. Output: probability of high
TSR and the class ("high TSR" / "low TSR") at a threshold of the package metadata,
fixed on the training data; the inputs used and missing.

## Inputs
- `ct_arterial`: arterial-phase abdominal CT; `ct_venous`: portal-venous-phase CT.
  Either may be absent (the model then reads the one available phase).
- A segmentation on the CT grid: the crop is centred on the tumour label, or on the
  pancreas when no tumour is segmented (less accurate).
- Crop: 3 axial planes ({config.crop.slice_offset_mm:g} mm apart) of
  {config.image_size} px at {config.crop.spacing_mm:g} mm, window
  {config.crop.window_hu[0]:g} to {config.crop.window_hu[1]:g} HU.

## Method
CLIP-adapter. A small open_clip CLIP (ViT image tower {clip.vision.layers} layers width
{clip.vision.width}, patch {clip.vision.patch_size}; text tower {clip.text.layers} layers
width {clip.text.width}; embedding {clip.embed_dim}), frozen. One residual bottleneck
adapter per phase (ratio alpha {config.head.alpha:g}), {config.head.fusion} fusion of the
phase tokens, cosine logits against the text embeddings of "low" and "high"
tumour-stroma ratio prompts. Encoder: {encoder["source"]}.

## Training data
Synthetic cohort `{training_data["cohort"]}` (seed {training_data["cohort_seed"]}, size
{training_data["size"]}), PDAC patients only, split by centre; the held-out centre is
never used for training, model selection or the threshold.

{_counts(training_data["split"])}

## Validation
Internal validation AUC (training centres): {metrics["auc_internal_validation"]:.3f}.
Held-out centre {metrics["held_out_centre"]} ({metrics["held_out_patients"]} patients);
the ablations were trained on the same training split with the same frozen encoder:

{_table(metrics["auc_held_out"])}

## Limitations
- Synthetic data: the planted signal (tumour enhancement per phase) is far simpler
  than real tumour biology; figures on real CT are unknown.
- The crop depends on the segmentation; with the pancreas fallback the tumour may
  sit off-centre or be missed.
- One held-out centre; scanners, protocols and contrast timing outside the training
  centres may shift the probabilities. Recalibrate and re-validate locally.
"""
