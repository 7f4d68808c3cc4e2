"""Old module paths keep importing: ``fxopt.zoo`` is ``fxopt.workloads.zoo`` since modules were grouped.

Why: users' code and notebooks import ``fxopt.zoo``, ``fxopt.lint``, ... . Each old name resolves to
the same module object (not a copy), so patching either name patches both.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old ``fxopt.<name>`` -> the subpackage that holds it now
MOVED = {name: group for group, names in {
    "workloads": "zoo models data",
    "measure": "bench bench_distributed profile profile_training calibrate ablate",
    "study": "lint sweep scaling explore explore_rules distributed memory",
    "render": "html plots timeline"}.items() for name in names.split()}


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``fxopt.<old>`` and hands back the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, leaf = fullname.partition(".")
        if pkg == "fxopt" and leaf in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        leaf = spec.name.partition(".")[2]
        module = importlib.import_module(f"fxopt.{MOVED[leaf]}.{leaf}")
        spec.loader_state = module.__spec__  # the import system overwrites __spec__; put it back below
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # already executed at its new path


def install() -> None:
    """Alias what is imported already (keeps ``fxopt.bench`` the function), find the rest lazily."""
    for leaf, group in MOVED.items():
        module = sys.modules.get(f"fxopt.{group}.{leaf}")
        if module is not None:
            sys.modules.setdefault(f"fxopt.{leaf}", module)
    if not any(isinstance(f, _OldPath) for f in sys.meta_path):
        sys.meta_path.append(_OldPath())
