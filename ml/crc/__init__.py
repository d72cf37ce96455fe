"""Model A: risk of metachronous liver metastasis within 3 years after CRC resection.

``network`` defines the multimodal network (CT crops, H&E tiles with gated-attention
MIL, clinical fields, attention fusion with missing-modality tokens), ``data`` builds
its inputs, ``train`` trains it and writes the model package, ``predict`` runs it,
``evaluate`` scores it on a held-out centre and ``cli`` is ``oncopacs train A``.
"""
