"""fxopt rewrite passes (installed as ``fxopt.passes``).

A pass is a registered class (``name``, ``summary``, ``options``, ``run(gm, ctx)``); pipelines
are strings such as ``"dce,normalize{div_exact_only=true}"`` (see :mod:`fxopt.passes.base` for
the syntax); :class:`PassManager` runs them with linting, metadata propagation, costing,
diffs, optional verification and rollback.

    from fxopt import capture
    from fxopt.passes import PassManager, timing_table
    gm, records = PassManager("dce,normalize", verify=True).run(capture(model, x))
    print(timing_table(records))
"""
from .base import (Decision, Pass, PassContext, PassError, PassResult, PipelineError, available,
                   format_pipeline, get, parse_pipeline, register, unregister)
from .manager import PassManager, PassRecord, find_divergence, propagate_meta, timing_table
from . import channels_last, dce, epilogue, fold_bn, fuse, mixed_precision, normalize, sdpa  # noqa: F401,E402  (registers the built-in passes)
from .channels_last import ToChannelsLast
from .dce import DeadCodeElimination
from .epilogue import FuseEpilogues
from .fold_bn import FoldBatchNorm
from .fuse import Fuse, region_table
from .mixed_precision import CastMixedPrecision
from .normalize import Normalize
from .sdpa import FuseAttention

__all__ = ["Pass", "PassResult", "PassContext", "Decision", "register", "unregister", "get", "available",
           "parse_pipeline", "format_pipeline", "PassManager", "PassRecord", "PassError", "PipelineError",
           "timing_table", "propagate_meta", "find_divergence", "DeadCodeElimination", "Normalize",
           "FoldBatchNorm", "FuseEpilogues", "FuseAttention",
           "ToChannelsLast", "CastMixedPrecision", "Fuse", "region_table"]
