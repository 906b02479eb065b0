"""Line magics inside a cell body, read as the code they run.

IPython turns `%time model = load()` into `get_ipython().run_line_magic('time', 'model = load()')`:
to the AST that is a call with two strings, and the assignment inside is invisible. Before the
body's targets and reads are analysed, each such call is replaced by the statement its magic
runs, so `%time model = AutoModelForCausalLM.from_pretrained(...)` is read as the assignment it
is. A magic whose effect on the namespace we cannot read (`%run script.py`, `%store -r model`) is
refused: releasing on a guess could drop what the cell still needs.
"""

from __future__ import annotations

import ast
import copy
import getopt
from dataclasses import dataclass

# Magics that run their statement in the user's namespace (its assignments bind there), with the
# getopt letters of their options that take a value.
_RUNS_IN_NAMESPACE = {"time": "", "prun": "D:l:s:T:", "memit": "r:t:"}
# Magics that run their statement inside a function of their own: it reads the namespace but its
# assignments stay local (IPython's timeit template), so they replace nothing.
_RUNS_IN_OWN_SCOPE = {"timeit": "n:r:p:v:"}
# Magics that bind no name in the user's namespace.
_BINDS_NOTHING = frozenset(
    {
        "gpustate", "llmfree", "llmwatch", "llmfit", "llmguard", "config", "env", "pip", "conda",
        "uv", "matplotlib", "load_ext", "reload_ext", "unload_ext", "who", "whos", "who_ls", "pwd",
        "cd", "ls", "lsmagic", "pinfo", "pinfo2", "psearch", "pdoc", "pdef", "psource", "pfile",
        "tb", "xmode", "history", "precision", "page", "autoreload", "aimport", "system", "sx",
        "colors", "automagic", "autocall", "magic", "quickref", "time_it", "killbgscripts",
        "pprint", "doctest_mode", "cat", "mkdir", "rm", "cp", "mv", "less", "more", "clear",
        "bookmark", "dhist", "dirs", "pushd", "popd", "notebook", "save", "debug", "pdb",
    }
)


class UnreadableMagic(ValueError):
    """A line magic in the body may bind names the analysis cannot see; nothing was changed."""


@dataclass(frozen=True)
class MagicCall:
    name: str  # the magic as the user typed it, without %
    argument: str  # its line


def magic_call(node: ast.AST) -> MagicCall | None:
    """The magic behind `get_ipython().run_line_magic('name', 'line')`, or None for other nodes."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    owner = node.func.value
    if node.func.attr != "run_line_magic" or not (
        isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "get_ipython"
    ):
        return None
    if len(node.args) < 2 or not all(isinstance(arg, ast.Constant) and isinstance(arg.value, str) for arg in node.args[:2]):
        return None
    return MagicCall(node.args[0].value, node.args[1].value)


def _statement_of(call: MagicCall, value_options: str) -> list[ast.stmt]:
    """The statement a timing magic runs: its line without the options, parsed."""
    flags = "".join(letter for letter in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if letter not in value_options)
    words = call.argument.split()
    try:
        # getopt stops at the first word that is not an option: the statement starts there.
        _, rest = getopt.getopt(words, flags + value_options, ["no-raise-error"])
        source = call.argument[call.argument.index(rest[0]):] if rest else ""
    except (getopt.GetoptError, ValueError):
        source = call.argument
    try:
        return ast.parse(source.strip()).body
    except SyntaxError:
        raise UnreadableMagic(f"cannot read the statement of %{call.name} in the cell body: nothing was released") from None


def expand_line_magics(tree: ast.Module) -> ast.Module:
    """A copy of `tree` in which each line magic is replaced by what it runs, for analysis only.

    `%time STMT` (and `%prun`, `%memit`) become STMT; `%timeit STMT` becomes STMT inside a
    function (it reads the namespace, binds nothing there); magics known to bind nothing are
    dropped; any other magic raises UnreadableMagic naming it. `x = %time expr` keeps its
    assignment and reads `expr`.
    """
    if not any(magic_call(node) for node in ast.walk(tree)):  # ast.walk is iterative
        return tree  # nothing to expand: no copy (a long body can nest deeper than copy recurses)
    return _Expander().visit(copy.deepcopy(tree))


class _Expander(ast.NodeTransformer):
    def visit_Expr(self, node: ast.Expr):
        call = magic_call(node.value)
        if call is None:
            return self.generic_visit(node)
        return self._expand(call, node) or ast.Pass()

    def visit_Call(self, node: ast.Call):
        call = magic_call(node)
        if call is None:
            return self.generic_visit(node)
        # A magic used as a value (`x = %time f()`): what it runs must be an expression.
        statements = self._expand(call, node)
        if not statements:
            return ast.Constant(None)
        if len(statements) == 1 and isinstance(statements[0], ast.Expr):
            return statements[0].value
        raise UnreadableMagic(f"cannot read the value of %{call.name} in the cell body: nothing was released")

    def _expand(self, call: MagicCall, node: ast.AST) -> list[ast.stmt] | None:
        if call.name in _RUNS_IN_NAMESPACE:
            return _statement_of(call, _RUNS_IN_NAMESPACE[call.name])
        if call.name in _RUNS_IN_OWN_SCOPE:
            body = _statement_of(call, _RUNS_IN_OWN_SCOPE[call.name]) or [ast.Pass()]
            (scope,) = ast.parse("def _timeit_scope():\n    pass\n_timeit_scope()").body[:1]
            scope.body = body
            return [scope, ast.Expr(ast.Call(ast.Name("_timeit_scope", ast.Load()), [], []))]
        if call.name in _BINDS_NOTHING:
            return None
        raise UnreadableMagic(
            f"the cell body runs %{call.name}, which can bind names the analysis cannot see: nothing was released "
            f"(run %{call.name} in a cell of its own)"
        )
