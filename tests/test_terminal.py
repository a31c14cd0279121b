"""Tables that fit the terminal: names shortened in the middle, never to identical strings; reasons cut at the
edge with an ellipsis; nothing shortened off a terminal."""
from hypothesis import given, settings
from hypothesis import strategies as st

from normswap.terminal import ELLIPSIS, fit_table, shorten_middle, shorten_unique

NAMES = st.lists(st.text(alphabet="ab._01", min_size=1, max_size=40), min_size=1, max_size=12, unique=True)


@settings(max_examples=200, derandomize=True)
@given(names=NAMES, width=st.integers(3, 30))
def test_shortened_names_stay_distinct_and_keep_both_ends(names, width):
    short = shorten_unique(names, width)
    assert len(set(short)) == len(names)  # never two identical strings for two different names
    for full, s in zip(names, short):
        if s == full:
            continue
        assert ELLIPSIS in s and len(s) < len(full)
        head, tail = s.split(ELLIPSIS)
        assert full.startswith(head) and full.endswith(tail)


def test_shorten_middle_keeps_start_and_end():
    assert shorten_middle("backbone.layer3.0.bn1", 12) == "backb….0.bn1"
    assert shorten_middle("short", 12) == "short"


def test_a_table_fits_the_width_and_is_whole_off_a_terminal():
    rows = [[f"model.stage{k}.block.very_long_layer_name.bn", "affine", "64",
             "its input is produced by Concat 'x', which cannot absorb a per-channel scale " * 2] for k in range(5)]
    header = ["layer", "action", "C", "reason"]
    fitted = fit_table(rows, header, 80)
    assert all(len(line) <= 80 for line in fitted)
    assert all(line.rstrip().endswith(ELLIPSIS) for line in fitted[1:])  # reasons cut with an ellipsis
    assert len({line.split()[0] for line in fitted[1:]}) == 5  # five distinct shortened names
    whole = fit_table(rows, header, None)
    assert rows[0][0] in whole[1] and rows[0][3].rstrip() in whole[1]
