"""One prepared GPU check (issue 15): the most measured truth per minute of a briefly lent GPU.

A GPU (an H200) is lent now and then for about 15 minutes in all, so everything fxopt needs to
measure runs from one command, in order of value, each step writing its results into ``--out``
the moment it finishes (a run cut short still leaves everything done so far):

1. ``pytest -m gpu``: fxopt's compiled Triton kernels (forward/backward vs float64) on the device;
2. ``fxopt.calibrate`` quick grid -> a hardware profile JSON for this device;
3. training-step bench (``fxopt.bench``) of the zoo's ResNet-50, ViT-B/16 and ConvNeXt-T at batch
   128 (then torchvision/timm versions where installed): eager autocast bf16 + channels-last,
   ``torch.compile`` (autocast + CL, warm-up timed), fxopt default, fxopt ``backend="triton"`` and
   ``backend="inductor"``; median of 20 steps, MFU, peak memory, time to first step;
4. predicted vs measured: each benched variant's whole step predicted with the device's preset and
   with step 2's fresh profile; per-node Spearman rank correlation for one model (``fxopt.profile``);
5. a short convergence ablation (``fxopt.ablate``: eager fp32 vs fxopt default) on one model.

A time budget decides what runs: before each step the time left is compared with the step's
estimate (:data:`ESTIMATES_S`, seconds on an H100/H200; estimates, not measurements); what no
longer fits is recorded as skipped, with why. Steps 3 and 5 size themselves to the time they are
given (models and variants by priority, ablation steps). On a GPU each step runs in its own
process with a time limit, so a hang or a CUDA fault in one step costs that step only.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --budget-s 480 --out gpu-check-out   # make gpu-check
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gc      # the same driver on a CPU, tiny models
    python benchmarks/gpu_report.py gpu-check-out --write docs/BENCHMARKS.md

``--out`` gets ``meta.json`` (device, driver, CUDA, torch, triton, timm/torchvision versions,
date, command, budget, each step's status) and per step ``<step>.json`` + ``<step>.log``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: E402  (benchmarks/_checkout.py: fxopt importable from a bare checkout)

_checkout.install()

import torch  # noqa: E402

from _cli import provenance, refuses_cpu  # noqa: E402  (benchmarks/_cli.py)

ROOT = _checkout.ROOT
SCHEMA = "fxopt.gpu_check/1"
STEP_SCHEMA = "fxopt.gpu_check.step/1"

# ---- the estimates (seconds). ESTIMATES, not measurements: no fxopt number has been measured on
# a GPU yet. Sources: DESIGN.md's H100 peer runs (torch.compile warm-ups ResNet-50 55 s,
# ConvNeXt-T 45 s, ViT-B/16 22 s; steps 30-70 ms at batch 128) and CPU timings of the same code.
# Per step: (expected wall on an H100/H200, least useful run, expected wall of the --cpu-smoke form).
ESTIMATES_S = {
    "1-pytest-gpu": (90, 30, 0),     # 11 gpu tests; Triton compiles every generated kernel (no CPU form)
    "2-calibrate": (30, 15, 6),      # quick grid + process start
    "3-bench": (240, 45, 10),        # elastic: models x variants by priority (BENCH_PLAN, BENCH_EST_S)
    "4-predicted": (60, 30, 15),     # predictions on the host CPU in parallel + one fxopt.profile
    "5-ablate": (60, 30, 10),        # elastic: ablation steps scaled to the time given
}
# an isolated step is killed at 1.25 x its allotment + this grace (process start, imports); a --cpu-smoke
# run's estimates are for an idle CPU, and CI's shared CPUs are often far from idle
GRACE_S, SMOKE_GRACE_S = 30, 120
# bench, per model: (build + matrix-FLOP analysis at batch 128, {variant: first step + 3 warm-up + 20 steps})
BENCH_EST_S = {
    "resnet50": (15, {"autocast-cl": 5, "fxopt": 25, "compile": 65, "fxopt-triton": 60, "fxopt-inductor": 75}),
    "vit_b16": (10, {"autocast-cl": 5, "fxopt": 25, "compile": 30, "fxopt-triton": 60, "fxopt-inductor": 45}),
    "convnext_t": (12, {"autocast-cl": 5, "fxopt": 25, "compile": 55, "fxopt-triton": 60, "fxopt-inductor": 65}),
    "torchvision:resnet50": (15, {"autocast-cl": 5, "compile": 65, "fxopt": 25}),
    "timm:vit_base_patch16_224": (10, {"autocast-cl": 5, "compile": 30, "fxopt": 25}),
    "timm:convnext_tiny": (12, {"autocast-cl": 5, "compile": 55, "fxopt": 25}),
}
# what each bench model runs, most valuable first, and how many of its first variants later models
# keep in reserve while earlier ones plan (the zoo models are the baseline; torchvision/timm, where
# installed, get what is left)
BENCH_PLAN = [(model, list(variants), 0 if ":" in model else 2) for model, (_, variants) in BENCH_EST_S.items()]
BENCH_STEPS, BENCH_WARMUP, BENCH_BATCH = 20, 3, 128
# --cpu-smoke: the same driver, tiny ViT, the variants that run on a CPU in seconds
SMOKE_BENCH_PLAN = [("vit_b16", ["autocast-cl", "fxopt"])]
SMOKE_NOT_RUN = {"compile": "cpu smoke: torch.compile's cold start alone is 18-30 s on these CPUs",
                 "fxopt-inductor": "cpu smoke: torch.compile's cold start alone is 18-30 s on these CPUs",
                 "fxopt-triton": "cpu smoke: Triton kernels need CUDA (the CPU interpreter is tested in tests/)"}

# step 4: how each bench variant's step is predicted (pipeline, backend, what the prediction is)
PREDICTORS = {
    "eager-fp32": ("dce", "eager", "the captured graph, fp32"),
    "autocast": ("mixed-precision{dtype=bf16}", "eager",
                 "proxy: fxopt's mixed-precision pass (each weight cast once; autocast casts around each op)"),
    "autocast-cl": ("mixed-precision{dtype=bf16},channels-last", "eager",
                    "proxy: mixed-precision + channels-last passes (each weight cast once; autocast casts "
                    "around each op)"),
    "fxopt": ("default", "eager", "the graph fxopt.optimize builds (preset's decisions, as on the GPU)"),
    "fxopt-triton": ("default", "triton", "the graph fxopt.optimize(backend='triton') builds"),
}
NOT_PREDICTED = {"compile": "Inductor's own fusion is not modelled by fxopt's cost model",
                 "fxopt-inductor": "Inductor's fusion of the final graph is not modelled"}
PREDICT_JOB_EST_S = 10      # one optimize on the meta device + two analyses, batch 128, host CPU
SPEARMAN_MODEL = "resnet50"
PYTEST_TEST_TIMEOUT_S = 120  # per gpu test, where pytest-timeout is installed
# step 5: (model, batch, seeds, steps cap, per-seed setup s, s per step of both variants)
ABLATE = ("resnet50", 64, 2, 300, 15.0, 0.06)
SMOKE_ABLATE = ("vit_b16", 4, 1, 6, 3.0, 0.3)
ABLATE_VARIANTS = ("eager-fp32", "fxopt")   # names in benchmarks/ablate_zoo.py's VARIANTS


# ---- one step's context ---------------------------------------------------------------------------
@dataclass
class Ctx:
    out: Path
    smoke: bool
    device: str
    allot_s: float
    step: str
    log_file: Path
    t0: float = field(default_factory=time.perf_counter)
    result: dict = field(default_factory=dict)

    def log(self, msg: str) -> None:
        with open(self.log_file, "a") as f:
            f.write(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}\n")

    def left_s(self) -> float:
        return self.allot_s - (time.perf_counter() - self.t0)

    def save(self, **result) -> None:
        """Record results so far (a step killed at its time limit keeps them)."""
        self.result.update(result)
        _write_step(self.out, self.step, status="running", result=self.result)

    def read(self, step: str) -> dict | None:
        path = self.out / f"{step}.json"
        return json.loads(path.read_text()) if path.exists() else None


def _write_step(out: Path, step: str, **fields) -> None:
    path = out / f"{step}.json"
    record = json.loads(path.read_text()) if path.exists() else {"schema": STEP_SCHEMA, "step": step}
    record.update(fields, log=f"{step}.log")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)  # atomic: a reader never sees half a file


# ---- step 1: pytest -m gpu ----------------------------------------------------------------------
def step_pytest(ctx: Ctx) -> dict:
    """The gpu-marked tests, in their own process (junit XML -> counts and failures)."""
    xml = ctx.out / "1-pytest-gpu.xml"
    xml.unlink(missing_ok=True)
    # only the files that hold gpu tests (collecting the whole suite costs time), and a file that fails to
    # collect (a package missing there) must not stop the others
    files = sorted(str(f) for f in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    ctx.log(f"gpu tests in: {[Path(f).name for f in files]}")
    argv = ["-v", "-p", "no:cacheprovider", "-m", "gpu", "--continue-on-collection-errors", "--junitxml", str(xml),
            *files]
    if importlib.util.find_spec("pytest_timeout") is not None:  # a hanging test fails alone (installed there)
        argv[:0] = ["--timeout", str(PYTEST_TEST_TIMEOUT_S)]
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import _checkout; _checkout.install(); "
            f"import pytest; sys.exit(pytest.main({argv!r}))")
    try:
        with open(ctx.log_file, "a") as log:
            proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(ctx.left_s(), 10))
    except subprocess.TimeoutExpired:
        ctx.save(**_verbose_results(ctx.log_file))  # no junit XML from a killed run: the -v lines say what finished
        raise RuntimeError(f"pytest did not finish in {ctx.allot_s:.0f} s; the tests that did are recorded") from None
    result = {"returncode": proc.returncode, **_junit(xml)}
    if proc.returncode not in (0, 1):  # 1: tests failed (reported); else pytest itself did not run
        raise RuntimeError(f"pytest exited {proc.returncode} (see 1-pytest-gpu.log); {result}")
    return result


def _verbose_results(log: Path) -> dict:
    """Per-test outcomes from ``pytest -v`` lines (``tests/x.py::test_y PASSED``)."""
    import re
    outcomes = dict(re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", log.read_text(), re.M))
    failed = [t for t, o in outcomes.items() if o in ("FAILED", "ERROR")]
    return {"tests": len(outcomes), "passed": sum(o == "PASSED" for o in outcomes.values()), "failed": len(failed),
            "skipped": sum(o == "SKIPPED" for o in outcomes.values()),
            "failures": [{"test": t, "message": "see 1-pytest-gpu.log"} for t in failed]}


def _junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET
    if not path.exists():
        return {"tests": 0, "failures": [], "note": "no junit XML written"}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                             "message": (bad.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"tests": sum(counts.values()), **counts, "failures": failures}


# ---- step 2: calibrate ---------------------------------------------------------------------------
def step_calibrate(ctx: Ctx) -> dict:
    from fxopt.measure.calibrate import calibrate, summary
    path = ctx.out / "2-calibrate.profile.json"
    path.unlink(missing_ok=True)  # step 4 must not predict with an earlier run's profile
    prof = calibrate(device=ctx.device, quick=True, out=path)
    ctx.log(summary(prof))
    return {"profile": path.name, "name": prof["name"], "source": prof.get("source"),
            "memory_bandwidth": prof.get("memory_bandwidth"), "kernel_model": prof.get("kernel_model"),
            "fit_mape": prof.get("measured", {}).get("fit_mape"), "nhwc_speedup": prof.get("nhwc_speedup")}


# ---- step 3: bench -------------------------------------------------------------------------------
def plan_bench(plan: list, est: dict, budget_s: float) -> list[dict]:
    """Which variants of which models fit ``budget_s``: each model its build plus its variants in
    priority order while they fit, keeping every later model's reserved first variants in reserve."""
    def floor(model, variants, reserved):  # what a model needs at the least
        build, costs = est[model]
        return build + sum(costs[v] for v in variants[:reserved]) if reserved else 0

    out, left = [], budget_s
    for i, (model, variants, reserved) in enumerate(plan):
        build, costs = est[model]
        room = max(left - sum(floor(*p) for p in plan[i + 1:]), min(left, floor(model, variants, reserved)))
        run, skipped, used = [], {}, build
        for v in variants:
            if used + costs[v] <= room:
                run.append(v)
                used += costs[v]
            else:
                skipped[v] = f"budget: ~{costs[v]:.0f} s more does not fit the {max(room - used, 0):.0f} s left for it"
        out.append({"model": model, "run": run, "skipped": skipped, "est_s": used if run else 0})
        left -= used if run else 0
    return out


def step_bench(ctx: Ctx) -> dict:
    from fxopt.measure.bench import bench
    if ctx.smoke:
        plan = [{"model": m, "run": v, "skipped": dict(SMOKE_NOT_RUN)} for m, v in SMOKE_BENCH_PLAN]
        steps, warmup, batch = 3, 1, 2
    else:
        plan = plan_bench(BENCH_PLAN, BENCH_EST_S, ctx.allot_s)
        steps, warmup, batch = BENCH_STEPS, BENCH_WARMUP, BENCH_BATCH
    ctx.save(plan=plan, steps=steps, warmup=warmup, batch=batch, models=[])
    models = []
    for i, entry in enumerate(plan):
        if not ctx.smoke:  # re-planned with the time really left: a fast model leaves more for the next
            entry = plan_bench(BENCH_PLAN[i:], BENCH_EST_S, ctx.left_s())[0]
        record = {"model": entry["model"], "skipped": dict(entry["skipped"])}
        if entry["run"]:
            t = time.perf_counter()
            try:
                res = bench(entry["model"], variants=entry["run"], steps=steps, warmup=warmup, device=ctx.device,
                            batch=batch, tiny=ctx.smoke, log=ctx.log)
                ctx.log(res.table())
                title, _, table = res.to_markdown().partition("\n")
                record.update(bench=res.to_dict(), markdown=f"{title}\n\n{table}")
            except Exception as exc:  # timm/torchvision missing, a model that does not build: recorded
                record["error"] = f"{type(exc).__name__}: {exc}"
                ctx.log(f"{entry['model']}: {record['error']}")
            record["wall_s"] = time.perf_counter() - t
        models.append(record)
        ctx.save(models=models)
        lost = _cuda_lost(record)
        if lost:  # every later CUDA call in this process fails too: stop, leave the time to steps 4-5
            ctx.save(stopped=f"CUDA context lost ({lost}); the models after {entry['model']} were not run "
                             f"(rerun them in a fresh process: --only 3)")
            break
    return ctx.result


CUDA_LOST = ("illegal memory access", "CUDA error", "device-side assert", "unspecified launch failure")


def _cuda_lost(record: dict) -> str | None:
    """The first failure reason of a model's bench that leaves the process's CUDA context unusable."""
    reasons = [record.get("error", "")] + [r.get("reason", "") for r in record.get("bench", {}).get("results", [])]
    return next((r for r in reasons if r and any(k in r for k in CUDA_LOST)), None)


# ---- step 4: predicted vs measured --------------------------------------------------------------
def predict_variant(spec: str, variant: str, batch: int, tiny: bool, preset: str, profile: str | None) -> dict:
    """Predicted step of one bench variant: the pipeline fxopt.optimize would run (the preset's
    decisions, as on the GPU) on the meta device, its final graph costed with the preset (the pass
    manager's own figure) and with the fresh profile."""
    from fxopt.analyze import analyze
    from fxopt.measure.bench import resolve_bench_model
    from fxopt.capture import Captured, capture
    from fxopt.passes import PassManager
    from fxopt.passes.default import choose_pipeline
    pipeline, backend, _ = PREDICTORS[variant]
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            name, model, inputs = resolve_bench_model(spec, batch, tiny)
        captured = capture(model.train(), inputs)
        if pipeline == "default":
            pipeline = choose_pipeline(captured.graph_module, True, backend)[0]
        gm, records = PassManager.from_pipeline(pipeline, verify=False, hardware=preset).run(captured)
        final = Captured(gm, captured.example_args, captured.example_kwargs, captured.training,
                         captured.dynamic_batch, name, captured.symbols)
        after = records[-1].step_time_after_s if records else None
        out = {"preset": float(after if after is not None else analyze(final, hardware=preset).totals["step_time_s"])}
        if profile:
            out["profile"] = float(analyze(final, hardware=profile).totals["step_time_s"])
    return {"predicted_s": out, "pipeline": pipeline, "wall_s": time.perf_counter() - t}


def _prediction_jobs(bench: dict | None) -> tuple[list, list, list]:
    """(jobs, rows without a prediction, every row in step 3's order) from step 3's measured variants."""
    jobs, rows, every = [], [], []
    for m in (bench or {}).get("result", {}).get("models", []):
        b = m.get("bench")
        if not b:
            continue
        for r in b["results"]:
            row = {"model": m["model"], "variant": r["name"], "measured_s": r.get("median_s"), "batch": b["batch"]}
            every.append(row)
            if r.get("status") != "ok":
                row["note"] = f"not measured: {r.get('reason', '')}"
                rows.append(row)
            elif r["name"] in PREDICTORS:
                row["how"] = PREDICTORS[r["name"]][2]
                jobs.append(row)
            else:
                row["note"] = NOT_PREDICTED.get(r["name"], "no predictor")
                rows.append(row)
    return jobs, rows, every


def step_predicted(ctx: Ctx) -> dict:
    from fxopt.cost_models.hardware import preset_for_gpu
    gpu = torch.cuda.get_device_name() if ctx.device == "cuda" else ""
    preset = preset_for_gpu(gpu, "h200")  # the lent machine is an H200
    prof_path = ctx.out / "2-calibrate.profile.json"
    profile = str(prof_path) if prof_path.exists() else None
    jobs, rows, _ = _prediction_jobs(ctx.read("3-bench"))
    notes = [] if profile else ["no fresh profile (step 2 did not write one): predicted with the preset only"]
    if not jobs:
        notes.append("no measured variant with a predictor (step 3 did not run or measured none)")
    ctx.save(preset=preset, profile=profile and prof_path.name, rows=rows, notes=notes)
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) // 2, 8))
    # the Spearman profile needs time too: predictions get the rest, by job estimates
    fit = max(1, int((ctx.left_s() - 20) / PREDICT_JOB_EST_S * workers)) if not ctx.smoke else len(jobs)
    for job in jobs[fit:]:
        rows.append({**job, "note": "budget: prediction skipped"})
    jobs = jobs[:fit]
    tiny = ctx.smoke
    args = [(j["model"], j["variant"], j["batch"], tiny, preset, profile) for j in jobs]
    ctx.log(f"{len(jobs)} predictions on {workers} worker(s), preset {preset}, profile {profile}")
    if workers > 1:
        import multiprocessing
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(predict_variant, *a) for a in args]
            outcomes = [_outcome(f.result) for f in futures]
    else:
        outcomes = [_outcome(lambda a=a: predict_variant(*a)) for a in args]
    for job, res in zip(jobs, outcomes):
        row = dict(job)
        if "error" in res:
            row["note"] = f"prediction failed: {res['error']}"
        else:
            row["predicted_s"], row["pipeline"] = res["predicted_s"], res["pipeline"]
            row["rel_err"] = {k: (p - job["measured_s"]) / job["measured_s"] for k, p in res["predicted_s"].items()}
        rows.append(row)
        ctx.log(f"{row['model']} {row['variant']}: {row.get('predicted_s') or row.get('note')} vs measured "
                f"{job['measured_s']}")
    order = [(j["model"], j["variant"]) for j in _prediction_jobs(ctx.read("3-bench"))[2]]
    rows.sort(key=lambda r: order.index((r["model"], r["variant"])))  # step 3's order
    ctx.save(rows=rows)
    ctx.save(spearman=_spearman(ctx, preset, profile))
    return ctx.result


def _outcome(call) -> dict:
    try:
        return call()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}


def _spearman(ctx: Ctx, preset: str, profile: str | None) -> dict:
    """Per-node rank correlation of predicted and measured time (``fxopt.profile``), preset and profile."""
    from fxopt import zoo
    from fxopt.analyze import analyze
    from fxopt.measure.profile import profile as measure, spearman
    name = "vit_b16" if ctx.smoke else SPEARMAN_MODEL
    batch = 2 if ctx.smoke else BENCH_BATCH
    try:
        res = measure(zoo.build(name, tiny=ctx.smoke), zoo.example_inputs(name, batch, tiny=ctx.smoke), steps=3,
                      hardware=preset, device=ctx.device)
        ctx.log(res.table(top=15))
        out = {"model": name + ("-tiny" if ctx.smoke else ""), "batch": batch, "nodes": len(res.rows),
               "measured_step_s": res.measured_step_s, "spearman": {"preset": res.spearman},
               "predicted_step_s": {"preset": res.predicted_step_s},
               "worst": [{k: r[k] for k in ("node", "op", "predicted_s", "measured_s")} for r in res.worst(5)],
               # every node timed both ways: lets a reader (and the tests) recompute the correlation
               "pairs": [[r["predicted_s"], r["measured_s"]] for r in res.rows
                         if r["predicted_s"] > 0 and r["measured_s"] > 0]}
        if profile:
            with torch.device("meta"):
                model, inputs = zoo.build(name, tiny=ctx.smoke), zoo.example_inputs(name, batch, tiny=ctx.smoke)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = analyze(model, inputs, hardware=profile)
            pred = {r["node"]: float(r["time_s"]) for r in report.rows("node")}
            both = [(pred[r["node"]], r["measured_s"]) for r in res.rows
                    if pred.get(r["node"], 0) > 0 and r["measured_s"] > 0]
            out["spearman"]["profile"] = spearman([p for p, _ in both], [m for _, m in both])
            out["predicted_step_s"]["profile"] = float(report.totals["step_time_s"])
        return out
    except Exception as exc:
        ctx.log(traceback.format_exc())
        return {"model": name, "error": f"{type(exc).__name__}: {exc}"}


# ---- step 5: ablation ----------------------------------------------------------------------------
def step_ablate(ctx: Ctx) -> dict:
    from ablate_zoo import VARIANTS  # benchmarks/ablate_zoo.py: the variants docs/ABLATION.md uses

    from fxopt import zoo
    from fxopt.measure.ablate import ablate
    from fxopt.workloads.data import auto_data
    name, batch, seeds, cap, setup_s, step_s = SMOKE_ABLATE if ctx.smoke else ABLATE
    steps = cap if ctx.smoke else int(min(cap, (ctx.left_s() - 10 - seeds * setup_s) / (seeds * step_s)))
    if steps < 50 and not ctx.smoke and seeds > 1:  # one seed with enough steps beats two too short to tell
        seeds = 1
        steps = int(min(cap, (ctx.left_s() - 10 - setup_s) / step_s))
    if steps < (3 if ctx.smoke else 30):
        raise StepSkipped(f"budget: {ctx.left_s():.0f} s leaves fewer than 30 steps")
    model_fn = lambda: zoo.build(name, tiny=ctx.smoke)  # noqa: E731
    shape = zoo.example_inputs(name, 1, tiny=ctx.smoke)[0].shape[1:]
    data = auto_data(model_fn, shape, steps, batch, seed=0, device=ctx.device)
    ctx.save(model=name + ("-tiny" if ctx.smoke else ""), batch=batch, steps=steps, seeds=seeds, data=repr(data))
    ctx.log(f"ablation {name}: batch {batch}, {steps} steps x {seeds} seeds; data {data!r}")
    res = ablate(model_fn, {v: VARIANTS[v] for v in ABLATE_VARIANTS}, data, steps=steps, seeds=seeds,
                 device=ctx.device, optimizer_fn=lambda p: torch.optim.AdamW(p, lr=1e-3), baseline="eager-fp32",
                 progress=False)
    ctx.log(res.table())
    out = {"ablation": res.to_dict(), "markdown": res.to_markdown()}
    try:
        out["plot"] = Path(res.plot(ctx.out / "5-ablate.png")).name
    except Exception as exc:  # matplotlib missing on the GPU machine: the table still stands
        ctx.log(f"no plot: {type(exc).__name__}: {exc}")
    return out


# ---- the driver ----------------------------------------------------------------------------------
class StepSkipped(Exception):
    """A step that decides, once running, that it cannot do anything useful (recorded as skipped)."""


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    run: Callable[[Ctx], dict]
    elastic: bool   # sizes itself to the time given (else: given its estimate plus half)
    cuda_only: str = ""  # why a --cpu-smoke run records it skipped (no CPU form)


STEPS = [Step("1-pytest-gpu", "pytest -m gpu (compiled Triton kernels vs float64)", step_pytest, False,
              cuda_only="needs CUDA: pytest -m gpu runs the compiled Triton kernels (the CPU suite covers "
                        "Triton's interpreter)"),
         Step("2-calibrate", "fxopt calibrate, quick grid", step_calibrate, False),
         Step("3-bench", "training-step bench", step_bench, True),
         Step("4-predicted", "predicted vs measured", step_predicted, False),
         Step("5-ablate", "convergence ablation, eager vs fxopt", step_ablate, True)]


def _est(key: str, smoke: bool, estimates=None) -> tuple[float, float]:
    est, least, smoke_est = (estimates or ESTIMATES_S)[key]
    return (smoke_est, smoke_est) if smoke else (est, least)


def allot(i: int, left_s: float, smoke: bool, steps=STEPS, estimates=None) -> float | None:
    """Seconds step ``i`` gets with ``left_s`` left, or None when it does not fit. Earlier steps come
    first, but each keeps the least useful run of every later step in reserve; a fixed step gets up
    to 1.5x its estimate, an elastic one what the later steps' full estimates leave."""
    est, least = _est(steps[i].key, smoke, estimates)
    if left_s < least:
        return None
    later = [_est(s.key, smoke, estimates) for s in steps[i + 1:]]
    if steps[i].elastic:
        return max(least, left_s - sum(e for e, _ in later))
    return max(least, min(left_s - sum(lo for _, lo in later), 1.5 * est))


def _versions(device: str) -> dict:
    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": dist("triton"),
            "timm": dist("timm"), "torchvision": dist("torchvision"), "python": platform.python_version(),
            "host_cpus": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                    driver=_nvidia_smi("driver_version"))
    else:
        info.update(device=f"CPU {platform.processor() or platform.machine()} (smoke run, not a benchmark)",
                    driver=None)
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except Exception:
        info["git"] = None  # the GPU machine gets a copy of the tree, maybe without .git
    return info


def _nvidia_smi(field_name: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field_name}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def run_in_process(step: Step, ctx: Ctx) -> tuple[str, str, dict]:
    """(status, reason, result) of a step run here."""
    handler = logging.FileHandler(ctx.log_file)
    logging.getLogger("fxopt").addHandler(handler)
    try:
        result = step.run(ctx)
        return "ok", "", {**ctx.result, **result}  # what the step saved on the way, plus its return
    except StepSkipped as exc:
        return "skipped", str(exc), ctx.result
    except Exception as exc:
        ctx.log(traceback.format_exc())
        return "failed", f"{type(exc).__name__}: {str(exc).strip()[:500]}", ctx.result
    finally:
        logging.getLogger("fxopt").removeHandler(handler)


def run_isolated(step: Step, args, allot_s: float, timeout_s: float, log_file: Path) -> tuple[str, str, dict]:
    """The step in a child process with a time limit: a hang or a CUDA fault costs this step only."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step.key, "--out", str(args.out),
           "--allot-s", f"{allot_s:.1f}"] + (["--cpu-smoke"] if args.cpu_smoke else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_file, "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and anything it started (compile workers, pytest)
            proc.wait()
            rc = None
    rec = json.loads((args.out / f"{step.key}.json").read_text()) if (args.out / f"{step.key}.json").exists() else {}
    result = rec.get("result", {})
    if rc is None:
        return "timed-out", f"killed at its time limit ({timeout_s:.0f} s); results so far kept", result
    if rec.get("status") in ("ok", "failed", "skipped"):
        return rec["status"], rec.get("reason", ""), result
    tail = log_file.read_text().strip().splitlines()[-3:] if log_file.exists() else []
    return "failed", f"child process exited {rc} without a result: {' | '.join(tail)[:500]}", result


def bundle(out: Path, path: Path | None) -> None:
    """``out`` as a .tar.gz at ``path`` (written aside, then renamed: never half a file)."""
    if path is None:
        return
    import tarfile
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    tmp.replace(path)


def child_main(args) -> int:
    """Run one step (``--child``) and write its JSON."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    step = next(s for s in STEPS if s.key == args.child)
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    ctx = Ctx(args.out, args.cpu_smoke, device, args.allot_s, step.key, args.out / f"{step.key}.log")
    status, reason, result = run_in_process(step, ctx)
    _write_step(args.out, step.key, status=status, reason=reason, result=result)
    return 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results directory (created)")
    p.add_argument("--budget-s", type=float, default=480, help="wall-time budget for all steps (default 480)")
    p.add_argument("--cpu-smoke", action="store_true", help="the same driver on a CPU with tiny models (< 60 s)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="also keep --out as this .tar.gz, rewritten after every step (one file to bring back "
                        "from a machine that returns few files; a run killed midway leaves its last state)")
    p.add_argument("--hard-limit-s", type=float, default=None,
                   help="no step runs past this many seconds from the start (default: budget + 60; "
                        "--cpu-smoke: budget + 240)")
    p.add_argument("--only", default=None, help="comma-separated step numbers to run (e.g. 3,4); the others' "
                                                 "files in --out are left as they are")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each step in its own process with a time limit (default: on a GPU yes, --cpu-smoke no)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--allot-s", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    args.out = args.out.resolve()
    if args.child:
        return child_main(args)
    if refuses_cpu(args, "gpu_check.py"):
        return 2
    if args.budget_s <= 0:
        print("gpu_check.py: --budget-s must be > 0", file=sys.stderr)
        return 2
    only = None
    if args.only:
        try:
            only = {int(x) for x in args.only.split(",") if x.strip()}
        except ValueError:
            only = set()
        if not only or not only <= set(range(1, len(STEPS) + 1)):
            print(f"gpu_check.py: --only takes step numbers 1-{len(STEPS)}, got {args.only!r}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    isolate = device == "cuda" if args.isolate is None else args.isolate
    _, _, cmd = provenance("gpu_check.py", argv, device == "cuda")
    meta = {"schema": SCHEMA, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": cmd, "budget_s": args.budget_s, "cpu_smoke": args.cpu_smoke, "isolated": isolate,
            **_versions(device), "estimates_s": {k: {"gpu": v[0], "least": v[1], "cpu_smoke": v[2]}
                                                 for k, v in ESTIMATES_S.items()},
            "steps": {}}
    meta_path = args.out / "meta.json"
    if only and meta_path.exists():  # a partial rerun keeps the other steps' records
        meta["steps"] = json.loads(meta_path.read_text()).get("steps", {})
    meta_path.write_text(json.dumps(meta, indent=1))
    bundle(args.out, args.bundle)
    hard_limit = args.hard_limit_s or args.budget_s + 2 * (SMOKE_GRACE_S if args.cpu_smoke else GRACE_S)
    print(f"gpu-check: {meta['device']}, torch {meta['torch']}, budget {args.budget_s:.0f} s -> {args.out}",
          flush=True)
    start = time.perf_counter()
    for i, step in enumerate(STEPS):
        if only and i + 1 not in only:
            continue
        left = args.budget_s - (time.perf_counter() - start)
        given = allot(i, left, args.cpu_smoke)
        est = _est(step.key, args.cpu_smoke)[0]
        log_file = args.out / f"{step.key}.log"
        log_file.write_text(f"{step.title}; {cmd}\n")
        (args.out / f"{step.key}.json").unlink(missing_ok=True)  # a rerun into the same --out never reads stale results
        t = time.perf_counter()
        if args.cpu_smoke and step.cuda_only:
            status, reason, result = "skipped", step.cuda_only, {}
        elif given is None:
            status, reason, result = ("skipped", f"budget: needs ~{_est(step.key, args.cpu_smoke)[1]:.0f} s at "
                                      f"least, {max(left, 0):.0f} s left", {})
        elif isolate:
            grace = SMOKE_GRACE_S if args.cpu_smoke else GRACE_S
            timeout = max(1.0, min(1.25 * given + grace, hard_limit - (time.perf_counter() - start)))
            status, reason, result = run_isolated(step, args, given, timeout, log_file)
        else:
            ctx = Ctx(args.out, args.cpu_smoke, device, given, step.key, log_file)
            status, reason, result = run_in_process(step, ctx)
        wall = time.perf_counter() - t
        _write_step(args.out, step.key, title=step.title, status=status, reason=reason, est_s=est,
                    allot_s=given, wall_s=round(wall, 2), result=result)
        meta["steps"][step.key] = {"title": step.title, "status": status, "reason": reason, "est_s": est,
                                   "allot_s": given, "wall_s": round(wall, 2)}
        meta["wall_s"] = round(time.perf_counter() - start, 2)
        meta_path.write_text(json.dumps(meta, indent=1))
        bundle(args.out, args.bundle)
        left = args.budget_s - (time.perf_counter() - start)
        print(f"[gpu-check] {i + 1}/{len(STEPS)} {step.key}: {status}"
              f"{' (' + reason + ')' if reason else ''} in {wall:.1f} s (est {est:.0f} s); {left:.0f} s of budget "
              f"left", flush=True)
    print(f"gpu-check: done in {time.perf_counter() - start:.0f} s; tables: python benchmarks/gpu_report.py "
          f"{args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
