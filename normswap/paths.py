"""Every path normswap will write, checked before any work: nothing it writes is, or overwrites, what it reads.

A ``WritePlan`` knows the files a command reads (the model, its external data, data files, weights) by file
identity (device and inode, so links and hard links count) and by resolved path. Each output added to it must be
a file path (not empty, not a folder), distinct from every input and from every other output, in a folder that
exists and is writable. Collisions are usage errors (exit 2); a missing or unwritable folder is an output error
(exit 5). The command checks all of its outputs before it converts anything, so a violation writes nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import OutputError, UsageError

def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, unreadable, or a name no file can have (a NUL byte)
        return None
    return st.st_dev, st.st_ino


def external_files(model: Path) -> list[Path]:
    """The external data files a model file names (resolved beside it), at any model size and without loading
    its weights (``onnx.scan``); none when the file cannot be read as a model (the loader says why)."""
    from .onnx.scan import external_locations
    locations = external_locations(Path(model)) if Path(model).is_file() else None
    return sorted({Path(model).parent / loc for loc in locations or () if loc and "\0" not in loc})


class WritePlan:
    """The files one command reads, and the outputs it will write (``add`` each before any work)."""

    def __init__(self, reads: list[Path]) -> None:
        self.reads = [Path(p) for p in reads if p is not None]
        self.read_ids = {i for i in map(_identity, self.reads) if i is not None}
        self.read_paths = {os.path.realpath(p) for p in self.reads}
        self.writes: dict[str, str] = {}  # resolved path -> what it is

    def add(self, path: str | os.PathLike, what: str, *, may_replace_input: bool = False) -> Path:
        """Check one output (``what``: "-o", "--report", ...) and return the path to write: through a symbolic
        link, its target (so ``--in-place`` on a link updates the real model, and the link stays)."""
        if str(path) == "":
            raise UsageError(f"{what} is empty; name a file")
        target = Path(os.path.realpath(path))
        if target.is_dir():
            raise OutputError(f"{what} '{path}' is a folder; name a file in it")
        same_as_input = _identity(target) in self.read_ids or str(target) in self.read_paths
        if same_as_input and not may_replace_input:
            raise UsageError(f"{what} '{path}' is a file this command reads (the model, its external data or a data "
                             "file); name another file")
        if str(target) in self.writes:
            raise UsageError(f"{what} '{path}' is also the {self.writes[str(target)]}; give each output its own file")
        folder = target.parent
        if not folder.is_dir():
            raise OutputError(f"{what} '{path}': folder '{folder}' does not exist; create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{what} '{path}': folder '{folder}' is not writable")
        self.writes[str(target)] = what
        return target if Path(path).is_symlink() else Path(path)

    def reserve(self, path: str | os.PathLike, what: str) -> None:
        """Claim a name the command may create later (an output's external data file, ``<output>.data``), so that
        no other output is given it; it may exist and be read now (a model rewritten in place writes its new data
        under a fresh name and removes the old file only once nothing reads it)."""
        self.writes.setdefault(os.path.realpath(path), what)
