"""Model B: tumour-stroma ratio (low/high) of pancreatic cancer from dual-phase CT.

Plain modules (no MONAI Deploy import): ``config`` (the validated model config),
``network`` (open_clip CLIP, per-phase adapters, phase attention, prompt logits),
``data`` (2.5D tumour crops per phase and their cache), ``pretrain`` (contrastive
CLIP pre-training on crops and report sentences), ``head`` (adapter/attention
training on frozen features), ``ablations`` (the comparators), ``train``
(``train(manifest, out, settings)``, writes the package), ``card`` (model card),
``predict`` (``TsrPredictor``), ``evaluate`` (``score_tsr``) and ``cli``
(``oncopacs train B``).
"""
