"""How wide a label is in the HTML reports' plots, so labels can be placed where they overlap nothing.

The plots pin their text to DejaVu Sans (the reports' CSS), the widest of the common sans-serif faces; the
tables below are its advance widths in thousandths of an em, read from the font files (hmtx), for printable
ASCII. The faces a browser falls back to without it (Liberation Sans / Arial, Helvetica, Segoe UI) are narrower
in total, so a width computed here bounds the drawn one. Any other character is counted as ``OTHER`` (CJK
glyphs are one em wide)."""

_REGULAR = (  # ' ' (32) to '~' (126)
    318, 401, 460, 838, 636, 950, 780, 275, 390, 390, 500, 838, 318, 361, 318, 337, 636, 636, 636,
    636, 636, 636, 636, 636, 636, 636, 337, 337, 838, 838, 838, 531, 1000, 684, 686, 698, 770, 632,
    575, 775, 752, 295, 295, 656, 557, 863, 748, 787, 603, 787, 695, 635, 611, 732, 684, 989, 685,
    611, 685, 390, 337, 390, 838, 500, 500, 613, 635, 550, 635, 615, 352, 635, 634, 278, 278, 579,
    278, 974, 634, 612, 635, 635, 411, 521, 392, 634, 592, 818, 592, 592, 525, 636, 337, 636, 838,
)
_BOLD = (  # ' ' (32) to '~' (126)
    348, 456, 521, 838, 696, 1002, 872, 306, 457, 457, 523, 838, 380, 415, 380, 365, 696, 696, 696,
    696, 696, 696, 696, 696, 696, 696, 400, 400, 838, 838, 838, 580, 1000, 774, 762, 734, 830, 683,
    683, 821, 837, 372, 372, 775, 637, 995, 837, 850, 733, 850, 770, 720, 682, 812, 774, 1103, 771,
    724, 725, 457, 365, 457, 838, 500, 500, 675, 716, 593, 716, 678, 435, 716, 712, 343, 343, 665,
    343, 1042, 712, 687, 716, 716, 493, 595, 478, 712, 652, 924, 645, 652, 582, 712, 365, 712, 838,
)
OTHER = 1200  # thousandths of an em for a character outside printable ASCII
MARGIN = 1.04  # rounding of glyph positions and the fallback faces' few wider letters (Liberation's J, ?, _)
ASCENT, DESCENT = 0.93, 0.24  # DejaVu Sans' hhea ascent and descent, in em


def text_width(text: str, size: float, bold: bool = False) -> float:
    """The advance width of ``text`` set at ``size`` px (an upper bound: see the module's docstring)."""
    table = _BOLD if bold else _REGULAR
    total = sum(table[code - 32] if 32 <= code <= 126 else OTHER for code in map(ord, text))
    return total * size / 1000 * MARGIN
