"""Per-module tree of a cost report, like DeepSpeed's flops profiler: params, FLOPs, time and
share of the step for every module down to a depth, children under their parent, hottest first.

Built only from public report data (``GraphReport.rows("block", depth)`` at each depth) and the
model's ``named_parameters``; ``fxopt report MODEL --by tree --depth N`` prints it.
"""
from __future__ import annotations

from tabulate import tabulate
from torch import nn

from .errors import FxoptError

SELF = "(self)"  # ops of a module outside its children, shown when it has children too


def _params(model: nn.Module | None) -> dict[str, int]:
    if model is None:
        return {}
    return {name: p.numel() for name, p in model.named_parameters()}


def _count(params: dict[str, int], block: str) -> int | None:
    if not params or block.startswith("("):
        return None
    return sum(n for name, n in params.items() if name == block or name.startswith(block + "."))


def module_tree(report, model: nn.Module | None = None, depth: int = 2) -> list[dict]:
    """Rows in tree order: each module, then its children (hottest first), to ``depth`` levels.
    Each row: ``block``, ``depth`` (1 = top level), ``params`` (None without a model),
    ``fwd_flops``, ``bwd_flops``, ``time_s``, ``share``, ``bound``."""
    if depth < 1:
        raise FxoptError(f"--depth must be >= 1 for the tree, got {depth}")
    if report.is_symbolic:
        raise FxoptError("the module tree needs concrete sizes: drop --symbolic, or use report.at(batch=N)")
    params = _params(model)
    levels = [{r["block"]: r for r in report.rows("block", d)} for d in range(1, depth + 1)]

    def node(block: str, level: int, row: dict, own: bool = False) -> dict:
        count = _count(params, block)
        if own and count is not None:  # only the parameters held by the module itself
            count = sum(n for name, n in params.items() if name.rpartition(".")[0] == block)
        return {"block": f"{block} {SELF}" if own else block, "depth": level + 1, "params": count,
                "fwd_flops": row["fwd_flops"], "bwd_flops": row["bwd_flops"], "time_s": row["time_s"],
                "share": row["share"], "bound": row["bound"]}

    def children(block: str, level: int) -> list[dict]:
        if level + 1 >= len(levels):
            return []
        below = levels[level + 1]
        kids = [b for b in below if b.startswith(block + ".")]
        out = []
        for name in kids:  # rows() is hottest first
            out.append(node(name, level + 1, below[name]))
            out += children(name, level + 1)
        if kids and block in below:  # the module's own ops next to its children
            out.append(node(block, level + 1, below[block], own=True))
        return out

    rows = []
    for block, row in levels[0].items():
        rows.append(node(block, 0, row))
        rows += children(block, 0)
    return rows


def tree_table(report, model: nn.Module | None = None, depth: int = 2, tablefmt: str = "simple") -> str:
    def num(x, scale, fmt):
        return "-" if x is None else format(x * scale, fmt)
    def label(r):  # tabulate strips leading spaces: indent with rules
        leaf = SELF if r["block"].endswith(SELF) else r["block"].rsplit(".", 1)[-1]
        return "│ " * (r["depth"] - 1) + (leaf if r["depth"] > 1 else r["block"])
    body = [[label(r),
             num(r["params"], 1e-6, ",.3g"), num(r["fwd_flops"] + r["bwd_flops"], 1e-9, ",.3g"),
             num(r["time_s"], 1e3, ",.3g"), num(r["share"], 100, ".1f"), r["bound"]]
            for r in module_tree(report, model, depth)]
    headers = ["module", "params M", "fwd+bwd GFLOP", "time ms", "share %", "bound"]
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
