"""The loader's memory budget: how each transformers version turns free memory into the bytes
per device its placement of `device_map="auto"` may use.

`loader_budget` is the one place that knows those rules; `transformers_budget` (the pre-flight's
budget, honouring a user `max_memory`), `free_after_release`, `autoload_budget` and
`loader_max_memory` build on it. Measuring the memory is `measure/memory.py`'s job; this module
only does arithmetic on its snapshots. Light: no torch or transformers at import, so the default
loader of `%llmload` can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from llm_magic.compat import transformers as tf
from llm_magic.names import accelerate_key, accelerators, normalize_device


@dataclass(frozen=True)
class Budget:
    """Bytes per device the placement algorithm may use, as `from_pretrained` would compute them."""

    max_memory: dict[str, float | None]  # "cuda:0" / "cpu" -> bytes (before multi-GPU balancing); None unknown
    source: str  # "max_memory argument" | "free memory, transformers 5.24 margins"
    notes: tuple[str, ...] = ()


def _version(version: str | tuple[int, int] | None) -> tuple[int, int]:
    if isinstance(version, tuple):
        return version
    return tf.version(version)


def loader_budget(
    free: Mapping[str, int | None],
    cached_unused: Mapping[str, int] | None = None,
    *,
    transformers_version: str | tuple[int, int] | None = None,
    sequential: bool = False,
) -> dict[str, int | None]:
    """Bytes per device `from_pretrained(device_map=...)` gives its placement when the user sets no `max_memory`.

    `free`: per device name ("cuda:0", "cpu"), the bytes the load will find: on a GPU the driver's
    free memory plus PyTorch's cached-but-unused memory (both versions add that cache), on the
    cpu psutil's available RAM. None: unknown, and so is that device's budget. Leave "cpu" out
    on integrated GPUs (host RAM is the GPU's memory: accelerate gives the cpu no budget).
    `cached_unused`: the part of a GPU's `free` that is PyTorch's cache; only 4.x treats it apart.
    `sequential`: `device_map="sequential"`, which skips `get_balanced_memory` and its 90% cut.

    The rules (read in the code of transformers 4.57 and 5.23, accelerate 1.15):
    - 5.x `integrations.accelerate.get_max_memory`: driver free + cache per GPU, 90% of the cpu;
      then its `get_balanced_memory` takes 90% of the first GPU when exactly one GPU has a
      positive figure.
    - 4.57 `modeling_utils._get_device_map`: accelerate's `get_balanced_memory` on driver free
      alone (90% of the first GPU when exactly one has driver memory left), then the cache is
      added; the cpu at 100% of available.
    Balancing across several GPUs comes later and depends on the model: not done here. The
    result, passed back as `max_memory`, makes both versions place exactly as they would have
    (neither scales a user's `max_memory`). Quantizers' `adjust_max_memory` is not applied.
    Keys: the accelerators in ordinal order, then "cpu" when `free` has it.
    """
    cached = cached_unused or {}
    v5 = _version(transformers_version)[0] >= 5
    gpus = accelerators(free)

    def counted(device: str) -> int | None:
        value = free[device]
        return value if value is None or v5 else value - cached.get(device, 0)

    # get_balanced_memory counts GPUs with a positive figure (an unknown one takes part) and
    # cuts the first GPU key, whichever that is.
    single = not sequential and sum(1 for d in gpus if counted(d) is None or counted(d) > 0) == 1
    budget: dict[str, int | None] = {}
    for index, device in enumerate(gpus):
        figure = counted(device)
        if figure is None:
            budget[device] = None
            continue
        cut = int(figure * 0.9) if single and index == 0 else figure
        budget[device] = cut if v5 else cut + cached.get(device, 0)
    if "cpu" in free:
        available = free["cpu"]
        budget["cpu"] = None if available is None else (int(available * 0.9) if v5 else available)
    return budget


def transformers_budget(
    free: Mapping[str, int | None],
    max_memory: Mapping[Any, Any] | None = None,
    *,
    cached_unused: Mapping[str, int] | None = None,
    version: tuple[int, int] | None = None,
    sequential: bool = False,
) -> Budget:
    """The per-device budget `from_pretrained(device_map="auto")` would give the placement algorithm.

    `free`: bytes available per device ("cuda:0", "cpu") once the release step is done, counting
    PyTorch's cached-but-unused memory on accelerators; None where unknown. `cached_unused`: the
    part of `free` that is such cached memory (4.x adds it after the 90% cut). Default 0 (the
    release step empties the cache).

    A user `max_memory` is taken as given in both versions (strings converted as accelerate
    converts them); devices it leaves out get nothing. Without one, the version's margins:
    `loader_budget`.
    """
    from llm_magic.compat.accelerate import file_size

    version = version or tf.version()
    if max_memory is None:
        budget = loader_budget(free, cached_unused, transformers_version=version, sequential=sequential)
        notes = () if "cpu" in free else ("no 'cpu' entry in the free-memory figures: cpu budget unknown",)
        return Budget(dict(budget), f"free memory, transformers {version[0]}.{version[1]} margins", notes)

    given: dict[str, float | None] = {}
    notes: list[str] = []
    for key, value in max_memory.items():
        device = normalize_device(key)
        size = file_size(value)
        given[device] = size
        available = free.get(device)
        if available is not None and device != "disk" and size > available:
            notes.append(
                f"max_memory[{key!r}] = {int(size)} bytes exceeds the {int(available)} bytes free on "
                f"{device}: the load can run out of memory"
            )
    return Budget(given, "max_memory argument", tuple(notes))


def free_after_release(
    snapshot,
    freed: Mapping[str, int] | None = None,
    *,
    empty_cache: bool = True,
) -> tuple[dict[str, int | None], dict[str, int]]:
    """(free, cached_unused) per device name once the release step has freed `freed`, for `predict`.

    `snapshot`: a `measure.memory.MemorySnapshot`. `freed`: bytes the release will free per
    device ("cuda:0", "cpu"). `empty_cache`: the release hands PyTorch's cached blocks back to
    the driver (`release.return_memory` does whenever CUDA is initialised), so every GPU's
    cache counts as driver-free and `cached_unused` is 0. False: the cache the snapshot shows
    stays cached (what `autoload_budget` models).

    Every GPU the load would use gets an entry. One whose free memory is unknown (CUDA not
    initialised in this process, or nothing of ours on it yet: measuring would create a context)
    gets None: `predict` then says its `device_map="auto"` placement is unknown, while a plain
    cpu load or an explicit map is still predicted. Without torch or CUDA only "cpu" is there.
    Freed RAM is counted as returned to the system; small allocations may stay in the allocator.
    """
    freed = freed or {}
    free: dict[str, int | None] = {}
    cached: dict[str, int] = {}
    for index in range(snapshot.cuda_device_count or 0):
        name = f"cuda:{index}"
        usable, _ = snapshot.usable_free(name)
        if usable is None:
            free[name] = None
            continue
        free[name] = usable + freed.get(name, 0)
        cached[name] = 0 if empty_cache else snapshot.device(name).reserved_unused_bytes or 0
    cpu = snapshot.device("cpu")
    if cpu is not None:
        free["cpu"] = None if cpu.free_bytes is None else cpu.free_bytes + freed.get("cpu", 0)
    return free, cached


def autoload_budget(
    snapshot,
    extra_free: dict[str, int] | None = None,
    *,
    transformers_version: str | None = None,
) -> dict[int | str, int | None]:
    """The `max_memory` that `from_pretrained(device_map="auto")` would build now, with no user `max_memory`.

    Keys are as accelerate writes them: GPU ordinals, then "cpu". A GPU's value is None when it
    cannot be known without creating a CUDA context (CUDA not initialised, or nothing of this
    process on that GPU yet); the load will also pay for that context there. `extra_free` is what
    the release step will free first, per device name ("cuda:0", "cpu"); freed GPU memory is
    counted as returned to the driver while the cache the snapshot shows stays cached, the
    smaller of the possible budgets on 4.x. The rules: `loader_budget`.
    """
    free, cached = free_after_release(snapshot, extra_free, empty_cache=False)
    return _as_accelerate_keys(snapshot, free, cached, transformers_version, False)


def loader_max_memory(
    snapshot,
    *,
    transformers_version: str | None = None,
    sequential: bool = False,
) -> dict[int | str, int] | None:
    """An explicit `max_memory` for `from_pretrained(device_map="auto")`, from a snapshot taken after the release.

    Equal to the budget the load would compute itself in a fresh process with the same free
    memory: PyTorch's cache counts as free (a fresh process has none; the release empties it),
    and the installed version's margins apply (`loader_budget`). Passed as `max_memory`, it gives
    the placement the load gives without one, so what the process held before cannot shift it.

    None when a figure is unknown (CUDA not initialised here, or a GPU this process holds nothing
    on): pass no `max_memory` then. This process holds no memory on such GPUs, so the load's
    own measurement there is already a fresh process's.
    """
    free, cached = free_after_release(snapshot, empty_cache=True)
    budget = _as_accelerate_keys(snapshot, free, cached, transformers_version, sequential)
    if any(value is None for value in budget.values()):
        return None
    return budget  # type: ignore[return-value]


def _as_accelerate_keys(snapshot, free, cached, version, sequential) -> dict[int | str, int | None]:
    # accelerate's get_max_memory gives no "cpu" entry on integrated CUDA devices.
    if any(row.integrated for row in snapshot.cuda_devices):
        free = {name: value for name, value in free.items() if name != "cpu"}
    budget = loader_budget(free, cached, transformers_version=version, sequential=sequential)
    return {accelerate_key(name): value for name, value in budget.items()}
