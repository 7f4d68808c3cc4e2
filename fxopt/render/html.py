"""One self-contained HTML file for a training step's cost: summary, hottest blocks and nodes,
lints (when ``fxopt.lint`` exists), the roofline (inline SVG), and, when given, pass-by-pass cost
deltas of an optimized model, scaling formulas and a sweep table.

No external resources: inline CSS, inline SVG, the report's totals as JSON in a ``<script
type="application/json" id="fxopt-data">`` block for tools. Open it in any browser, attach it to a
review, archive it with a run.
"""
from __future__ import annotations

import html
import importlib
import json
import re
import time
from pathlib import Path

from ..errors import AnalysisError
from ..report import GraphReport, _jsonable

__all__ = ["html_report"]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d232a;
  background:#f6f7f9;margin:0}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid #d9dde3}
.sub{color:#5b6470;margin:0 0 18px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
.card{background:#fff;border:1px solid #e0e4ea;border-radius:8px;padding:10px 12px}
.card .k{color:#5b6470;font-size:12px;text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:20px;font-weight:600;margin-top:2px}.card .n{color:#5b6470;font-size:12px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #e0e4ea;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid #eceff3;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600;white-space:nowrap}tr:nth-child(even) td{background:#fafbfc}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.src{color:#5b6470;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;overflow-wrap:anywhere}
td.text{overflow-wrap:anywhere;min-width:160px}.scroll{overflow-x:auto}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre{background:#fff;border:1px solid #e0e4ea;border-radius:6px;padding:10px;overflow-x:auto}
.bar{position:relative;height:10px;min-width:90px;background:#eef1f5;border-radius:3px}
.bar span{position:absolute;left:0;top:0;bottom:0;border-radius:3px}
.b{display:inline-block;padding:0 6px;border-radius:9px;font-size:12px;color:#fff}
.compute{background:#d62728}.memory{background:#1f77b4}.launch{background:#8c8c8c}.none{background:#bbb}
.stack{display:flex;height:22px;border-radius:5px;overflow:hidden;border:1px solid #e0e4ea;margin:6px 0 2px}
.stack div{color:#fff;font-size:12px;line-height:22px;padding-left:6px;white-space:nowrap;overflow:hidden}
.plot{background:#fff;border:1px solid #e0e4ea;border-radius:8px;padding:8px;text-align:center}
.plot svg{width:100%;max-width:1100px;height:auto}
.good{color:#1a7f37}.bad{color:#b42318}.muted{color:#5b6470}
details{margin:6px 0}summary{cursor:pointer}
footer{color:#5b6470;font-size:12px;margin-top:36px}
"""

BOUND_COLOR = {"compute": "#d62728", "memory": "#1f77b4", "launch": "#8c8c8c"}


def _e(x) -> str:
    return html.escape(str(x))


def _ms(t) -> str:
    return "-" if t is None else f"{float(t) * 1e3:.3f}"


def _g(x, scale=1e-9) -> str:
    v = float(x) * scale
    return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset(), raw: set[int] = frozenset(),
           cls: dict | None = None) -> str:
    """An HTML table; cells are escaped unless their column is in ``raw``."""
    cls = cls or {}
    th = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                 for i, h in enumerate(headers))
    body = []
    for row in rows:
        tds = []
        for i, v in enumerate(row):
            c = "num" if i in numeric else cls.get(i, "")
            attr = f' class="{c}"' if c else ""
            tds.append(f"<td{attr}>{v if i in raw else _e(v)}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<div class=\"scroll\"><table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


_SOURCE = re.compile(r"^(.*?):(\d+): (.*)$", re.S)


def _source(source: str) -> str:
    """``/long/path/file.py:12: y = x / 2`` -> ``file.py:12: y = x / 2``: the path shortened, the code whole."""
    m = _SOURCE.match(str(source or ""))
    if not m:
        return str(source or "")
    path, line, code = m.groups()
    return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line}: {code}"


def _bar(share: float, color: str = "#4c78a8") -> str:
    pct = max(0.0, min(100.0, float(share) * 100))
    return f'<div class="bar" title="{pct:.1f}%"><span style="width:{pct:.1f}%;background:{color}"></span></div>'


def _badge(bound: str) -> str:
    return f'<span class="b {_e(bound) if bound in BOUND_COLOR else "none"}">{_e(bound)}</span>'


# ---------------------------------------------------------------------------------------------
# sections


def _summary(report: GraphReport) -> str:
    t = report.totals
    cards = [
        ("predicted step", f"{_ms(t['step_time_s'])} ms", f"on {report.hardware.name}"),
        ("MFU", f"{float(t['mfu']) * 100:.3g} %", "matrix FLOPs / (step x bf16 peak)"),
        ("parameters", f"{t['params'] / 1e6:,.2f} M", "trainable"),
        ("matrix FLOPs", f"{_g(t['matrix_flops_fwd'] + t['matrix_flops_bwd'])} G",
         f"fwd {_g(t['matrix_flops_fwd'])} G, bwd {_g(t['matrix_flops_bwd'])} G"),
        ("other FLOPs", f"{_g(t['other_flops_fwd'] + t['other_flops_bwd'])} G",
         f"optimizer {_g(t['optimizer_flops'])} G"),
        ("bytes moved", f"{_g(t['bytes'])} GB", f"{t['kernels']:,} kernels"),
        ("activations saved", f"{_g(t['activation_bytes'])} GB", "for backward"),
        ("unknown ops", f"{t['unknown_ops']}", ", ".join(report.unknown_ops) or "every op has a formula"),
    ]
    html_cards = "".join(f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div>'
                         f'<div class="n">{_e(n)}</div></div>' for k, v, n in cards)
    # time by bound (per node: the term that holds most of each node's time)
    by_bound: dict[str, float] = {}
    for r in report.rows("node"):
        by_bound[r["bound"]] = by_bound.get(r["bound"], 0.0) + float(r["share"])
    stack = "".join(f'<div style="width:{s * 100:.2f}%;background:{BOUND_COLOR.get(b, "#bbb")}" '
                    f'title="{_e(b)} {s * 100:.1f}%">{_e(b)} {s * 100:.0f}%</div>'
                    for b, s in sorted(by_bound.items(), key=lambda kv: -kv[1]) if s > 0)
    return (f'<section id="summary"><h2>Summary</h2><div class="cards">{html_cards}</div>'
            f'<p class="muted" style="margin:14px 0 0">Step time by what bounds each node:</p>'
            f'<div class="stack">{stack}</div></section>')


def _blocks(report: GraphReport, top: int, depth: int) -> str:
    rows = report.rows("block", depth)
    body = [[r["block"], _g(r["fwd_flops"]), _g(r["bwd_flops"]), _g(r["bytes"], 1e-6), f"{float(r['ai']):,.3g}",
             r["kernels"], _ms(r["time_s"]), _badge(r["bound"]), f"{float(r['share']) * 100:.1f}",
             _bar(r["share"], BOUND_COLOR.get(r["bound"], "#4c78a8"))] for r in rows[:top]]
    head = ["block", "fwd GFLOP", "bwd GFLOP", "MB", "FLOP/B", "kernels", "time ms", "bound", "share %", ""]
    return (f'<section id="blocks"><h2>Hottest blocks (module path depth {depth})</h2>'
            + _table(head, body, numeric={1, 2, 3, 4, 5, 6, 8}, raw={7, 9}) + "</section>")


def _nodes(report: GraphReport, top: int) -> str:
    rows = report.rows("node")
    body = [[r["node"], r["op"], r["op_class"], r["module"] or "(root)", _g(r["fwd_flops"] + r["bwd_flops"]),
             _g(r["bytes"], 1e-6), f"{float(r['ai']):,.3g}", _ms(r["time_s"]), _badge(r["bound"]),
             f"{float(r['share']) * 100:.1f}", _source(r["source"])] for r in rows[:top]]
    head = ["node", "op", "class", "module", "GFLOP", "MB", "FLOP/B", "time ms", "bound", "share %", "source"]
    return (f'<section id="nodes"><h2>Hottest nodes</h2>'
            + _table(head, body, numeric={4, 5, 6, 7, 9}, raw={8}, cls={10: "src"}) + "</section>")


def _roofline(report: GraphReport, by: str, depth: int) -> str:
    from .plots import PlotError, roofline_svg
    try:
        svg = roofline_svg(report, by=by, depth=depth)
    except PlotError as exc:
        return f'<section id="roofline"><h2>Roofline</h2><p class="muted">{_e(exc)}</p></section>'
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG
    return (f'<section id="roofline"><h2>Roofline</h2><div class="plot">{svg}</div>'
            f'<p class="muted">Each {"node" if by == "node" else by} at (FLOPs / bytes, FLOPs / predicted time); '
            f"area = share of the step; solid roofs are datasheet peaks, dashed ones include the preset's "
            f"measured efficiencies.</p></section>")


MEM_COLOR = {"weights": "#7f7f7f", "grads": "#bcbd22", "optimizer_state": "#9467bd", "comm_buffers": "#8c564b",
             "inputs": "#17becf", "activations": "#ff7f0e", "transient": "#f4a6a6"}
PHASE_BAND = {"fwd": "#eef5ff", "bwd": "#fff4e8", "opt": "#f1ecf8"}
_W, _LEFT, _RIGHT = 1100, 92, 16


def _axis(end_s: float, y: float, height: float) -> str:
    """Time ticks (ms) along the bottom of a plot area."""
    if end_s <= 0:
        return ""
    span = end_s * 1e3
    step = 10 ** int(f"{span / 6:e}".split("e")[1])
    for m in (1, 2, 5, 10):
        if span / (step * m) <= 8:
            step *= m
            break
    out, t = [], 0.0
    scale = (_W - _LEFT - _RIGHT) / span
    while t <= span * 1.0001:
        x = _LEFT + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{y - height:.1f}" x2="{x:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
                   f'<text x="{x:.1f}" y="{y + 13:.1f}" font-size="11" text-anchor="middle" fill="#5b6470">'
                   f"{t:g}</text>")
        t += step
    out.append(f'<text x="{_W - _RIGHT}" y="{y + 27:.1f}" font-size="11" text-anchor="end" fill="#5b6470">'
               f"ms into the step</text>")
    return "".join(out)


def timeline_svg(tl) -> str:
    """Inline SVG of a Timeline: one lane per track, one rect per slice (hover: what and how long)."""
    tracks = tl.tracks()
    lane, top = 22, 6
    end = tl.end_s or 1.0
    scale = (_W - _LEFT - _RIGHT) / end
    h = top + lane * len(tracks) + 34
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {h}" role="img" '
             f'aria-label="{_e(tl.title)}">', _axis(end, top + lane * len(tracks), lane * len(tracks))]
    for i, track in enumerate(tracks):
        y = top + i * lane
        parts.append(f'<text x="{_LEFT - 6}" y="{y + lane / 2 + 4:.1f}" font-size="12" text-anchor="end">'
                     f"{_e(track)}</text>")
    for s in tl.slices:
        y = top + tracks.index(s.track) * lane + 2
        a = s.args
        color = BOUND_COLOR.get(a.get("bound"), "#4c78a8")
        tip = (f"{s.name}\n{s.dur_s * 1e3:.4g} ms at {s.start_s * 1e3:.4g} ms"
               + (f"\nop {a['op']}, {a.get('kernels', 0)} kernels, {a.get('bound', '')}-bound" if a.get("op") else "")
               + (f"\n{_source(a['source'])}" if a.get("source") else ""))
        parts.append(f'<rect x="{_LEFT + s.start_s * scale:.2f}" y="{y}" width="{max(s.dur_s * scale, 0.6):.2f}" '
                     f'height="{lane - 4}" fill="{color}" fill-opacity="0.8" stroke="#fff" stroke-width="0.3">'
                     f"<title>{_e(tip)}</title></rect>")
    parts.append("</svg>")
    return "".join(parts)


def memory_svg(curve) -> str:
    """Inline SVG of a MemoryCurve: stacked components over the step, the peak, the device's memory."""
    from ..study.memory import COMPONENTS, GB
    pts = curve.points
    end = pts[-1].t_s if pts else 1.0
    peak = curve.peak
    cap = curve.capacity_bytes
    show_cap = bool(cap) and cap <= 1.6 * peak.total
    top_v = max(peak.total, cap if show_cap else 0) * 1.08 or 1.0
    ph, top = 260, 8
    xs = lambda t: _LEFT + t / end * (_W - _LEFT - _RIGHT)
    ys = lambda v: top + ph - v / top_v * ph
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {top + ph + 34}" role="img" '
             f'aria-label="predicted memory over the step">']
    prev_t, start = 0.0, 0.0
    for i, p in enumerate(pts):  # phase bands
        if i + 1 == len(pts) or pts[i + 1].phase != p.phase:
            parts.append(f'<rect x="{xs(start):.1f}" y="{top}" width="{xs(p.t_s) - xs(start):.1f}" height="{ph}" '
                         f'fill="{PHASE_BAND.get(p.phase, "#fafafa")}"><title>{_e(p.phase)}</title></rect>')
            start = p.t_s
    parts.append(_axis(end, top + ph, ph))
    for g in range(5):
        v = top_v * g / 4
        parts.append(f'<text x="{_LEFT - 6}" y="{ys(v) + 4:.1f}" font-size="11" text-anchor="end" fill="#5b6470">'
                     f"{v / GB:.3g} GB</text>")
    base = [0.0] * len(pts)
    for comp in COMPONENTS:
        vals = [p.bytes[comp] for p in pts]
        if not any(vals):
            continue
        upper = [b + v for b, v in zip(base, vals)]
        fwd, back = [], []
        prev_t = 0.0
        for t, lo_v, hi_v in zip([p.t_s for p in pts], base, upper):  # steps: a value holds over its slice
            fwd += [(xs(prev_t), ys(hi_v)), (xs(t), ys(hi_v))]
            back += [(xs(prev_t), ys(lo_v)), (xs(t), ys(lo_v))]
            prev_t = t
        poly = " ".join(f"{x:.1f},{y:.1f}" for x, y in fwd + back[::-1])
        parts.append(f'<polygon points="{poly}" fill="{MEM_COLOR[comp]}" fill-opacity="0.85">'
                     f"<title>{_e(comp)}: peak {max(vals) / GB:.4g} GB, {peak.bytes[comp] / GB:.4g} GB at the peak"
                     f"</title></polygon>")
        base = upper
    x = xs(peak.t_s)
    parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#1d232a" stroke-dasharray="3,3">'
                 f"<title>peak {peak.total / GB:.4g} GB at {_e(peak.node)} ({_e(peak.phase)})</title></line>")
    if show_cap:
        y = ys(cap)
        parts.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_W - _RIGHT}" y2="{y:.1f}" stroke="#b42318" '
                     f'stroke-width="1.5">'
                     f"<title>{_e(curve.hardware)} memory {cap / GB:.4g} GB</title></line>"
                     f'<text x="{_W - _RIGHT - 4}" y="{y - 4:.1f}" font-size="11" text-anchor="end" fill="#b42318">'
                     f"{_e(curve.hardware)} {cap / GB:.3g} GB</text>")
    parts.append("</svg>")
    return "".join(parts)


def _timeline_section(report: GraphReport) -> str:
    from .timeline import predicted_timeline
    tl = predicted_timeline(report)
    legend = " ".join(f'<span class="b {k}">{k}-bound</span>' for k in BOUND_COLOR)
    return (f'<section id="timeline"><h2>Predicted timeline of one step</h2><div class="plot">{timeline_svg(tl)}</div>'
            f'<p class="muted">Each node\'s forward and backward calls end to end as the device would run them if '
            f"the host kept up; colour: what bounds the slice {legend}. Hover for node, module and source. "
            f"<code>fxopt report MODEL --trace step.json</code> writes it for Perfetto / chrome://tracing.</p>"
            f"</section>")


def _memory_section(report: GraphReport) -> str:
    from ..study.memory import COMPONENTS, memory_curve
    try:
        curve = memory_curve(report)
    except AnalysisError as exc:
        return f'<section id="memory"><h2>Predicted memory</h2><p class="muted">{_e(exc)}</p></section>'
    cls = "good" if curve.fits else "bad" if curve.fits is False else "muted"
    legend = " ".join(f'<span class="b" style="background:{MEM_COLOR[c]}">{_e(c)}</span>' for c in COMPONENTS)
    options = ""
    if curve.options:
        rows = [[o.change, f"{o.saves_bytes / 1e9:.3g}", o.cost, "yes" if o.fits else "no"] for o in curve.options]
        options = "<p>Ways to fit, cheapest first:</p>" + _table(["change", "saves GB", "costs", "fits alone"], rows,
                                                                   numeric={1}, cls={2: "text"})
    notes = "".join(f'<p class="muted">{_e(n)}</p>' for n in curve.notes)
    return (f'<section id="memory"><h2>Predicted memory over the step</h2><p class="{cls}">{_e(curve.verdict())}</p>'
            f'<div class="plot">{memory_svg(curve)}</div><p class="muted">{legend} Bands: forward, backward, '
            f"optimizer. Saved activations rise in the forward and fall as the backward frees them; the allocator's "
            f"cache and fragmentation come on top.</p>{options}{notes}</section>")


def _find_lint(lint, model, inputs, report):
    """A LintReport-like object (has ``to_dict``), an exception to show, or None (no lint section).

    "auto": when ``fxopt.lint`` exists, lint the model (all rules, on the report's hardware) if it is
    given, else the report itself (the rules that need no graph shapes, unless it carries its graph).
    """
    if lint is None:
        return None
    if lint != "auto":
        return lint
    try:
        fn = importlib.import_module("fxopt.study.lint").lint
    except (ImportError, AttributeError):
        return None
    try:
        if model is not None and report.captured is None:
            return fn(model, inputs, hardware=report.hardware, training=report.training)
        return fn(report)
    except Exception as exc:  # a failing lint must not cost the user the whole report
        return exc


def _lint_section(found, step_time_s: float, top: int) -> str:
    if found is None:
        return ""
    if isinstance(found, Exception):
        body = f'<p class="bad">lint failed: {_e(type(found).__name__)}: {_e(found)}</p>'
        return f'<section id="lints"><h2>Lints</h2>{body}</section>'
    data = found.to_dict() if hasattr(found, "to_dict") else {}
    findings = data.get("findings")
    if isinstance(findings, list) and all(isinstance(f, dict) and "rule" in f for f in findings):
        return _findings(findings, data, step_time_s, top)
    items_key = next((k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(i, dict) for i in v)),
                     None)
    if items_key:
        items = data[items_key]
        cols: list[str] = []
        for item in items:
            cols += [k for k in item if k not in cols]
        body = _table(cols, [[_cell(item.get(c, "")) for c in cols] for item in items[:200]])
        return f'<section id="lints"><h2>Lints ({len(items)})</h2>{body}</section>'
    if hasattr(found, "to_markdown"):
        return f'<section id="lints"><h2>Lints</h2><pre>{_e(found.to_markdown())}</pre></section>'
    return f'<section id="lints"><h2>Lints</h2><pre>{_e(json.dumps(data, indent=1, default=str))}</pre></section>'


def _findings(findings: list[dict], data: dict, step_time_s: float, top: int) -> str:
    """fxopt.study.lint's findings: what to change, where, why, and the estimated saving."""
    rows = []
    for i, f in enumerate(findings[:top], 1):
        nodes = list(f.get("nodes") or [])
        where = ", ".join(nodes[:3]) + (f" +{len(nodes) - 3}" if len(nodes) > 3 else "")
        saving = float(f.get("saving_s") or 0.0)
        rows.append([i, f.get("title") or f["rule"], f.get("block", ""), where, f"{saving * 1e3:.3g}",
                     f"{saving / step_time_s * 100:.2g}" if step_time_s else "-", f.get("change", ""),
                     f.get("evidence", ""), _source(f.get("source", ""))])
    head = ["#", "lint", "block", "nodes", "saves ms", "% step", "change", "evidence", "source"]
    skipped = data.get("skipped") or {}
    notes = ['<p class="muted">Estimated savings overlap between findings; they do not add up.']
    if skipped:
        notes.append(" Skipped: " + "; ".join(f"{_e(k)} ({_e(v)})" for k, v in skipped.items()) + ".")
    notes.append("</p>")
    more = (f'<p class="muted">the top {top} by estimated saving; {len(findings) - top} more: fxopt lint MODEL</p>'
            if len(findings) > top else "")
    body = (_table(head, rows, numeric={0, 4, 5}, cls={6: "text", 7: "text", 8: "src"}) if rows
            else '<p class="good">no findings</p>')
    return f'<section id="lints"><h2>Lints ({len(findings)})</h2>{"".join(notes)}{body}{more}</section>'


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _passes(optimized) -> str:
    report = getattr(optimized, "report", optimized)
    records = getattr(report, "records", report)
    if not isinstance(records, (list, tuple)):
        raise AnalysisError("optimized= takes an OptimizedModule, its .report, or a list of pass records")
    rows = []
    details = []
    for i, r in enumerate(records, 1):
        before, after = r.step_time_before_s, r.step_time_after_s
        try:
            delta = float(after) - float(before)
            delta_ms = f'<span class="{"good" if delta < 0 else "bad" if delta > 0 else ""}">{delta * 1e3:+.3f}</span>'
            delta_pct = f"{delta / float(before) * 100:+.1f}" if float(before) else "-"
        except (TypeError, ValueError):
            delta_ms, delta_pct = "-", "-"
        state = "rolled back" if getattr(r, "rolled_back", False) else ("changed" if r.modified else "no change")
        ver = getattr(r, "verification", None)
        verified = "-" if ver is None else ("ok" if ver else "FAILED")
        rows.append([i, r.name, state, f"{getattr(r, 'time_s', 0.0) * 1e3:.1f}", _ms(before), _ms(after), delta_ms,
                     delta_pct, len(r.decisions), verified])
        if r.decisions or getattr(r, "note", ""):
            items = "".join(
                f"<tr><td>{_e(d.node)}</td><td>{_e(d.action)}</td><td>{_e(d.reason)}</td>"
                f'<td class="num">{"-" if d.est_gain_s is None else f"{d.est_gain_s * 1e6:+.1f}"}</td></tr>'
                for d in r.decisions[:300])
            note = f'<p class="muted">{_e(r.note)}</p>' if getattr(r, "note", "") else ""
            more = f'<p class="muted">{len(r.decisions) - 300} more decisions</p>' if len(r.decisions) > 300 else ""
            details.append(f"<details><summary>{i}. {_e(r.name)}: {len(r.decisions)} decisions</summary>{note}"
                           f'<table><thead><tr><th>node</th><th>action</th><th>reason</th><th class="num">'
                           f"est. gain us</th></tr></thead><tbody>{items}</tbody></table>{more}</details>")
    head = ["#", "pass", "status", "pass ms", "step ms before", "step ms after", "delta ms", "delta %", "decisions",
            "verified"]
    total = ""
    if records:
        try:
            b, a = float(records[0].step_time_before_s), float(records[-1].step_time_after_s)
            total = (f'<p>Predicted step: {b * 1e3:.3f} ms &rarr; {a * 1e3:.3f} ms '
                     f"({(a - b) / b * 100:+.1f} %)</p>" if b else "")
        except (TypeError, ValueError):
            pass
    return (f'<section id="passes"><h2>Pass by pass</h2>{total}'
            + _table(head, rows, numeric={0, 3, 4, 5, 6, 7, 8}, raw={6}) + "".join(details) + "</section>")


def _scaling(sc) -> str:
    from ..study.scaling import _short
    totals = [["FLOPs", sc.flops], ["matrix FLOPs", sc.matrix_flops], ["bytes", sc.bytes],
              ["activations saved (bytes)", sc.activation_bytes], ["step time (s), at the example's bounds",
                                                                    _short(sc.time_s_regime)]]
    dims = ", ".join(f"{n} (example {sc.base[n]}, step {sc.step[n]})" for n in sc.symbols)
    blocks = [[b.block, b.flops, b.dominant, f"{b.dominant_share * 100:.1f}", b.leading] for b in sc.blocks]
    return (f'<section id="scaling"><h2>Scaling in {_e(", ".join(sc.symbols))}</h2><p class="muted">{_e(dims)}; '
            f"exact on each dim's lattice, checked at {_e(sc.checked_at)}</p>"
            + _table(["quantity", "formula"], [[k, str(v)] for k, v in totals], cls={1: "src"})
            + "<p></p>" + _table(["block", "FLOPs", "dominant term", "share %", "leading term"], blocks, numeric={3},
                                 cls={1: "src", 2: "src", 4: "src"}) + "</section>")


def _sweep(sw) -> str:
    rows = []
    for r in sw.rows:
        front = " ".join(k for k, f in (("P", r["pareto_params"]), ("F", r["pareto_flops"])) if f)
        line = [*(r[k] for k in sw.grid), f"{r['n_params'] / 1e6:.3g}", f"{r['flops'] / 1e9:,.4g}",
                f"{r['step_time_s'] * 1e3:.4g}", f"{r['throughput']:,.0f}", f"{r['mfu'] * 100:.3g}", f"{r['ai']:.3g}",
                f"{r['activation_bytes'] / 1e9:.3g}"]
        if sw.measured:
            m = r.get("measured_s")
            line.append("-" if m is None else f"{m * 1e3:.4g}")
        rows.append(line + [front])
    head = [*sw.grid, "params M", "GFLOP", "step ms", "samples/s", "MFU %", "FLOP/B", "act GB"]
    head += (["measured ms"] if sw.measured else []) + ["front"]
    n = len(sw.grid)
    return (f'<section id="sweep"><h2>Sweep ({len(sw.rows)} variants)</h2>'
            + _table(head, rows, numeric=set(range(n, len(head) - 1)))
            + '<p class="muted">front: P = no variant is both faster and bigger (params); F = no variant is both '
              "faster and has more FLOPs.</p></section>")


def html_report(report: GraphReport, path: str | Path | None = None, *, optimized=None, lint="auto", model=None,
                inputs=None, scaling=None, sweep=None, explore=None, title: str | None = None, top: int = 15,
                depth: int = 1, plot_by: str = "node") -> str:
    """Render ``report`` (a concrete GraphReport) as one self-contained HTML page; write it to ``path``.

    ``optimized``: an OptimizedModule (or its ``.report``) for pass-by-pass deltas. ``lint``: a
    LintReport, None (no lint section), or "auto": when ``fxopt.lint`` exists, lint ``model`` on
    ``inputs`` if given (all rules), else the report (rules that need no graph). ``scaling`` /
    ``sweep``: a ScalingReport / SweepResult to include. ``explore``: an ExploreResult (its ranked
    architecture candidates).
    """
    if not isinstance(report, GraphReport):
        raise AnalysisError(f"html_report() renders a GraphReport (from fxopt.analyze), got {type(report).__name__}")
    if report.is_symbolic:
        raise AnalysisError("html_report() needs concrete sizes: pass report.at(batch=N)")
    title = title or f"fxopt: {report.model}"
    data = {"schema": "fxopt.html/1", "model": report.model, "inputs": report.inputs,
            "hardware": report.hardware.name, "training": report.training, "totals": _jsonable(report.totals)}
    sections = [_summary(report), _blocks(report, top, depth), _nodes(report, top),
                _lint_section(_find_lint(lint, model, inputs, report), float(report.totals["step_time_s"]), top),
                _roofline(report, plot_by, depth)]
    if report.training:
        sections += [_timeline_section(report), _memory_section(report)]
    if optimized is not None:
        sections.append(_passes(optimized))
    if scaling is not None:
        sections.append(_scaling(scaling))
    if sweep is not None:
        sections.append(_sweep(sweep))
    if explore is not None:
        sections.append(explore.html_section(top))
    mode = "training step" if report.training else "forward"
    blob = json.dumps(data).replace("</", "<\\/")  # raw text inside <script>: only "</" must not appear
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{_e(title)}</h1>
<p class="sub">{_e(report.model)} ({_e(report.inputs)}), {mode} on {_e(report.hardware.name)}
 ({_e(report.hardware.description)})</p>
{''.join(s for s in sections if s)}
<footer>fxopt report, {time.strftime('%Y-%m-%d %H:%M')}. Predicted by the analytical cost model (roofline with
measured efficiencies), not measured.</footer>
</main>
<script type="application/json" id="fxopt-data">{blob}</script>
</body></html>
"""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(doc, encoding="utf-8")
    return doc
