"""Roofline plot of a training step: every node (or block) under the device's roofs.

A point sits at (arithmetic intensity, predicted FLOP/s) = (FLOPs / bytes, FLOPs / predicted
time); its area is its share of the step time, its colour what bounds it. The roofs are the
preset's datasheet peaks (solid: memory roof = bandwidth x intensity, one compute roof per
dtype) and the same scaled by the preset's measured efficiencies (dashed): the cost model never
predicts a kernel above the dashed roofs, and launch overhead pulls small kernels further down.

Drawn with matplotlib's Agg canvas on a private Figure (no pyplot, no global backend change).
"""
from __future__ import annotations

import io
from pathlib import Path

from ..errors import AnalysisError, FxoptError, InputError
from ..report import GraphReport

__all__ = ["roofline", "roofline_points", "roofline_svg", "roofline_png", "PlotError"]


class PlotError(FxoptError):
    """matplotlib (the ``plot`` extra) is not installed."""


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotError("plots need matplotlib: pip install 'fxopt[plot]' (or pip install matplotlib)") from exc

    def agg_figure(**kwargs):
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        return fig
    return agg_figure

BOUND_COLORS = {"compute": "#d62728", "memory": "#1f77b4", "launch": "#8c8c8c", "none": "#8c8c8c", "-": "#8c8c8c"}
# Compute roofs drawn per dtype key of the preset (fp64 only if the model runs fp64).
ROOF_DTYPES = ("fp8", "bf16", "fp16", "tf32", "fp32")


def roofline_points(report: GraphReport, by: str = "node", depth: int = 1) -> tuple[list[dict], dict]:
    """Points to plot (name, ai, flops_per_s, share, bound, time_s) and what was left out.

    Rows without FLOPs or bytes (copies, views, launch-only kernels) have no place on a log-log
    roofline; they are counted in the second value (``{"rows": n, "share": fraction}``).
    """
    if report.is_symbolic:
        raise AnalysisError("a roofline needs concrete sizes: plot report.at(batch=N), not the symbolic report")
    points, left = [], {"rows": 0, "share": 0.0}
    for r in report.rows(by, depth):
        flops = r["fwd_flops"] + r["bwd_flops"]
        if flops <= 0 or r["bytes"] <= 0 or r["time_s"] <= 0:
            if r["time_s"] > 0:
                left["rows"] += 1
                left["share"] += float(r["share"])
            continue
        label = f"{r['module']}:{r['op']}" if by == "node" and r.get("module") else r[by]
        points.append({"name": r[by], "label": str(label), "ai": flops / r["bytes"], "flops_per_s": flops / r["time_s"],
                       "share": float(r["share"]), "bound": r["bound"], "time_s": float(r["time_s"]),
                       "flops": flops, "bytes": r["bytes"]})
    return points, left


def _roofs(hw, dtypes_used: set) -> list[tuple[str, float]]:
    """(label, FLOP/s) per compute roof; equal peaks share one line (bf16/fp16)."""
    peaks: dict[float, list[str]] = {}
    for key in ROOF_DTYPES + (("fp64",) if "fp64" in dtypes_used else ()):
        if key == "fp32":
            value, label = hw.vector_flops.get("fp32"), "fp32 (no tensor cores)"
        else:
            value, label = hw.tensor_flops.get(key), key
        if value:
            peaks.setdefault(float(value), []).append(label)
    return sorted(((" / ".join(v), k) for k, v in peaks.items()), key=lambda r: -r[1])


def roofline(report: GraphReport, path: str | Path | None = None, *, by: str = "node", depth: int = 1,
             top: int = 8, title: str | None = None, figsize=(9.0, 6.0)):
    """Draw the roofline of ``report`` (a concrete GraphReport) on a matplotlib Figure, returned;
    save it if ``path`` is given (``.png`` or ``.svg``). ``by``: "node", "block" (module path at
    ``depth``) or "op" (op class).
    The ``top`` points by time share are labelled."""
    if path is not None and Path(path).suffix.lower() not in (".png", ".svg"):
        raise InputError(f"roofline path {str(path)!r}: use a .png or .svg file name")
    points, left = roofline_points(report, by, depth)
    hw = report.hardware
    dtypes = {_dtype_key(c.dtype) for c in report.calls if c.kernels}
    roofs = _roofs(hw, dtypes)
    bw = hw.memory_bandwidth
    eff_m, eff_bw = hw.efficiency.get("matrix", 1.0), hw.efficiency.get("memory", 1.0)

    fig = _figure_class()(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ais = [p["ai"] for p in points] or [1.0]
    perfs = [p["flops_per_s"] for p in points] or [1e9]
    top_peak = roofs[0][1]
    x_lo = min(min(ais) / 3, 0.05)
    x_hi = max(max(ais) * 3, top_peak / bw * 8)
    y_lo = min(min(perfs) / 3, bw * x_lo)
    y_hi = top_peak * 2.5
    xs = _geom(x_lo, x_hi, 200)

    ax.plot(xs, [min(bw * x, top_peak) for x in xs], color="black", lw=1.6,
            label=f"memory roof {bw / 1e12:.3g} TB/s")
    ax.plot(xs, [min(bw * eff_bw * x, top_peak * eff_m) for x in xs], color="black", lw=1, ls="--",
            label=f"with measured efficiency ({eff_bw:.0%} bw, {eff_m:.0%} matrix)")
    for i, (label, peak) in enumerate(roofs):
        ridge = peak / bw
        seg = [x for x in xs if x >= ridge] or [ridge]
        ax.plot([ridge] + seg, [peak] * (len(seg) + 1), color=f"C{i + 2}", lw=1.3,
                label=f"{label} roof {peak / 1e12:.4g} TFLOP/s")

    for bound in ("compute", "memory", "launch"):
        sel = [p for p in points if p["bound"] == bound]
        if sel:
            ax.scatter([p["ai"] for p in sel], [p["flops_per_s"] for p in sel],
                       s=[20 + 1800 * p["share"] for p in sel], c=BOUND_COLORS[bound], alpha=0.55,
                       edgecolors="black", linewidths=0.4, label=f"{bound}-bound ({len(sel)})", zorder=3)
    other = [p for p in points if p["bound"] not in ("compute", "memory", "launch")]
    if other:
        ax.scatter([p["ai"] for p in other], [p["flops_per_s"] for p in other], s=20, c="#8c8c8c", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    note = "point area = share of step time"
    what = {"node": "nodes", "op": "op classes", "block": f"blocks (depth {depth})"}[by]
    if left["rows"]:
        note += f"; not shown: {left['rows']} {what} without FLOPs or bytes ({left['share'] * 100:.1f}% of the step)"
    ax.set_xlabel(f"arithmetic intensity (FLOP / byte)\n{note}")
    ax.set_ylabel("predicted FLOP/s")
    ax.grid(True, which="major", alpha=0.3)
    step_ms = float(report.totals["step_time_s"]) * 1e3
    ax.set_title(title or f"{report.model}: {what} on {hw.name}, predicted step {step_ms:.3g} ms")
    legend = ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    for handle in legend.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([40])
    _label(ax, sorted(points, key=lambda p: -p["share"])[:top])
    if path is not None:
        save(fig, path)
    return fig


def save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".svg":
        path.write_text(_svg_text(fig))
    else:
        fig.savefig(path, dpi=150, format="png")


def _svg_text(fig) -> str:
    import matplotlib
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fxopt"}):  # text stays text
        fig.savefig(buf, format="svg")
    return buf.getvalue()


def roofline_svg(report: GraphReport, **kwargs) -> str:
    """The roofline as SVG text (for embedding in HTML)."""
    return _svg_text(roofline(report, **kwargs))


def roofline_png(report: GraphReport, dpi: int = 150, **kwargs) -> bytes:
    """The roofline as PNG bytes."""
    buf = io.BytesIO()
    roofline(report, **kwargs).savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# Label offsets tried in order (points from the marker); the first that overlaps no earlier label wins.
_OFFSETS = [(7, 4), (7, -11), (-7, 4), (-7, -11), (7, 16), (-7, 16), (7, -23), (-7, -23), (24, 28), (-24, 28),
            (24, -36), (-24, -36), (40, 8), (-40, 8)]


def _label(ax, points: list[dict], fontsize: float = 7.5) -> None:
    """Label the hottest points, each at the first offset whose text box stays inside the plot area
    and overlaps no earlier label (else the one that overlaps least, inside the area if possible).

    Boxes are measured in display pixels after a layout pass: constrained layout moves and resizes
    the axes only when the figure is drawn, so positions taken before it are stale and labels near
    an edge were cut off.
    """
    from matplotlib.font_manager import FontProperties

    fig = ax.figure
    fig.draw_without_rendering()  # settle constrained layout: final axes box and data transform
    renderer = fig.canvas.get_renderer()
    font = FontProperties(size=fontsize)
    px_per_pt = fig.dpi / 72
    area = ax.bbox
    placed: list[tuple] = []
    for p in points:
        text = f"{_short(p['label'])} {p['share'] * 100:.1f}%"
        w, h, _ = renderer.get_text_width_height_descent(text, font, ismath=False)
        h *= 1.2
        px, py = ax.transData.transform((p["ai"], p["flops_per_s"]))
        best = None
        for dx, dy in _OFFSETS:
            x0 = px + dx * px_per_pt - (w if dx < 0 else 0)
            y0 = py + dy * px_per_pt
            box = (x0, y0, x0 + w, y0 + h)
            outside = (max(0.0, area.x0 - box[0]) + max(0.0, box[2] - area.x1) + max(0.0, area.y0 - box[1])
                       + max(0.0, box[3] - area.y1))
            overlap = sum(max(0.0, min(box[2], b[2]) - max(box[0], b[0]))
                          * max(0.0, min(box[3], b[3]) - max(box[1], b[1])) for b in placed)
            key = (outside, overlap)
            if best is None or key < best[0]:
                best = (key, dx, dy, box)
            if key == (0.0, 0.0):
                break
        _, dx, dy, box = best
        placed.append(box)
        far = abs(dx) > 10 or abs(dy) > 20
        ann = ax.annotate(text, (p["ai"], p["flops_per_s"]), xytext=(dx, dy), textcoords="offset points",
                          ha="right" if dx < 0 else "left", va="baseline", fontsize=fontsize, zorder=4,
                          arrowprops=dict(arrowstyle="-", lw=0.5, color="#555555") if far else None)
        ann.set_in_layout(False)  # placed for this layout: labels must not move the axes again


def _geom(lo: float, hi: float, n: int) -> list[float]:
    r = (hi / lo) ** (1 / (n - 1))
    return [lo * r ** i for i in range(n)]


def _short(name: str, n: int = 30) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1):]


def _dtype_key(dtype: str | None) -> str:
    from ..cost_models.hardware import DTYPE_KEYS
    return DTYPE_KEYS.get(dtype or "float32", "fp32")

