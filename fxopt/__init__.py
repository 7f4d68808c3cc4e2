"""fxopt: compiler passes on torch.fx graphs that make training faster, and show why."""
from . import _checkout

if _checkout.needed():  # a bare checkout on PYTHONPATH (the GPU machine): map passes/ and cost_models/
    _checkout.install()
from . import cost_models  # noqa: F401  (cost_models installs as fxopt.cost_models)
from .workloads import data, zoo  # noqa: F401
from .measure.ablate import AblationError, AblationResult, ablate
from .study.explore import ExploreResult, explore
from .analyze import UnknownOpWarning, analyze
from .measure.bench import BenchResult, bench
from .measure.calibrate import calibrate
from .capture import Captured, capture
from .errors import AnalysisError, CaptureError, FxoptError, HardwareError, InputError, ModelSpecError
from .render.html import html_report
from .study.lint import LintReport, lint
from .optimize import OptimizedModule, optimize
from .measure.profile import ProfileResult, profile
from .measure.profile_training import TrainingProfile, profile_training, trace_training
from .report import GraphReport
from .study.scaling import ScalingReport, scaling
from .study.distributed import Distributed, DistributedCost, gpu_scaling
from .study.sweep import MeasureError, SweepResult, sweep
from .verify import VerificationResult, verify
from .backend import fxopt_backend, register as _register_backend

_register_backend()  # torch.compile(model, backend="fxopt")

from . import _aliases  # noqa: E402

_aliases.install()  # old module paths (fxopt.zoo, fxopt.lint, ...) still import

__version__ = "0.1.0"
__all__ = ["explore", "ExploreResult", "Distributed", "DistributedCost", "gpu_scaling", "bench", "BenchResult", "calibrate", "profile", "ProfileResult", "profile_training", "trace_training", "TrainingProfile", "scaling", "ScalingReport", "sweep", "SweepResult", "MeasureError", "html_report", "ablate", "AblationResult", "AblationError", "analyze", "capture", "optimize", "verify", "lint", "LintReport", "OptimizedModule", "VerificationResult", "Captured", "GraphReport", "UnknownOpWarning", "FxoptError", "fxopt_backend",
           "CaptureError", "InputError", "ModelSpecError", "HardwareError", "AnalysisError"]
