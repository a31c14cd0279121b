"""Tables that fit the terminal: name columns shortened in the middle (never to identical strings), the last
column (the reason) cut at the edge with an ellipsis; the JSON report keeps every full string.

On a terminal the width is the terminal's (at least ``MIN_WIDTH``); written to a pipe or a file nothing is
shortened, so logs keep every name and reason whole.
"""
from __future__ import annotations

import re
import shutil
import sys

MIN_WIDTH = 80
ELLIPSIS = "…"
GAP = "  "


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object, keep: str = "") -> str:
    """``text`` with every control character (C0, DEL, C1: terminal escapes, BEL, CR, LF, NUL) and bidirectional
    override escaped as ``\\xNN`` / ``\\uNNNN``, except those in ``keep``: a model's names cannot move the cursor,
    retitle the terminal or forge output lines. The JSON report keeps the strings exactly."""
    def escape(m: re.Match) -> str:
        c = m.group(0)
        if c in keep:
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    return _CONTROL.sub(escape, str(text))


def terminal_width(stream=None) -> int | None:
    """Columns to fit, or None when ``stream`` (stdout by default) is not a terminal."""
    stream = stream if stream is not None else sys.stdout
    if not getattr(stream, "isatty", lambda: False)():
        return None
    return max(MIN_WIDTH, shutil.get_terminal_size((MIN_WIDTH, 24)).columns)


def shorten_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, its start and end kept around an ellipsis (layer names differ at
    both ends: ``backbone.layer3.0.bn1`` -> ``backbone…0.bn1``)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    tail = (width - 1) // 2 + (width - 1) % 2
    head = width - 1 - tail
    return text[:head] + ELLIPSIS + text[len(text) - tail:]


def shorten_unique(values: list[str], width: int) -> list[str]:
    """Every value shortened to ``width``, widening (per value) where two different values would read the same."""
    out = [shorten_middle(v, width) for v in values]
    for _ in range(max((len(v) for v in values), default=0)):
        seen: dict[str, set[str]] = {}
        for short, full in zip(out, values):
            seen.setdefault(short, set()).add(full)
        clashes = {s for s, fulls in seen.items() if len(fulls) > 1}
        if not clashes:
            break
        out = [shorten_middle(full, len(short) + 1) if short in clashes else short
               for short, full in zip(out, values)]
    return out


def cut_end(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + ELLIPSIS


def fit_table(rows: list[list[str]], header: list[str], width: int | None, name_columns: tuple[int, ...] = (0,)
              ) -> list[str]:
    """Lines of a left-aligned table. With a ``width``: the name columns shrink (to no less than a third of
    their natural size, at least 12) until the table fits, then the last column is cut at the edge."""
    cols = len(header)
    columns = [[r[k] for r in rows] for k in range(cols)]
    natural = [max([len(header[k])] + [len(c) for c in columns[k]]) for k in range(cols)]
    widths = list(natural)
    if width is not None:
        fixed = sum(widths[:-1]) + len(GAP) * (cols - 1)
        room = width - fixed
        want_last = min(natural[-1], max(24, width // 3))
        for k in name_columns:
            if k == cols - 1 or room >= want_last:
                break
            floor = max(12, len(header[k]), natural[k] // 3)
            give = min(widths[k] - floor, want_last - room)
            if give > 0:
                widths[k] -= give
                room += give
        widths[-1] = max(len(header[-1]), room)
        for k in name_columns:
            if k < cols - 1 and widths[k] < natural[k]:
                columns[k] = shorten_unique(columns[k], widths[k])
                widths[k] = max([len(header[k])] + [len(c) for c in columns[k]])
        columns[-1] = [cut_end(c, widths[-1]) for c in columns[-1]]
    lines = []
    for cells in [header] + [[columns[k][i] for k in range(cols)] for i in range(len(rows))]:
        lines.append(GAP.join(c.ljust(w) if k < cols - 1 else c for k, (c, w) in enumerate(zip(cells, widths)))
                     .rstrip())
    return lines
