"""Progress bars for long work (sweeps, benches, ablations, calibration, verified pipelines).

``progress(iterable)`` is a tqdm bar on stderr when stderr is a terminal, and the iterable itself
otherwise: piped or captured output (CI logs, ``| tee``, ``--format json > file``) stays clean.
``fxopt -q`` and ``FXOPT_PROGRESS=0`` turn bars off; ``FXOPT_PROGRESS=1`` forces them on.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    """Bars on: stderr is a TTY, fxopt's logger is not quieted below warnings, no FXOPT_PROGRESS=0."""
    forced = os.environ.get("FXOPT_PROGRESS")
    if forced is not None:
        return forced.strip().lower() not in ("0", "false", "no", "")
    if logging.getLogger("fxopt").getEffectiveLevel() > logging.WARNING:  # fxopt -q
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None,
             unit: str = "it") -> Iterable[T]:
    """Wrap a loop over long steps: ``for point in progress(grid, desc="sweep"):``."""
    if not enabled():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                dynamic_ncols=True)
