"""Values kept between calibration segments, per batch: in memory up to a byte budget, on disk beyond it."""
from __future__ import annotations

import os
import resource
import sys

import numpy as np


def default_memory_budget() -> int:
    """A quarter of the machine's physical memory (1 GiB when it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


DEFAULT_MEMORY_BUDGET = default_memory_budget()


class ActivationStore:
    """``put`` / ``get`` / ``drop`` arrays by (value name, batch index). Arrays go to memory while the total
    held there stays within ``budget`` bytes, else to ``.npy`` files in ``workdir`` (read back when needed, so a
    calibration larger than memory runs, slower). Tracks the peak bytes held in memory and on disk."""

    def __init__(self, budget: int, workdir: str, to_host=np.asarray, from_host=None, size=None) -> None:
        """``to_host`` / ``from_host`` convert a value to a numpy array for the disk and back (a torch tensor or
        an OrtValue on its device, say); ``size`` gives a value's bytes (default: its ``nbytes``), None for
        values that always stay in memory (numbers, shapes)."""
        self.budget, self.workdir = budget, workdir
        self.to_host, self.from_host = to_host, from_host or (lambda a: a)
        self.size = size or (lambda v: getattr(v, "nbytes", None))
        self.memory: dict[tuple[str, int], object] = {}
        self.sizes: dict[tuple[str, int], int] = {}
        self.disk: dict[tuple[str, int], tuple[str, int]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.memory_bytes = self.disk_bytes = 0
        self.peak_memory = self.peak_disk = 0
        self._files = 0

    def put(self, name: str, batch: int, value) -> None:
        key = (name, batch)
        self.drop(name, batch)
        size = self.size(value)
        self.dtypes[name] = _dtype(value)
        if size is None or self.memory_bytes + size <= self.budget:
            self.memory[key] = value
            self.sizes[key] = size or 0
            self.memory_bytes += size or 0
            self.peak_memory = max(self.peak_memory, self.memory_bytes)
            return
        self._files += 1
        path = os.path.join(self.workdir, f"value{self._files}.npy")
        np.save(path, self.to_host(value), allow_pickle=False)
        self.disk[key] = (path, size)
        self.disk_bytes += size
        self.peak_disk = max(self.peak_disk, self.disk_bytes)

    def get(self, name: str, batch: int):
        key = (name, batch)
        if key in self.memory:
            return self.memory[key]
        return self.from_host(np.load(self.disk[key][0], allow_pickle=False))

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.memory or key in self.disk

    def drop(self, name: str, batch: int) -> None:
        key = (name, batch)
        if key in self.memory:
            del self.memory[key]
            self.memory_bytes -= self.sizes.pop(key)
        elif key in self.disk:
            path, size = self.disk.pop(key)
            self.disk_bytes -= size
            os.unlink(path)

    def where(self) -> str:
        """Where the values lived: 'memory', 'memory and disk' or 'nothing kept'."""
        if self.peak_disk:
            return "memory and disk"
        return "memory" if self.peak_memory else "nothing kept"


def _dtype(value):
    """A value's element type as a numpy dtype (an OrtValue's too), or None."""
    if hasattr(value, "element_type"):
        try:
            import onnx
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.element_type()))
        except Exception:  # not a tensor
            return None
    return getattr(value, "dtype", None)


def peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
