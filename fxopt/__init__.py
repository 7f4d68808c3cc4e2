"""fxopt: compiler passes on torch.fx graphs that make training faster, and show why."""
from . import _checkout

if _checkout.needed():  # a bare checkout on PYTHONPATH (the GPU machine): map passes/ and cost_models/
    _checkout.install()
from . import cost_models, data, zoo  # noqa: F401  (cost_models installs as fxopt.cost_models)
from .ablate import AblationError, AblationResult, ablate
from .explore import ExploreResult, explore
from .analyze import UnknownOpWarning, analyze
from .bench import BenchResult, bench
from .calibrate import calibrate
from .capture import Captured, capture
from .errors import AnalysisError, CaptureError, FxoptError, HardwareError, InputError, ModelSpecError
from .html import html_report
from .lint import LintReport, lint
from .optimize import OptimizedModule, optimize
from .profile import ProfileResult, profile
from .profile_training import TrainingProfile, profile_training, trace_training
from .report import GraphReport
from .scaling import ScalingReport, scaling
from .distributed import Distributed, DistributedCost, gpu_scaling
from .sweep import MeasureError, SweepResult, sweep
from .verify import VerificationResult, verify
from .backend import fxopt_backend, register as _register_backend

_register_backend()  # torch.compile(model, backend="fxopt")

__version__ = "0.1.0"
__all__ = ["explore", "ExploreResult", "Distributed", "DistributedCost", "gpu_scaling", "bench", "BenchResult", "calibrate", "profile", "ProfileResult", "profile_training", "trace_training", "TrainingProfile", "scaling", "ScalingReport", "sweep", "SweepResult", "MeasureError", "html_report", "ablate", "AblationResult", "AblationError", "analyze", "capture", "optimize", "verify", "lint", "LintReport", "OptimizedModule", "VerificationResult", "Captured", "GraphReport", "UnknownOpWarning", "FxoptError", "fxopt_backend",
           "CaptureError", "InputError", "ModelSpecError", "HardwareError", "AnalysisError"]
