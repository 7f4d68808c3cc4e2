"""What the command line prints besides the library's own tables: logging set-up, a closed pipe,
the JSON documents of ``optimize``/``diff``/``models``, and the text of ``fxopt optimize``.

JSON documents carry a ``schema`` name with a version (``fxopt.optimize/1``): fields are only
added within a version; README.md documents each one.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter

from .passes.manager import format_ms

LOG_FORMAT = "fxopt: %(levelname)s: %(name)s: %(message)s"
# -q/-v count -> level of the "fxopt" logger (warnings by default)
LEVELS = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


def configure_logging(verbosity: int) -> None:
    """One stderr handler on the ``fxopt`` logger (not the root: torch's loggers stay as the user set them)."""
    logger = logging.getLogger("fxopt")
    logger.setLevel(LEVELS[max(-1, min(2, verbosity))])
    if not any(getattr(h, "_fxopt_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._fxopt_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False


def silence_closed_stdout() -> None:
    """After a BrokenPipeError (``fxopt report ... | head``): point stdout at /dev/null so the
    interpreter's final flush does not print a second error, as Python's docs recommend."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def dumps(data: dict) -> str:
    return json.dumps(data, indent=1, default=_jsonable)


def _jsonable(value):
    """Symbolic step times (sympy) and other non-JSON numbers: a float when concrete, else the formula."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _seconds(value):
    return None if value is None else _jsonable(value)


# ---- fxopt optimize / diff ----------------------------------------------------------------------
NO_EFFECT_US = 0.05  # |estimate| below this prints as +0.0 us: a decision with no estimated effect


def _status(record) -> str:
    return "rolled back" if record.rolled_back else ("changed" if record.modified else "no change")


def _kept_as_is(decision) -> bool:
    """A decision to leave a node alone (keep, keep-nchw, keep-region, no change): it explains, it changes nothing."""
    return decision.action.startswith("keep") or decision.action == "no change"


def _no_effect(decision) -> bool:
    return decision.est_gain_s is None or abs(decision.est_gain_s) * 1e6 < NO_EFFECT_US


def _kind(decision) -> str:
    """The rule that made a decision (``transpose-to-permute: aten...`` -> ``transpose-to-permute``)."""
    head = decision.reason.split(":", 1)[0].strip()
    return head if head and " " not in head else decision.action


def optimize_dict(report, model: str) -> dict:
    """``fxopt optimize --format json``: schema ``fxopt.optimize/1``."""
    verification = report.verification
    return {
        "schema": "fxopt.optimize/1",
        "model": model,
        "pipeline": report.pipeline,
        "pipeline_reasons": list(report.pipeline_reasons),
        "step_time_before_s": _seconds(report.step_time_before_s),
        "step_time_after_s": _seconds(report.step_time_after_s),
        "verification": None if verification is None else bool(verification),
        "passes": [{"name": r.name, "status": _status(r), "time_s": r.time_s,
                    "step_time_before_s": _seconds(r.step_time_before_s),
                    "step_time_after_s": _seconds(r.step_time_after_s),
                    "verified": None if r.verification is None else bool(r.verification),
                    "decisions": len(r.decisions), "note": r.note, "error": getattr(r, "error", "")}
                   for r in report.records],
        "decisions": [{"pass": r.name, "node": d.node, "action": d.action, "reason": d.reason,
                       "est_gain_s": d.est_gain_s, "applied": not _kept_as_is(d), "no_effect": _no_effect(d)}
                      for r in report.records for d in r.decisions],
    }


def diff_dict(report, model: str) -> dict:
    """``fxopt diff --format json``: schema ``fxopt.diff/1``."""
    return {"schema": "fxopt.diff/1", "model": model, "pipeline": report.pipeline,
            "passes": [{"index": i, "name": r.name, "status": _status(r), "diff": r.diff or ""}
                       for i, r in enumerate(report.records, 1)]}


def optimize_text(report, *, verbose: bool = False, limit: int = 30) -> str:
    """The passes table and predicted step first, then decisions that change the predicted time
    (largest first), then the decisions that kept a node as it was with an estimate; decisions with
    no estimated effect (renames, transpose->permute, unused get_attr removal) are one summary line
    unless ``verbose``."""
    from .passes import timing_table
    lines = [f"pipeline: {report.pipeline}", timing_table(report.records),
             f"predicted step: {format_ms(report.step_time_before_s)} ms -> {format_ms(report.step_time_after_s)} ms; "
             f"final verification: {_verdict(report.verification)}"]
    lines += [f"  {r.name}: {r.note}" for r in report.records if r.note]
    lines += [text for r in report.records if (text := r.details_text())]
    decisions = report.decisions()
    by_gain = lambda d: -abs(d.est_gain_s or 0.0)  # noqa: E731
    changes = sorted((d for d in decisions if not _kept_as_is(d) and not _no_effect(d)), key=by_gain)
    kept = sorted((d for d in decisions if _kept_as_is(d) and not _no_effect(d)), key=by_gain)
    silent = [d for d in decisions if _no_effect(d)]
    for title, group in (("decisions that change the predicted step", changes),
                         ("left as is, with the estimate that decided it", kept)):
        if group:
            shown = group if verbose else group[:limit]
            lines.append(f"{title} ({len(group)}):")
            lines += [f"  - {d}" for d in shown]
            if len(shown) < len(group):
                lines.append(f"  ... {len(group) - len(shown)} more (-v lists all)")
    if silent:
        counts = Counter(_kind(d) for d in silent)
        summary = ", ".join(f"{n} {k}" for k, n in counts.most_common())
        if verbose:
            lines.append(f"decisions with no estimated effect ({len(silent)}: {summary}):")
            lines += [f"  - {d}" for d in silent]
        else:
            lines.append(f"{len(silent)} decisions with no estimated effect ({summary}); -v lists them")
    if verbose and report.pipeline_reasons:
        lines.append("why these passes:")
        lines += [f"  {r}" for r in report.pipeline_reasons]
    return "\n".join(lines)


def _verdict(v) -> str:
    return "-" if v is None else ("ok" if v else "FAILED")


# ---- fxopt models --------------------------------------------------------------------------------
SPEC_FORMS = [
    ("<zoo name>[-tiny]", "a built-in model (above); -tiny is its small test variant"),
    ("hf:<ModelClass>[-tiny]", "a HF transformers model built from its default config (no download)"),
    ("timm:<name>", "a timm model, pretrained=False (pip install timm)"),
    ("torchvision:<name>", "a torchvision model, weights=None (pip install torchvision)"),
    ("path/to/file.py:factory", "your own model: factory() returns a module (the file then defines "
                                "example_inputs(batch)) or (module, inputs)"),
]


def models_dict(zoo) -> dict:
    """``fxopt models --format json``: schema ``fxopt.models/1``."""
    return {"schema": "fxopt.models/1",
            "models": [{"name": n, "description": zoo.ZOO[n].description, "tiny": f"{n}-tiny"} for n in zoo.names()],
            "spec_forms": [{"form": f, "description": d} for f, d in SPEC_FORMS]}


def models_text(zoo) -> str:
    width = max(len(f) for f, _ in SPEC_FORMS)
    lines = [f"{n:{width}s}  {zoo.ZOO[n].description}" for n in zoo.names()]
    return "\n".join(lines + [""] + [f"{f:{width}s}  {d}" for f, d in SPEC_FORMS])
