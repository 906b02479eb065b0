"""Which class a `X.from_pretrained` call is on, and what kind of object it loads.

The class is found without running code (the user's namespace, or transformers' own names);
its kind ("model", "tokenizer", "processor", "config") decides what the pre-flight does with
the call. When the class cannot be found, transformers' naming conventions give a guess.
"""

from __future__ import annotations

import ast
from typing import Any

from llm_magic.predict.expressions import Resolver, Unresolvable


def classify(cls: Any) -> str | None:
    """'model' / 'tokenizer' / 'processor' / 'config' for a transformers class, else None."""
    if not isinstance(cls, type):
        return None
    try:
        import transformers
    except ImportError:
        return None
    from llm_magic.compat import CompatError
    from llm_magic.compat.transformers import is_auto_class

    try:
        if is_auto_class(cls):
            return "model"
    except CompatError:
        # Auto classes cannot be told apart in this version: the public bases below still sort
        # tokenizers and configs; an Auto model class is then named by its name.
        auto_unknown = True
    else:
        auto_unknown = False
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
    return None if auto_unknown else "other"


def classify_by_name(name: str) -> str:
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


def resolve_class(node: ast.AST, resolver: Resolver) -> Any:
    """The class object behind `X` in `X.from_pretrained`, or None when it can't be found safely."""
    if isinstance(node, ast.Name):
        if node.id in resolver.namespace:
            value = resolver.namespace[node.id]
            return value if isinstance(value, type) else None
        return _transformers_class(node.id)
    if isinstance(node, ast.Attribute):
        try:
            value = resolver.attribute(node)
        except Unresolvable:
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
