"""Markdown tables from a ``benchmarks/gpu_check.py`` results directory (issue 15).

    python benchmarks/gpu_report.py gpu-check-out                              # Markdown to stdout
    python benchmarks/gpu_report.py gpu-check-out --write docs/BENCHMARKS.md   # replace its GPU-check section

Every step appears, with its status; a skipped, failed or timed-out step (or bench variant) says
why. ``--write`` replaces the text between ``<!-- gpu-check:begin -->`` and
``<!-- gpu-check:end -->`` (appended, markers included, when the file has none), so reruns
do not duplicate the section.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
STEP_KEYS = ("1-pytest-gpu", "2-calibrate", "3-bench", "4-predicted", "5-ablate")


class ReportError(Exception):
    """The directory is not a gpu_check results directory, or the target file's markers are broken."""


def _ms(x) -> str:
    return "—" if x is None else f"{x * 1e3:.2f}"


def _pct(x) -> str:
    return "—" if x is None else f"{x * 100:+.0f} %"


def _cell(x) -> str:
    return "—" if x in (None, "") else str(x).replace("|", "\\|").replace("\n", " ")


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]


def load(out: Path) -> tuple[dict, dict]:
    """(meta, {step key: step record}) of a results directory."""
    meta_path = out / "meta.json"
    if not meta_path.exists():
        raise ReportError(f"{out} has no meta.json: not a gpu_check.py results directory "
                          f"(make one with: python benchmarks/gpu_check.py --out {out})")
    meta = json.loads(meta_path.read_text())
    steps = {k: json.loads((out / f"{k}.json").read_text()) for k in STEP_KEYS if (out / f"{k}.json").exists()}
    return meta, steps


def _status(rec: dict | None) -> str:
    if rec is None:
        return "not run"
    status = rec.get("status", "?")
    if status == "running":  # the last record a step wrote before the run itself was stopped
        return "**interrupted**: the run stopped during this step (results so far kept)"
    return status if status == "ok" else f"**{status}**: {rec.get('reason') or 'no reason recorded'}"


def _pytest(r: dict) -> list[str]:
    lines = [f"{r.get('passed', 0)} passed, {r.get('failed', 0)} failed, {r.get('skipped', 0)} skipped "
             f"(pytest exit {r.get('returncode', '?')})."]
    if r.get("failures"):
        lines += [""] + _table(["failed test", "message"], [[f["test"], f["message"]] for f in r["failures"]])
    return lines


def _calibrate(r: dict) -> list[str]:
    """The fitted kernel-time parameters (cost_models/kernels.py) and the fit's in-sample error."""
    bw, km = r.get("memory_bandwidth"), r.get("kernel_model") or {}
    lines = [f"Profile `{r.get('profile')}` ({_cell(r.get('source'))}): peak bandwidth "
             f"{'—' if bw is None else f'{bw / 1e9:,.1f} GB/s'}; host dispatch "
             f"{_cell(km.get('host', {}).get('fwd'))} s per op.", ""]
    matrix = km.get("matrix") or {}
    if matrix:
        keys = ["eff", "k_half", "reuse", "latency_s", "reduce_bw"]
        lines += _table(["regime"] + keys, [[reg] + [f"{p.get(k, float('nan')):.4g}" for k in keys]
                                            for reg, p in matrix.items()]) + [""]
    eff = (km.get("memory") or {}).get("efficiency") or {}
    if eff:
        lines += _table(["memory-bound class"] + list(eff), [["share of bandwidth"] + [f"{v:.3f}" for v in eff.values()]])
    if r.get("fit_mape"):
        lines += ["", "Fit error (in-sample MAPE): " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in r["fit_mape"].items())]
    return lines


def _bench(r: dict) -> list[str]:
    lines = [f"Batch {r.get('batch')}, one training step (forward, loss, backward, SGD momentum), median of "
             f"{r.get('steps')} steps after {r.get('warmup')} warm-up; first step = build (capture, passes, "
             f"compile) + one step; MFU vs the dense bf16 peak.", ""]
    if r.get("stopped"):
        lines += [f"**Stopped early**: {r['stopped']}", ""]
    for m in r.get("models", []):
        lines.append(f"#### {m['model']}")
        lines.append("")
        if m.get("markdown"):
            lines += [m["markdown"], ""]
        if m.get("error"):
            lines += [f"not run: {m['error']}", ""]
        if m.get("skipped"):
            lines += [f"- {v}: not run ({why})" for v, why in m["skipped"].items()] + [""]
    return lines


def _predicted(r: dict) -> list[str]:
    lines = [f"Whole training step predicted by fxopt's cost model with the `{r.get('preset')}` preset and with "
             f"the fresh profile `{r.get('profile') or '— (none)'}`, against step 3's measured median; "
             f"error = (predicted - measured) / measured.", ""]
    rows = []
    for row in r.get("rows", []):
        p, e = row.get("predicted_s") or {}, row.get("rel_err") or {}
        rows.append([row["model"], row["variant"], _ms(row.get("measured_s")), _ms(p.get("preset")),
                     _pct(e.get("preset")), _ms(p.get("profile")), _pct(e.get("profile")),
                     row.get("note") or row.get("how")])
    lines += _table(["model", "variant", "measured ms", "predicted ms (preset)", "error", "predicted ms (profile)",
                     "error", "prediction / note"], rows)
    sp = r.get("spearman") or {}
    if sp.get("error"):
        lines += ["", f"Per-node Spearman ({sp.get('model')}): failed: {sp['error']}"]
    elif sp:
        rho = sp.get("spearman", {})
        lines += ["", f"Per-node Spearman rank correlation of predicted and measured time (`fxopt.profile`, "
                      f"{sp['model']}, batch {sp['batch']}, fp32, {sp['nodes']} nodes): preset "
                      f"{rho.get('preset', float('nan')):.3f}, fresh profile "
                      f"{rho.get('profile', float('nan')):.3f}. Measured step {_ms(sp.get('measured_step_s'))} ms; "
                      "worst predicted nodes: " + ", ".join(
                          f"{w['node']} ({_ms(w['predicted_s'])} vs {_ms(w['measured_s'])} ms)"
                          for w in sp.get("worst", []))]
    lines += [f"- {n}" for n in r.get("notes", [])]
    return lines


def _ablate(r: dict, out: Path, doc: Path | None) -> list[str]:
    lines = [f"{r.get('model')}, batch {r.get('batch')}, {r.get('steps')} steps x {r.get('seeds')} seeds; "
             f"data `{r.get('data')}`.", ""]
    if r.get("markdown"):
        lines += [r["markdown"]]
    if r.get("plot"):
        where = os.path.relpath(out / r["plot"], doc.parent) if doc else str(out / r["plot"])
        lines += ["", f"![ablation]({where})"]
    return lines


RENDER = {"1-pytest-gpu": ("1. `pytest -m gpu`", _pytest), "2-calibrate": ("2. Calibration, quick grid", _calibrate),
          "3-bench": ("3. Training step", _bench), "4-predicted": ("4. Predicted vs measured", _predicted),
          "5-ablate": ("5. Convergence ablation", None)}


def render(out: Path, doc: Path | None = None) -> str:
    """The Markdown section (markers included) for results directory ``out``."""
    meta, steps = load(out)
    smoke = meta.get("cpu_smoke")
    lines = [BEGIN, f"## GPU check: {meta.get('device')}, {str(meta.get('date', ''))[:10]}", "",
             "Generated by `benchmarks/gpu_report.py` from the results of `benchmarks/gpu_check.py` (issue 15)."
             + (" **CPU smoke run: the numbers only show that the mechanics work.**" if smoke else ""), ""]
    lines += _table(["device", "driver", "CUDA", "torch", "triton", "timm", "torchvision", "date", "git"],
                    [[meta.get(k) for k in ("device", "driver", "cuda", "torch", "triton", "timm", "torchvision",
                                            "date", "git")]])
    lines += ["", f"Command: `{meta.get('command')}`; budget {meta.get('budget_s', 0):.0f} s, wall "
                  f"{meta.get('wall_s', 0):.0f} s. Estimates are predictions for an H100/H200 written before any "
                  "GPU run (`ESTIMATES_S` in gpu_check.py).", ""]
    summary = meta.get("steps", {})
    lines += _table(["step", "status", "wall s", "estimate s (H100/H200)", "allotted s"],
                    [[k, _status(steps.get(k)), summary.get(k, {}).get("wall_s"),
                      (meta.get("estimates_s") or {}).get(k, {}).get("gpu"), _fmt_s(summary.get(k, {}).get("allot_s"))]
                     for k in STEP_KEYS])
    for key in STEP_KEYS:
        title, fn = RENDER[key]
        rec = steps.get(key)
        lines += ["", f"### {title}", ""]
        if rec is None or (rec.get("status") != "ok" and not rec.get("result")):
            lines.append(f"Not measured: {_status(rec)}.")
            continue
        if rec.get("status") != "ok":
            lines += [f"Partial: {_status(rec)}.", ""]
        result = rec.get("result") or {}
        lines += _ablate(result, out, doc) if key == "5-ablate" else fn(result)
    lines.append(END)
    return "\n".join(lines) + "\n"


def _fmt_s(x) -> str:
    return "—" if x is None else f"{x:.0f}"


def write_section(doc: Path, section: str) -> None:
    """Replace the delimited section of ``doc`` (or append it)."""
    text = doc.read_text() if doc.exists() else ""
    begin, end = text.find(BEGIN), text.find(END)
    if (begin < 0) != (end < 0) or end < begin:
        raise ReportError(f"{doc}: one of {BEGIN} / {END} is missing or they are out of order; fix the markers")
    if begin < 0:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section
    else:
        text = text[:begin] + section.rstrip("\n") + text[end + len(END):]
    doc.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the gpu_check.py results directory")
    p.add_argument("--write", type=Path, default=None, help="replace the gpu-check section of this Markdown file")
    args = p.parse_args(argv)
    try:
        section = render(args.out, args.write)
        if args.write:
            write_section(args.write, section)
            print(f"wrote the gpu-check section of {args.write}")
        else:
            print(section, end="")
    except ReportError as exc:
        print(f"gpu_report.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
