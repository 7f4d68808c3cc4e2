"""Small modules the tests share."""
import torch
from torch import nn


class Fn(nn.Module):
    """A module whose forward is ``fn(self, *inputs)`` over the given submodules (``self.mods``)."""

    def __init__(self, fn, *mods):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(mods)

    def forward(self, *xs):
        return self.fn(self, *xs)


class Lambda(nn.Module):
    """A module around a plain function of its inputs (no parameters: every tensor is an input)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


class Scaled(nn.Module):
    """linear -> relu -> divide by a constant: a tiny net with a source line worth showing."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x)) / 4.0


def add_dtype_check(captured, node, dtype=torch.float32):
    """Insert ``_assert_tensor_metadata(node, None, dtype=dtype)`` after ``node`` in a captured graph
    (the size given positionally, as a user may write it; export itself passes keywords only)."""
    g = captured.graph_module.graph
    with g.inserting_after(node):
        check = g.call_function(torch.ops.aten._assert_tensor_metadata.default, (node, None), {"dtype": dtype})
    check.meta["val"] = None
    captured.graph_module.recompile()
    return check
