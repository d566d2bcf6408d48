"""fxfusion: GABFusion for low-bit QAT of multi-branch networks, on any PyTorch model.

The flow (each step a pass in ``fxfusion.passes``)::

    find_fusions -> rewrite -> quantize -> (your QAT loop + ADALoss, AlphaBalancer)
                 -> deploy -> export_onnx -> verify_onnx
"""

from __future__ import annotations

from fxfusion.gabfusion import GABFusion
from fxfusion.passes.find import FusionReport, FusionSite, find_fusions
from fxfusion.passes.quantize import quantize
from fxfusion.passes.rewrite import rewrite

__all__ = ["FusionReport", "FusionSite", "GABFusion", "find_fusions", "quantize", "rewrite"]
__version__ = "0.1.0"
