"""How much memory a step may take, checked before it allocates: a clear error instead of a MemoryError.

A model input declared ``[1, 3, 100000, 100000]`` or an ``.npz`` whose header promises 256 GB must be refused by
arithmetic on the shapes, before numpy asks for the bytes (which ends in a MemoryError, or in the kernel killing
the process).
"""
from __future__ import annotations

import resource

from .errors import UnsupportedError


def available_memory() -> int:
    """Bytes this process can still allocate: the kernel's MemAvailable, capped by the address-space limit
    (``ulimit -v``) less what the process already maps; physical memory when /proc cannot be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        import os
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            available = 1 << 40
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * resource.getpagesize()
        except OSError:
            mapped = 0
        available = min(available, max(soft - mapped, 0))
    return available


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_allocation(nbytes: int, what: str, remedy: str) -> None:
    """Raise ``UnsupportedError`` (exit 4) when ``what`` needs more than the memory available."""
    free = available_memory()
    if nbytes > free:
        raise UnsupportedError(f"{what} needs {human(nbytes)} of memory, more than the {human(free)} available; "
                               f"{remedy}")


__all__ = ["available_memory", "check_allocation", "human"]
