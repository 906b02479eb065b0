"""Byte counts as people read them. No heavy dependencies: data modules and renderers share it."""

from __future__ import annotations

from llm_magic.names import device_sort_key


def format_bytes(count: int | None) -> str:
    """Binary units, three significant figures: '1.21 GiB', '640 KiB', 'unknown'."""
    if count is None:
        return "unknown"
    sign = "-" if count < 0 else ""
    value = float(abs(count))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            break
        value /= 1024
    return f"{sign}{int(value)} B" if unit == "B" else f"{sign}{value:.3g} {unit}"


def format_by_device(bytes_by_device: dict[str, int]) -> str:
    """'1.2 GiB cuda:0, 300 MiB cpu'."""
    if not bytes_by_device:
        return "0 B"
    ordered = sorted(bytes_by_device, key=device_sort_key)
    return ", ".join(f"{format_bytes(bytes_by_device[d])} {d}" for d in ordered)
