"""Run a model's own forward on fake tensors and count the bytes it would hold, without holding them.

Three small pieces, all imported lazily with torch:

- `LiveBytes`, a `TorchDispatchMode` that sees every tensor an operator returns: a storage it
  has not seen (not a view of an input, not a parameter made before it started) adds its bytes;
  when the storage dies (a weak reference's callback) the bytes go. `live` and the peak since the
  last `mark()` are what a real allocator would have held, minus its rounding.
- `SmallRealOps`, a `TorchFunctionMode`: an operator whose tensor arguments are all real (or that
  has none: a factory) runs for real when its result is small, and the next-token pick of fake
  logits (argmax, multinomial) returns a real token. So `generate` itself runs on the fake model:
  its token ids, attention mask, position ids and stopping checks are real (and small), its
  decisions read real values (transformers reads the mask to decide whether to build a causal
  mask at all, and treats a fake one as "tracing"), and every tensor that depends on a weight
  (activations, cache, logits) is fake.
- `fake_mode()`: PyTorch's `FakeTensorMode`, which runs the real modeling code on tensors that
  have shapes, dtypes and devices but no data.

The fake tensors live on the cpu: fake CUDA tensors do not survive indexing on a machine without
CUDA, and the memory an operator returns does not depend on the device (`sdpa` on the cpu picks
the flash kernel, whose outputs are those of CUDA's flash or memory-efficient kernels).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from llm_magic.engine.tensors import is_fake

# Results of real operators up to this many elements are computed for real (masks of B x T
# booleans and their indices); anything larger stays fake.
SMALL_REAL_NUMEL = 1 << 20


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    # compat: FakeTensorMode is torch's (torch._subclasses), stable since torch 2.1.
    return FakeTensorMode(allow_non_fake_inputs=True)


def _tensors(tree: Any, found: list | None = None) -> list:
    """The tensors in nested tuples, lists and dicts (operator arguments and results)."""
    import torch

    found = [] if found is None else found
    if isinstance(tree, torch.Tensor):
        found.append(tree)
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            _tensors(item, found)
    elif isinstance(tree, dict):
        for item in tree.values():
            _tensors(item, found)
    return found


def _storage(tensor: Any):
    try:
        return tensor.untyped_storage()
    except Exception:  # noqa: BLE001 - sparse or exotic tensors have none: not counted
        return None


def live_bytes_mode(cpu_kernels: bool = False, block: int = 1):
    """A fresh `LiveBytes` (the class is built on first use: torch is imported lazily)."""
    return _live_bytes_class()(cpu_kernels, block)


def _cpu_flash_attention() -> tuple:
    import torch

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return (op.default,) if op is not None else ()


def cpu_flash_attention_scratch(args) -> int:
    """Bytes the cpu flash-attention kernel allocates inside itself while it runs.

    compat: the buffers of PyTorch's cpu_flash_attention (aten/src/ATen/native/cpu/
    FlashAttentionKernel.cpp, torch 2.1 to 2.13): per thread, a q-block x kv-block score tile,
    the running max and sum, and an output tile, in float32 (plus the tile in the input dtype
    for bf16/fp16). The operator's own outputs are counted like any other.
    """
    import torch

    query, key, value = args[:3]
    q_length, kv_length = query.shape[-2], key.shape[-2]
    q_split = 256 if q_length >= 768 else 64 if q_length >= 192 else 32
    q_split, kv_split = min(q_split, q_length), min(512, kv_length)
    per_thread = q_split * kv_split + 2 * q_split + q_split * value.shape[-1]
    reduced = query.dtype in (torch.bfloat16, torch.float16)
    threads = torch.get_num_threads()
    return threads * (4 * per_thread + (q_split * kv_split * query.element_size() if reduced else 0))


def small_real_ops_mode(token: int = 0, counter=None):
    return _small_real_ops_class()(token, counter)


_CLASSES: dict[str, type] = {}


def _live_bytes_class() -> type:
    # Long because it holds a class: the class is made on first use, so that importing this
    # module does not import torch (`%load_ext` stays instant).
    if "live" in _CLASSES:
        return _CLASSES["live"]
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.weak import WeakIdKeyDictionary

    class LiveBytes(TorchDispatchMode):
        """Bytes of the storages operators created, alive now (`live`) and at most (`peak`)."""

        def __init__(self, cpu_kernels: bool = False, block: int = 1) -> None:
            super().__init__()
            self.cpu_kernels = cpu_kernels  # add the scratch memory of the cpu attention kernel
            self.block = block  # allocation granularity: PyTorch's CUDA allocator rounds to 512 bytes
            self.live = 0  # bytes
            self.peak = 0  # bytes, since the last mark()
            self._sizes = WeakIdKeyDictionary()  # storage -> bytes counted (0: not ours)
            self._refs: list = []
            self.paused = False  # True while SmallRealOps sizes a result on fake copies

        def mark(self) -> int:
            """Start a new peak window here; returns the live bytes now."""
            self.peak = self.live
            return self.live

        def bytes_of(self, tensors) -> int:
            """Bytes of the counted storages behind `tensors`, each storage once."""
            seen, total = set(), 0
            for tensor in tensors:
                storage = _storage(tensor)
                if storage is None or id(storage) in seen:
                    continue
                seen.add(id(storage))
                total += self._sizes.get(storage, 0)
            return total

        def _release(self, nbytes: int, _ref=None) -> None:
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.paused or _returns_views(func):
                return out
            for tensor in _tensors((args, kwargs)):  # inputs made elsewhere: never ours
                storage = _storage(tensor)
                if storage is not None and storage not in self._sizes:
                    self._sizes[storage] = 0
            for tensor in _tensors(out):
                storage = _storage(tensor)
                if storage is None or storage in self._sizes:
                    continue  # a view or an in-place result: no new memory
                nbytes = -(-storage.nbytes() // self.block) * self.block
                self._sizes[storage] = nbytes
                if nbytes:
                    self._refs.append(weakref.ref(storage, lambda ref, n=nbytes: self._release(n)))
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
            if self.cpu_kernels and func in _cpu_flash_attention():
                self.peak = max(self.peak, self.live + cpu_flash_attention_scratch(args))
            return out

    _CLASSES["live"] = LiveBytes
    return LiveBytes


def _small_real_ops_class() -> type:
    if "small" in _CLASSES:
        return _CLASSES["small"]
    import torch
    from torch.overrides import TorchFunctionMode

    picks = {torch.argmax, torch.Tensor.argmax, torch.multinomial, torch.Tensor.multinomial}

    class SmallRealOps(TorchFunctionMode):
        """Small results of real inputs are computed for real; the next token is a real constant."""

        def __init__(self, token: int = 0, counter=None) -> None:
            super().__init__()
            self.token = token  # the id every "generated" token gets (not an end-of-sequence id)
            self.counter = counter  # a LiveBytes that must not count the sizing runs

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            tensors = _tensors((args, kwargs))
            if any(is_fake(t) or t.device.type == "meta" for t in tensors):
                result = func(*args, **kwargs)
                if func in picks and is_fake(result):  # argmax/multinomial of fake logits
                    with _real():
                        return torch.full(tuple(result.shape), self.token, dtype=result.dtype)
                return result
            if _inside_vmap():  # sizes there are per example: a small one may be a large result
                return func(*args, **kwargs)
            name = getattr(func, "__name__", "")
            in_place = name.startswith("__i") or (name.endswith("_") and not name.endswith("__"))
            if in_place:  # writes into a real tensor: no new memory, and must happen once
                small = True
            else:
                small = self._small(func, args, kwargs)
            if not small:
                return func(*args, **kwargs)
            with _real():
                return func(*args, **kwargs)

        def _small(self, func, args, kwargs) -> bool:
            """Is the result small? Sized on fake copies: no real memory for a large one."""
            if self.counter is not None:
                self.counter.paused = True
            try:
                return sum(t.numel() for t in _tensors(func(*args, **kwargs))) <= SMALL_REAL_NUMEL
            except Exception:  # noqa: BLE001 - a value read (bool(), item()): a scalar result
                return True
            finally:
                if self.counter is not None:
                    self.counter.paused = False

    _CLASSES["small"] = SmallRealOps
    return SmallRealOps


def _returns_views(func) -> bool:
    """Does the operator return views of (or write into) its inputs? Its schema says so
    (`Tensor(a)`); the storage check cannot, when the input was a real tensor made fake on entry."""
    schema = getattr(func, "_schema", None)
    returns = getattr(schema, "returns", None)
    return bool(returns) and all(ret.alias_info is not None for ret in returns)


def _inside_vmap() -> bool:
    """Is a functorch transform (vmap: transformers builds masks with it) running?"""
    # compat: torch._C._functorch.peek_interpreter_stack (private, torch >= 2.0).
    try:
        import torch

        return torch._C._functorch.peek_interpreter_stack() is not None
    except Exception:  # noqa: BLE001 - cannot tell: treat as inside (the fake path is always safe)
        return True


def _real():
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def fake_like(tensor: Any, dtype: Any = None):
    """A fake tensor of `tensor`'s shape (and dtype unless given), on the cpu. Call inside fake_mode()."""
    import torch

    return torch.empty(tuple(tensor.shape), dtype=dtype or tensor.dtype, device="cpu")


def make_fake_parameters(module: Any, mode: Any, dtype_of: Callable[[str, Any], Any]) -> None:
    """Replace every parameter and buffer of `module` (ours: a replica) by a fake cpu tensor.

    `dtype_of(qualified_name, tensor)` gives the dtype to use (the real model's, by name).
    """
    import torch

    with mode:
        for prefix, sub in module.named_modules():
            for name, parameter in list(sub._parameters.items()):
                if parameter is not None:
                    dtype = dtype_of(f"{prefix}.{name}" if prefix else name, parameter)
                    sub._parameters[name] = torch.nn.Parameter(fake_like(parameter, dtype), requires_grad=False)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    sub._buffers[name] = fake_like(buffer)
