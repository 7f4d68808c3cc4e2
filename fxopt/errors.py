"""One error family: every fxopt failure is an ``FxoptError`` that says what to do next."""


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class ModelSpecError(FxoptError, ValueError):
    """A MODEL string (zoo name, ``hf:Class``, ``file.py:factory``) could not be resolved."""


class InputError(FxoptError, ValueError):
    """Example inputs do not fit the model (wrong type, shape or count)."""


class CaptureError(FxoptError):
    """``torch.export`` could not capture the model; the message names the cause and a fix."""


class HardwareError(FxoptError, ValueError):
    """An unknown hardware preset or a malformed hardware profile."""


class AnalysisError(FxoptError):
    """The cost model could not interpret the captured graph."""
