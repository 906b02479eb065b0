"""Reading a cell body before it runs: its syntax, and the targets it will assign.

`%%llmload` must free what the body is about to replace *before* the body runs, so it reads
the assignment targets from the AST: `model = ...`, `tok, model = ...`, `self.model = ...`,
`cache["m"] = ...`. Only targets a user can name simply are supported (a name followed by
attributes and constant subscripts); anything else is left alone rather than guessed.
"""

from __future__ import annotations

import ast
from typing import Iterator

from llm_magic.engine.paths import TargetPath, target_path


class CellSyntaxError(ValueError):
    """The body does not parse; raised before anything is released."""


def parse_body(source: str, filename: str = "<llmload>") -> ast.Module:
    """Parse the body, turning a SyntaxError into a one-line CellSyntaxError."""
    try:
        return ast.parse(source, filename=filename)
    except SyntaxError as error:
        where = f"line {error.lineno}" if error.lineno else "the body"
        raise CellSyntaxError(f"syntax error in the cell body at {where}: {error.msg}") from None
    except RecursionError:  # Python cannot compile it either: expressions nested too deeply
        raise CellSyntaxError("the cell body is nested too deeply for Python to compile") from None


def _flatten(target: ast.expr) -> Iterator[ast.expr]:
    if isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from _flatten(element)
    elif isinstance(target, ast.Starred):
        yield from _flatten(target.value)
    else:
        yield target


# Nodes that open a new scope: assignments inside them do not replace anything in the user
# namespace, so they are not read.
_NEW_SCOPES = (
    ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
    ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
)


def assignment_targets(tree: ast.Module) -> list[TargetPath]:
    """Simple targets the body assigns at cell level, in order of appearance, without duplicates.

    An explicit stack, not ast.NodeVisitor: a body Python compiles (`x = 1 + 1 + ...` with
    hundreds of terms) can nest deeper than the recursion limit allows a visitor to go.
    """
    targets: list[TargetPath] = []
    known: set[TargetPath] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _NEW_SCOPES):
            continue
        if isinstance(node, ast.Assign):
            assigned = list(node.targets)
        elif isinstance(node, ast.AnnAssign) and node.value is not None or isinstance(node, ast.NamedExpr):
            assigned = [node.target]
        else:
            assigned = []
        for target in assigned:
            for element in _flatten(target):
                path = target_path(element)
                if path is not None and path not in known:
                    known.add(path)
                    targets.append(path)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return targets


def last_expression(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    """Split off a trailing expression statement, so its value can be shown like `%%time` does."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        body = ast.Module(body=tree.body[:-1], type_ignores=[])
        return body, ast.Expression(tree.body[-1].value)
    return tree, None
