"""``OptimizedModule.forward`` that reports the wrapped model's ``inspect.signature``.

Signature-reading tools keep working on an optimized model: HF ``Trainer`` drops dataset columns
that ``model.forward`` does not name, ``accelerate`` and Lightning bind batches by parameter name.
A class-level descriptor (not a closure stored on the instance) keeps the module picklable.
"""
from __future__ import annotations

import inspect


class _BoundForward:
    """``module.forward``: calls the class's forward; its signature is ``module.<attr>.forward``'s."""

    __slots__ = ("_fn", "_owner", "_attr")

    def __init__(self, fn, owner, attr: str):
        self._fn, self._owner, self._attr = fn, owner, attr

    def __call__(self, *args, **kwargs):
        return self._fn(self._owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        wrapped = getattr(self._owner, self._attr, None)
        if wrapped is None:
            return inspect.signature(self._fn.__get__(self._owner))
        return inspect.signature(wrapped.forward)

    def __repr__(self) -> str:
        return f"<forward of {type(self._owner).__name__}{self.__signature__}>"


class signed_forward:
    """Decorate a module's ``forward`` so ``inspect.signature(module.forward)`` is that of
    ``getattr(module, attr).forward`` (the wrapped model)."""

    def __init__(self, attr: str):
        self._attr = attr

    def __call__(self, fn):
        self._fn = fn
        return self

    def __get__(self, owner, cls=None):
        return self._fn if owner is None else _BoundForward(self._fn, owner, self._attr)
