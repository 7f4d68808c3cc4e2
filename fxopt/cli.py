"""The ``fxopt`` command line. Each subcommand is a function in the COMMANDS table."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

import torch

from .workloads import zoo
from .analyze import UnknownOpWarning, analyze
from . import __version__
from ._torch_private import quiet_torch_warnings
from .cli_output import (configure_logging, diff_dict, dumps, models_dict, models_text, optimize_dict,
                         optimize_text, silence_closed_stdout)
from .cost_models.hardware import presets
from .errors import FxoptError
from .workloads.models import input_overrides, resolve
from .cost_models.hardware import DEFAULT_PRESET


def _build(spec: str, batch: int, tiny: bool):
    """Build on the meta device: analysis needs shapes only, so even a 7B model costs no memory."""
    try:
        with torch.device("meta"):
            return resolve(spec, batch=batch, tiny=tiny)
    except FxoptError:
        raise
    except Exception:  # a model whose __init__ needs real tensors: build it on the CPU
        return resolve(spec, batch=batch, tiny=tiny)


def cmd_report(args) -> int:
    spec = _build(args.model, args.batch, args.tiny)
    optimizer = None if args.optimizer == "none" else args.optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)  # the report lists them itself
        report = analyze(spec.model, spec.inputs, hardware=args.hw, training=not args.eval,
                         dtype=args.dtype, optimizer=optimizer, dynamic_batch=args.symbolic,
                         distributed=_distributed(args))
    report.model = spec.name
    found = None
    if args.lint and not args.symbolic:
        from .study.lint import lint
        found = lint(report)
    tree = args.by == "tree"  # DeepSpeed-profiler-style module tree; plots and tables of blocks otherwise
    by = "block" if tree else args.by
    if args.plot:
        from .render.plots import roofline
        roofline(report, args.plot, by=by, depth=args.depth)
    if args.trace:
        from .render.timeline import predicted_timeline
        predicted_timeline(report).export_chrome_trace(args.trace)
        print(f"wrote {args.trace}: the predicted step for ui.perfetto.dev or chrome://tracing", file=sys.stderr)
    if args.format == "html":
        from .render.html import html_report
        print(html_report(report, model=spec.model, inputs=spec.inputs, lint=found if found is not None else "auto",
                          top=args.top, depth=args.depth))
    elif args.format == "json":
        data = report.to_dict(args.depth)
        if tree:
            from .tree import module_tree
            data["tree"] = module_tree(report, spec.model, args.depth)
        if found is not None:
            data["lint"] = found.to_dict()
        print(dumps(data))
    elif args.format == "md":
        if tree:
            from .tree import tree_table
            print(report.summary() + "\n\n" + tree_table(report, spec.model, args.depth, tablefmt="github"))
        else:
            print(report.to_markdown(top=args.top, by=by, depth=args.depth))
        if found is not None:
            print(found.to_markdown(top=args.lint))
    else:
        print(report.summary())
        print()
        if tree:
            from .tree import tree_table
            print(tree_table(report, spec.model, args.depth))
        else:
            print(report.table(top=args.top, by=by, depth=args.depth))
        if found is not None:
            print("\n" + found.table(top=args.lint))
    if args.memory:
        from .study.memory import memory_curve
        print(memory_curve(report).summary(), file=sys.stderr if args.format in ("json", "html") else sys.stdout)
    return 0


def _distributed(args, world_size=None):
    """The Distributed spec of --gpus/--gpus-per-node/--strategy/--cluster/--bucket-mb (None: one GPU)."""
    n = world_size or getattr(args, "gpus", None)
    if not n:
        return None
    return {"world_size": n, "strategy": args.strategy, "gpus_per_node": args.gpus_per_node,
            "cluster": args.cluster, "bucket_mb": args.bucket_mb, "grad_dtype": args.grad_dtype}


def _add_distributed_args(p, gpus_help: str, gpus_type=int) -> None:
    from .cost_models.comm import cluster_presets
    from .study.distributed import STRATEGIES
    p.add_argument("--gpus", type=gpus_type, default=None, help=gpus_help)
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the cluster preset's (8)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp",
                   help="ddp, fsdp (FULL_SHARD/ZeRO-3), shard_grad_op (ZeRO-2) or hsdp (sharded per node, replicated "
                        "across nodes)")
    p.add_argument("--cluster", default=None,
                   help=f"cluster preset ({', '.join(cluster_presets())}) or JSON path (default: the --hw's)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb")
    p.add_argument("--grad-dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype gradients are communicated in (default: the parameters')")


def cmd_scaling(args) -> int:
    from .study.distributed import gpu_scaling
    spec = _build(args.model, args.batch, args.tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)
        d = _distributed(args, world_size=1)
        d.pop("world_size")
        result = gpu_scaling(spec.model, spec.inputs, args.gpus, hardware=args.hw, dtype=args.dtype, **d)
    result.model = spec.name
    print(json.dumps(result.to_dict(), indent=1) if args.format == "json" else
          result.table(tablefmt="github" if args.format == "md" else "simple"))
    if args.plot:
        result.plot(args.plot)
    return 0


def cmd_sweep(args) -> int:
    import functools
    import inspect
    from .study.sweep import load_factory, parse_grid, sweep
    factory, make_inputs, _ = load_factory(args.model)
    grid = parse_grid(args.grid)
    if make_inputs is not None and "batch" not in grid and "batch" in inspect.signature(make_inputs).parameters:
        make_inputs = functools.partial(make_inputs, batch=args.batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)
        result = sweep(factory, grid, make_inputs, hardware=args.hw, measure=args.measure,
                       training=not args.eval, dtype=args.dtype,
                       optimizer=None if args.optimizer == "none" else args.optimizer)
    print({"table": result.table, "json": result.to_json, "csv": result.to_csv}[args.format]())
    return 0


def cmd_bench(args) -> int:
    if args.gpus:
        from .measure.bench_distributed import bench_gpus
        print(bench_gpus(args))
        return 0
    from .measure.bench import bench
    res = bench(args.model, variants=args.variants, steps=args.steps, warmup=args.warmup, device=args.device,
                batch=args.batch, tiny=args.tiny, hardware=args.hw,
                log=logging.getLogger("fxopt.measure.bench").info)  # fxopt bench -v shows each variant as it starts
    print(res.to_json() if args.format == "json" else res.to_markdown() if args.format == "md" else res.table())
    return 0


def cmd_calibrate(args) -> int:
    if args.comm:
        from .study.distributed import calibrate_comm
        prof = calibrate_comm(out=args.out, quick=args.quick)
        print(json.dumps(prof["intra"]["by_collective"], indent=1) + (f"\nwrote {args.out}" if args.out else ""))
        return 0
    from .measure.calibrate import calibrate, import_table, summary
    if args.import_csv:
        prof = import_table(args.import_csv, device=args.import_device or args.device, base=args.hw or DEFAULT_PRESET,
                            out=args.out)
    else:
        prof = calibrate(device=args.device, quick=args.quick, out=args.out)
    print(summary(prof) + (f"\nwrote {args.out} (use: fxopt report MODEL --hw {args.out})" if args.out else ""))
    return 0


def cmd_profile(args) -> int:
    from .measure.profile import profile
    spec = resolve(args.model, batch=args.batch, tiny=args.tiny)  # real tensors: profile runs the model
    res = profile(spec.model, spec.inputs, steps=args.steps, hardware=args.hw, device=args.device)
    res.model = spec.name
    print(json.dumps(res.to_dict(), indent=1) if args.format == "json" else res.table(top=args.top))
    return 0


def cmd_lint(args) -> int:
    from .study.lint import lint
    spec = _build(args.model, args.batch, args.tiny)
    rules = [r.strip() for r in args.rules.split(",")] if args.rules else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)  # the report lists them itself
        result = lint(spec.model, spec.inputs, hardware=args.hw, dtype=args.dtype, training=not args.eval,
                      depth=args.depth, rules=rules, min_saving_s=args.min_saving_us * 1e-6)
    result.model = spec.name
    if args.format == "json":
        print(result.to_json())
    elif args.format == "md":
        print(result.to_markdown(top=args.top))
    else:
        print(result.summary())
        print()
        print(result.table(top=args.top))
    return 0


def _optimized(args, print_after_change: bool):
    """Build MODEL on the CPU (verification needs values) and optimize it with the CLI's options."""
    from .optimize import optimize
    spec = resolve(args.model, batch=args.batch, tiny=args.tiny)
    spec.model.train(not args.eval)
    return optimize(spec.model, spec.inputs, pipeline=args.pipeline, hardware=args.hw, verify=args.verify,
                    backend=args.backend, print_after_change=print_after_change,
                    dump_dir=getattr(args, "dump_dir", None))


def cmd_optimize(args) -> int:
    opt = _optimized(args, print_after_change=False)
    if args.format == "json":
        print(dumps(optimize_dict(opt.report, args.model)))
    else:
        print(optimize_text(opt.report, verbose=args.verbose > 0))
    if args.dump_dir:
        print(f"graphs and diffs written to {args.dump_dir}/", file=sys.stderr if args.format == "json" else sys.stdout)
    return 0 if opt.report.verification is None or opt.report.verification else 1


def cmd_diff(args) -> int:
    opt = _optimized(args, print_after_change=False)
    if args.format == "json":
        print(dumps(diff_dict(opt.report, args.model)))
        return 0
    for i, record in enumerate(opt.report.records, 1):
        state = "rolled back" if record.rolled_back else ("changed" if record.modified else "no change")
        print(f"=== {i:02d} {record.name}: {state}")
        if record.diff:
            print(record.diff)
    return 0


def cmd_models(args) -> int:
    print(dumps(models_dict(zoo)) if args.format == "json" else models_text(zoo))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxopt", description="Cost, rewrite and verify training graphs.")
    p.add_argument("--version", action="version", version=f"fxopt {__version__} (torch {torch.__version__})")
    _add_verbosity(p, 0)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("report", help="analytical cost of one training step, per node/op class/block")
    add_model(r)
    add_hw(r)
    r.add_argument("--dtype", default=None, help="cost as if weights and inputs were cast: bf16, fp16, fp32")
    r.add_argument("--by", choices=["node", "op", "block", "tree"], default="node",
                   help="tree: every module to --depth levels, children under parents (params, FLOPs, time, share)")
    r.add_argument("--depth", type=int, default=1, help="module-path depth of --by block")
    r.add_argument("--top", type=int, default=30)
    r.add_argument("--format", choices=["table", "md", "json", "html"], default="table",
                   help="html: one self-contained page (summary, hottest blocks, lints, roofline) on stdout")
    r.add_argument("--plot", default=None, metavar="OUT.png|OUT.svg",
                   help="also write the roofline plot of --by/--depth (node, block or op class)")
    r.add_argument("--symbolic", action="store_true", help="formulas in the batch size")
    r.add_argument("--eval", action="store_true", help="forward only (inference)")
    r.add_argument("--optimizer", choices=["sgd", "adamw", "none"], default="sgd")
    r.add_argument("--lint", type=int, default=0, metavar="N", help="append the top N lint findings")
    r.add_argument("--trace", default=None, metavar="STEP.json",
                   help="write the predicted step timeline as Chrome trace JSON (Perfetto, chrome://tracing)")
    r.add_argument("--memory", action="store_true",
                   help="predicted peak memory against the device's, and the cheapest ways to fit")
    _add_distributed_args(r, "cost data-parallel training on N GPUs (communication, exposed time)")
    r.set_defaults(func=cmd_report)

    li = sub.add_parser("lint", help="performance lints: where time is lost, the change, its est. saving")
    add_model(li)
    add_hw(li)
    li.add_argument("--dtype", default=None, help="lint as if weights and inputs were cast: bf16, fp16, fp32")
    li.add_argument("--depth", type=int, default=2, help="module-path depth of the low-intensity roll-up")
    li.add_argument("--rules", default=None, help="comma-separated rule ids (default all; see fxopt.lint.RULES)")
    li.add_argument("--min-saving-us", type=float, default=0.0, help="drop findings that save less (us)")
    li.add_argument("--top", type=int, default=30)
    li.add_argument("--format", choices=["table", "md", "json"], default="table")
    li.add_argument("--eval", action="store_true", help="forward only (inference)")
    li.set_defaults(func=cmd_lint)

    for name, func, help_ in (("optimize", cmd_optimize, "rewrite MODEL with a pass pipeline and verify it"),
                              ("diff", cmd_diff, "pass-by-pass diffs of the canonical graph text")):
        o = sub.add_parser(name, help=help_)
        o.add_argument("model", help="zoo name, hf:<ModelClass>, or path/to/file.py:factory")
        o.add_argument("--pipeline", default="default", help='e.g. "dce,normalize" (default: chosen by fxopt)')
        o.add_argument("--batch", type=int, default=2)
        o.add_argument("--tiny", action="store_true", help="the model's tiny test variant")
        o.add_argument("--eval", action="store_true", help="optimize the eval-mode graph")
        add_hw(o, None, "hardware preset or profile (default: the model's GPU, else h100)")
        o.add_argument("--backend", choices=["eager", "triton", "inductor"], default="eager",
                       help="triton: fxopt's own fused kernels (adds the fuse pass to the default pipeline)")
        o.add_argument("--verify", action=argparse.BooleanOptionalAction, default=name == "optimize",
                       help="verify each pass and the result numerically (rolls back failing passes)")
        if name == "optimize":
            o.add_argument("--dump-dir", default=None, help="write 00_capture.txt, NN_<pass>.txt/.diff here")
        o.add_argument("--format", choices=["table", "json"], default="table",
                       help="json: schema fxopt.optimize/1 or fxopt.diff/1 (README)")
        o.set_defaults(func=func)

    s = sub.add_parser("sweep", help="cost every variant of a model family over a grid of hyper-parameters")
    s.add_argument("model", help="path/to/file.py:factory; factory(**point) returns a module (or (module, inputs)); "
                                 "the file's example_inputs(**point) makes the inputs (each takes the names it wants)")
    s.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                   help="e.g. --grid width=64,96,128 depth=2,3,4 (the cartesian product is swept)")
    s.add_argument("--batch", type=int, default=2, help="batch for example_inputs(batch) when the grid has none")
    add_hw(s)
    s.add_argument("--dtype", default=None, help="cost as if weights and inputs were cast: bf16, fp16, fp32")
    s.add_argument("--eval", action="store_true", help="forward only (inference)")
    s.add_argument("--optimizer", choices=["sgd", "adamw", "none"], default="sgd")
    s.add_argument("--measure", action="store_true", help="also time each variant on the CUDA GPU")
    s.add_argument("--format", choices=["table", "json", "csv"], default="table")
    s.set_defaults(func=cmd_sweep)

    from .measure.bench import VARIANTS
    b = sub.add_parser("bench", help="time a training step in several variants (GPU: CUDA events; CPU: wall clock)")
    b.add_argument("model", help="zoo name, hf:<ModelClass>, file.py:factory, timm:<name>, torchvision:<name>")
    b.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--tiny", action="store_true", help="the model's tiny test variant")
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add_hw(b, None, "preset whose bf16 peak MFU is taken against (default: the GPU's)")
    b.add_argument("--format", choices=["table", "md", "json"], default="table")
    b.add_argument("--gpus", type=int, default=None,
                   help="time DDP on N local GPUs under torchrun (and on 1 for scaling), next to the prediction; "
                        "variants eager-fp32, autocast, fxopt")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("calibrate", help="micro-benchmark this device into a hardware profile JSON")
    c.add_argument("--out", default=None, help="write the profile here (then: --hw PATH)")
    c.add_argument("--quick", action="store_true", help="tiny grid (seconds)")
    c.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available); with --import: "
                   "the device whose rows to fit (the table's Device column)")
    c.add_argument("--import", dest="import_csv", metavar="FILE.csv", default=None,
                   help="fit the profile to a table of measured per-op times instead of measuring "
                        "(columns: fxopt.cost_models.fit; NeuSight's tables are read as they are)")
    c.add_argument("--device-name", dest="import_device", default=None,
                   help="with --import: the rows of this device (the table's Device/device column)")
    add_hw(c, None, "with --import: the preset whose peaks the fit refers to (default h100)")
    c.add_argument("--comm", action="store_true", help="measure NCCL collectives on this node's GPUs (2+) into a "
                                                       "cluster JSON (--out; then: --cluster PATH)")
    c.set_defaults(func=cmd_calibrate)

    pr = sub.add_parser("profile", help="measured time per fx node vs the cost model's prediction")
    add_model(pr)
    pr.add_argument("--steps", type=int, default=3)
    add_hw(pr, None, "preset or profile JSON for the prediction "
                     "(default: the GPU's preset; on CPU a quick calibration)")
    pr.add_argument("--device", default=None)
    pr.add_argument("--top", type=int, default=30)
    pr.add_argument("--format", choices=["table", "json"], default="table")
    pr.set_defaults(func=cmd_profile)

    from .measure.ablate import add_cli as add_ablate_cli
    add_ablate_cli(sub)

    from .measure.profile_training import add_cli as add_profile_training_cli
    add_profile_training_cli(sub)

    from .study.explore import add_cli as add_explore_cli
    add_explore_cli(sub)

    sc = sub.add_parser("scaling", help="predicted step time, exposed communication, throughput and scaling "
                                        "efficiency on 1..N GPUs")
    add_model(sc, 32, batch_help="per-GPU batch")
    add_hw(sc)
    sc.add_argument("--dtype", default=None, help="cost as if weights and inputs were cast: bf16, fp16, fp32")
    sc.add_argument("--format", choices=["table", "md", "json"], default="table")
    sc.add_argument("--plot", default=None, metavar="OUT.png|OUT.svg", help="also plot step time and efficiency")
    _add_distributed_args(sc, "world sizes, e.g. 1,8,64,512,4096",
                          gpus_type=lambda s: [int(x) for x in s.split(",")])
    sc.set_defaults(func=cmd_scaling, gpus=[1, 8, 64, 512, 4096])

    m = sub.add_parser("models", help="list the built-in models")
    m.add_argument("--format", choices=["table", "json"], default="table", help="json: schema fxopt.models/1")
    m.set_defaults(func=cmd_models)

    for command in sub.choices.values():  # -v/-q after the subcommand too (fxopt optimize M -v)
        _add_verbosity(command, argparse.SUPPRESS)
        if any(a.dest == "model" for a in command._actions):
            _add_input_knobs(command)
    return p


MODEL_HELP = "zoo name (see `fxopt models`), hf:<ModelClass>, or path/to/file.py:factory"


def add_model(parser: argparse.ArgumentParser, batch: int = 2, batch_help: str | None = None,
              model_help: str = MODEL_HELP) -> None:
    """MODEL, ``--batch`` and ``--tiny``: what every command that builds a model takes."""
    parser.add_argument("model", help=model_help)
    parser.add_argument("--batch", type=int, default=batch, help=batch_help)
    parser.add_argument("--tiny", action="store_true", help="the model's tiny test variant")


def add_hw(parser: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET, help: str | None = None) -> None:
    """``--hw``: a hardware preset or a profile JSON path. Commands that cost default to h100; commands
    that measure default to None (the preset of the GPU they run on) and say so in ``help``."""
    parser.add_argument("--hw", default=default, help=help or f"preset ({', '.join(presets())}) or a profile JSON path")


def _add_input_knobs(parser: argparse.ArgumentParser) -> None:
    """--image-size / --seq-len for every command that takes a MODEL spec (zoo, hf:, timm:, torchvision:)."""
    known = {o for a in parser._actions for o in a.option_strings}
    if "--image-size" not in known:
        parser.add_argument("--image-size", type=int, default=None, metavar="PX",
                            help="side of the example images (zoo, hf vision, timm, torchvision models)")
    if "--seq-len" not in known:
        parser.add_argument("--seq-len", type=int, default=None, metavar="N",
                            help="tokens per example (hf text models)")


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    """-v (info, -vv debug: what passes decide, what is captured) and -q (errors only, no progress)."""
    if any("--verbose" in a.option_strings for a in parser._actions):
        return
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more detail: -v lists every decision and logs progress, -vv debug logs")
    parser.add_argument("-q", "--quiet", action="count", default=default,
                        help="errors only (no warnings, no progress bars)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        with quiet_torch_warnings(), input_overrides(getattr(args, "image_size", None),
                                                     getattr(args, "seq_len", None)):
            return args.func(args)
    except FxoptError as exc:
        print(f"fxopt: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fxopt report ... | head`: the reader left; stop like cat and grep do
        silence_closed_stdout()
        return 141  # 128 + SIGPIPE, the shell's code for a writer whose reader went away


if __name__ == "__main__":
    sys.exit(main())
