"""Small modules the tests share."""
from torch import nn


class Fn(nn.Module):
    """A module whose forward is ``fn(self, *inputs)`` over the given submodules (``self.mods``)."""

    def __init__(self, fn, *mods):
        super().__init__()
        self.fn, self.mods = fn, nn.ModuleList(mods)

    def forward(self, *xs):
        return self.fn(self, *xs)
