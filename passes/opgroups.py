"""The ATen op groups the passes match, defined once.

Why: each pass used to list its own casts, views and convolutions, and the lists drifted (one
pass's "cast" missed ``to.device``, another's "conv" missed the ``padding`` overloads). A pass that
needs a narrower or wider set builds it from these, next to the reason.
"""
from __future__ import annotations

import torch

__all__ = ["CONVS", "CONV2D", "TRANSPOSED_CONVS", "LINEAR", "GEMMS", "MATRIX", "CASTS", "RESHAPES", "TRANSPOSES",
           "SHAPE_VIEWS", "DROPOUTS", "SOFTMAXES", "CHECKS"]

aten = torch.ops.aten

#: every forward convolution overload export emits (transposed ones are ``convolution`` or below)
CONVS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
                   aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default})
#: the 2-D ones (channels-last converts these; ``convolution`` is checked for rank where it is used)
CONV2D = frozenset({aten.conv2d.default, aten.conv2d.padding, aten.convolution.default})
TRANSPOSED_CONVS = frozenset({aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                              aten.conv_transpose3d.input})
LINEAR = frozenset({aten.linear.default})
#: matrix products on tensor cores, besides convolutions
GEMMS = frozenset({aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default,
                   aten.addmm.default, aten.baddbmm.default})
MATRIX = CONVS | GEMMS | {aten.scaled_dot_product_attention.default}

#: dtype (and device) conversions
CASTS = frozenset({aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other})
#: views that change the shape only
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
TRANSPOSES = frozenset({aten.t.default, aten.transpose.int, aten.permute.default})
#: ops that move no data in the value they return (views, and contiguous/clone/alias of a value)
SHAPE_VIEWS = RESHAPES | {aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
                          aten.flatten.using_ints, aten.expand.default, aten.contiguous.default,
                          aten.clone.default, aten.alias.default}
DROPOUTS = frozenset({aten.dropout.default})
SOFTMAXES = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
#: export's dtype checks: not real users of a value
CHECKS = frozenset({aten._assert_tensor_metadata.default})
