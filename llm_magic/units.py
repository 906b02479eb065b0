"""Byte counts as people read them. No dependencies: data modules and renderers share it."""

from __future__ import annotations


def format_bytes(count: int | None) -> str:
    """Binary units, three significant figures: '1.21 GiB', '640 KiB', 'unknown'."""
    if count is None:
        return "unknown"
    sign = "-" if count < 0 else ""
    value = float(abs(count))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{sign}{int(value)} B" if unit == "B" else f"{sign}{value:.3g} {unit}"
