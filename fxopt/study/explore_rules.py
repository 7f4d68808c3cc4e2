"""The substitution rules of :func:`fxopt.explore`: one small entry per architecture change.

Each :class:`Rule` says what it matches (a module, given the shapes it was called with), what it
builds in its place (a trainable module, made on the matched module's device, so rules work on
``meta`` models), why it should train faster, what it may cost in quality, whether it computes
exactly the same function, and the parameter count of what it builds as a formula of the matched
module's hyper-parameters (``params``; the tests check it against the built module).

Rules change modules, never graphs: the replacement sits at the same module path, keeps the
original's child names where the function is unchanged (so ``state_dict`` keys stay), and
initializes what is new as documented in its ``build`` (copied slices, zero-initialized new
output units so the function starts unchanged, or torch's default initialization).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelSpecError
from ..workloads.zoo import LayerNorm2d, Mlp

__all__ = ["Rule", "Site", "RULES", "rule_names", "attention_spec", "AttentionSpec", "SdpaAttention",
           "RMSNorm2d", "FoldedConvBN", "Conv1x1AsLinear", "Downscale", "UNCOVERED", "TopKMoE", "MoESpec",
           "moe_spec", "BranchFusion", "FusionSpec", "fusion_spec", "FunctionalSwap"]


@dataclass
class Site:
    """A module the explorer may replace: where it is and how it was called (meta tensors)."""

    path: str                 # module path ("" for the whole model)
    module: nn.Module
    args: tuple = ()          # the first call's positional inputs (meta tensors)
    kwargs: dict | None = None
    output: object = None     # the first call's output (meta tensors)
    calls: int = 1
    training: bool = True     # whether the model is costed as training
    device: torch.device | None = None  # where the model being rewritten lives (new parameter-less modules)

    def in_shape(self, i: int = 0) -> tuple | None:
        a = self.args[i] if len(self.args) > i else None
        return tuple(a.shape) if isinstance(a, torch.Tensor) else None


@dataclass(frozen=True)
class Rule:
    """One substitution. ``match(site)`` -> bool; ``build(module, site)`` -> the replacement;
    ``params(module, site)`` -> its parameter count, stated as a formula (not by counting)."""

    name: str
    family: str
    builds: str
    why: str
    risk: str
    exact: bool
    match: Callable[[Site], bool]
    build: Callable[[nn.Module, Site], nn.Module]
    params: Callable[[nn.Module, Site], int]
    model_level: bool = False  # matches the whole model (site path "") instead of its modules


# ---------------------------------------------------------------------------------------------
# helpers


def _dev(m: nn.Module) -> torch.device:
    t = next(iter(m.parameters()), None)
    if t is None:
        t = next(iter(m.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src)


def _mode(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` in ``old``'s mode, without touching its children (copies keep theirs: a frozen BN stays frozen)."""
    new.training = old.training
    return new


def _nlin(i: int, o: int, bias: bool = True) -> int:
    """Parameters of Linear(i, o)."""
    return i * o + (o if bias else 0)


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---------------------------------------------------------------------------------------------
# attention: recognize q/k/v/proj (or fused qkv/proj) modules with a head count


@dataclass(frozen=True)
class AttentionSpec:
    """What the attention rules need to know about an attention module."""

    dim: int          # query input width
    kv_dim: int       # key/value input width
    out: int          # output width
    heads: int
    kv_heads: int
    head_dim: int
    scale: float | None
    dropout: float
    fused_qkv: bool   # one Linear qkv (dim -> 3 * heads * head_dim)
    uses_sdpa: bool   # its forward already calls scaled_dot_product_attention
    cross: bool       # forward(x, memory)


def _forward_source(m: nn.Module) -> str:
    import inspect
    try:
        return inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return ""


def _n_inputs(m: nn.Module) -> int:
    import inspect
    try:
        ps = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return 0
    return sum(1 for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def attention_spec(m: nn.Module) -> AttentionSpec | None:
    """An attention module fxopt can rebuild: Linear children ``q, k, v, proj`` (or ``qkv, proj``),
    an int ``heads``/``num_heads``, ``forward(x)`` (self) or ``forward(x, memory)`` (cross), and a
    softmax or SDPA in its forward. Anything else (masks, biases, rotary embeddings in forward)
    would be caught by verification (exact rules) or changes the function (the others)."""
    if isinstance(m, (SdpaAttention, nn.MultiheadAttention)):
        return None
    heads = getattr(m, "heads", getattr(m, "num_heads", None))
    proj = getattr(m, "proj", None)
    if not isinstance(heads, int) or heads < 1 or not isinstance(proj, nn.Linear):
        return None
    src = _forward_source(m)
    uses_sdpa = "scaled_dot_product_attention" in src
    if not uses_sdpa and "softmax" not in src:
        return None
    n_in = _n_inputs(m)
    if n_in not in (1, 2):
        return None
    drop = getattr(m, "attn_drop", None)
    dropout = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    scale = getattr(m, "scale", None)
    scale = float(scale) if isinstance(scale, (int, float)) else None
    qkv = getattr(m, "qkv", None)
    if isinstance(qkv, nn.Linear) and n_in == 1:
        if qkv.out_features % (3 * heads):
            return None
        hd = qkv.out_features // (3 * heads)
        return AttentionSpec(qkv.in_features, qkv.in_features, proj.out_features, heads, heads, hd, scale, dropout,
                             True, uses_sdpa, False)
    q, k, v = (getattr(m, n, None) for n in ("q", "k", "v"))
    if not all(isinstance(x, nn.Linear) for x in (q, k, v)):
        return None
    if q.out_features % heads or k.out_features != v.out_features or k.out_features % (q.out_features // heads):
        return None
    hd = q.out_features // heads
    if proj.in_features != heads * hd:
        return None
    return AttentionSpec(q.in_features, k.in_features, proj.out_features, heads, k.out_features // hd, hd, scale,
                         dropout, False, uses_sdpa, n_in == 2)


class SdpaAttention(nn.Module):
    """q/k/v projections -> ``F.scaled_dot_product_attention`` (grouped K/V heads, optional block-local
    windows of ``window`` tokens) -> proj. ``forward(x)`` or ``forward(x, memory)``."""

    def __init__(self, dim: int, kv_dim: int, out: int, heads: int, kv_heads: int, head_dim: int, *,
                 scale: float | None = None, dropout: float = 0.0, window: int | None = None,
                 bias: bool = True):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale, self.dropout, self.window = scale, dropout, window
        self.q = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k = nn.Linear(kv_dim, kv_heads * head_dim, bias=bias)
        self.v = nn.Linear(kv_dim, kv_heads * head_dim, bias=bias)
        self.proj = nn.Linear(heads * head_dim, out, bias=bias)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, window={self.window}"

    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, L, _ = t.shape
        t = t.view(B, L, heads, self.head_dim).transpose(1, 2)
        if self.window:  # (B, h, L, d) -> (B * L/w, h, w, d): attention within each window of w tokens
            w = self.window
            t = t.reshape(B, heads, L // w, w, self.head_dim).transpose(1, 2).reshape(-1, heads, w, self.head_dim)
        return t

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        src = x if memory is None else memory
        q = self._split(self.q(x), self.heads)
        k, v = self._split(self.k(src), self.kv_heads), self._split(self.v(src), self.kv_heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.scale, enable_gqa=self.kv_heads != self.heads)
        if self.window:
            out = out.reshape(B, L // self.window, self.heads, self.window, self.head_dim).transpose(1, 2)
        out = out.reshape(B, self.heads, L, self.head_dim).transpose(1, 2).reshape(B, L, -1)
        return self.proj(out)


def _qkv_weights(m: nn.Module, s: AttentionSpec):
    """(q, k, v) Linear modules of ``m``, slicing a fused qkv into three views."""
    if not s.fused_qkv:
        return m.q, m.k, m.v
    w, b = m.qkv.weight, m.qkv.bias
    n = s.heads * s.head_dim
    pieces = []
    for i in range(3):
        lin = nn.Linear(s.dim, n, bias=b is not None, device=w.device, dtype=w.dtype)
        _copy_(lin.weight, w[i * n:(i + 1) * n])
        if b is not None:
            _copy_(lin.bias, b[i * n:(i + 1) * n])
        pieces.append(lin)
    return tuple(pieces)


def _pool_heads(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """Mean of each group of ``heads // kv_heads`` consecutive heads (GQA's uptraining init)."""
    lead = t.shape[1:]
    g = heads // kv_heads
    return t.reshape(kv_heads, g, head_dim, *lead).mean(1).reshape(kv_heads * head_dim, *lead)


def _pool_bias(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    return t.reshape(kv_heads, heads // kv_heads, head_dim).mean(1).reshape(-1)


def _rebuild_attention(m: nn.Module, site: Site, *, kv_heads: int | None = None, window: int | None = None,
                       heads: int | None = None, head_dim: int | None = None) -> SdpaAttention:
    """SdpaAttention from ``m``'s weights. K/V heads: mean-pooled per group (GQA); a head re-split
    (same width): the same weights; a wider head dim: the original weights in the first ``d`` of
    each head's columns, zeros elsewhere (the function starts unchanged)."""
    s = attention_spec(m)
    heads = heads or s.heads
    kv = kv_heads or (heads if heads != s.heads else s.kv_heads)
    hd = head_dim or (s.heads * s.head_dim // heads)
    q0, k0, v0 = _qkv_weights(m, s)
    bias = q0.bias is not None
    with torch.device(_dev(m)):
        new = SdpaAttention(s.dim, s.kv_dim, s.out, heads, kv, hd, scale=s.scale if hd == s.head_dim else None,
                            dropout=s.dropout, window=window, bias=bias)
    new.train(m.training)
    if head_dim is not None:  # wider heads: zero-pad every head's columns
        with torch.no_grad():
            for dst, src, h in ((new.q, q0, s.heads), (new.k, k0, s.kv_heads), (new.v, v0, s.kv_heads)):
                dst.weight.zero_()
                dst.weight.view(h, hd, -1)[:, :s.head_dim].copy_(src.weight.view(h, s.head_dim, -1))
                if bias:
                    dst.bias.zero_()
                    dst.bias.view(h, hd)[:, :s.head_dim].copy_(src.bias.view(h, s.head_dim))
            new.proj.weight.zero_()
            new.proj.weight.view(-1, s.heads, hd)[:, :, :s.head_dim].copy_(m.proj.weight.view(-1, s.heads, s.head_dim))
            if bias:
                new.proj.bias.copy_(m.proj.bias)
            # the original scale (1/sqrt(d)) keeps the scores equal at init
            new.scale = s.scale if s.scale is not None else s.head_dim ** -0.5
        return new
    _copy_(new.q.weight, q0.weight)
    _copy_(new.proj.weight, m.proj.weight)
    if bias:
        _copy_(new.q.bias, q0.bias)
        _copy_(new.proj.bias, m.proj.bias)
    for dst, src in ((new.k, k0), (new.v, v0)):
        if kv == s.kv_heads or heads != s.heads:
            _copy_(dst.weight, src.weight)
            if bias:
                _copy_(dst.bias, src.bias)
        else:
            _copy_(dst.weight, _pool_heads(src.weight, s.kv_heads, kv, hd))
            if bias:
                _copy_(dst.bias, _pool_bias(src.bias, s.kv_heads, kv, hd))
    return new


def _attn_params(s: AttentionSpec, heads: int, kv: int, hd: int, bias: bool = True) -> int:
    """q: dim -> heads*hd, k and v: kv_dim -> kv*hd, proj: heads*hd -> out (each with bias)."""
    return _nlin(s.dim, heads * hd, bias) + 2 * _nlin(s.kv_dim, kv * hd, bias) + _nlin(heads * hd, s.out, bias)


def _has_bias(m: nn.Module) -> bool:
    return m.proj.bias is not None


def _gqa_kv(heads: int) -> int | None:
    """Grouped-query K/V heads: the largest divisor of ``heads`` that is at most heads/4, at least 2."""
    best = max((d for d in range(2, heads // 4 + 1) if heads % d == 0), default=None)
    return best


def _tokens(site: Site) -> int | None:
    shape = site.in_shape(0)
    return shape[1] if shape and len(shape) == 3 else None


def _window(site: Site) -> int | None:
    """Block-local window for self-attention over L >= 256 tokens: the largest divisor of L in [32, L/4]."""
    L = _tokens(site)
    if not L or L < 256:
        return None
    return max((w for w in range(32, L // 4 + 1) if L % w == 0), default=None)


def _spec(site: Site) -> AttentionSpec | None:
    return attention_spec(site.module)


def _match_sdpa(site: Site) -> bool:
    s = _spec(site)
    return s is not None and not s.uses_sdpa and not s.fused_qkv


def _match_gqa(site: Site) -> bool:
    s = _spec(site)
    return s is not None and s.kv_heads == s.heads and _gqa_kv(s.heads) is not None


def _match_mqa(site: Site) -> bool:
    s = _spec(site)
    return s is not None and s.kv_heads > 1 and s.heads >= 2


def _match_window(site: Site) -> bool:
    s = _spec(site)
    return s is not None and not s.cross and _window(site) is not None


def _match_hd64(site: Site) -> bool:
    s = _spec(site)
    return (s is not None and s.kv_heads == s.heads and s.head_dim != 64 and s.head_dim % 8 == 0
            and (s.heads * s.head_dim) % 64 == 0 and s.heads * s.head_dim >= 128)


def _match_hd_align(site: Site) -> bool:
    s = _spec(site)
    return s is not None and s.head_dim % 8 != 0


# ---------------------------------------------------------------------------------------------
# stems


def _stem_parts(m: nn.Module):
    """(conv, middle modules, pool) of a Sequential stem 7x7/2 conv -> ... -> 3x3/2 max-pool."""
    if not isinstance(m, nn.Sequential) or len(m) < 2:
        return None
    conv, pool = m[0], m[-1]
    if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (7, 7) and conv.stride == (2, 2)
            and conv.groups == 1 and isinstance(pool, nn.MaxPool2d) and pool.stride in (2, (2, 2))):
        return None
    return conv, list(m)[1:-1], pool


def _match_stem(site: Site) -> bool:
    shape = site.in_shape(0)
    return _stem_parts(site.module) is not None and shape is not None and len(shape) == 4 \
        and shape[-1] % 4 == 0 and shape[-2] % 4 == 0


def _build_patchify(m: nn.Module, site: Site) -> nn.Module:
    """4x4/4 conv (torch's default init) + the original's norm/activation; no max-pool."""
    import copy
    conv, middle, _ = _stem_parts(m)
    with torch.device(_dev(m)):
        new = nn.Conv2d(conv.in_channels, conv.out_channels, 4, stride=4, bias=conv.bias is not None)
    return _mode(nn.Sequential(new, *(copy.deepcopy(x) for x in middle)), m)


def _params_patchify(m: nn.Module, site: Site) -> int:
    conv, middle, _ = _stem_parts(m)
    return conv.out_channels * conv.in_channels * 16 + (conv.out_channels if conv.bias is not None else 0) \
        + sum(_nparams(x) for x in middle)


def _build_stem3x3(m: nn.Module, site: Site) -> nn.Module:
    """3x3/2 (c/2) -> BN -> ReLU -> 3x3 (c/2) -> BN -> ReLU -> 3x3 (c) -> the original's norm/act -> pool
    (the ResNet-C deep stem); new convs and BNs take torch's default init."""
    import copy
    conv, middle, pool = _stem_parts(m)
    c, h = conv.out_channels, conv.out_channels // 2
    with torch.device(_dev(m)):
        layers = [nn.Conv2d(conv.in_channels, h, 3, 2, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                  nn.Conv2d(h, h, 3, 1, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                  nn.Conv2d(h, c, 3, 1, 1, bias=conv.bias is not None)]
    for layer in layers:
        layer.train(m.training)
    return _mode(nn.Sequential(*layers, *(copy.deepcopy(x) for x in middle), copy.deepcopy(pool)), m)


def _params_stem3x3(m: nn.Module, site: Site) -> int:
    conv, middle, _ = _stem_parts(m)
    c, h, cin = conv.out_channels, conv.out_channels // 2, conv.in_channels
    return 9 * (cin * h + h * h + h * c) + 2 * 2 * h + (c if conv.bias is not None else 0) \
        + sum(_nparams(x) for x in middle)


# ---------------------------------------------------------------------------------------------
# normalization


class RMSNorm2d(nn.RMSNorm):
    """RMSNorm over the channel dim of an NCHW tensor (permute to NHWC and back), like LayerNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


_LN_TO_RMS = {nn.LayerNorm: nn.RMSNorm, LayerNorm2d: RMSNorm2d}


def _build_rms(m: nn.LayerNorm, site: Site) -> nn.Module:
    """RMSNorm with the LayerNorm's eps and scale (its bias is dropped)."""
    with torch.device(_dev(m)):
        new = _LN_TO_RMS[type(m)](m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)
    if m.elementwise_affine:
        _copy_(new.weight, m.weight)
    return new


class FoldedConvBN(nn.Sequential):
    """``Sequential(conv, bn)`` with the running-statistics BN folded into the conv on every call:
    ``w' = w * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``. Same children,
    same parameter names; gradients reach conv and BN parameters through w', b'."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self[0], self[1]
        s = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            s = s * bn.weight
        b = (conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)) - bn.running_mean
        b = b * s + (bn.bias if bn.bias is not None else 0)
        return conv._conv_forward(x, conv.weight * s.reshape(-1, 1, 1, 1), b)


def _match_fold(site: Site) -> bool:
    m = site.module
    return (isinstance(m, nn.Sequential) and type(m) is nn.Sequential and len(m) == 2
            and isinstance(m[0], nn.Conv2d) and isinstance(m[1], nn.BatchNorm2d) and not m[1].training
            and m[1].track_running_stats and m[1].running_var is not None and m[0].padding_mode == "zeros")


def _build_fold(m: nn.Module, site: Site) -> nn.Module:
    return _mode(FoldedConvBN(m[0], m[1]), m)  # the BN keeps its (eval) mode


def _match_gn(site: Site) -> bool:
    m = site.module
    return type(m) is nn.GroupNorm and m.num_channels // m.num_groups <= 4 and m.num_groups > 1 \
        and site.in_shape(0) is not None and len(site.in_shape(0)) == 4


def _build_gn(m: nn.GroupNorm, site: Site) -> nn.Module:
    """LayerNorm over channels (per pixel) with the GroupNorm's eps and per-channel affine."""
    with torch.device(_dev(m)):
        new = LayerNorm2d(m.num_channels, eps=m.eps, elementwise_affine=m.affine)
    if m.affine:
        _copy_(new.weight, m.weight)
        _copy_(new.bias, m.bias)
    return new


# ---------------------------------------------------------------------------------------------
# convolutions


def _is_depthwise(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels
            and m.groups > 1)


def _match_dw_k(site: Site) -> bool:
    m = site.module
    k = m.kernel_size if isinstance(m, nn.Conv2d) else None
    return _is_depthwise(m) and k[0] == k[1] and k[0] >= 5 and k[0] % 2 == 1 and m.stride == (1, 1) \
        and m.padding == (k[0] // 2, k[1] // 2) and m.dilation == (1, 1)


def _build_dw_k(m: nn.Conv2d, site: Site) -> nn.Module:
    """Depthwise (k-2)x(k-2), 'same' padding, initialized with the centre of the original kernel."""
    k = m.kernel_size[0] - 2
    with torch.device(_dev(m)):
        new = nn.Conv2d(m.in_channels, m.out_channels, k, padding=k // 2, groups=m.groups, bias=m.bias is not None)
    _copy_(new.weight, m.weight[:, :, 1:-1, 1:-1])
    if m.bias is not None:
        _copy_(new.bias, m.bias)
    return new


GROUP_WIDTH = 8  # channels per group of dw-to-grouped


def _match_dw_grouped(site: Site) -> bool:
    m = site.module
    return _is_depthwise(m) and m.in_channels % GROUP_WIDTH == 0 and m.in_channels >= 2 * GROUP_WIDTH


def _build_dw_grouped(m: nn.Conv2d, site: Site) -> nn.Module:
    """Grouped conv with GROUP_WIDTH channels per group, same kernel/stride/padding, torch's default init."""
    with torch.device(_dev(m)):
        return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                         groups=m.in_channels // GROUP_WIDTH, bias=m.bias is not None)


class Conv1x1AsLinear(nn.Module):
    """A 1x1 conv computed as a GEMM over channels-last pixels: permute, ``F.linear``, permute back.
    Keeps the conv's ``weight`` ([out, in, 1, 1]) and ``bias``, so names and values are unchanged."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)
        return y.permute(0, 3, 1, 2)


def _match_1x1(site: Site) -> bool:
    m = site.module
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), "valid") and m.dilation == (1, 1))


# ---------------------------------------------------------------------------------------------
# feature fusion: upsampling


def _match_upsample(site: Site) -> bool:
    m = site.module
    return type(m) is nn.Upsample and m.mode in ("bilinear", "bicubic")


def _build_nearest(m: nn.Upsample, site: Site) -> nn.Module:
    return nn.Upsample(size=m.size, scale_factor=m.scale_factor, mode="nearest")


def _int_scale(m: nn.Upsample) -> int | None:
    s = m.scale_factor
    s = s[0] if isinstance(s, tuple) and len(set(s)) == 1 else s
    return int(s) if isinstance(s, (int, float)) and float(s).is_integer() and s >= 2 else None


def _match_convT(site: Site) -> bool:
    shape = site.in_shape(0)
    return _match_upsample(site) and _int_scale(site.module) is not None and shape is not None and len(shape) == 4


def _build_convT(m: nn.Upsample, site: Site) -> nn.Module:
    """Depthwise ConvTranspose2d(k = s, stride = s), weights 1 (= nearest upsampling at init), learnable."""
    c, s = site.in_shape(0)[1], _int_scale(m)
    with torch.device(site.device or "cpu"):
        new = nn.ConvTranspose2d(c, c, s, stride=s, groups=c, bias=False)
    with torch.no_grad():
        new.weight.fill_(1.0)
    return new


# ---------------------------------------------------------------------------------------------
# activations


def _gelu(approx: str | None):
    def match(site: Site) -> bool:
        return type(site.module) is nn.GELU and (approx is None or site.module.approximate == approx)
    return match


# ---------------------------------------------------------------------------------------------
# widths and depth


def _mlp(m: nn.Module):
    """(fc1, fc2) of an MLP-shaped module: Linear children fc1 (d -> h) and fc2 (h -> o)."""
    fc1, fc2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
    if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.out_features == fc2.in_features:
        return fc1, fc2
    return None


ALIGN = 64  # width multiple of round-width (tensor-core tiles of bf16 GEMMs)


def _match_round(site: Site) -> bool:
    p = _mlp(site.module)
    return p is not None and p[0].out_features % ALIGN != 0 and p[0].out_features > ALIGN


def _widen(m: nn.Module, hidden: int) -> nn.Module:
    """A copy of MLP ``m`` with ``hidden`` units: the original units copied, new fc1 rows with torch's
    default init, new fc2 columns zero (so the function starts unchanged)."""
    import copy
    fc1, fc2 = _mlp(m)
    h = fc1.out_features
    new = copy.deepcopy(m)
    with torch.device(_dev(m)):
        new.fc1 = nn.Linear(fc1.in_features, hidden, bias=fc1.bias is not None)
        new.fc2 = nn.Linear(hidden, fc2.out_features, bias=fc2.bias is not None)
    with torch.no_grad():
        keep = min(h, hidden)
        new.fc1.weight[:keep].copy_(fc1.weight[:keep])
        if fc1.bias is not None:
            new.fc1.bias[:keep].copy_(fc1.bias[:keep])
        new.fc2.weight.zero_()
        new.fc2.weight[:, :keep].copy_(fc2.weight[:, :keep])
        if fc2.bias is not None:
            new.fc2.bias.copy_(fc2.bias)
    return new


def _mlp_params(fc1: nn.Linear, fc2: nn.Linear, hidden: int) -> int:
    return _nlin(fc1.in_features, hidden, fc1.bias is not None) + _nlin(hidden, fc2.out_features, fc2.bias is not None)


def _blocks(m: nn.Module):
    """Blocks of a Sequential/ModuleList of >= 4 blocks of one class, each with exactly one MLP."""
    if type(m) not in (nn.Sequential, nn.ModuleList) or len(m) < 4:
        return None
    blocks = list(m)
    if len({type(b) for b in blocks}) != 1:
        return None
    mlps = [[x for x in b.modules() if _mlp(x) is not None] for b in blocks]
    if any(len(x) != 1 for x in mlps):
        return None
    return blocks, [x[0] for x in mlps]


def _depth_width_plan(m: nn.Module):
    """(kept blocks n', new hidden h'): drop a quarter of the blocks, widen the kept blocks' MLP
    hidden so the total parameter count (the linear layers' FLOPs per token) stays about equal."""
    blocks, mlps = _blocks(m)
    n = len(blocks)
    keep = n - max(1, n // 4)
    fc1, fc2 = _mlp(mlps[0])
    per_block = _nparams(blocks[0])
    other = per_block - _mlp_params(fc1, fc2, fc1.out_features)
    per_unit = fc1.in_features + fc2.out_features + (1 if fc1.bias is not None else 0)
    fixed = fc2.out_features if fc2.bias is not None else 0
    hidden = (n * per_block / keep - other - fixed) / per_unit
    return keep, max(ALIGN, int(round(hidden / ALIGN)) * ALIGN)


def _match_depth_width(site: Site) -> bool:
    return _blocks(site.module) is not None


def _build_depth_width(m: nn.Module, site: Site) -> nn.Module:
    """The first n' blocks (copied), each MLP widened to h' (see _widen)."""
    import copy
    keep, hidden = _depth_width_plan(m)
    blocks = [copy.deepcopy(b) for b in list(m)[:keep]]
    for i, b in enumerate(blocks):
        name = next(n for n, sub in b.named_modules() if _mlp(sub) is not None)
        if not name:
            blocks[i] = _widen(b, hidden)
            continue
        parent, _, attr = name.rpartition(".")
        setattr(b.get_submodule(parent), attr, _widen(b.get_submodule(name), hidden))
    return _mode(nn.Sequential(*blocks) if type(m) is nn.Sequential else nn.ModuleList(blocks), m)


def _params_depth_width(m: nn.Module, site: Site) -> int:
    blocks, mlps = _blocks(m)
    keep, hidden = _depth_width_plan(m)
    fc1, fc2 = _mlp(mlps[0])
    other = _nparams(blocks[0]) - _mlp_params(fc1, fc2, fc1.out_features)
    return keep * (other + _mlp_params(fc1, fc2, hidden))


# ---------------------------------------------------------------------------------------------
# mixture-of-experts routing


class TopKMoE(nn.Module):
    """Token-choice top-k mixture of experts with a capacity (GShard/Switch style), written in fixed
    shapes so that torch.export captures it and the cost model costs what a padded-capacity
    implementation runs: the router GEMM and softmax, top-k, each token copy scattered into its
    expert's buffer of ``C = ceil(capacity_factor * tokens * top_k / experts)`` rows (copies past C
    are dropped: they add nothing), every expert MLP on all its C rows (padding included), a gather
    back, weighted by the router probability (not renormalized, so the router also learns at top-1)
    and summed over the k choices. All tokens' first choices take buffer places before second
    choices. No auxiliary load-balancing loss: add one to your loss if you train with it."""

    def __init__(self, dim: int, hidden: int, experts: int = 8, top_k: int = 2, capacity_factor: float = 1.25,
                 out: int | None = None, router_bias: bool = False):
        super().__init__()
        if not 1 <= top_k <= experts or capacity_factor <= 0:
            raise ModelSpecError(f"TopKMoE needs 1 <= top_k <= experts and capacity_factor > 0, got top_k={top_k}, "
                                 f"experts={experts}, capacity_factor={capacity_factor}")
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.router = nn.Linear(dim, experts, bias=router_bias)
        self.experts = nn.ModuleList(Mlp(dim, hidden, out) for _ in range(experts))

    def extra_repr(self) -> str:
        return f"experts={len(self.experts)}, top_k={self.top_k}, capacity_factor={self.capacity_factor:g}"

    def capacity(self, tokens: int) -> int:
        return max(1, math.ceil(self.capacity_factor * tokens * self.top_k / len(self.experts)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, d)
        n, e, k = x.shape[0], len(self.experts), self.top_k
        cap = self.capacity(n)
        weight, idx = self.router(x).softmax(-1).topk(k, dim=-1)            # (n, k)
        choice = idx.t().reshape(-1)                                         # (k n,): first choices first
        onehot = (choice[:, None] == torch.arange(e, device=x.device)).long()
        pos = (onehot.cumsum(0) * onehot).sum(-1) - 1                        # place in the expert's buffer
        slot = torch.where(pos < cap, choice * cap + pos, e * cap)           # e * cap: the dropped copies' row
        buf = x.new_zeros(e * cap + 1, d).index_add(0, slot, x.repeat(k, 1))
        outs = [expert(buf[i * cap:(i + 1) * cap]) for i, expert in enumerate(self.experts)]
        y = torch.cat(outs + [outs[0].new_zeros(1, outs[0].shape[-1])])[slot] * weight.t().reshape(-1, 1)
        return y.view(k, n, -1).sum(0).reshape(*lead, -1)


@dataclass(frozen=True)
class MoESpec:
    """What the MoE rules need to know about a mixture-of-experts module."""

    router: str       # the router Linear's attribute name
    dim: int
    hidden: int
    out: int
    experts: int
    top_k: int
    capacity_factor: float | None
    router_bias: bool
    bias1: bool
    bias2: bool


def moe_spec(m: nn.Module) -> MoESpec | None:
    """A mixture-of-experts module the MoE rules can change: a Linear ``router`` (or ``gate``) with
    one output per expert, a ModuleList ``experts`` of identical MLPs (fc1/fc2 children), an int
    ``top_k`` that its forward reads, optionally a number ``capacity_factor``. The rules set these
    attributes on a copy or regroup its experts, so a forward that reads them (like TopKMoE's) keeps
    working; explore runs every rebuilt module on the recorded inputs before costing it."""
    name = next((n for n in ("router", "gate") if isinstance(getattr(m, n, None), nn.Linear)), None)
    experts, k = getattr(m, "experts", None), getattr(m, "top_k", None)
    if name is None or not isinstance(experts, nn.ModuleList) or len(experts) < 2 or type(k) is not int:
        return None
    mlps = [_mlp(e) for e in experts]
    router = getattr(m, name)
    if any(p is None for p in mlps) or router.out_features != len(experts) or "top_k" not in _forward_source(m):
        return None
    dims = {(a.in_features, a.out_features, b.out_features, a.bias is not None, b.bias is not None) for a, b in mlps}
    if len(dims) != 1:
        return None
    d, h, o, b1, b2 = dims.pop()
    cf = getattr(m, "capacity_factor", None)
    cf = float(cf) if isinstance(cf, (int, float)) and not isinstance(cf, bool) else None
    return MoESpec(name, d, h, o, len(experts), k, cf, router.bias is not None, b1, b2)


MOE_CAPACITY = 1.0  # capacity factor of the moe-capacity rule


def _moe(site: Site) -> MoESpec | None:
    return moe_spec(site.module)


def _with(m: nn.Module, **attrs) -> nn.Module:
    import copy
    new = copy.deepcopy(m)
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    with torch.device(w.device):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    _copy_(lin.weight, w)
    if b is not None:
        _copy_(lin.bias, b)
    return lin


def _regroup(m: nn.Module, merge: bool) -> nn.Module:
    """A copy of MoE ``m`` with its experts merged in pairs (E/2 experts of hidden 2h; expert j is the
    average of old experts 2j and 2j+1 at init: fc1 rows stacked, fc2 columns stacked and halved, fc2
    bias averaged; router row j = the mean of rows 2j and 2j+1) or each split in two (2E experts of
    hidden h/2: units [:h/2] and [h/2:], fc2 columns doubled so that a pair averages to the old
    expert; router rows duplicated). The same expert parameters either way (fc2 biases aside)."""
    import copy
    s = moe_spec(m)
    router = getattr(m, s.router)
    n = s.experts // 2 if merge else 2 * s.experts
    new = copy.deepcopy(m)
    experts = []
    with torch.no_grad():
        for j in range(n):
            if merge:
                (a1, a2), (b1, b2) = _mlp(m.experts[2 * j]), _mlp(m.experts[2 * j + 1])
                cat = lambda x, y, dim=0: None if x is None else torch.cat([x, y], dim)  # noqa: E731
                fc1 = _linear(cat(a1.weight, b1.weight), cat(a1.bias, b1.bias))
                fc2 = _linear(cat(a2.weight, b2.weight, 1) / 2, None if a2.bias is None else (a2.bias + b2.bias) / 2)
            else:
                f1, f2 = _mlp(m.experts[j // 2])
                half = slice(0, s.hidden // 2) if j % 2 == 0 else slice(s.hidden // 2, s.hidden)
                fc1 = _linear(f1.weight[half], None if f1.bias is None else f1.bias[half])
                fc2 = _linear(f2.weight[:, half] * 2, f2.bias)
            expert = copy.deepcopy(m.experts[2 * j if merge else j // 2])
            expert.fc1, expert.fc2 = fc1, fc2
            experts.append(expert)
        w, b = router.weight, router.bias
        if merge:
            w, b = w.view(n, 2, -1).mean(1), None if b is None else b.view(n, 2).mean(1)
        else:
            w, b = w.repeat_interleave(2, 0), None if b is None else b.repeat_interleave(2, 0)
    new.experts = nn.ModuleList(experts)
    setattr(new, s.router, _linear(w, b))
    if type(getattr(new, "num_experts", None)) is int:
        new.num_experts = n
    return new


def _p_moe(factor: float):
    """Router (dim -> E') + E' experts of hidden h' (E' = factor E, h' = h / factor)."""
    def params(m: nn.Module, site: Site) -> int:
        s = moe_spec(m)
        e, h = int(s.experts * factor), int(s.hidden / factor)
        return _nlin(s.dim, e, s.router_bias) + e * (_nlin(s.dim, h, s.bias1) + _nlin(h, s.out, s.bias2))
    return params


def _match_fewer(site: Site) -> bool:
    s = _moe(site)
    return s is not None and s.experts % 2 == 0 and s.experts // 2 >= max(2, s.top_k)


def _match_more(site: Site) -> bool:
    s = _moe(site)
    return s is not None and s.hidden % 16 == 0  # halves stay multiples of 8 (tensor-core alignment)


# ---------------------------------------------------------------------------------------------
# feature fusion: concat + 1x1 conv -> add


@dataclass(frozen=True)
class FusionSpec:
    """A concat + 1x1 fusion module: ``tail(conv(cat(branches, 1)))``."""

    conv: str            # the 1x1 conv's child name (the first child)
    widths: tuple        # channels of each branch
    tail: tuple          # the other children's names, applied after the conv in this order
    listed: bool         # forward takes one list/tuple of branches (else one argument per branch)


def _branches(site: Site) -> list | None:
    """The input branches: one list/tuple argument, or >= 2 positional tensors; 4-D, same N, H, W."""
    args = site.args
    xs = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
    if len(xs) < 2 or site.kwargs or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in xs):
        return None
    return xs if len({(t.shape[0], *t.shape[2:]) for t in xs}) == 1 else None


def _computes_cat_conv(m: nn.Module, spec: FusionSpec, xs: list) -> bool:
    """Whether ``m`` computes ``tail(conv(cat(branches, 1)))``: checked on a CPU copy with random
    weights, in eval mode, on batch-1 inputs of at most 2x2 pixels (concat, the 1x1 conv and a
    norm/activation tail act per pixel; a module that needs its recorded size does not match)."""
    import copy
    c = copy.deepcopy(m)
    c = (c.to_empty(device="cpu") if any(t.is_meta for t in [*c.parameters(), *c.buffers()]) else c.cpu()).float()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in c.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for b in c.buffers():
            b.copy_(torch.rand(b.shape, generator=g) + 0.5) if b.is_floating_point() else b.zero_()
    c.eval()
    h, w = (min(2, s) for s in xs[0].shape[-2:])
    probe = [torch.randn(1, t.shape[1], h, w, generator=g) for t in xs]
    try:
        with torch.no_grad():
            got = c(probe) if spec.listed else c(*probe)
            ref = getattr(c, spec.conv)(torch.cat(probe, 1))
            for name in spec.tail:
                ref = getattr(c, name)(ref)
        return isinstance(got, torch.Tensor) and got.shape == ref.shape and torch.allclose(got, ref, 1e-4, 1e-5)
    except Exception:
        return False


def fusion_spec(site: Site) -> FusionSpec | None:
    """A module whose forward concatenates its input branches along channels and applies its first
    child, a 1x1 conv over all of them, then its other children in registration order (a norm, an
    activation): the usual multi-scale / multi-camera fusion block. Checked numerically."""
    m, xs = site.module, _branches(site)
    kids = list(m.named_children())
    if xs is None or not kids or "cat" not in _forward_source(m):
        return None
    name, conv = kids[0]
    widths = tuple(int(t.shape[1]) for t in xs)
    if not _match_1x1(Site(name, conv)) or conv.in_channels != sum(widths):
        return None
    spec = FusionSpec(name, widths, tuple(n for n, _ in kids[1:]), len(site.args) == 1)
    return spec if _computes_cat_conv(m, spec, xs) else None


class BranchFusion(nn.Module):
    """The fusion without the concatenated tensor. ``summed=False``: each branch through its slice of
    the 1x1 conv's weight, the results added (the same function: the concat's write and read are
    gone, the GEMMs accumulate). ``summed=True``: branches of equal width added first, then one
    c -> out 1x1 conv (1/k of the GEMM FLOPs; a different function). Then the original tail. Keeps the
    original's child names (the same ``state_dict`` when not summed)."""

    def __init__(self, m: nn.Module, spec: FusionSpec, summed: bool = False):
        super().__init__()
        self.spec, self.summed = spec, summed
        for name, child in m.named_children():
            setattr(self, name, child)
        if summed:  # weight: the mean of the branches' slices (the same output when the branches are equal)
            conv, c, k = getattr(m, spec.conv), spec.widths[0], len(spec.widths)
            w = conv.weight.reshape(conv.out_channels, k, c, 1, 1).mean(1)
            with torch.device(w.device):
                new = nn.Conv2d(c, conv.out_channels, 1, bias=conv.bias is not None, dtype=w.dtype)
            _copy_(new.weight, w)
            if conv.bias is not None:
                _copy_(new.bias, conv.bias)
            setattr(self, spec.conv, new)

    def extra_repr(self) -> str:
        how = "summed then projected" if self.summed else "projected then added"
        return f"branches={list(self.spec.widths)}, {how}"

    def forward(self, *args):
        xs = args[0] if self.spec.listed else args
        conv = getattr(self, self.spec.conv)
        if self.summed:
            y = xs[0]
            for x in xs[1:]:
                y = y + x
            y = conv(y)
        else:
            y, start = None, 0
            for x, c in zip(xs, self.spec.widths):
                part = F.conv2d(x, conv.weight[:, start:start + c], conv.bias if y is None else None)
                y, start = part if y is None else y + part, start + c
        for name in self.spec.tail:
            y = getattr(self, name)(y)
        return y


def _match_fusion_sum(site: Site) -> bool:
    s = fusion_spec(site)
    return s is not None and len(set(s.widths)) == 1


def _params_fusion_sum(m: nn.Module, site: Site) -> int:
    s = fusion_spec(site)
    conv = getattr(m, s.conv)
    return _nparams(m) - _nparams(conv) + _nlin(s.widths[0], conv.out_channels, conv.bias is not None)


# ---------------------------------------------------------------------------------------------
# functional calls: F.gelu / F.interpolate written in forwards (no module to rebuild)


def _gelu_call(args: tuple, kwargs: dict):
    """(args, kwargs) of an erf ``F.gelu`` call as a tanh one, or None (already tanh)."""
    approx = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
    return None if approx != "none" else ((args[0],), {"approximate": "tanh"})


def _interp_call(args: tuple, kwargs: dict):
    """(args, kwargs) of a bilinear/bicubic ``F.interpolate`` call as a nearest one, or None."""
    import inspect
    bound = inspect.signature(F.interpolate).bind(*args, **kwargs)
    if bound.arguments.get("mode", "nearest") not in ("bilinear", "bicubic"):
        return None
    bound.arguments.update(mode="nearest", align_corners=None, antialias=False)
    return bound.args, bound.kwargs


#: swap name -> (functional, the module class whose own calls are left to the module rules, rewrite)
_CALL_SWAPS = {"gelu": (F.gelu, nn.GELU, _gelu_call), "interpolate": (F.interpolate, nn.Upsample, _interp_call)}


class _CallSwap(torch.overrides.TorchFunctionMode):
    """Rewrites (or, with ``count``, counts) the calls of one functional made outside its module class."""

    def __init__(self, swap: str, count: bool = False):
        super().__init__()
        self.func, module, self.rewrite = _CALL_SWAPS[swap]
        self.skip, self.count, self.calls = module.forward.__code__, count, 0

    def _in_module(self) -> bool:
        import sys
        f = sys._getframe(2)
        for _ in range(4):  # the caller: the module's forward, or torch's dispatch helpers above it
            if f is None or f.f_code is self.skip:
                return f is not None
            f = f.f_back
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is self.func and not self._in_module():
            new = self.rewrite(args, kwargs)
            if new is not None:
                self.calls += 1
                if not self.count:
                    args, kwargs = new
        return func(*args, **kwargs)


class FunctionalSwap(nn.Module):
    """``model`` run with its ``F.gelu`` (erf -> tanh) or ``F.interpolate`` (bilinear/bicubic ->
    nearest) calls rewritten while its forward runs (a TorchFunctionMode: torch.export captures the
    rewritten op). Calls made by nn.GELU / nn.Upsample modules are left to the module rules."""

    def __init__(self, model: nn.Module, swap: str):
        super().__init__()
        self.model, self.swap = model, swap

    def extra_repr(self) -> str:
        return f"swap={self.swap}"

    def forward(self, *args, **kwargs):
        with _CallSwap(self.swap):
            return self.model(*args, **kwargs)


def _calls(swap: str):
    """Matcher: the model makes rewritable ``swap`` calls outside their module class (counted on one
    forward with the recorded inputs; the model is on the meta device there)."""
    def match(site: Site) -> bool:
        if not site.args and not site.kwargs:
            return False
        mode = _CallSwap(swap, count=True)
        with torch.no_grad(), mode:
            site.module(*site.args, **(site.kwargs or {}))
        return mode.calls > 0
    return match


# ---------------------------------------------------------------------------------------------
# resolution (the whole model)

RESOLUTION = 0.875  # input side scale of the resolution rule (224 -> 192 after rounding down to 16)


class Downscale(nn.Module):
    """Resize the image input to ``size`` (bilinear) and run ``model`` on it: the same data and
    labels, a lower training resolution."""

    def __init__(self, model: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.model, self.size = model, tuple(size)

    def extra_repr(self) -> str:
        return f"size={self.size}"

    def forward(self, x: torch.Tensor, *args, **kwargs):
        lead = x.shape[:-3]
        y = F.interpolate(x.flatten(0, -4) if x.dim() > 4 else x, size=self.size, mode="bilinear",
                          align_corners=False)
        return self.model(y.reshape(*lead, *y.shape[-3:]) if x.dim() > 4 else y, *args, **kwargs)


def _low_res(site: Site) -> tuple[int, int] | None:
    shape = site.in_shape(0)
    if not shape or len(shape) < 4 or len(site.args) != 1:
        return None
    h, w = shape[-2:]
    side = lambda s: max(16, int(s * RESOLUTION) // 16 * 16)  # noqa: E731
    out = (side(h), side(w))
    return out if out != (h, w) and h >= 64 and w >= 64 else None


def _build_low_res(m: nn.Module, site: Site) -> nn.Module:
    return _mode(Downscale(m, _low_res(site)), m)


# ---------------------------------------------------------------------------------------------
# the table


def _same(m: nn.Module, site: Site) -> int:
    return _nparams(m)


def _p_attn(heads=None, kv=None, hd=None):
    def params(m: nn.Module, site: Site) -> int:
        s = attention_spec(m)
        h = heads(s) if heads else s.heads
        return _attn_params(s, h, kv(s) if kv else s.kv_heads if h == s.heads else h,
                            hd(s) if hd else s.heads * s.head_dim // h, _has_bias(m))
    return params


RULES: tuple[Rule, ...] = (
    Rule("sdpa", "attention", "SdpaAttention: the same q/k/v/proj -> F.scaled_dot_product_attention",
         "one fused flash/memory-efficient kernel instead of matmul, scale, softmax, dropout, matmul: the LxL "
         "scores never reach memory", "none: the same function", True,
         _match_sdpa, lambda m, s: _rebuild_attention(m, s), _same),
    Rule("gqa", "attention", "grouped-query attention: K/V heads = the largest divisor of heads <= heads/4 "
         "(K/V weights mean-pooled per group)", "smaller K/V projections and K/V tensors: fewer FLOPs and bytes "
         "in the projections and in attention's K/V reads", "fewer distinct keys/values per layer; usually "
         "small at >= 4 query heads per K/V head", False,
         _match_gqa, lambda m, s: _rebuild_attention(m, s, kv_heads=_gqa_kv(_spec(s).heads)),
         _p_attn(kv=lambda s: _gqa_kv(s.heads))),
    Rule("mqa", "attention", "multi-query attention: one K/V head (K/V weights mean-pooled over heads)",
         "K/V projections shrink by the head count", "one key/value subspace for all heads: the largest "
         "quality risk of the attention rules", False,
         _match_mqa, lambda m, s: _rebuild_attention(m, s, kv_heads=1), _p_attn(kv=lambda s: 1)),
    Rule("window-attn", "attention", "block-local self-attention in windows of w tokens (w: the largest "
         "divisor of L in [32, L/4]), same weights", "attention FLOPs and score traffic drop by L/w",
         "no information flow between windows in this layer (stack with global layers or shift windows)",
         False, _match_window, lambda m, s: _rebuild_attention(m, s, window=_window(s)), _same),
    Rule("heads-hd64", "attention", "re-split the same width into heads of dim 64 (same weights)",
         "flash attention kernels run best at head dim 64/128: fewer, fuller tiles", "fewer, wider heads",
         False, _match_hd64,
         lambda m, s: _rebuild_attention(m, s, heads=_spec(s).heads * _spec(s).head_dim // 64), _same),
    Rule("head-dim-align", "attention", "head dim rounded up to a multiple of 8 (new columns zero: same "
         "function at init)", "tensor cores need head dims in multiples of 8 (16 bytes of bf16)",
         "more parameters; none at init", False, _match_hd_align,
         lambda m, s: _rebuild_attention(m, s, head_dim=_round_up(_spec(s).head_dim, 8)),
         _p_attn(hd=lambda s: _round_up(s.head_dim, 8))),
    Rule("stem-patchify", "stem", "4x4 stride-4 patchify conv (+ the stem's norm/activation), no max-pool",
         "one small-K conv at 1/4 resolution instead of a 7x7 conv at 1/2 resolution plus a max-pool pass",
         "non-overlapping patches; ConvNeXt trains well with it, ResNets lose a little early", False,
         _match_stem, _build_patchify, _params_patchify),
    Rule("stem-3x3", "stem", "three 3x3 convs (c/2, c/2, c; BN-ReLU between) instead of the 7x7 (ResNet-C)",
         "3x3 convs run on faster kernels than 7x7 (more FLOPs though)", "usually +accuracy; more FLOPs",
         False, _match_stem, _build_stem3x3, _params_stem3x3),
    Rule("rmsnorm", "norm", "RMSNorm with the LayerNorm's scale and eps (bias dropped)",
         "no mean pass and no bias: fewer reductions and bytes per norm", "no centring; LLMs and many ViTs "
         "train on par", False,
         lambda s: type(s.module) in _LN_TO_RMS, _build_rms,
         lambda m, s: math.prod(m.normalized_shape) if m.elementwise_affine else 0),
    Rule("fold-bn", "norm", "FoldedConvBN: the running-statistics BN folded into the conv weight on each call",
         "one conv instead of conv + BN pass (forward and backward)", "none: the same function (BN in eval "
         "mode: an eval-only model or a frozen BN)", True,
         _match_fold, _build_fold, _same),
    Rule("gn-to-ln", "norm", "LayerNorm over channels (per pixel) instead of GroupNorm with <= 4 channels "
         "per group", "a per-pixel reduction over C fuses and vectorizes in channels-last; GroupNorm with "
         "tiny groups reduces over long strided spans", "per-pixel instead of per-group statistics", False,
         _match_gn, _build_gn, lambda m, s: 2 * m.num_channels if m.affine else 0),
    Rule("gelu-tanh", "activation", "GELU(approximate='tanh')", "tanh GELU fuses into GEMM epilogues "
         "(cuBLASLt, flash kernels) and is cheaper than erf", "max |difference| ~1e-3: negligible", False,
         _gelu("none"), lambda m, s: nn.GELU(approximate="tanh"), lambda m, s: 0),
    Rule("gelu-silu", "activation", "SiLU", "cheaper pointwise op, fusable epilogue",
         "different nonlinearity; usually on par", False, _gelu(None), lambda m, s: nn.SiLU(), lambda m, s: 0),
    Rule("gelu-relu", "activation", "ReLU", "cheapest activation; backward needs only a sign mask "
         "(1 byte/element saved instead of the input)", "dead units; often a little worse in transformers",
         False, _gelu(None), lambda m, s: nn.ReLU(), lambda m, s: 0),
    Rule("dw-smaller-k", "conv", "depthwise (k-2)x(k-2) conv, initialized with the kernel's centre",
         "(k-2)^2/k^2 of the FLOPs and weight reads of a memory-bound depthwise conv",
         "smaller receptive field per block", False, _match_dw_k, _build_dw_k,
         lambda m, s: m.in_channels * (m.kernel_size[0] - 2) ** 2 + (m.out_channels if m.bias is not None else 0)),
    Rule("dw-to-grouped", "conv", f"grouped conv, {GROUP_WIDTH} channels per group, same kernel",
         "higher arithmetic intensity: implicit-GEMM tensor-core kernels instead of a memory-bound depthwise",
         f"{GROUP_WIDTH}x the parameters of the depthwise conv, more capacity", False,
         _match_dw_grouped, _build_dw_grouped,
         lambda m, s: m.in_channels * GROUP_WIDTH * m.kernel_size[0] * m.kernel_size[1]
         + (m.out_channels if m.bias is not None else 0)),
    Rule("conv1x1-linear", "conv", "Conv1x1AsLinear: the same weights as a GEMM over channels-last pixels",
         "a plain GEMM (cuBLAS) with no conv layout transforms when activations are channels-last",
         "none: the same function", True, _match_1x1, lambda m, s: Conv1x1AsLinear(m), _same),
    Rule("upsample-nearest", "fusion", "nearest instead of bilinear/bicubic upsampling",
         "a pure copy kernel, no 4-tap reads; backward a strided sum", "blockier features before fusion",
         False, _match_upsample, _build_nearest, lambda m, s: 0),
    Rule("upsample-convT", "fusion", "depthwise ConvTranspose2d(k = s, stride = s), initialized to "
         "nearest upsampling (weights 1)", "learnable upsampling at copy-like cost", "a learned upsampler "
         "(checkerboard risk is nil at k = stride)", False, _match_convT, _build_convT,
         lambda m, s: s.in_shape(0)[1] * _int_scale(m) ** 2),
    Rule("concat-to-add", "fusion", "BranchFusion: each branch through its slice of the 1x1 conv, the results added "
         "(no concat)", "the concatenated tensor is never written nor read again; the per-branch GEMMs can "
         "accumulate in place (GEMM beta = 1)", "none: the same function", True,
         lambda s: fusion_spec(s) is not None, lambda m, s: _mode(BranchFusion(m, fusion_spec(s)), m), _same),
    Rule("concat-to-sum", "fusion", "BranchFusion(summed): equal-width branches added, then one c -> out 1x1 conv "
         "(weight: the mean of the branches' slices)", "1/k of the fusion GEMM's FLOPs and weight, no concat",
         "the branches share one projection: less expressive fusion (FPN-style add)", False,
         _match_fusion_sum, lambda m, s: _mode(BranchFusion(m, fusion_spec(s), summed=True), m), _params_fusion_sum),
    Rule("moe-top1", "moe", "top-1 routing (Switch): each token to its most probable expert only",
         "half the token copies: expert buffers of capacity_factor * tokens / experts rows instead of twice that, "
         "so half the expert GEMM FLOPs and half the dispatch/combine traffic", "one expert per token; Switch "
         "trains on par at equal compute, usually a little worse at equal steps", False,
         lambda s: _moe(s) is not None and _moe(s).top_k > 1, lambda m, s: _with(m, top_k=1), _same),
    Rule("moe-capacity", "moe", f"capacity factor {MOE_CAPACITY:g}", "smaller padded expert buffers: the experts' "
         "FLOPs and bytes scale with the capacity factor", "more token copies dropped when routing is unbalanced "
         "(they skip the layer)", False,
         lambda s: _moe(s) is not None and (_moe(s).capacity_factor or 0) > MOE_CAPACITY,
         lambda m, s: _with(m, capacity_factor=MOE_CAPACITY), _same),
    Rule("moe-fewer-experts", "moe", "half the experts, each with twice the hidden width (equal expert parameters; "
         "pairs merged by averaging)", "half the expert kernels and a narrower router, wider GEMMs: helps "
         "launch-bound layers", "each token meets 2x wider experts: twice the expert FLOPs per token; fewer "
         "specialists", False, _match_fewer, lambda m, s: _regroup(m, merge=True), _p_moe(0.5)),
    Rule("moe-more-experts", "moe", "twice the experts, each with half the hidden width (equal expert parameters; "
         "old experts split in halves)", "half the expert FLOPs per token (the chosen experts are half as wide)",
         "half the active parameters per token (fine-grained MoE usually raises top_k with it); twice the expert "
         "kernels", False, _match_more, lambda m, s: _regroup(m, merge=False), _p_moe(2)),
    Rule("gelu-tanh-calls", "activation", "F.gelu calls in forwards computed as tanh GELU (FunctionalSwap "
         "around the model)", "tanh GELU fuses into GEMM epilogues and is cheaper than erf", "max |difference| "
         "~1e-3: negligible", False, _calls("gelu"), lambda m, s: _mode(FunctionalSwap(m, "gelu"), m), _same,
         model_level=True),
    Rule("interp-nearest-calls", "fusion", "bilinear/bicubic F.interpolate calls in forwards computed as nearest "
         "(FunctionalSwap around the model)", "a pure copy kernel, no 4-tap reads; backward a strided sum",
         "blockier features before fusion", False, _calls("interpolate"),
         lambda m, s: _mode(FunctionalSwap(m, "interpolate"), m), _same, model_level=True),
    Rule("round-width", "width", f"MLP hidden width rounded up to a multiple of {ALIGN} (new fc1 rows: torch "
         "init; new fc2 columns zero, so the function starts unchanged)", "misaligned GEMM widths waste "
         "tensor-core tiles", "more parameters; none at init", False, _match_round,
         lambda m, s: _widen(m, _round_up(_mlp(m)[0].out_features, ALIGN)),
         lambda m, s: _mlp_params(*_mlp(m), _round_up(_mlp(m)[0].out_features, ALIGN))),
    Rule("depth-width", "width", "drop a quarter of the blocks, widen the kept MLPs (hidden rounded to "
         f"{ALIGN}) to keep the parameter count", "fewer sequential layers and larger GEMMs: fewer launches "
         "and higher arithmetic intensity at about equal FLOPs", "shallower network; quality depends on the "
         "task", False, _match_depth_width, _build_depth_width, _params_depth_width),
    Rule("resolution", "resolution", f"train at {RESOLUTION:g}x the input side (rounded down to 16): bilinear "
         "resize in front of the model", "activation FLOPs and bytes scale with pixels", "less detail "
         "(small objects); raise it again for the last epochs", False,
         lambda s: _low_res(s) is not None, _build_low_res, _same, model_level=True),
)

#: Families of the issue not covered by a rule here, and why (listed by ExploreResult).
UNCOVERED = {
    "add -> concat + 1x1 (the reverse of concat-to-add)": "never cheaper in the cost model: it writes and reads "
    "the k-wide concat and adds a GEMM where the add reads k inputs once; a quality change, not a speed one",
    "other functional calls": "only F.gelu and F.interpolate calls are rewritten (FunctionalSwap); e.g. F.silu, "
    "F.layer_norm or F.group_norm written in a forward are not replaced",
}


def rule_names() -> list[str]:
    return [r.name for r in RULES]
