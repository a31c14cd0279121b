"""Progress bars people can trust: on stderr when it is a terminal, quiet in pipes, logs and CI.

Every long step reports ``(done, total, label)``; calibration's label carries its throughput (samples/s) and
the bar its ETA. The CLI and the Python API draw the same bar: the API's ``progress=None`` means "a bar when
stderr is a terminal", ``False`` means none, a callable receives the calls itself.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator

Progress = Callable[[int, int, str], None]


@contextlib.contextmanager
def terminal_progress(quiet: bool = False) -> Iterator[Progress | None]:
    """A callback drawing a bar (with ETA) on stderr when it is a terminal; None when quiet or piped. A call
    whose total changes, or whose count goes back, starts a new bar (a new stage)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    import click
    bar = None

    def update(done: int, total: int, label: str) -> None:
        nonlocal bar
        if bar is not None and (bar.length != total or done < bar.pos):
            bar.__exit__(None, None, None)
            bar = None
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, show_eta=True)
            bar.__enter__()
        bar.label = label
        bar.update(done - bar.pos)
    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


@contextlib.contextmanager
def progress_for(progress: Progress | bool | None) -> Iterator[Progress | None]:
    """The API's ``progress`` argument as a callback: None -> a terminal bar when stderr is one, False -> none."""
    if progress is False:
        yield None
    elif progress is None or progress is True:
        with terminal_progress(quiet=False) as bar:
            yield bar
    else:
        yield progress


def auto_progress(fn):
    """Decorate an API function so its ``progress`` keyword follows ``progress_for``."""
    @functools.wraps(fn)
    def wrapper(*args, progress: Progress | bool | None = None, **kwargs):
        with progress_for(progress) as callback:
            return fn(*args, progress=callback, **kwargs)
    return wrapper
