"""What a cell's `X.from_pretrained(...)` calls ask for, read from its source without running it.

The pre-flight has to know, before the cell runs, which checkpoint each call loads and with which
`device_map`, `max_memory`, dtype, quantization and offload folder. The cell is parsed with `ast`;
an argument is resolved only when that needs no code to run: a literal, arithmetic on literals,
a plain name bound in the user's namespace, a module attribute such as `torch.bfloat16` (read
with `inspect.getattr_static`, so no property or `__getattr__` runs), or a container of those.
Anything else (a call, a subscript, an f-string) is kept as its source text and marked unknown:
the pre-flight then says it cannot predict, instead of guessing.
"""

from __future__ import annotations

import ast
import inspect
import operator
import types
from dataclasses import dataclass, field
from typing import Any, Mapping

# The from_pretrained keywords the pre-flight reads. `torch_dtype` is the old spelling of `dtype`
# (both versions still accept it; `dtype` wins when both are given).
LOAD_KEYWORDS = (
    "dtype",
    "torch_dtype",
    "device_map",
    "max_memory",
    "quantization_config",
    "offload_folder",
    "trust_remote_code",
)

# Keywords that change where the files are read from, not what is built.
LOCATION_KEYWORDS = ("revision", "subfolder", "cache_dir", "variant", "use_safetensors")

# Everything else from_pretrained pops before the rest go to the config as overrides.
_NOT_CONFIG_KEYWORDS = frozenset(
    LOAD_KEYWORDS
    + LOCATION_KEYWORDS
    + (
        "pretrained_model_name_or_path",
        "config",
        "force_download",
        "local_files_only",
        "proxies",
        "token",
        "use_auth_token",
        "output_loading_info",
        "low_cpu_mem_usage",
        "offload_buffers",
        "offload_state_dict",
        "attn_implementation",
        "state_dict",
        "from_tf",
        "from_flax",
        "adapter_kwargs",
        "adapter_name",
        "gguf_file",
        "key_mapping",
        "weights_only",
        "use_kernels",
        "kernel_config",
        "tp_plan",
        "tp_size",
        "device_mesh",
        "distributed_config",
        "generation_config",
        "code_revision",
        "_fast_init",
        "mirror",
    )
)

# Arithmetic allowed on literal numbers (`20 * 1024**3`): cannot run user code.
_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Pow: operator.pow,
}
_MAX_EXPONENT = 128  # `2 ** 10**9` would hang the pre-flight


class _Unresolvable(Exception):
    """An expression we will not evaluate (it would need code to run)."""


@dataclass(frozen=True)
class Arg:
    """One argument of a call as written, and its value when that can be known without running code.

    `present` False: the argument was not written (and no `**kwargs` could hide it); `value` is
    then None. `known` False: written (or possibly inside `**kwargs`), but its value needs code to
    run; `source` holds the text.
    """

    present: bool = False
    known: bool = True
    value: Any = None
    source: str | None = None
    origin: str = "absent"  # "absent" | "literal" | "namespace" | "attribute" | "kwargs" | "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "known": self.known,
            "value": _plain(self.value) if self.known else None,
            "source": self.source,
            "origin": self.origin,
        }


ABSENT = Arg()


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


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of a resolved value (dtypes and other objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------------------------------
# Safe resolution of an expression


class _Resolver:
    def __init__(self, source: str, namespace: Mapping[str, Any]):
        self.source = source
        self.namespace = namespace

    def text(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or ast.unparse(node)

    def arg(self, node: ast.AST) -> Arg:
        text = self.text(node)
        try:
            return Arg(present=True, known=True, value=ast.literal_eval(node), source=text, origin="literal")
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
        try:
            value, origin = self.value(node)
        except _Unresolvable:
            return Arg(present=True, known=False, value=None, source=text, origin="unknown")
        return Arg(present=True, known=True, value=value, source=text, origin=origin)

    def value(self, node: ast.AST) -> tuple[Any, str]:
        """(value, origin) of a node made only of literals, bound names and module attributes."""
        if isinstance(node, ast.Constant):
            return node.value, "literal"
        if isinstance(node, ast.Name):
            if node.id in self.namespace:
                return self.namespace[node.id], "namespace"
            raise _Unresolvable(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(node), "attribute"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand, origin = self.value(node.operand)
            if isinstance(operand, (int, float)) and not isinstance(operand, bool):
                return (-operand if isinstance(node.op, ast.USub) else operand), origin
            raise _Unresolvable("unary")
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, lo = self.value(node.left)
            right, ro = self.value(node.right)
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
            if not numbers:
                raise _Unresolvable("binop")
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise _Unresolvable("huge power")
            try:
                return _BINARY_OPS[type(node.op)](left, right), _merge(lo, ro)
            except (ArithmeticError, ValueError):
                raise _Unresolvable("arithmetic") from None
        if isinstance(node, ast.Dict):
            out: dict[Any, Any] = {}
            origin = "literal"
            for key_node, value_node in zip(node.keys, node.values):
                if key_node is None:  # `{**other}`
                    merged, o = self.value(value_node)
                    if not isinstance(merged, Mapping):
                        raise _Unresolvable("dict unpack")
                    out.update(merged)
                else:
                    key, ko = self.value(key_node)
                    try:
                        hash(key)
                    except TypeError:
                        raise _Unresolvable("unhashable key") from None
                    out[key], o = self.value(value_node)
                    origin = _merge(origin, ko)
                origin = _merge(origin, o)
            return out, origin
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items, origin = [], "literal"
            for element in node.elts:
                if isinstance(element, ast.Starred):
                    raise _Unresolvable("starred")
                value, o = self.value(element)
                items.append(value)
                origin = _merge(origin, o)
            kind = {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)]
            try:
                return kind(items), origin
            except TypeError:
                raise _Unresolvable("unhashable") from None
        raise _Unresolvable(type(node).__name__)

    def attribute(self, node: ast.Attribute) -> Any:
        """`torch.bfloat16`, `transformers.AutoModel`: an attribute chain rooted at a module.

        Only modules are walked, and only through `inspect.getattr_static`, so no property,
        descriptor or module `__getattr__` runs. The root is the namespace's binding, or, for the
        well-known `torch` / `transformers` names left unbound, the module itself (imported lazily:
        the cell is about to import them anyway).
        """
        chain: list[str] = []
        current: ast.AST = node
        while isinstance(current, ast.Attribute):
            chain.append(current.attr)
            current = current.value
        if not isinstance(current, ast.Name):
            raise _Unresolvable("attribute root")
        chain.reverse()
        root = _module_root(current.id, self.namespace)
        obj = root
        for name in chain:
            if not isinstance(obj, types.ModuleType):
                raise _Unresolvable("attribute of a non-module")
            try:
                obj = inspect.getattr_static(obj, name)
            except AttributeError:
                # Lazy modules (transformers) keep most names out of their `__dict__`; asking a lazy
                # module for a class is what `import` itself does, and runs no user code.
                obj = _lazy_module_attribute(obj, name)
        return obj


def _merge(a: str, b: str) -> str:
    if a == b:
        return a
    for origin in ("namespace", "attribute"):
        if origin in (a, b):
            return origin
    return a


def _module_root(name: str, namespace: Mapping[str, Any]) -> types.ModuleType:
    if name in namespace:
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            return value
        raise _Unresolvable("root is not a module")
    if name in ("torch", "transformers"):
        import importlib

        return importlib.import_module(name)
    raise _Unresolvable(name)


def _lazy_module_attribute(module: types.ModuleType, name: str) -> Any:
    import sys

    transformers = sys.modules.get("transformers")
    if transformers is not None and module is transformers:
        try:
            return getattr(transformers, name)
        except (AttributeError, ImportError, RuntimeError):
            pass
    raise _Unresolvable(f"{module.__name__}.{name}")


# ---------------------------------------------------------------------------------------------
# Which class, and what kind of object it loads


def _classify(cls: Any) -> str | None:
    """'model' / 'tokenizer' / 'processor' / 'config' for a transformers class, else None."""
    if not isinstance(cls, type):
        return None
    try:
        import transformers
        from transformers.models.auto import auto_factory
    except ImportError:
        return None
    if issubclass(cls, auto_factory._BaseAutoModelClass):
        return "model"
    checks = [
        ("model", "PreTrainedModel"),
        ("tokenizer", "PreTrainedTokenizerBase"),
        ("tokenizer", "AutoTokenizer"),
        ("processor", "ProcessorMixin"),
        ("processor", "ImageProcessingMixin"),
        ("processor", "FeatureExtractionMixin"),
        ("processor", "AutoProcessor"),
        ("processor", "AutoImageProcessor"),
        ("processor", "AutoFeatureExtractor"),
        ("processor", "AutoVideoProcessor"),
        ("config", "PretrainedConfig"),
        ("config", "AutoConfig"),
        ("config", "GenerationConfig"),
    ]
    for kind, base_name in checks:
        try:
            base = getattr(transformers, base_name)
        except (AttributeError, ImportError, RuntimeError):
            continue
        if isinstance(base, type) and issubclass(cls, base):
            return kind
    return "other"


def _classify_by_name(name: str) -> str:
    """A fallback when the class cannot be found: the naming conventions of transformers."""
    if "Tokenizer" in name:
        return "tokenizer"
    if any(word in name for word in ("Processor", "FeatureExtractor")):
        return "processor"
    if name.endswith("Config"):
        return "config"
    if name.startswith("AutoModel") or "For" in name or name.endswith("Model"):
        return "model"
    return "other"


def _resolve_class(node: ast.AST, resolver: _Resolver) -> Any:
    """The class object behind `X` in `X.from_pretrained`, or None when it can't be found safely."""
    if isinstance(node, ast.Name):
        if node.id in resolver.namespace:
            value = resolver.namespace[node.id]
            return value if isinstance(value, type) else None
        return _transformers_class(node.id)
    if isinstance(node, ast.Attribute):
        try:
            value = resolver.attribute(node)
        except _Unresolvable:
            return None
        return value if isinstance(value, type) else None
    return None


def _transformers_class(name: str) -> Any:
    try:
        import transformers
    except ImportError:
        return None
    try:
        value = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        return None
    return value if isinstance(value, type) else None


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
    resolver = _Resolver(source, namespace)
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


def _load_call(node: ast.Call, resolver: _Resolver, parents, targets) -> LoadCall:
    notes: list[str] = []
    class_node = node.func.value  # type: ignore[attr-defined]
    class_expr = resolver.text(class_node)
    class_name = class_node.attr if isinstance(class_node, ast.Attribute) else class_expr
    cls = _resolve_class(class_node, resolver)
    kind = _classify(cls) if cls is not None else None
    if kind is None:
        kind = _classify_by_name(class_name)
        notes.append(f"class {class_expr} not found: kind {kind!r} guessed from its name")

    outer, chained = _outermost_chain(node, parents)
    target = targets.get(id(outer))

    keywords: dict[str, Arg] = {}
    hidden: list[str] = []  # `**expr` we cannot see into
    for keyword in node.keywords:
        if keyword.arg is None:
            unpacked = resolver.arg(keyword.value)
            if unpacked.known and isinstance(unpacked.value, Mapping):
                for key, value in unpacked.value.items():
                    keywords[str(key)] = Arg(True, True, value, f"{unpacked.source}[{key!r}]", "kwargs")
            else:
                hidden.append(f"**{unpacked.source}")
        else:
            keywords[keyword.arg] = resolver.arg(keyword.value)

    def get(name: str) -> Arg:
        if name in keywords:
            return keywords[name]
        if hidden:
            # Could be inside the `**kwargs` we cannot read: unknown, not absent.
            return Arg(present=True, known=False, source=", ".join(hidden), origin="unknown")
        return ABSENT

    # The checkpoint: first positional, or the keyword.
    positional = [a for a in node.args if not isinstance(a, ast.Starred)]
    if node.args and isinstance(node.args[0], ast.Starred):
        model_id = Arg(True, False, None, resolver.text(node.args[0]), "unknown")
    elif positional:
        model_id = resolver.arg(positional[0])
    else:
        model_id = get("pretrained_model_name_or_path")
    if len(node.args) > 1:
        notes.append("extra positional arguments go to the model's __init__ (model_args): not modelled")

    # `dtype=` wins over `torch_dtype=` in both transformers 4.57 and 5.x.
    if "dtype" in keywords:
        dtype, dtype_keyword = keywords["dtype"], "dtype"
    elif "torch_dtype" in keywords:
        dtype, dtype_keyword = keywords["torch_dtype"], "torch_dtype"
    else:
        dtype, dtype_keyword = get("dtype"), None

    location = {name: keywords[name] for name in LOCATION_KEYWORDS if name in keywords}
    overrides = {name: arg for name, arg in keywords.items() if name not in _NOT_CONFIG_KEYWORDS}
    if "config" in keywords:
        notes.append("an explicit config= is passed: the checkpoint's config.json is not what is built")
        overrides = {**overrides, "config": keywords["config"]}
    if hidden:
        notes.append(f"{', '.join(hidden)} may hold any argument: those not written out are unknown")

    return LoadCall(
        class_expr=class_expr,
        class_name=class_name,
        kind=kind,
        class_resolved=cls is not None,
        target=target,
        model_id=model_id,
        dtype=dtype,
        dtype_keyword=dtype_keyword,
        device_map=get("device_map"),
        max_memory=get("max_memory"),
        quantization_config=get("quantization_config"),
        offload_folder=get("offload_folder"),
        trust_remote_code=get("trust_remote_code"),
        location=location,
        config_overrides=overrides,
        chained=chained,
        lineno=node.lineno,
        source=resolver.text(node),
        notes=tuple(notes),
        cls=cls,
    )


def load_call(
    model_id: Any,
    class_name: str = "AutoModelForCausalLM",
    **arguments: Any,
) -> LoadCall:
    """A LoadCall for `class_name.from_pretrained(model_id, **arguments)` without writing the source.

    Convenience for callers that already hold the values (the benchmark, tests, a line magic):
    the arguments are passed through the namespace, so they take exactly the parsing path a cell does.
    """
    namespace = {"__model_id": model_id, **{f"__arg_{k}": v for k, v in arguments.items()}}
    keyword_text = "".join(f", {k}=__arg_{k}" for k in arguments)
    source = f"__model = {class_name}.from_pretrained(__model_id{keyword_text})"
    (call,) = find_load_calls(source, namespace)
    return call
