"""The error and the per-layer record shared by every step of :func:`fxfusion.passes.export.export_onnx`.

They are public names of :mod:`fxfusion.passes.export` and are imported from there. They live in
this leaf module so that the steps (``export_trace``, ``onnx_qdq``) can raise and fill them
without importing ``export``, which imports the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LayerExport", "OnnxExportError"]


class OnnxExportError(RuntimeError):
    """The model could not be written as ONNX (an unsupported op, a failed check)."""


@dataclass
class LayerExport:
    """How one quantized layer (or standalone quantizer) was written.

    ``weight`` and ``act`` describe the grids in words; ``*_bits`` and ``*_type`` (an ONNX integer
    type name such as ``"INT4"``) are None where that tensor stayed float.
    """

    layer: str
    kind: str
    weight: str = "float"
    act: str = "float"
    nodes: int = 0  # ONNX compute nodes whose input received the activation QDQ
    weight_bits: int | None = None
    weight_type: str | None = None
    act_bits: int | None = None
    act_type: str | None = None

    def row(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "weight": self.weight, "act": self.act, "nodes": self.nodes}

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# Where users import them (tracebacks print ``fxfusion.passes.export.OnnxExportError`` as before).
OnnxExportError.__module__ = LayerExport.__module__ = "fxfusion.passes.export"
