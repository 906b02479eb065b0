"""Which assignments of a cell load a model: what guard mode releases before the cell runs.

A model load is `X.from_pretrained(...)` (any transformers, diffusers or PEFT class; also
`from_config` and diffusers' `from_single_file`), `pipeline(...)`, or sentence-transformers'
`SentenceTransformer(...)` / `CrossEncoder(...)`, anywhere in the assigned value
(`model = get_peft_model(AutoModelForCausalLM.from_pretrained(...), cfg)` loads too).

`may_load` is the cheap first look: a regular expression over the raw cell, so the common cell
(one that loads nothing) costs microseconds and never touches the AST or the namespace.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

from llm_magic.engine.paths import TargetPath, target_path

LOAD_METHODS = frozenset({"from_pretrained", "from_config", "from_single_file"})
LOAD_FUNCTIONS = frozenset({"pipeline", "SentenceTransformer", "CrossEncoder"})
_MAY_LOAD = re.compile(r"\b(?:" + "|".join(sorted(LOAD_METHODS | LOAD_FUNCTIONS)) + r")\s*\(")
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def may_load(raw_cell: str) -> bool:
    """Could this cell load a model? False for certain; True means "read it properly"."""
    return _MAY_LOAD.search(raw_cell) is not None


def is_load_call(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr in LOAD_METHODS or func.attr in LOAD_FUNCTIONS
    return isinstance(func, ast.Name) and func.id in LOAD_FUNCTIONS


@dataclass(frozen=True)
class LoadSite:
    target: TargetPath  # where the loaded model is bound
    call: ast.Call  # the load call whose result it holds (the first one in the value)


def load_sites(tree: ast.Module) -> list[LoadSite]:
    """Targets assigned a model load at cell level, in order (`draft, model = (A.., B..)` pairs)."""
    sites: list[LoadSite] = []
    stack: list[ast.AST] = [tree]
    while stack:  # explicit stack: a long body nests deeper than recursion allows
        node = stack.pop()
        if isinstance(node, _SCOPES):
            continue  # assignments in a function body replace nothing in the namespace
        if isinstance(node, ast.Assign):
            for target in node.targets:
                sites += _sites(target, node.value)
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
            sites += _sites(node.target, node.value)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    unique: dict[TargetPath, LoadSite] = {}
    for site in sites:
        unique.setdefault(site.target, site)
    return list(unique.values())


def _sites(target: ast.AST, value: ast.AST) -> list[LoadSite]:
    sequences = (ast.Tuple, ast.List)
    if isinstance(target, sequences) and isinstance(value, sequences) and len(target.elts) == len(value.elts):
        if not any(isinstance(node, ast.Starred) for node in (*target.elts, *value.elts)):
            return [site for element, item in zip(target.elts, value.elts) for site in _sites(element, item)]
    call = first_load_call(value)
    if call is None:
        return []
    elements = target.elts if isinstance(target, sequences) else [target]
    paths = [target_path(element.value if isinstance(element, ast.Starred) else element) for element in elements]
    return [LoadSite(path, call) for path in paths if path is not None]


def first_load_call(value: ast.AST) -> ast.Call | None:
    """The first load call inside `value`, not counting function bodies defined there."""
    stack = [value]
    while stack:
        node = stack.pop(0)
        if is_load_call(node):
            return node
        if not isinstance(node, _SCOPES):
            stack.extend(ast.iter_child_nodes(node))
    return None
