"""Roofline plot (PNG/SVG) and the self-contained HTML report: content, not pixels."""
import html
import json
import re
import sys
import types

import pytest
import torch
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.errors import AnalysisError, InputError
from fxopt.render.html import html_report
from fxopt.passes.base import Decision
from fxopt.passes.manager import PassRecord
from fxopt.render.plots import PlotError, roofline, roofline_points, roofline_svg
from nets import Scaled  # noqa: E402  (tests/nets.py)


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    with torch.device("meta"):
        model, x = zoo.build("driving", tiny=True), zoo.example_inputs("driving", 4, tiny=True)
    return fxopt.analyze(model, x)


def test_roofline_points_sit_under_the_roofs(report):
    hw = report.hardware
    top_peak = max(list(hw.tensor_flops.values()) + list(hw.vector_flops.values()))
    for by in ("node", "block", "op"):
        points, left = roofline_points(report, by=by, depth=2)
        assert points
        for p in points:
            assert p["ai"] == pytest.approx(p["flops"] / p["bytes"])
            # a predicted time is never faster than the datasheet roofline
            assert p["flops_per_s"] <= min(hw.memory_bandwidth * p["ai"], top_peak) * (1 + 1e-9)
        rows = report.rows(by, 2)
        timed = sum(float(r["share"]) for r in rows if r["time_s"] > 0)
        assert sum(p["share"] for p in points) + left["share"] == pytest.approx(timed)


def test_roofline_png_and_svg(report, tmp_path):
    png, svg = tmp_path / "r.png", tmp_path / "r.svg"
    fig = roofline(report, png, top=5)
    roofline(report, svg, by="block", depth=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    assert "memory roof" in text and "bf16 / fp16 roof" in text and "tf32 roof" in text
    hottest = max(roofline_points(report, "block", 2)[0], key=lambda p: p["share"])
    assert hottest["label"] in text  # the hottest blocks are labelled
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert len(labels) == 5 and all("%" in t for t in labels)


@pytest.fixture(scope="module")
def symbolic():
    return fxopt.analyze(zoo.build("resnet50", tiny=True), zoo.example_inputs("resnet50", 2, tiny=True),
                         dynamic_batch=True)


def test_roofline_refuses_symbolic_and_unknown_formats(report, symbolic, tmp_path):
    sym = symbolic
    with pytest.raises(AnalysisError, match="at\\(batch=N\\)"):
        roofline(sym)
    assert "<svg" in roofline_svg(sym.at(batch=4))
    with pytest.raises(InputError, match=".png or .svg"):
        roofline(report, tmp_path / "r.pdf")


def test_without_matplotlib_a_clear_error_and_a_report_without_plot(report, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotError, match="pip install"):
        roofline(report)
    doc = html_report(report, lint=None)
    roof = doc[doc.index('<section id="roofline">'):doc.index("</section>", doc.index('<section id="roofline">'))]
    assert "pip install" in roof and "<svg" not in roof  # the timeline and memory plots need no matplotlib


def _records():
    return [
        PassRecord("dce", False, {}, [], "", 0.0012, 1.0e-3, 1.0e-3),
        PassRecord("fuse-things", True, {}, [Decision("linear", "fuse", "epilogue <relu> fits cuBLAS", 2.5e-6),
                                             Decision("conv2d_1", "keep", "grouped conv, est 1.3x slower", None)],
                   "", 0.034, 1.0e-3, 0.75e-3),
    ]


def _data(doc: str) -> dict:
    blob = re.search(r'<script type="application/json" id="fxopt-data">(.*?)</script>', doc, re.S).group(1)
    return json.loads(blob)


def test_html_sections_and_numbers(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fxopt.study.lint", None)  # no lint module: no lint section
    path = tmp_path / "report.html"
    doc = html_report(report, path, optimized=types.SimpleNamespace(records=_records()), depth=1, top=8)
    assert path.read_text(encoding="utf-8") == doc
    for section in ("summary", "blocks", "nodes", "roofline", "passes"):
        assert f'<section id="{section}">' in doc
    assert 'id="lints"' not in doc
    t = report.totals
    assert _data(doc)["totals"] == json.loads(json.dumps(fxopt.report._jsonable(t)))
    assert f"{t['step_time_s'] * 1e3:.3f} ms" in doc and f"{t['kernels']:,} kernels" in doc
    # hottest blocks, in order, with their shares
    blocks = report.rows("block", 1)[:8]
    table = doc[doc.index('<section id="blocks">'):doc.index('<section id="nodes">')]
    positions = [table.index(f"<td>{b['block']}</td>") for b in blocks]
    assert positions == sorted(positions)
    for b in blocks:
        assert f"{float(b['share']) * 100:.1f}" in table
    # pass-by-pass deltas
    passes = doc[doc.index('<section id="passes">'):]
    assert "1.000 ms &rarr; 0.750 ms (-25.0 %)" in passes
    assert "-0.250" in passes and "-25.0" in passes and "fuse-things" in passes
    assert "epilogue &lt;relu&gt; fits cuBLAS" in passes and "+2.5" in passes  # escaped, gain in us
    # self-contained: inline SVG, no external resources
    assert "<svg" in doc and "<?xml" not in doc
    assert not re.search(r'(src|href)="(https?:)?//', doc) and "<link" not in doc and "@import" not in doc


def test_html_pass_table_of_a_real_optimize(report):
    opt = fxopt.optimize(Scaled(), (torch.randn(4, 8),), pipeline="dce,normalize", verify=False)
    doc = html_report(report, optimized=opt, lint=None)
    passes = doc[doc.index('<section id="passes">'):]
    for r in opt.report.records:
        assert f"<td>{r.name}</td>" in passes
        assert f"{r.step_time_before_s * 1e3:.3f}" in passes
    assert "changed" in passes and "no change" in passes


def test_html_lint_section_shows_fxopt_lint_findings(monkeypatch):
    from fxopt.study.lint import lint
    torch.manual_seed(0)
    model, x = zoo.build("driving", tiny=True), zoo.example_inputs("driving", 2, tiny=True)
    report = fxopt.analyze(model, x)
    found = lint(model, x)
    assert len(found), "the tiny driving model has findings (hand-written attention, fp32 GEMMs)"
    doc = html_report(report, model=model, inputs=x)
    lints = doc[doc.index('<section id="lints">'):doc.index('<section id="roofline">')]
    assert f"Lints ({len(found)})" in lints
    for f in found.findings[:10]:
        assert html.escape(f.block) in lints and f"{f.saving_s * 1e3:.3g}" in lints
    # without the model, "auto" lints the report itself
    assert '<section id="lints">' in html_report(report)


class OtherLint:
    def to_dict(self):
        return {"items": [{"rule": "r1", "message": "depthwise conv <7x7>"}, {"rule": "r2", "message": "x"}]}


def test_html_lint_section_generic_and_failing(report, monkeypatch):
    lints = html_report(report, lint=OtherLint())
    assert "Lints (2)" in lints and "depthwise conv &lt;7x7&gt;" in lints and "<th>message</th>" in lints
    fake = types.ModuleType("fxopt.study.lint")
    fake.lint = lambda *a, **k: 1 / 0
    monkeypatch.setitem(sys.modules, "fxopt.study.lint", fake)
    assert "lint failed: ZeroDivisionError" in html_report(report)


def test_html_with_scaling_and_sweep(report):
    from fxopt.study.scaling import scaling
    from fxopt.study.sweep import sweep
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    sc = scaling(model, torch.randn(2, 6), dims=("batch",))
    sw = sweep(lambda hidden: nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 3)),
               {"hidden": [4, 8]}, lambda: (torch.randn(2, 6),), progress=False)
    doc = html_report(report, scaling=sc, sweep=sw, lint=None)
    assert '<section id="scaling">' in doc and str(sc.flops) in doc
    sweep_html = doc[doc.index('<section id="sweep">'):]
    assert "Sweep (2 variants)" in sweep_html
    assert f"{sw.rows[1]['step_time_s'] * 1e3:.4g}" in sweep_html


def test_html_refuses_symbolic_reports(symbolic):
    with pytest.raises(AnalysisError, match="concrete"):
        html_report(symbolic)
