"""What one ATen call costs: its op class, FLOPs, bytes moved and kernel launches.

Matrix FLOPs come from torch's own registry (``torch.utils.flop_counter``), so they equal
``FlopCounterMode`` by construction; everything else is a rule table keyed by op name.
Bytes are the minimum traffic of the kernel: each distinct input element read once, each
output element written once; views, metadata and allocations move nothing.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten

from .layout import conv_layout
from .names import dtype_name

MATRIX_CLASSES = ("matmul", "conv", "attention")


@dataclass(frozen=True)
class Rule:
    """How to cost one op: its class, FLOPs per element of ``basis``, and whether it is a kernel."""

    op_class: str
    flops_per_elem: int = 0
    basis: str = "out"   # elements of: "out" the main output, "in" the main input, "all" every output
    kernel: bool = True  # launches a kernel (views, metadata and empty allocations do not)
    known: bool = True


META = Rule("meta", kernel=False)
VIEW = Rule("view", kernel=False)
ALLOC = Rule("alloc", kernel=False)
UNKNOWN = Rule("unknown", known=False)


def _rules(op_class: str, names: str, flops: int = 0, basis: str = "out", kernel: bool = True):
    return {n: Rule(op_class, flops, basis, kernel) for n in names.split()}


# Per-element FLOP counts are the usual convention (one per arithmetic step of the textbook
# formula); they only feed "other" FLOPs and never the matrix totals compared with torch.
RULES: dict[str, Rule] = {
    **_rules("meta", "prim.device sym_size sym_stride sym_numel sym_storage_offset is_contiguous "
             "_local_scalar_dense _record_function_enter _record_function_enter_new _record_function_exit "
             "_assert_tensor_metadata _assert_async _assert_scalar sym_constrain_range "
             "sym_constrain_range_for_size",
             kernel=False),
    **_rules("view", "_unsafe_view view_as_real view_as_complex lift_fresh _reshape_alias", kernel=False),
    **_rules("alloc", "empty empty_like empty_strided new_empty new_empty_strided empty_permuted",
             kernel=False),
    **_rules("memory", "zeros ones full zeros_like ones_like full_like new_zeros new_ones new_full "
             "fill_ zero_ scalar_tensor arange linspace clone _to_copy copy_ cat stack index "
             "index_select gather scatter scatter_add index_put index_put_ index_add _unsafe_index "
             "_unsafe_index_put embedding embedding_dense_backward constant_pad_nd roll flip repeat "
             "select_backward slice_backward slice_scatter select_scatter as_strided_scatter tril triu "
             "masked_scatter _index_put_impl_ diagonal_backward index_copy lift_fresh_copy split_with_sizes_copy "
             "alias_copy"),
    **_rules("random", "rand randn randint rand_like randn_like uniform_ normal_ bernoulli bernoulli_ "
             "random_ exponential_", 1),
    **_rules("random", "native_dropout", 2),
    **_rules("pointwise", "native_dropout_backward", 2),
    **_rules("softmax", "_softmax _log_softmax _safe_softmax", 5, "in"),
    **_rules("softmax", "_softmax_backward_data _log_softmax_backward_data", 4, "in"),
    **_rules("norm", "native_layer_norm native_batch_norm _native_batch_norm_legit "
             "_native_batch_norm_legit_functional _native_batch_norm_legit_no_training "
             "native_group_norm _fused_rms_norm _batch_norm_with_update _batch_norm_no_update", 8, "in"),
    **_rules("norm", "native_layer_norm_backward native_batch_norm_backward native_group_norm_backward "
             "_fused_rms_norm_backward batch_norm_backward", 10, "in"),
    **_rules("reduction", "sum mean amax amin max min argmax argmin prod var std var_mean std_mean "
             "norm linalg_vector_norm logsumexp any all cumsum cumprod nll_loss_forward "
             "nll_loss2d_forward mse_loss binary_cross_entropy_with_logits _cdist_forward", 1, "in"),
    **_rules("pointwise", "nll_loss_backward nll_loss2d_backward mse_loss_backward", 1),
    **_rules("pooling", "max_pool2d_with_indices max_pool3d_with_indices avg_pool2d avg_pool3d "
             "_adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool2d", 1, "in"),
    **_rules("pooling", "max_pool2d_with_indices_backward avg_pool2d_backward "
             "_adaptive_avg_pool2d_backward adaptive_max_pool2d_backward", 1),
    **_rules("pooling", "upsample_nearest1d upsample_nearest2d upsample_nearest3d "
             "upsample_bilinear2d _upsample_nearest_exact2d upsample_bicubic2d", 1),
    **_rules("pooling", "upsample_nearest1d_backward upsample_nearest2d_backward "
             "upsample_nearest3d_backward upsample_bilinear2d_backward "
             "_upsample_nearest_exact2d_backward", 1, "in"),
}

# CPU's fused attention has no entry in torch's registry; it computes what the CUDA kernels do,
# so it is costed with torch's own SDPA formulas.
_CPU_SDPA = {
    "aten._scaled_dot_product_flash_attention_for_cpu":
        lambda q, k, v, *a, **kw: flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape),
    "aten._scaled_dot_product_flash_attention_for_cpu_backward":
        lambda go, q, k, v, *a, **kw: flop_counter.sdpa_backward_flop_count(go.shape, q.shape, k.shape,
                                                                            v.shape),
}


def _conv_backward_flops(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                         groups, output_mask, out_val=None):
    """grad_input and grad_weight each cost one forward conv.

    torch's registry (2.13) counts grad_weight of a grouped conv ``groups`` times over (a 96-group
    depthwise conv's backward comes out 97x its forward, not 2x); this counts it once.
    """
    fwd = flop_counter.conv_flop_count(x.shape, w.shape, grad_out.shape, transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


MATRIX_FORMULAS = {str(k): v for k, v in flop_counter.flop_registry.items()}
# CPU-only entries are keyed by the packet's own str(); wrap them to drop torch's out_val kwarg
MATRIX_FORMULAS.update({k: (lambda f: lambda *a, out_val=None, **kw: f(*a, **kw))(f)
                        for k, f in _CPU_SDPA.items()})
MATRIX_FORMULAS["aten.convolution_backward"] = _conv_backward_flops
MATRIX_FORMULAS["aten._addmm_activation"] = MATRIX_FORMULAS["aten.addmm"]  # GEMM + relu/gelu epilogue

# fxopt's own fused-region ops (``fxopt.codegen``): op packet -> FLOPs of one launch. They are
# costed like any kernel: their boundary tensors' bytes, one launch.
FUSED_FLOPS: dict[str, int] = {}

# In-place ops that overwrite their destination without reading it.
WRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "exponential_", "bernoulli_"}


def matrix_class(name: str) -> str:
    return next((c for key, c in (("conv", "conv"), ("attention", "attention")) if key in name), "matmul")


def short_name(func) -> str:
    """``aten.add.Tensor`` -> ``add``; ``prim.device.default`` -> ``prim.device``."""
    packet = str(func.overloadpacket)
    return packet if packet.startswith("prim.") else packet.split(".", 1)[-1]


@functools.lru_cache(maxsize=None)
def classify(func) -> Rule:
    """The rule for an OpOverload. Cached: an op's rule never depends on its arguments."""
    packet, name = str(func.overloadpacket), short_name(func)
    if packet in MATRIX_FORMULAS:
        return Rule(matrix_class(name), kernel=True)
    if packet in FUSED_FLOPS:
        return Rule("fused")
    if name in RULES:
        return RULES[name]
    schema = func._schema
    if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return VIEW
    if name.startswith("_foreach_"):
        return Rule("optimizer", 1, "all")
    if torch.Tag.pointwise in func.tags or (name.endswith("_") and _inplace_is_pointwise(name)):
        return Rule("pointwise", 1)
    return UNKNOWN


def _inplace_is_pointwise(name: str) -> bool:
    base = getattr(torch.ops.aten, name[:-1], None)
    return base is not None and any(torch.Tag.pointwise in getattr(base, o).tags for o in base.overloads())


def is_matrix(rule: Rule) -> bool:
    return rule.op_class in MATRIX_CLASSES


# ---- sizes -------------------------------------------------------------------------------

def tensors(tree) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def distinct_elems(t: torch.Tensor):
    """Elements a kernel must touch: broadcast (stride-0) dimensions are read once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if isinstance(stride, int) and stride == 0:
            continue
        n = n * size
    return n


def tensor_bytes(t: torch.Tensor):
    return distinct_elems(t) * t.element_size()


def _unique(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in ts:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def mutated_args(func, args, kwargs) -> list[torch.Tensor]:
    """Tensors an in-place or out= op writes (schema ``Tensor(a!)`` arguments)."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            val = args[i] if i < len(args) else kwargs.get(arg.name)
            written += tensors(val)
    return written


@dataclass
class CallCost:
    op: str
    op_class: str
    flops: object           # int or SymInt
    bytes_read: object
    bytes_written: object
    kernels: int
    dtype: str | None       # dtype of the first floating input (drives the peak)
    known: bool
    conv_layout: tuple | None = None  # (conv class, precision, is NHWC) of a conv call: its layout factor
    gemms: tuple = ()        # the (b, m, n, k) GEMMs a matrix call runs, at concrete (hint) sizes
    kind: str | None = None  # matrix kernel kind (gemm, conv, conv_1x1, attention_fwd/bwd)
    traffic: str = ""        # the real-traffic rule applied, when bytes exceed the minimum
    extra_bytes: object = 0  # bytes beyond the minimum traffic (multi-pass kernels); in bytes_read


def cost_call(func, args, kwargs, out) -> CallCost:
    """FLOPs, minimum bytes and kernels of one ATen call."""
    rule = classify(func)
    name = short_name(func)
    ins = tensors((args, kwargs))
    dtype = next((dtype_name(t.dtype) for t in ins if t.is_floating_point()), None)
    if not rule.kernel:
        return CallCost(name, rule.op_class, 0, 0, 0, 0, dtype, True)
    written = mutated_args(func, args, kwargs)
    if written:
        read = [t for t in ins if name not in WRITE_ONLY or all(t is not w for w in written)]
    else:
        written, read = tensors(out), ins
    read, written = _unique(read), _unique(written)
    bytes_read = sum((tensor_bytes(t) for t in read), 0)
    bytes_written = sum((tensor_bytes(t) for t in written), 0)
    if rule.op_class == "fused":
        flops = FUSED_FLOPS[str(func.overloadpacket)]
    elif is_matrix(rule):
        flops = MATRIX_FORMULAS[str(func.overloadpacket)](*args, **kwargs, out_val=out)
    elif rule.flops_per_elem:
        basis = ins if rule.basis == "in" else written  # the first is the op's main tensor
        basis = basis if rule.basis == "all" else basis[:1]
        flops = rule.flops_per_elem * sum((t.numel() for t in basis), 0)
    else:
        flops = 0
    kernels = _kernels(name, args, kwargs)
    extra, traffic, extra_kernels = 0, "", 0
    if name in TRAFFIC:
        extra, traffic, extra_kernels = TRAFFIC[name](args, kwargs, out) or (0, "", 0)
    kind, gemms = _matrix_shape(name, rule, args, kwargs, out)
    return CallCost(name, rule.op_class, flops, bytes_read + extra, bytes_written, kernels + extra_kernels,
                    dtype, rule.known, _conv_layout(name, args), gemms, kind, traffic, extra)


# ---- GEMM shapes of matrix calls (what the tile/wave model prices) ------------------------

def _mm(args, kwargs, out):
    """mm(a, b) and addmm(bias, a, b): the last two positional arguments (beta/alpha are keywords)."""
    a, b = args[-2], args[-1]
    return "gemm", ((1, a.shape[0], b.shape[1], a.shape[1]),)


def _bmm(args, kwargs, out):
    """bmm(a, b) and baddbmm(self, a, b): the last two positional arguments (beta/alpha are keywords)."""
    a, b = args[-2], args[-1]
    return "gemm", ((a.shape[0], a.shape[1], b.shape[2], a.shape[2]),)


def _conv_kind(w, groups, cin) -> str:
    if groups > 1 and groups == cin:
        return "depthwise"
    return "conv_1x1" if all(int(k) == 1 for k in w.shape[2:]) else "conv"


def _conv(args, kwargs, out):
    """Implicit GEMM: rows = output pixels, cols = output channels per group, K = C_in/g x kernel."""
    x, w = args[0], args[1]
    transposed, groups = bool(args[6]) if len(args) > 6 else False, int(args[8]) if len(args) > 8 else 1
    if x.dim() < 3:
        return None, ()
    ksize = math.prod(w.shape[2:])
    if transposed:   # w: [C_in, C_out/g, k...]
        n, k = w.shape[1], w.shape[0] // groups * ksize
    else:
        n, k = w.shape[0] // groups, w.shape[1] * ksize
    m = math.prod((out.shape[0], *out.shape[2:]))
    return _conv_kind(w, groups, x.shape[1]), ((groups, m, n, k),)


def _conv_backward(args, kwargs, out):
    """grad_input: rows = input pixels, K = C_out/g x kernel; grad_weight: K = output pixels."""
    go, x, w = args[0], args[1], args[2]
    groups, mask = int(args[9]), args[10]
    if x.dim() < 3:
        return None, ()
    ksize = math.prod(w.shape[2:])
    cin_g, cout_g = x.shape[1] // groups, go.shape[1] // groups
    gemms = []
    if mask[0]:
        gemms.append((groups, math.prod((x.shape[0], *x.shape[2:])), cin_g, cout_g * ksize))
    if mask[1]:
        gemms.append((groups, cout_g, cin_g * ksize, math.prod((go.shape[0], *go.shape[2:]))))
    return _conv_kind(w, groups, x.shape[1]), tuple(gemms)


def _attention(backward: bool):
    """Fused (flash) attention as one GEMM-like kernel per (batch, head): a CTA owns a block of
    query rows and the whole head dim, and its K loop streams the keys and values. The forward
    runs two GEMMs per key (Q K^T, P V): K = 2 x L_k; the backward five: K = 5 x L_k."""
    def dims(args, kwargs, out):
        q, k = (args[1], args[2]) if backward else (args[0], args[1])
        if q.dim() != 4:
            return None, ()
        b, h, lq, e = q.shape
        return ("attention_bwd" if backward else "attention_fwd"), ((b * h, lq, e, (5 if backward else 2) * k.shape[2]),)
    return dims


_GEMM_DIMS = {"mm": _mm, "bmm": _bmm, "baddbmm": _bmm, "addmm": _mm, "_addmm_activation": _mm,
              "convolution": _conv, "convolution_backward": _conv_backward}


def _matrix_shape(name: str, rule: Rule, args, kwargs, out) -> tuple:
    if not is_matrix(rule):
        return None, ()
    if name in _GEMM_DIMS:
        try:
            return _GEMM_DIMS[name](args, kwargs, out)
        except (IndexError, AttributeError, TypeError, ValueError):
            return matrix_kind(rule.op_class, name), ()
    if "attention" in name:
        return _attention("backward" in name)(args, kwargs, out)
    return matrix_kind(rule.op_class, name), ()


def matrix_kind(op_class: str, name: str = "") -> str:
    """The kernel kind of a matrix call known only by its class."""
    if op_class == "attention":
        return "attention_bwd" if "backward" in name else "attention_fwd"
    return "conv" if op_class == "conv" else "gemm"


# ---- real traffic: kernels that read their inputs more than once ---------------------------

def _row(t) -> int:
    from .layout import _int
    return _int(t.shape[-1]) * t.element_size() if t.dim() else 0


def _bn_forward(args, kwargs, out):
    """Training batch norm (ATen/cuDNN): a statistics pass over x, then a normalize pass reading x
    again (and a second kernel). Eval batch norm is one pass."""
    saved_mean = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
    if saved_mean is None or saved_mean.numel() == 0:   # eval: no batch statistics saved
        return None
    return tensor_bytes(args[0]), "batch-norm training: statistics pass + normalize pass (x read twice)", 1


def _bn_backward(args, kwargs, out):
    """Batch-norm backward: a reduction pass over (dy, x), then the dx pass reading both again."""
    go, x = args[0], args[1]
    return tensor_bytes(go) + tensor_bytes(x), "batch-norm backward: reduce (dy, x) then dx pass reads them again", 1


# a row whose bytes fit on chip is read once; longer rows are re-read from memory
LN_ONE_PASS_ROW = 16384            # bytes: ATen's vectorized layer norm keeps the row on chip
SOFTMAX_ONE_PASS_ROW = 48 * 1024   # bytes: the shared-memory softmax kernel holds the row


def _copies(*ts) -> tuple:
    """ATen's norm and softmax kernels call ``.contiguous()`` on their inputs: a permuted view (a
    layer norm over the channels of an NCHW tensor) is copied first, one read and one write."""
    strided = [t for t in ts if isinstance(t, torch.Tensor) and not _contiguous(t)]
    return sum((2 * tensor_bytes(t) for t in strided), 0), len(strided)


def _contiguous(t) -> bool:
    try:
        return bool(t.is_contiguous())
    except Exception:  # undecidable symbolic strides: assume the common case
        return True


def _with_copies(extra, why, kernels, *ts):
    """A traffic rule's ``(extra bytes, why, extra kernels)`` plus the copies of strided inputs."""
    copy_bytes, copies = _copies(*ts)
    if copies:
        why = (why + "; " if why else "") + f"{copies} strided input(s) copied to contiguous first"
    return (extra + copy_bytes, why, kernels + copies) if (extra or copies) else None


def _ln_forward(args, kwargs, out):
    x = args[0]
    if _row(x) <= LN_ONE_PASS_ROW:
        return _with_copies(0, "", 0, x)
    return _with_copies(tensor_bytes(x), f"layer norm, row {_row(x)} B > {LN_ONE_PASS_ROW} B: moments then "
                        f"normalize (x read twice)", 0, x)


def _ln_backward(args, kwargs, out):
    """dx needs row reductions of (dy, x); dgamma/dbeta a second kernel reducing over rows."""
    go, x = args[0], args[1]
    return _with_copies(tensor_bytes(go) + tensor_bytes(x),
                        "layer-norm backward: dx kernel + dgamma/dbeta kernel re-read (dy, x)", 1, go, x)


def _softmax_forward(args, kwargs, out):
    x = args[0]
    dim = args[1] if len(args) > 1 else -1
    if dim not in (-1, x.dim() - 1) or _row(x) <= SOFTMAX_ONE_PASS_ROW:
        return _with_copies(0, "", 0, x)
    return _with_copies(2 * tensor_bytes(x), f"softmax, row {_row(x)} B > {SOFTMAX_ONE_PASS_ROW} B: max, sum and "
                        f"write passes (x read 3x)", 0, x)


def _softmax_backward(args, kwargs, out):
    go, y = args[0], args[1]
    if _row(y) <= SOFTMAX_ONE_PASS_ROW:
        return _with_copies(0, "", 0, go, y)
    return _with_copies(tensor_bytes(go) + tensor_bytes(y), "softmax backward, long rows: dot pass then dx pass "
                        "(dy, y read twice)", 0, go, y)


TRAFFIC = {
    **dict.fromkeys(("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                     "_batch_norm_with_update", "cudnn_batch_norm"), _bn_forward),
    **dict.fromkeys(("native_batch_norm_backward", "batch_norm_backward", "cudnn_batch_norm_backward"),
                    _bn_backward),
    "native_layer_norm": _ln_forward,
    "native_layer_norm_backward": _ln_backward,
    **dict.fromkeys(("_softmax", "_log_softmax", "_safe_softmax"), _softmax_forward),
    **dict.fromkeys(("_softmax_backward_data", "_log_softmax_backward_data"), _softmax_backward),
}


# conv op -> positions of (input, weight, groups) in its arguments
_CONV_ARGS = {"convolution": (0, 1, 8), "convolution_backward": (1, 2, 9)}


def _conv_layout(name: str, args) -> tuple | None:
    if name not in _CONV_ARGS or len(args) <= _CONV_ARGS[name][2]:
        return None
    x, w, groups = (args[i] for i in _CONV_ARGS[name])
    return conv_layout(x, w, groups)


def _kernels(name: str, args, kwargs) -> int:
    """convolution_backward launches one kernel per gradient it computes; others launch one."""
    if name == "convolution_backward":
        mask = kwargs.get("output_mask", args[-1] if args else None)
        return max(1, sum(bool(m) for m in mask)) if isinstance(mask, (list, tuple)) else 1
    return 1
