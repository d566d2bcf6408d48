"""fxfusion: GABFusion for low-bit QAT of multi-branch networks, on any PyTorch model.

The flow (each step a pass in ``fxfusion.passes``)::

    find_fusions -> rewrite -> quantize -> (your QAT loop + ADALoss, AlphaBalancer)
                 -> deploy -> export_onnx -> verify_onnx
"""

from __future__ import annotations

from fxfusion.ada import ADALoss
from fxfusion.balance import AlphaBalancer
from fxfusion.deployed import DeployedFusion
from fxfusion.gabfusion import GABFusion
from fxfusion.passes.deploy import deploy
from fxfusion.passes.export import export_onnx
from fxfusion.passes.find import FusionReport, FusionSite, find_fusions
from fxfusion.passes.quantize import quantize
from fxfusion.passes.rewrite import rewrite
from fxfusion.passes.verify import verify_onnx
from fxfusion.profile import profile_gradients
from fxfusion.schedule import NormSchedule

__all__ = [
    "ADALoss",
    "AlphaBalancer",
    "DeployedFusion",
    "FusionReport",
    "FusionSite",
    "GABFusion",
    "NormSchedule",
    "deploy",
    "export_onnx",
    "find_fusions",
    "profile_gradients",
    "quantize",
    "rewrite",
    "verify_onnx",
]
__version__ = "0.1.0"
