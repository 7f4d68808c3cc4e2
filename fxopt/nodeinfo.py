"""What a report says about an fx node: its op, its block (module path) and the user's source line."""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in \S+\n\s+(.*)')


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op: str        # short target name: "conv2d", "linear", "getitem", or "optimizer"
    module: str    # FQN of the innermost nn.Module ("" for the root)
    module_type: str
    source: str    # "file.py:123: code" of the innermost frame outside torch

    def block(self, depth: int) -> str:
        """The module path cut to ``depth`` components (``layer1.0`` at depth 2)."""
        parts = self.module.split(".") if self.module else []
        return ".".join(parts[:depth]) if parts and depth > 0 else "(root)"


def target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0] if hasattr(t, "overloadpacket") else name


def user_source(stack_trace: str | None) -> str:
    """The innermost frame of the node's stack trace that is not inside torch."""
    frames = [f for f in _FRAME.findall(stack_trace or "") if "/torch/" not in f[0]]
    if not frames:
        return ""
    path, line, code = frames[-1]
    return f"{path}:{line}: {code.strip()}"


def node_info(node: fx.Node) -> NodeInfo:
    stack = node.meta.get("nn_module_stack") or {}
    module, module_type = next(reversed(stack.values())) if stack else ("", "")
    module_type = module_type if isinstance(module_type, str) else getattr(module_type, "__name__", "")
    return NodeInfo(node.name, target_name(node), module, module_type.rsplit(".", 1)[-1],
                    user_source(node.meta.get("stack_trace")))
