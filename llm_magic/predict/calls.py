"""What a cell's `X.from_pretrained(...)` calls ask for, read from its source without running it.

The pre-flight has to know, before the cell runs, which checkpoint each call loads and with which
`device_map`, `max_memory`, dtype, quantization and offload folder. The cell is parsed with `ast`;
an argument is resolved only when that needs no code to run: a literal, arithmetic on literals,
a plain name bound in the user's namespace, a module attribute such as `torch.bfloat16` (read
with `inspect.getattr_static`, so no property or `__getattr__` runs), or a container of those.
Anything else (a call, a subscript, an f-string) is kept as its source text and marked unknown:
the pre-flight then says it cannot predict, instead of guessing. (Reading one argument:
`expressions.py`; which class and what kind of object: `classes.py`.)
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from llm_magic.predict.classes import classify, classify_by_name, resolve_class
from llm_magic.predict.expressions import ABSENT, Arg, Resolver

# The from_pretrained keywords the pre-flight reads. `torch_dtype` is the old spelling of `dtype`
# (both versions still accept it; `dtype` wins when both are given).
LOAD_KEYWORDS = ("dtype", "torch_dtype", "device_map", "max_memory", "quantization_config", "offload_folder",
                 "trust_remote_code")

# Keywords that change where the files are read from, not what is built.
LOCATION_KEYWORDS = ("revision", "subfolder", "cache_dir", "variant", "use_safetensors", "local_files_only",
                     "gguf_file")

# Everything else from_pretrained pops before the rest go to the config as overrides.
_NOT_CONFIG_KEYWORDS = frozenset(LOAD_KEYWORDS + LOCATION_KEYWORDS + (
    "pretrained_model_name_or_path", "config", "force_download", "local_files_only", "proxies", "token",
    "use_auth_token", "output_loading_info", "low_cpu_mem_usage", "offload_buffers", "offload_state_dict",
    "attn_implementation", "state_dict", "from_tf", "from_flax", "adapter_kwargs", "adapter_name", "gguf_file",
    "key_mapping", "weights_only", "use_kernels", "kernel_config", "tp_plan", "tp_size", "device_mesh",
    "distributed_config", "generation_config", "code_revision", "_fast_init", "mirror",
))


@dataclass(frozen=True)
class LoadCall:
    """One `X.from_pretrained(...)` call found in a cell."""

    class_expr: str  # the class as written: "AutoModelForCausalLM", "transformers.AutoModel"
    class_name: str  # its last name: "AutoModelForCausalLM"
    kind: str  # "model" | "tokenizer" | "processor" | "config" | "other"
    class_resolved: bool  # the class object was found (namespace or transformers), not guessed from its name
    target: str | None  # what the result is assigned to ("model", "model, info", "self.m"), or None
    model_id: Arg
    dtype: Arg  # `dtype=`, else `torch_dtype=` (origin tells which was written)
    dtype_keyword: str | None  # "dtype" | "torch_dtype" | None
    device_map: Arg
    max_memory: Arg
    quantization_config: Arg
    offload_folder: Arg
    trust_remote_code: Arg
    location: Mapping[str, Arg]  # revision / subfolder / cache_dir / variant / use_safetensors, when written
    config_overrides: Mapping[str, Arg]  # other keywords: from_pretrained hands them to the config
    chained: tuple[str, ...]  # methods called on the result in the same expression: ("to", "eval")
    lineno: int
    source: str  # the call's source text
    notes: tuple[str, ...] = ()
    cls: Any = field(default=None, compare=False, repr=False)  # the resolved class, when class_resolved

    @property
    def is_model(self) -> bool:
        return self.kind == "model"

    def unknown_arguments(self) -> dict[str, str]:
        """name -> source text of every argument whose value could not be known."""
        out: dict[str, str] = {}
        for name in ("model_id", "dtype", "device_map", "max_memory", "quantization_config",
                     "offload_folder", "trust_remote_code"):
            arg = getattr(self, name)
            if not arg.known:
                out[name] = arg.source or "?"
        for group in (self.location, self.config_overrides):
            for name, arg in group.items():
                if not arg.known:
                    out[name] = arg.source or "?"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_expr": self.class_expr,
            "class_name": self.class_name,
            "kind": self.kind,
            "class_resolved": self.class_resolved,
            "target": self.target,
            "model_id": self.model_id.to_dict(),
            "dtype": self.dtype.to_dict(),
            "dtype_keyword": self.dtype_keyword,
            "device_map": self.device_map.to_dict(),
            "max_memory": self.max_memory.to_dict(),
            "quantization_config": self.quantization_config.to_dict(),
            "offload_folder": self.offload_folder.to_dict(),
            "trust_remote_code": self.trust_remote_code.to_dict(),
            "location": {k: v.to_dict() for k, v in self.location.items()},
            "config_overrides": {k: v.to_dict() for k, v in self.config_overrides.items()},
            "chained": list(self.chained),
            "lineno": self.lineno,
            "source": self.source,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------
# Finding the calls


def _target_text(node: ast.AST, source: str) -> str:
    if isinstance(node, (ast.Tuple, ast.List)):
        return ", ".join(_target_text(element, source) for element in node.elts)
    return ast.get_source_segment(source, node) or ast.unparse(node)


def _assignment_targets(tree: ast.AST, source: str) -> dict[int, str]:
    """id(value node) -> target text, for `a = value`, `a, b = value`, `a: T = value`, `a := value`."""
    targets: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets[id(node.value)] = " = ".join(_target_text(t, source) for t in node.targets)
            for target in node.targets:  # `draft, model = (A.from_pretrained(..), B.from_pretrained(..))`
                for element, value in _paired(target, node.value):
                    targets[id(value)] = _target_text(element, source)
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets[id(node.value)] = _target_text(node.target, source)
        elif isinstance(node, ast.NamedExpr):
            targets[id(node.value)] = _target_text(node.target, source)
    return targets


def _paired(target: ast.AST, value: ast.AST) -> list[tuple[ast.AST, ast.AST]]:
    """(target element, value element) when both sides are tuples or lists of the same length."""
    sequences = (ast.Tuple, ast.List)
    if not (isinstance(target, sequences) and isinstance(value, sequences)) or len(target.elts) != len(value.elts):
        return []
    if any(isinstance(node, ast.Starred) for node in (*target.elts, *value.elts)):
        return []
    pairs = []
    for element, item in zip(target.elts, value.elts):
        pairs += _paired(element, item) or [(element, item)]
    return pairs


def _outermost_chain(call: ast.Call, parents: dict[int, ast.AST]) -> tuple[ast.AST, tuple[str, ...]]:
    """Follow `X.from_pretrained(...).to("cuda").eval()` outwards: (outermost node, method names)."""
    chained: list[str] = []
    node: ast.AST = call
    while True:
        parent = parents.get(id(node))
        if not (isinstance(parent, ast.Attribute) and parent.value is node):
            break
        grand = parents.get(id(parent))
        if isinstance(grand, ast.Call) and grand.func is parent:
            chained.append(parent.attr)
            node = grand
        else:
            break
    return node, tuple(chained)


def _parse(source: str) -> ast.AST:
    """Parse a cell body; IPython lines (`%magic`, `!shell`) become `pass` so the rest parses."""
    try:
        return ast.parse(source)
    except SyntaxError:
        lines = []
        for line in source.splitlines():
            stripped = line.lstrip()
            if stripped.startswith(("%", "!")):
                line = line[: len(line) - len(stripped)] + "pass"
            lines.append(line)
        # A cell that still fails to parse will fail when it runs: let the SyntaxError say so.
        return ast.parse("\n".join(lines))


def find_load_calls(source: str, namespace: Mapping[str, Any] | None = None) -> list[LoadCall]:
    """Every `X.from_pretrained(...)` call in `source`, in source order.

    `namespace` is the user's namespace (names like `MODEL_NAME` are looked up there, never
    evaluated). Raises SyntaxError when the cell is not Python (it would fail to run anyway).
    """
    namespace = {} if namespace is None else namespace
    tree = _parse(source)
    resolver = Resolver(source, namespace)
    parents = {id(child): parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    targets = _assignment_targets(tree, source)

    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_pretrained"
    ]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    return [_load_call(node, resolver, parents, targets) for node in calls]


class _Keywords:
    """The keyword arguments of one call, `**mapping` unpacked when it can be read."""

    def __init__(self, node: ast.Call, resolver: Resolver):
        self.given: dict[str, Arg] = {}
        self.hidden: list[str] = []  # `**expr` we cannot see into
        for keyword in node.keywords:
            if keyword.arg is not None:
                self.given[keyword.arg] = resolver.arg(keyword.value)
                continue
            unpacked = resolver.arg(keyword.value)
            if unpacked.known and isinstance(unpacked.value, Mapping):
                for key, value in unpacked.value.items():
                    self.given[str(key)] = Arg(True, True, value, f"{unpacked.source}[{key!r}]", "kwargs")
            else:
                self.hidden.append(f"**{unpacked.source}")

    def get(self, name: str) -> Arg:
        if name in self.given:
            return self.given[name]
        if self.hidden:
            # Could be inside the `**kwargs` we cannot read: unknown, not absent.
            return Arg(present=True, known=False, source=", ".join(self.hidden), origin="unknown")
        return ABSENT

    def dtype(self) -> tuple[Arg, str | None]:
        """`dtype=` wins over `torch_dtype=` in both transformers 4.57 and 5.x."""
        for name in ("dtype", "torch_dtype"):
            if name in self.given:
                return self.given[name], name
        return self.get("dtype"), None


def _model_id(node: ast.Call, resolver: Resolver, keywords: _Keywords) -> Arg:
    """The checkpoint: the first positional argument, or the keyword."""
    if node.args and isinstance(node.args[0], ast.Starred):
        return Arg(True, False, None, resolver.text(node.args[0]), "unknown")
    positional = [a for a in node.args if not isinstance(a, ast.Starred)]
    return resolver.arg(positional[0]) if positional else keywords.get("pretrained_model_name_or_path")


def _load_call(node: ast.Call, resolver: Resolver, parents, targets) -> LoadCall:
    notes: list[str] = []
    class_node = node.func.value  # type: ignore[attr-defined]
    class_expr = resolver.text(class_node)
    class_name = class_node.attr if isinstance(class_node, ast.Attribute) else class_expr
    cls = resolve_class(class_node, resolver)
    kind = classify(cls) if cls is not None else None
    if kind is None:
        kind = classify_by_name(class_name)
        notes.append(f"class {class_expr} not found: kind {kind!r} guessed from its name")
    outer, chained = _outermost_chain(node, parents)
    keywords = _Keywords(node, resolver)
    if len(node.args) > 1:
        notes.append("extra positional arguments go to the model's __init__ (model_args): not modelled")
    dtype, dtype_keyword = keywords.dtype()
    given = keywords.given
    overrides = {name: arg for name, arg in given.items() if name not in _NOT_CONFIG_KEYWORDS}
    if "config" in given:
        notes.append("an explicit config= is passed: the checkpoint's config.json is not what is built")
        overrides = {**overrides, "config": given["config"]}
    if keywords.hidden:
        notes.append(f"{', '.join(keywords.hidden)} may hold any argument: those not written out are unknown")
    return LoadCall(
        class_expr=class_expr, class_name=class_name, kind=kind, class_resolved=cls is not None,
        target=targets.get(id(outer)), model_id=_model_id(node, resolver, keywords),
        dtype=dtype, dtype_keyword=dtype_keyword, device_map=keywords.get("device_map"),
        max_memory=keywords.get("max_memory"), quantization_config=keywords.get("quantization_config"),
        offload_folder=keywords.get("offload_folder"), trust_remote_code=keywords.get("trust_remote_code"),
        location={name: given[name] for name in LOCATION_KEYWORDS if name in given},
        config_overrides=overrides, chained=chained, lineno=node.lineno, source=resolver.text(node),
        notes=tuple(notes), cls=cls,
    )


def load_call(
    model_id: Any,
    class_name: str = "AutoModelForCausalLM",
    *,
    target: str | None = "model",
    **arguments: Any,
) -> LoadCall:
    """A LoadCall for `target = class_name.from_pretrained(model_id, **arguments)` without writing the source.

    Convenience for callers that already hold the values (the default loader of `%llmload`, the
    benchmark, tests): the arguments are passed through the namespace, so they take exactly the
    parsing path a cell does. `target` is the name the user chose for the result (`--model-var`):
    reports name the model by it.
    """
    namespace = {"__model_id": model_id, **{f"__arg_{k}": v for k, v in arguments.items()}}
    keyword_text = "".join(f", {k}=__arg_{k}" for k in arguments)
    source = f"__model = {class_name}.from_pretrained(__model_id{keyword_text})"
    (call,) = find_load_calls(source, namespace)
    return replace(call, target=target)
