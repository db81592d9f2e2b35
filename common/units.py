"""Byte counts for people: all sizes are Python ints (64-bit and beyond)."""
from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; exact below 1 KiB."""
    n = int(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < KiB:
        return f"{sign}{n} B"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}"
    raise AssertionError("unreachable")


def format_mib(n: int) -> str:
    """Whole MiB, the unit of the plan tables: 412 MiB."""
    return f"{int(n) // MiB} MiB"
