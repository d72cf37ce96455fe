"""Import timm and open_clip on a CPU-only torch.

PyPI has only CUDA builds of torchvision, whose compiled operators cannot load
next to the CPU build of torch this project pins. torchvision then still
registers Python "fake" kernels for ``torchvision::nms`` and ``torchvision::qnms``
at import and fails because those operators were never defined. timm and
open_clip import torchvision (for its transforms and feature extraction), so
they fail too.

When torchvision's compiled operators are missing, this module defines the
two operator schemas (with no kernel: calling them raises) before importing
timm and open_clip. Nothing oncopacs runs uses torchvision's compiled operators.
With a CUDA torch and a matching torchvision nothing is defined.

Import timm and open_clip only from here: ``from ml.compat import open_clip, timm``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY: list[torch.library.Library] = []


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        for lib in Path(folder).glob("_C*.so"):
            try:
                torch.ops.load_library(str(lib))  # type: ignore[no-untyped-call]
            except OSError:
                return False
            return True
    return False


def _define_missing_schemas() -> None:
    if _LIBRARY or hasattr(torch.ops.torchvision, "nms"):
        return
    if _torchvision_ops_load():
        return
    lib = torch.library.Library("torchvision", "DEF")  # type: ignore[no-untyped-call]
    for schema in _SCHEMAS:
        lib.define(schema)  # type: ignore[no-untyped-call]
    _LIBRARY.append(lib)
    log.debug("torchvision's compiled operators do not load with this torch; "
              "defined the nms/qnms schemas so that timm and open_clip import")


_define_missing_schemas()

import open_clip  # noqa: E402  (needs the schemas above)
import timm  # noqa: E402

__all__ = ["open_clip", "timm"]
