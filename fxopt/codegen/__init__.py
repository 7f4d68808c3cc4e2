"""fxopt's own fused kernels: a region of fx nodes -> a program (:mod:`.lower`, :mod:`.program`) ->
Triton source forward and backward (:mod:`.kernel`) -> a custom op with autograd (:mod:`.runtime`).
The ``fuse`` pass (``fxopt.passes.fuse``) forms the regions."""
from .lower import Domain, Unfusible, classify, lower
from .program import Program, derive_backward, choose_saved
from .runtime import region_op, regions, triton_status

__all__ = ["Domain", "Unfusible", "classify", "lower", "Program", "derive_backward", "choose_saved",
           "region_op", "regions", "triton_status"]
