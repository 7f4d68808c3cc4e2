"""Mutation testing of fxopt's core with cosmic-ray, one shard per module (``make mutation``).

Why: a test suite that passes says little until plausible bugs are shown to fail it. Each core
module is mutated (an operator swapped, a comparison bounded the other way, a constant nudged,
a condition negated, a loop skipped) and its *matching* test files are run against every mutant;
a mutant that passes them survives and needs either a new test or a reason it is equivalent.

How: cosmic-ray edits the module file on disk, so each shard runs in its own snapshot of the
committed tree (``git archive HEAD``), never in the working tree other people are editing. The
snapshot is put first on ``PYTHONPATH`` with ``fxopt/passes`` and ``fxopt/cost_models`` linked to
their top-level folders (the package-dir mapping of pyproject.toml), so the tests import the
mutated copy, not the editable install. Sessions are sqlite files: a shard stopped by its time
budget resumes where it stopped on the next run (incremental mode).

Usage::

    .venv/bin/python tools/mutation.py passes/normalize.py cost_models/ops.py --budget 1800
    .venv/bin/python tools/mutation.py --list
    .venv/bin/python tools/mutation.py --all --budget 3600   # every shard (hours on 2 cores)

Prints one Markdown row per shard (for docs/BENCHMARKS.md) and writes the surviving mutants'
diffs to ``<workdir>/<shard>/survivors.txt``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import io
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: module -> the test files (and -k selections) that test it. Small on purpose: a mutant is run
#: against what should catch it, which keeps a shard to minutes, not hours.
SHARDS: dict[str, list[str]] = {
    "passes/normalize.py": ["tests/test_references_passes.py -k 'div or transpose or vector or dropout or noop'",
                            "tests/test_passes.py -k 'normalize and not each_pass'"],
    "passes/dce.py": ["tests/test_mutation_passes.py -k dce", "tests/test_passes.py -k 'dce and not each_pass'"],
    "passes/rewrite.py": ["tests/test_mutation_rewrite.py",
                          "tests/test_mutation_passes.py tests/test_references_passes.py tests/test_passes.py -k "
                          "'test_dce_ or test_rewrite_ or div or transpose or vector or dropout or noop or normalize'"],
    "passes/fold_bn.py": ["tests/test_mutation_fold_bn.py",
                          "tests/test_fold_bn.py -k 'golden or not_folded or functional_frozen or frozen_in_training "
                          "or tiny_layers or load_state'"],
    "passes/channels_last.py": ["tests/test_mutation_cl.py",
                                "tests/test_mutation_passes.py tests/test_references_passes.py tests/test_channels_last.py "
                                "-k 'test_channels_last_ or stack_converts or depthwise or pointwise_and_tiny or "
                                "forced_golden or written_in_place or costs_are or transposed or bad_input or training_keeps'"],
    "passes/mixed_precision.py": ["tests/test_mutation_mp.py", "tests/test_mutation_passes.py -k mixed_precision",
                                  "tests/test_references_passes.py -k 'policy or threshold or reduc or follow or pow or keep_fp32 or outputs_keep'",
                                  "tests/test_mixed_precision.py -k 'not models_verify and not each_weight and not gpt2'"],
    "passes/sdpa.py": ["tests/test_mutation_sdpa.py", "tests/test_mutation_passes.py -k sdpa",
                       "tests/test_sdpa.py -k 'form_golden or refusals or not_attention or refusal_after or canonicalize "
                       "or fuse_dropout or bad_option or min_gain or estimate_by_hand'"],
    "passes/epilogue.py": ["tests/test_mutation_epilogue.py", "tests/test_mutation_passes.py -k epilogue",
                           "tests/test_epilogue.py -k 'bias_forms or activation_forms or refusals or options or "
                           "costed_decisions or cpu_addmm or no_derivative or training_fuses or gelu_fusion'"],
    "passes/fuse.py": ["tests/test_mutation_fuse.py",
                       "tests/test_mutation_passes.py tests/test_fuse.py -k 'test_fuse_ or golden or strides or reused "
                       "or options_bound or costed or without_triton or not_changed'"],
    "passes/manager.py": ["tests/test_mutation_passes.py -k manager", "tests/test_passes.py"],
    # split out of the manager / rewrite.py this session
    "passes/graph_utils.py": ["tests/test_mutation_passes.py -k graph_utils",
                              "tests/test_passes.py -k 'rollback or divergence or dump or numerics'",
                              "tests/test_mixed_precision.py -k 'golden or verified'"],
    "passes/verification.py": ["tests/test_mutation_passes.py -k verification",
                               "tests/test_passes.py -k 'rollback or divergence or verif'"],
    "passes/provenance.py": ["tests/test_mutation_passes.py", "tests/test_channels_last.py -k golden"],
    "passes/base.py": ["tests/test_mutation_passes.py -k base",
                       "tests/test_passes.py -k 'parse or malformed or registry or unknown_pass'",
                       "tests/test_config.py -k 'option or declar or shorthand or malformed or errors'"],
    "passes/default.py": ["tests/test_mutation_passes.py -k default"],
    # cost_models/*: tests/test_mutation_cost.py first (hand-derived, per module, seconds), then the
    # module's fast reference files; the zoo-wide analyses are left out (minutes per mutant on 2 cores)
    "cost_models/ops.py": ["tests/test_mutation_cost.py -k ops", "tests/test_references_cost.py",
                           "tests/test_kernel_model.py -k 'not fit and not import and not report and not symbolic "
                           "and not checkpointing'"],
    "cost_models/kernels.py": ["tests/test_mutation_cost.py -k kernels",
                               "tests/test_kernel_model.py -k 'not fit_recovers_known and not symbolic and not checkpointing'"],
    "cost_models/trace.py": ["tests/test_mutation_cost.py -k trace", "tests/test_references_cost.py",
                             "tests/test_cost_model.py -k 'sgd_momentum or linear_backward'"],
    "cost_models/layout.py": ["tests/test_mutation_cost.py -k layout", "tests/test_cost_model.py -k 'layout'"],
    "cost_models/roofline.py": ["tests/test_mutation_cost.py -k roofline",
                                "tests/test_cost_model.py -k 'big_gemm or tf32 or dtype_option or memory_layout'"],
    "cost_models/hardware.py": ["tests/test_mutation_cost.py -k hardware",
                                "tests/test_cost_model.py -k 'hardware or big_gemm or tf32'"],
    "cost_models/fit.py": ["tests/test_mutation_cost.py -k fit", "tests/test_kernel_model.py -k 'fit or import or split'"],
    "cost_models/comm.py": ["tests/test_mutation_cost.py -k comm", "tests/test_comm.py"],
    "fxopt/verify.py": ["tests/test_mutation_core.py -k verify", "tests/test_references_verify.py",
                        "tests/test_verify.py"],
    "fxopt/capture.py": ["tests/test_mutation_core.py -k capture", "tests/test_capture.py"],
    "fxopt/codegen/program.py": ["tests/test_mutation_core.py -k 'program or lower'",
                                 "tests/test_references_codegen.py", "tests/test_codegen.py"],
    "fxopt/codegen/lower.py": ["tests/test_mutation_core.py -k 'program or lower'",
                               "tests/test_references_codegen.py", "tests/test_codegen.py"],
}

#: mutmut-sized operator set: each binary operator gets one counterpart (not all twelve), each
#: comparison its boundary/negation; VariableReplacer/Inserter (random rewiring) and
#: RemoveDecorator (removing @dataclass/@register breaks every import: killed, at full cost) are off.
_KEEP_BINARY = "Add_Sub Sub_Add Mul_Div Div_Mul FloorDiv_Div Mod_FloorDiv Pow_Mul BitAnd_BitOr " \
               "BitXor_BitOr LShift_RShift RShift_LShift"
_KEEP_COMPARE = "Eq_NotEq NotEq_Eq Lt_LtE LtE_Lt Gt_GtE GtE_Gt Is_IsNot IsNot_Is"
EXCLUDE_OPERATORS = [
    r"core/ReplaceBinaryOperator_(?!(" + "|".join(_KEEP_BINARY.split()) + r")$).*",
    r"core/ReplaceComparisonOperator_(?!(" + "|".join(_KEEP_COMPARE.split()) + r")$).*",
    r"core/ReplaceUnaryOperator_(?!(USub_UAdd|Delete_Not)$).*",
    r"core/VariableReplacer", r"core/VariableInserter", r"core/RemoveDecorator",
]


def _snapshot(dest: Path, shard: str) -> bool:
    """The committed tree (HEAD) in ``dest``, laid out as the installed package sees it. An existing
    snapshot is refreshed (tests added since are picked up, a module left mutated by an interrupted
    run is restored); returns True when HEAD's module differs from the one the session was made
    from, which makes that session stale."""
    tar = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(dest, filter="data")
    for pkg in ("passes", "cost_models"):  # pyproject's package-dir: fxopt.passes <- passes/
        link = dest / "fxopt" / pkg
        if not link.is_symlink():
            link.symlink_to(Path("..") / pkg)
    digest = hashlib.sha256((dest / shard).read_bytes()).hexdigest()
    stamp = dest / "module.sha256"
    stale = stamp.exists() and stamp.read_text() != digest
    stamp.write_text(digest)
    return stale


def _config(shard: str, work: Path, timeout: float) -> Path:
    py = shlex.quote(sys.executable)
    env = f"env PYTHONPATH={shlex.quote(str(work))} PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1"
    # one pytest per spec (pytest keeps only the last -k), stopping at the first that fails
    runs = [f"{env} {py} -m pytest -x -q -p no:cacheprovider --no-header -m 'not slow and not gpu' "
            + " ".join(shlex.quote(a) for a in args)
            for spec in SHARDS[shard] if (args := _existing(spec, work))]
    cmd = "bash -c " + shlex.quote(" && ".join(runs))
    lines = [
        "[cosmic-ray]",
        f"module-path = {json.dumps(shard)}",
        f"timeout = {timeout}",
        "excluded-modules = []",
        f"test-command = {json.dumps(cmd)}",
        "",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "",
        "[cosmic-ray.filters.operators-filter]",
        "exclude-operators = [" + ", ".join(json.dumps(e) for e in EXCLUDE_OPERATORS) + "]",
    ]
    path = work / "cosmic-ray.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _existing(spec: str, work: Path) -> list[str]:
    """A test spec's arguments, dropped when its file is not in the snapshot (not committed yet)."""
    args = shlex.split(spec)
    return args if (work / args[0]).exists() else []


def _counts(session: Path) -> dict:
    """killed / survived / timeout / pending / skipped (filtered operators) from a session."""
    out = subprocess.run([str(Path(sys.executable).parent / "cosmic-ray"), "dump", str(session)],
                         capture_output=True, text=True, check=True).stdout
    counts = {"killed": 0, "survived": 0, "timeout": 0, "pending": 0, "skipped": 0, "error": 0, "unsampled": 0}
    survivors = []
    for line in out.splitlines():
        item, result = json.loads(line)
        if result is None:
            counts["pending"] += 1
        elif result["worker_outcome"] == "skipped":
            counts["unsampled" if result.get("output") == SAMPLE_SKIP else "skipped"] += 1
        elif result["worker_outcome"] == "timeout":
            counts["timeout"] += 1
        elif result["worker_outcome"] != "normal":
            counts["error"] += 1
        elif result["test_outcome"] == "survived":
            counts["survived"] += 1
            survivors.append((item, result))
        else:
            counts["killed"] += 1
    counts["survivors"] = survivors
    return counts


def _sample(session: Path, n: int, seed: int = 0) -> None:
    """Keep ``n`` mutants in all (those already run count), drawn uniformly at random among the
    pending ones; the rest are marked skipped ("not sampled"). On 2 shared cores a module's full set
    takes hours; a uniform sample estimates its score without the bias of running in file order."""
    import random

    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult
    with use_db(str(session), WorkDB.Mode.open) as db:
        done = sum(1 for _, r in db.results if r.worker_outcome != WorkerOutcome.SKIPPED)
        pending = sorted(item.job_id for item in db.pending_work_items)
        keep = set(random.Random(seed).sample(pending, max(0, min(len(pending), n - done))))
        for job in pending:
            if job not in keep:
                db.set_result(job, WorkResult(output=SAMPLE_SKIP, worker_outcome=WorkerOutcome.SKIPPED))


SAMPLE_SKIP = "not sampled"


def run_shard(shard: str, workdir: Path, budget: float, timeout: float, sample: int | None = None) -> dict:
    work = workdir / shard.replace("/", "_").removesuffix(".py")
    session = work / "session.sqlite"
    if _snapshot(work, shard) and session.exists():
        print(f"{shard} changed since its session: starting over", file=sys.stderr)
        session.unlink()
    if session.exists() and not _initialized(session):  # an interrupted init: start over
        session.unlink()
    config = _config(shard, work, timeout)
    if session.exists():  # tests may have been added since: survivors are tried again
        with sqlite3.connect(session) as db:
            db.execute("delete from work_results where test_outcome = 'SURVIVED'")
    bin_ = Path(sys.executable).parent
    if not session.exists():
        base = subprocess.run(shlex.split(_read_cmd(config)), cwd=work, capture_output=True, text=True)
        if base.returncode != 0:
            raise SystemExit(f"{shard}: the unmutated tests fail in the snapshot; fix them first:\n"
                             f"{base.stdout[-3000:]}{base.stderr[-2000:]}")
        subprocess.run([str(bin_ / "cosmic-ray"), "init", str(config), str(session)], cwd=work, check=True)
        subprocess.run([str(bin_ / "cr-filter-operators"), str(session), str(config)], cwd=work, check=True)
    if sample:
        _sample(session, sample)
    start = time.monotonic()
    proc = subprocess.Popen([str(bin_ / "cosmic-ray"), "exec", str(config), str(session)], cwd=work,
                            start_new_session=True)
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:  # out of budget: stop; the session resumes next time
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    counts = _counts(session)
    counts["wall_s"] = time.monotonic() - start
    with open(work / "survivors.txt", "w") as f:
        for item, result in counts["survivors"]:
            m = item["mutations"][0]
            f.write(f"## {m['module_path']}:{m['start_pos'][0]} {m['operator_name']} #{m['occurrence']}\n")
            f.write((result.get("diff") or "") + "\n")
    return counts


def _initialized(session: Path) -> bool:
    with sqlite3.connect(session) as db:
        return db.execute("select count(*) from sqlite_master where name = 'work_results'").fetchone()[0] == 1


def _read_cmd(config: Path) -> str:
    for line in config.read_text().splitlines():
        if line.startswith("test-command = "):
            return json.loads(line.split(" = ", 1)[1])
    raise AssertionError("no test-command")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help="shards to run (paths as in --list)")
    p.add_argument("--all", action="store_true", help="every shard")
    p.add_argument("--list", action="store_true", help="list the shards and their test files")
    p.add_argument("--budget", type=float, default=1800, help="seconds per shard (resumes next run)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant's test run")
    p.add_argument("--workdir", type=Path, default=Path(os.environ.get("FXOPT_MUTATION_DIR", "/tmp/fxopt-mutation")))
    p.add_argument("--fresh", action="store_true", help="discard earlier sessions and snapshots")
    p.add_argument("--sample", type=int, help="run a uniform random sample of this many mutants per shard")
    a = p.parse_args(argv)
    if a.list:
        for shard, tests in SHARDS.items():
            print(f"{shard}: {'; '.join(tests)}")
        return 0
    shards = list(SHARDS) if a.all else a.modules
    unknown = [s for s in shards if s not in SHARDS]
    if unknown or not shards:
        p.error(f"unknown shard(s) {unknown}; see --list" if unknown else "name shards or pass --all")
    if a.fresh:
        for s in shards:
            shutil.rmtree(a.workdir / s.replace("/", "_").removesuffix(".py"), ignore_errors=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print("| module | mutants | run | killed | survived | timeout | pending | score | wall | date |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 1.0
    for s in shards:
        c = run_shard(s, a.workdir, a.budget, a.timeout, a.sample)
        done = c["killed"] + c["timeout"] + c["survived"]
        score = (c["killed"] + c["timeout"]) / done if done else float("nan")
        worst = min(worst, score) if done else worst
        print(f"| {s} | {done + c['pending'] + c['unsampled']} | {done} | {c['killed']} | {c['survived']} | "
              f"{c['timeout']} | {c['pending']} | {score:.0%} | {c['wall_s'] / 60:.0f} min | {date} |", flush=True)
    return 0 if worst >= 0.85 else 1


if __name__ == "__main__":
    sys.exit(main())
