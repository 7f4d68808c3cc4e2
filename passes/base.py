"""The pass interface, the registry and the pipeline-string parser.

A pass is a class with a kebab-case ``name``, a one-line ``summary``, the ``options`` it
accepts (a typed schema: ``{name: Option(type, default, doc, choices=..., minimum=...)}``) and
``run(gm, ctx) -> PassResult``. It rewrites the graph and
logs every decision with ``ctx.decide(...)``; it never lints, recompiles, re-propagates
metadata, costs or verifies: the :class:`~fxopt.passes.manager.PassManager` does that.

Pipeline strings
----------------
``"dce,normalize,mixed-precision{dtype=bf16,keep_fp32=head.*;softmax}"``

* passes are separated by ``,``; each may carry options in ``{key=value,...}``;
* a value is parsed as ``true``/``false`` (bool, any case), an int (``8``, ``-1``), a float
  (``0.5``, ``1e-3``), otherwise kept as a string (``bf16``, ``head.*``);
* a value containing ``;`` is a list, each item parsed as above: ``keep_fp32=head.*;softmax``
  is ``["head.*", "softmax"]``; a trailing ``;`` makes a one-item list (``keep_fp32=head.*;``);
* whitespace around names, keys and values is ignored; ``{``, ``}``, ``,``, ``=`` and ``;``
  cannot appear inside values.

Every value is then checked against the pass's declared :class:`Option` (type, allowed values,
minimum) when the pipeline is parsed, i.e. before anything is captured: ``fuse{max_ops=abc}``
is a PipelineError naming the option, what it accepts and its doc, not a crash inside the pass.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import fx

from fxopt.errors import FxoptError
from fxopt.cost_models.hardware import DEFAULT_PRESET

__all__ = ["Pass", "PassResult", "PassContext", "Decision", "PassError", "PipelineError", "Option", "undeclared",
           "check_order",
           "register", "unregister", "get", "available", "parse_pipeline", "format_pipeline", "schema",
           "defaults", "check_options", "options_help"]

_KEBAB = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


class PassError(FxoptError):
    """A pass raised, or broke the graph; names the pass and the passes that ran before it."""

    def __init__(self, message: str, pass_name: str = "", previous: list[str] | None = None):
        super().__init__(message)
        self.pass_name = pass_name
        self.previous = list(previous or [])


class PipelineError(FxoptError, ValueError):
    """A pipeline string or pass list is malformed, or names an unknown pass or option."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_words(v) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v))


# option type -> (accepts the value?, how the pipeline string writes it)
_TYPES: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (_is_int, "an integer"),
    float: (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v), "a number"),
    str: (lambda v: isinstance(v, str) and v != "", "a word"),
    list: (_is_words, "a word or a ';'-separated list of words (a;b, or a; for one)"),
}


@dataclass(frozen=True)
class Option:
    """One option a pass accepts: its type, default, one-line doc, allowed values and minimum.

    ``type`` is bool, int, float (an int is accepted), str, or list (a word or a ``;``-list of
    words), or a tuple of those and other Python types (programmatic values such as a
    ``torch.dtype``). ``choices`` restricts a word (each word of a list) to those values.
    """

    type: type | tuple
    default: Any
    doc: str = ""
    choices: tuple = ()
    minimum: float | None = None

    def allowed(self) -> str:
        """What the option accepts, in words (for error messages and ``options_help``)."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        what = " or ".join(_TYPES[t][1] if t in _TYPES else t.__name__ for t in types)
        if self.choices:
            what = f"one of {', '.join(map(str, self.choices))}" + (" (or a ';'-list of them)" if list in types else "")
        if self.minimum is not None:
            what += f", at least {self.minimum:g}"
        return what

    def check(self, value, where: str):
        """``value`` if this option accepts it (an int given to a float option becomes a float),
        else a PipelineError saying ``where``, what was given and what is allowed."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        ok = any(_TYPES[t][0](value) if t in _TYPES else isinstance(value, t) for t in types)
        if ok and self.choices:
            words = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
            ok = all(w in self.choices for w in words)
        if ok and self.minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = value >= self.minimum
        if not ok:
            doc = f" ({self.doc})" if self.doc else ""
            raise PipelineError(f"{where} is {value!r}; it must be {self.allowed()}{doc}")
        if float in types and _is_int(value) and int not in types:
            return float(value)
        return value


@dataclass
class PassResult:
    """What a pass hands back: the (possibly new) graph module, whether it changed, counters."""

    graph_module: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)  # named counters, each declared in the pass's ``statistics``
    details: Any = None  # structured output beyond counters (fuse's regions), shown by ``render_details``


@dataclass(frozen=True)
class Decision:
    """One decision of a pass about one node, with its reason and the cost model's estimate."""

    node: str
    action: str
    reason: str
    est_gain_s: float | None = None

    def __str__(self) -> str:
        gain = "" if self.est_gain_s is None else f" (est. {self.est_gain_s * 1e6:+.1f} us)"
        return f"{self.node}: {self.action}: {self.reason}{gain}"


@dataclass
class PassContext:
    """Everything a pass may read, plus the decision log of the pass now running.

    ``options`` are the current pass's options (its declared defaults overlaid with the
    pipeline's values); ``node_times`` maps node name -> predicted time (s) of one training
    step of the graph *before* the current pass, when the manager costs (empty otherwise).
    """

    hardware: str = DEFAULT_PRESET
    training: bool = True
    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    pass_name: str = ""
    node_times: dict = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)

    @property
    def hw(self):
        """The resolved hardware profile of ``hardware`` (one load per spec: cost_models caches it)."""
        from fxopt.cost_models.hardware import load_hardware
        return load_hardware(self.hardware)

    @property
    def precision(self):
        """The math modes every cost in this pipeline assumes (TF32 as torch is set now), as analyze does."""
        from fxopt.cost_models.roofline import Precision
        return Precision.from_torch()

    @property
    def example_inputs(self) -> tuple[tuple, dict]:
        """The example ``(args, kwargs)`` the graph was captured with (real tensors)."""
        return self.example_args, self.example_kwargs

    def begin(self, pass_name: str, options: dict, node_times: dict | None = None) -> None:
        """Called by the manager before each pass: fresh options and decision log."""
        self.pass_name, self.options, self.decisions = pass_name, dict(options), []
        self.node_times = dict(node_times or {})

    def decide(self, node, action: str, reason: str, est_gain_s: float | None = None) -> Decision:
        """Log one decision (``node`` is an fx.Node or a name) for the current pass."""
        d = Decision(node.name if isinstance(node, fx.Node) else str(node), action, reason, est_gain_s)
        self.decisions.append(d)
        return d

    def node_time(self, node) -> float | None:
        """The predicted step time (s) spent in ``node`` (forward + backward); 0.0 for a node that
        launches nothing (views, get_attr); None when the graph was not costed or the time is a
        formula (symbolic batch)."""
        if not self.node_times:
            return None
        name = node.name if isinstance(node, fx.Node) else str(node)
        t = self.node_times.get(name, 0.0)
        try:
            return float(t)
        except TypeError:
            return None


class Pass:
    """Base class of every pass. Subclass, set ``name``/``summary``/``options``, implement ``run``.

    ``requires(gm, ctx)`` runs before ``run`` and ``ensures(gm, ctx)`` after the manager has
    re-propagated metadata; both raise (any exception) on a violated condition.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # option name -> Option(type, default, doc, ...); a bare default value is shorthand for
    # Option(type(default), default) (see :func:`schema`)
    options: ClassVar[dict[str, Any]] = {}
    # the named counters ``run`` may report, name -> what it counts (MLIR's pass statistics); a name
    # ending in ``*`` declares a family (``removed_*``). The manager refuses an undeclared counter.
    # None: not declared (a pass written before statistics were), not checked.
    statistics: ClassVar[dict[str, str] | None] = None
    # passes that must come before / after this one when both are in a pipeline (and why)
    after: ClassVar[dict[str, str]] = {}
    before: ClassVar[dict[str, str]] = {}

    @classmethod
    def render_details(cls, details) -> str:
        """``PassResult.details`` as text for reports ("" when there is nothing to show)."""
        return ""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} does not implement run(gm, ctx)")

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Precondition on the input graph; raise to refuse it."""

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Postcondition on the output graph; raise when it does not hold."""

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass] | None = None, *, replace: bool = False) -> Callable | type[Pass]:
    """Class decorator adding a pass to the registry under ``cls.name`` (``@register``)."""
    def add(c: type[Pass]) -> type[Pass]:
        if not (isinstance(c, type) and issubclass(c, Pass)):
            raise PipelineError(f"register() takes a Pass subclass, got {c!r}")
        if not _KEBAB.fullmatch(c.name or ""):
            raise PipelineError(f"{c.__name__}.name must be kebab-case (like 'fold-bn'), got {c.name!r}")
        if not c.summary or "\n" in c.summary:
            raise PipelineError(f"{c.__name__}.summary must be one non-empty line")
        schema(c)  # a malformed option declaration fails here, at import, not in a user's pipeline
        if c.name in _REGISTRY and _REGISTRY[c.name] is not c and not replace:
            raise PipelineError(f"a pass named {c.name!r} is already registered ({_REGISTRY[c.name].__name__}); "
                                f"pick another name or register(..., replace=True)")
        _REGISTRY[c.name] = c
        return c
    return add(cls) if cls is not None else add


def unregister(name: str) -> None:
    """Remove a pass from the registry (test-only passes); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def available() -> list[str]:
    """The names of all registered passes, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Pass]:
    """The registered pass class called ``name``; PipelineError listing the known ones if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(available()) or '(none)'}") from None


def _parse_scalar(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _parse_value(text: str, where: str):
    if ";" not in text:
        if not text:
            raise PipelineError(f"{where} has no value (write key=value)")
        return _parse_scalar(text)
    items = [t.strip() for t in text.split(";")]
    if items[-1] == "":
        items.pop()  # trailing ';' marks a one-item list
    if any(not t for t in items):
        raise PipelineError(f"{where}: empty item in list {text!r} (items are separated by ';')")
    return [_parse_scalar(t) for t in items]


def _split_items(text: str) -> list[str]:
    """Split at top-level commas, checking braces balance."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            if depth > 1:
                raise PipelineError(f"pipeline {text!r}: nested '{{' at position {i}; options cannot contain braces")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"pipeline {text!r}: '}}' at position {i} closes nothing")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise PipelineError(f"pipeline {text!r}: '{{' is never closed (missing '}}')")
    items.append(text[start:])
    return items


def parse_pipeline(text: str, *, check: bool = True) -> list[tuple[str, dict]]:
    """Parse ``"a,b{k=v,l=x;y}"`` into ``[("a", {}), ("b", {"k": v, "l": [x, y]})]``.

    With ``check`` (the default) pass names must be registered and option keys declared by the
    pass; otherwise only the syntax is checked. Raises :class:`PipelineError` saying what is wrong.
    """
    if not isinstance(text, str):
        raise PipelineError(f"a pipeline is a string like 'dce,normalize', got {type(text).__name__}")
    if not text.strip():
        raise PipelineError("the pipeline is empty; name at least one pass, e.g. 'dce'")
    out = []
    for n, raw in enumerate(_split_items(text)):
        item = raw.strip()
        if not item:
            raise PipelineError(f"pipeline {text!r}: pass #{n + 1} is empty (doubled or trailing ',')")
        m = re.fullmatch(r"([^{}]*?)\s*(\{(.*)\})?", item, flags=re.S)
        if m is None:
            raise PipelineError(f"pipeline {text!r}: cannot read {item!r}; write name or name{{key=value,...}}")
        name, body = m.group(1).strip(), m.group(3)
        if not _KEBAB.fullmatch(name):
            raise PipelineError(f"pipeline {text!r}: {name!r} is not a pass name (kebab-case, like 'fold-bn')")
        options: dict = {}
        if body is not None and body.strip():
            for opt in _split_items(body):
                opt = opt.strip()
                if "=" not in opt:
                    raise PipelineError(f"pipeline {text!r}: option {opt!r} of pass {name!r} needs key=value")
                key, value = (s.strip() for s in opt.split("=", 1))
                if not _KEY.fullmatch(key):
                    raise PipelineError(f"pipeline {text!r}: {key!r} is not an option name of pass {name!r}")
                if key in options:
                    raise PipelineError(f"pipeline {text!r}: option {key!r} given twice for pass {name!r}")
                if "=" in value:
                    raise PipelineError(f"pipeline {text!r}: option {key!r} of pass {name!r} has a stray '=' "
                                        f"in {value!r} (options are separated by ',')")
                options[key] = _parse_value(value, f"option {key!r} of pass {name!r}")
        out.append((name, options))
    if check:
        for name, options in out:
            check_options(get(name), options)
    return out


def schema(cls: type[Pass]) -> dict[str, Option]:
    """``cls.options`` as ``{name: Option}``; a bare default ``v`` declares ``Option(type(v), v)``."""
    out = {}
    for key, decl in cls.options.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise PipelineError(f"{cls.__name__}.options: {key!r} is not an option name (a Python identifier)")
        if not isinstance(decl, Option):
            kind = list if isinstance(decl, tuple) else type(decl)
            if kind not in _TYPES:
                raise PipelineError(f"{cls.__name__}.options[{key!r}]: declare it as Option(type, default, doc); "
                                    f"a bare default must be a bool, int, float, str or list, got {decl!r}")
            decl = Option(kind, decl)
        out[key] = decl
    return out


def defaults(cls: type[Pass]) -> dict:
    """The default value of every option ``cls`` declares."""
    return {k: o.default for k, o in schema(cls).items()}


def check_options(cls: type[Pass], options: dict) -> dict:
    """The declared defaults overlaid with ``options``, each value checked against its Option;
    PipelineError naming the pass, the option and what is allowed on an undeclared key or bad value."""
    if not isinstance(options, dict):
        raise PipelineError(f"options of pass {cls.name!r} must be a dict, got {type(options).__name__}")
    declared = schema(cls)
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise PipelineError(f"pass {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
                            f"{options_help(cls) or 'it takes none'}")
    checked = {k: declared[k].check(v, f"option {k!r} of pass {cls.name!r}") for k, v in options.items()}
    return {**defaults(cls), **checked}


def options_help(cls: type[Pass]) -> str:
    """One line per option: ``name=default: allowed values; doc``."""
    return "; ".join(f"{k}={_format_value(o.default) or '(empty)'} ({o.allowed()}{': ' + o.doc if o.doc else ''})"
                     for k, o in schema(cls).items())


def _format_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return ";".join(_format_value(x) for x in v) + (";" if len(v) == 1 else "")
    return str(v)


def format_pipeline(items: list[tuple[str, dict]]) -> str:
    """The inverse of :func:`parse_pipeline` (for messages and reports)."""
    return ",".join(name + ("{" + ",".join(f"{k}={_format_value(v)}" for k, v in opts.items()) + "}" if opts else "")
                    for name, opts in items)


def undeclared(cls: type[Pass], stats: dict) -> list[str]:
    """The counters in ``stats`` that ``cls.statistics`` does not declare (none when it declares nothing)."""
    if cls.statistics is None:
        return []
    families = tuple(k[:-1] for k in cls.statistics if k.endswith("*"))
    return sorted(k for k in stats if k not in cls.statistics and not (families and str(k).startswith(families)))


def check_order(names: list[str]) -> None:
    """PipelineError when the pipeline ``names`` breaks an ordering constraint a pass declares
    (``after``/``before``: this pass must run after/before that one when both are present)."""
    position = {}
    for i, name in enumerate(names):
        position.setdefault(name, i)
    for i, name in enumerate(names):
        cls = _REGISTRY.get(name)
        if cls is None:
            continue
        for other, why in cls.after.items():
            if other in position and position[other] > i:
                raise PipelineError(f"pass {name!r} must run after {other!r} ({why}); reorder the pipeline")
        for other, why in cls.before.items():
            if other in position and position[other] < i and other != name:
                raise PipelineError(f"pass {name!r} must run before {other!r} ({why}); reorder the pipeline")
