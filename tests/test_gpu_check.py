"""benchmarks/gpu_check.py and gpu_report.py (issue 15): the prepared GPU check, run in its CPU form.

The smoke run is the CI check that the driver works before a GPU is lent: every step's results
land in the directory, skipped steps say why, and the report renders them.
"""
import importlib
import json
import statistics
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402

STEPS = ["1-pytest-gpu", "2-calibrate", "3-bench", "4-predicted", "5-ablate"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    assert gpu_check.main(["--cpu-smoke", "--out", str(out)]) == 0
    return out


def _step(out: Path, key: str) -> dict:
    return json.loads((out / f"{key}.json").read_text())


def test_smoke_run_writes_meta_and_every_step(smoke):
    import torch
    meta = json.loads((smoke / "meta.json").read_text())
    assert meta["cpu_smoke"] is True and meta["torch"] == torch.__version__
    assert "--cpu-smoke" in meta["command"] and meta["date"].startswith("20")
    assert list(meta["steps"]) == STEPS
    statuses = {k: v["status"] for k, v in meta["steps"].items()}
    assert statuses == {"1-pytest-gpu": "skipped", "2-calibrate": "ok", "3-bench": "ok", "4-predicted": "ok",
                        "5-ablate": "ok"}, meta["steps"]
    assert "CUDA" in meta["steps"]["1-pytest-gpu"]["reason"]
    for key in STEPS:
        rec = _step(smoke, key)
        assert rec["status"] == statuses[key] and rec["schema"] == gpu_check.STEP_SCHEMA
        assert (smoke / rec["log"]).exists()
    assert (smoke / "3-bench.log").read_text().count("\n") > 2  # the step's own progress went to its log


def test_smoke_calibration_profile_loads(smoke):
    from fxopt.cost_models.hardware import load_hardware
    rec = _step(smoke, "2-calibrate")["result"]
    hw = load_hardware(str(smoke / rec["profile"]))
    assert hw.memory_bandwidth == pytest.approx(rec["memory_bandwidth"])


def test_smoke_bench_medians_and_skipped_variants(smoke):
    rec = _step(smoke, "3-bench")["result"]
    (model,) = rec["models"]
    results = {r["name"]: r for r in model["bench"]["results"]}
    assert set(results) == {"autocast-cl", "fxopt"}
    for r in results.values():
        assert r["status"] == "ok" and len(r["step_times_s"]) == rec["steps"] == 3
        assert r["median_s"] == pytest.approx(statistics.median(r["step_times_s"]))
    assert set(model["skipped"]) == {"compile", "fxopt-inductor", "fxopt-triton"}
    assert all(why for why in model["skipped"].values())


def test_smoke_predictions_against_the_bench(smoke):
    bench = {r["name"]: r["median_s"] for r in _step(smoke, "3-bench")["result"]["models"][0]["bench"]["results"]}
    rec = _step(smoke, "4-predicted")["result"]
    rows = {r["variant"]: r for r in rec["rows"]}
    assert set(rows) == set(bench)
    for name, row in rows.items():
        assert row["measured_s"] == bench[name]
        assert set(row["predicted_s"]) == {"preset", "profile"}
        for hw, p in row["predicted_s"].items():
            assert p > 0 and row["rel_err"][hw] == pytest.approx((p - bench[name]) / bench[name])
    # the fxopt row predicts the graph fxopt.optimize itself builds and costs with that preset
    import fxopt
    import torch
    from fxopt import zoo
    with torch.device("meta"):
        model, inputs = zoo.build("vit_b16", tiny=True), zoo.example_inputs("vit_b16", 2, tiny=True)
    report = fxopt.optimize(model, inputs, hardware=rec["preset"], verify=False).report
    assert rows["fxopt"]["pipeline"] == report.pipeline
    assert rows["fxopt"]["predicted_s"]["preset"] == pytest.approx(report.step_time_after_s, rel=1e-9)
    sp = rec["spearman"]
    assert "error" not in sp, sp
    assert sp["nodes"] > 5 and len(sp["pairs"]) > 5
    # the recorded correlation, recomputed from the recorded pairs with average ranks counted directly
    # (rank = number below + (number equal + 1) / 2), not with fxopt's sort-based ranking
    pred, meas = (torch.tensor([p[i] for p in sp["pairs"]], dtype=torch.float64) for i in (0, 1))

    def ranks(v):
        below, equal = ((v[None, :] < v[:, None]).sum(1), (v[None, :] == v[:, None]).sum(1))
        return below.double() + (equal.double() + 1) / 2

    rp, rm = ranks(pred), ranks(meas)
    rho = float(torch.corrcoef(torch.stack([rp, rm]))[0, 1])
    assert sp["spearman"]["preset"] == pytest.approx(rho, abs=1e-9)


def test_smoke_ablation(smoke):
    rec = _step(smoke, "5-ablate")["result"]
    assert [v["name"] for v in rec["ablation"]["variants"]] == ["eager-fp32", "fxopt"]
    assert rec["steps"] == rec["ablation"]["steps"] and rec["seeds"] == 1


def test_report_renders_every_step_and_replaces_its_section(smoke, tmp_path):
    text = gpu_report.render(smoke)
    assert text.startswith(gpu_report.BEGIN) and text.rstrip().endswith(gpu_report.END)
    assert "CPU smoke run" in text and "**skipped**: needs CUDA" in text
    for title in ("pytest -m gpu", "Calibration", "Training step", "Predicted vs measured", "Convergence ablation"):
        assert f"{title}" in text and text.count("\n### ") == 5
    assert "compile: not run (cpu smoke" in text and "| autocast-cl |" in text
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nkept above\n")
    for _ in range(2):  # a rerun replaces, never duplicates
        assert gpu_report.main([str(smoke), "--write", str(doc)]) == 0
    written = doc.read_text()
    assert written.count(gpu_report.BEGIN) == 1 and written.count(gpu_report.END) == 1
    assert written.startswith("# Benchmarks\n\nkept above\n")
    doc.write_text(written + "\nkept below\n")
    gpu_report.main([str(smoke), "--write", str(doc)])
    assert doc.read_text().endswith("\nkept below\n") and doc.read_text().count(gpu_report.BEGIN) == 1


def test_report_refuses_what_it_cannot_read(tmp_path, capsys):
    assert gpu_report.main([str(tmp_path)]) == 2
    assert "meta.json" in capsys.readouterr().err
    doc = tmp_path / "doc.md"
    doc.write_text(f"x\n{gpu_report.END}\n{gpu_report.BEGIN}\n")
    with pytest.raises(gpu_report.ReportError, match="markers"):
        gpu_report.write_section(doc, "section")


def test_tiny_budget_skips_later_steps_and_says_why(tmp_path):
    """The CLI, each step in its own process: step 2 fits the 10 s budget, nothing after it does."""
    out, tgz = tmp_path / "gc", tmp_path / "gc.tgz"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--isolate",
                           "--budget-s", "10", "--out", str(out), "--bundle", str(tgz)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("[gpu-check]") == 5  # a progress line per step
    meta = json.loads((out / "meta.json").read_text())
    assert meta["isolated"] is True
    assert meta["steps"]["2-calibrate"]["status"] == "ok", meta["steps"]["2-calibrate"]
    for key in STEPS[2:]:
        rec = _step(out, key)
        assert rec["status"] == "skipped" and rec["reason"].startswith("budget:"), rec
    assert "Not measured: **skipped**: budget" in gpu_report.render(out)
    with tarfile.open(tgz) as tar:  # the one-file copy holds the final state
        names = set(tar.getnames())
        assert {f"gc/{k}.json" for k in STEPS} | {"gc/meta.json", "gc/2-calibrate.profile.json"} <= names
        assert json.load(tar.extractfile("gc/meta.json")) == meta


def test_plan_bench_keeps_later_models_their_reserved_variants():
    est = {"a": (10, {"x": 5, "y": 50}), "b": (10, {"x": 5, "y": 20})}
    plan = [("a", ["x", "y"], 1), ("b", ["x", "y"], 1)]
    # 40 s: a may use 40 - (10 + 5) = 25 s, so only x (15 s); b then has 25 s: x (15), y would need 35
    small = gpu_check.plan_bench(plan, est, 40)
    assert [(p["model"], p["run"]) for p in small] == [("a", ["x"]), ("b", ["x"])]
    assert small[0]["skipped"]["y"].startswith("budget:")
    # 100 s: a takes 65, b the remaining 35 exactly
    assert [p["run"] for p in gpu_check.plan_bench(plan, est, 100)] == [["x", "y"], ["x", "y"]]
    # 12 s: a's own reserved variant does not fit (15 s): nothing runs, each variant says why
    tiny = gpu_check.plan_bench(plan, est, 12)
    assert [p["run"] for p in tiny] == [[], []] and set(tiny[0]["skipped"]) == {"x", "y"}


def test_allot_reserves_later_steps_least_runs():
    steps = [gpu_check.Step("a", "", None, False), gpu_check.Step("b", "", None, True),
             gpu_check.Step("c", "", None, False)]
    est = {"a": (100, 20, 0), "b": (200, 50, 0), "c": (60, 30, 0)}
    # a (fixed): up to 1.5 x 100, but keeps b's 50 and c's 30 -> min(300 - 80, 150) = 150
    assert gpu_check.allot(0, 300, False, steps, est) == 150
    assert gpu_check.allot(0, 150, False, steps, est) == 70      # 150 - 80
    assert gpu_check.allot(0, 19, False, steps, est) is None     # under its least useful run
    # b (elastic): what c's full estimate leaves, at least its own least
    assert gpu_check.allot(1, 200, False, steps, est) == 140
    assert gpu_check.allot(1, 70, False, steps, est) == 50


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="ok"/>'
                   '<testcase classname="t" name="bad"><failure message="boom"/></testcase>'
                   '<testcase classname="t" name="err"><error message="oops"/></testcase>'
                   '<testcase classname="t" name="skip"><skipped/></testcase></testsuite></testsuites>')
    r = gpu_check._junit(xml)
    assert (r["tests"], r["passed"], r["failed"], r["skipped"]) == (4, 1, 2, 1)
    assert [f["test"] for f in r["failures"]] == ["t::bad", "t::err"] and r["failures"][0]["message"] == "boom"


def test_fxopt_imports_from_a_bare_checkout(tmp_path):
    """The GPU machine has only a copy of the tree on PYTHONPATH: without the editable install's
    finder (python -S skips .pth files), _checkout maps fxopt.passes and fxopt.cost_models."""
    site = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path.append({site!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
            "import _checkout; _checkout.install(); import fxopt.passes, fxopt.cost_models.hardware, fxopt.bench; "
            "print(fxopt.passes.__file__, fxopt.cost_models.hardware.__file__)")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    passes_file, hardware_file = proc.stdout.split()
    assert Path(passes_file) == ROOT / "passes" / "__init__.py"
    assert Path(hardware_file) == ROOT / "cost_models" / "hardware.py"


def test_bench_step_replans_and_stops_when_cuda_is_lost(tmp_path, monkeypatch):
    """The GPU form of step 3, with fxopt.bench replaced: a model that fails with a CUDA fault stops the
    step (every later CUDA call in that process would fail too) and the record says why."""
    calls = []

    class Result:
        def __init__(self, variants):
            self.variants = variants

        def table(self):
            return ""

        def to_markdown(self):
            return "title\n| t |"

        def to_dict(self):
            return {"batch": 128, "results": [
                {"name": v, "status": "failed" if v == "fxopt" else "ok",
                 "reason": "RuntimeError: CUDA error: an illegal memory access was encountered" if v == "fxopt" else ""}
                for v in self.variants]}

    def fake_bench(spec, variants, **kw):
        calls.append((spec, list(variants), kw["batch"], kw["steps"]))
        return Result(variants)

    monkeypatch.setattr(importlib.import_module("fxopt.measure.bench"), "bench", fake_bench)
    ctx = gpu_check.Ctx(tmp_path, False, "cpu", 1000.0, "3-bench", tmp_path / "3-bench.log")
    result = gpu_check.step_bench(ctx)
    first_model, first_variants = gpu_check.BENCH_PLAN[0][:2]
    assert calls == [(first_model, first_variants, 128, 20)]  # 1000 s: the first model runs all its variants
    assert [m["model"] for m in result["models"]] == [first_model]
    assert "illegal memory access" in result["stopped"] and "--only 3" in result["stopped"]
    saved = _step(tmp_path, "3-bench")  # written as it went, before the step returned
    assert saved["status"] == "running" and saved["result"]["stopped"] == result["stopped"]
