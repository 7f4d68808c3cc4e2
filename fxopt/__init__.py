"""fxopt: compiler passes on torch.fx graphs that make training faster, and show why."""
from . import cost_models, zoo  # noqa: F401  (cost_models installs as fxopt.cost_models)
from .analyze import UnknownOpWarning, analyze
from .capture import Captured, capture
from .errors import AnalysisError, CaptureError, FxoptError, HardwareError, InputError, ModelSpecError
from .report import GraphReport

__version__ = "0.1.0"
__all__ = ["analyze", "capture", "Captured", "GraphReport", "UnknownOpWarning", "FxoptError",
           "CaptureError", "InputError", "ModelSpecError", "HardwareError", "AnalysisError"]
