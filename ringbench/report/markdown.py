"""Small Markdown helpers: escaping untrusted text, number formats used in every table, and folding
text for a terminal."""

from __future__ import annotations

import math
import re
import textwrap

import pandas as pd
from tabulate import tabulate

_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def escape(text: object, limit: int | None = None) -> str:
    """One line of inert Markdown: whitespace folded, markup characters escaped, optionally shortened."""
    flat = " ".join(str(text).split())
    if limit is not None and len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return _SPECIAL.sub(r"\\\1", flat)


def fold(text: str, width: int) -> str:
    """Markdown ``text`` (headings and list items) for a terminal ``width`` columns wide: each line folded
    between words, a list item's continuation under its text. A word wider than a line (a path, a
    cell's title) is kept whole, so that it can be copied."""
    lines = []
    for line in text.splitlines():
        item = line.lstrip()
        hang = " " * (len(line) - len(item) + (2 if item.startswith("- ") else 0))
        folded = textwrap.wrap(line, width, subsequent_indent=hang, break_long_words=False, break_on_hyphens=False)
        lines += folded or [""]  # a blank line stays one
    return "\n".join(lines)


def ms(value: float) -> str:
    """Milliseconds with about four significant digits and no exponent."""
    if value >= 100:
        return f"{value:.1f}"
    if value >= 10:
        return f"{value:.2f}"
    if value >= 1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def tflops(value: float) -> str:
    """TFLOP/s with one decimal, or three significant digits below 10 (a CPU's rates read as 0.0 otherwise)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(1, 2 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def mib(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.1f}"


def table(frame: pd.DataFrame, text_columns: int | None = None) -> str:
    """A pipe table of text cells (tabulate must not reformat numbers).

    With ``text_columns`` given, columns after the first ``text_columns`` hold
    figures and are right-aligned.
    """
    align = None
    if text_columns is not None:
        align = ("left",) * text_columns + ("right",) * (len(frame.columns) - text_columns)
    return tabulate(frame, headers="keys", tablefmt="pipe", showindex=False, disable_numparse=True, colalign=align)
