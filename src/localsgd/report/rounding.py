"""One rounding rule for every number the report shows: Markdown, HTML and the workbook.

A value with a spread (mean ± std over seeds) keeps as many digits as its std justifies:
the std is rounded to two significant digits when its leading digit is 1 or 2 and to one
otherwise (the Particle Data Group's convention, simplified), and the mean is rounded to
the same decimal place: ``97.79 ± 0.26``, ``8.3 ± 0.6``, ``3540 ± 280``. A value without a
spread (one seed, or every seed equal) keeps four significant digits and no trailing
zeros: ``0.01414``, ``1250``. A std below a millionth of its mean is float noise and counts
as no spread (``0.01414 ± 2.1e-18`` is shown as ``0.01414``).

The workbook stores the unrounded numbers and shows them through a cell number format with
the same number of decimals (:func:`excel_format`), in percent where the report shows
percent.
"""

from __future__ import annotations

import math
from typing import Any

ALONE_DIGITS = 4
"""Significant digits of a value shown without a spread."""
NOISE = 1e-6
"""A std below this fraction of its mean counts as none."""
FIXED_RANGE = (1e-4, 1e7)
"""Magnitudes written in fixed notation; outside, scientific (``1.2e-05``)."""


def number(value: Any) -> float:
    """A float, NaN for None, text and other non-numbers."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def has_spread(mean: float, std: float) -> bool:
    """Whether ``std`` is a spread worth showing beside ``mean``."""
    return math.isfinite(std) and std > 0 and not (math.isfinite(mean) and std < NOISE * abs(mean))


def _exponent(value: float) -> int:
    return math.floor(math.log10(abs(value)))


def std_place(std: float) -> int:
    """The power of ten of the last digit kept of a positive ``std``: two significant
    digits when the leading one (after rounding) is 1 or 2, else one."""
    place = _exponent(std) - 1
    two = round(std / 10.0**place)  # two significant digits, 10..100
    if two >= 100:  # 9.96 rounds up to 10: one more digit in front
        place += 1
        two = round(std / 10.0**place)
    return place if two < 30 else place + 1


def alone_place(value: float) -> int:
    """The power of ten of the last digit kept of a value shown alone (never below the
    units digit for a whole part of more than four digits)."""
    if value == 0 or not math.isfinite(value):
        return 0
    return min(_exponent(value) - (ALONE_DIGITS - 1), 0)


def decimals(mean: Any, std: Any = None, scale: float = 1.0) -> int:
    """Decimal places the rule gives ``mean ± std`` (both displayed × ``scale``); 0 when
    the last kept digit is left of the point (the value is then rounded to tens, ...)."""
    m, s = number(mean) * scale, abs(number(std) * scale)
    place = std_place(s) if has_spread(m, s) else alone_place(m)
    return max(-place, 0)


def _fixed(value: float, place: int) -> str:
    rounded = round(value, -place)
    text = f"{rounded:.{max(-place, 0)}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0.0"


def _strip(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def fmt(value: Any, scale: float = 1.0) -> str:
    """A value alone: four significant digits, no trailing zeros; blank for NaN/None,
    ``inf`` spelled out, text passed through."""
    if isinstance(value, str):
        return value
    v = number(value) * scale
    if math.isnan(v):
        return ""
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and not FIXED_RANGE[0] <= abs(v) < FIXED_RANGE[1]:
        mantissa, exponent = f"{v:.{ALONE_DIGITS - 1}e}".split("e")
        return f"{_strip(mantissa)}e{int(exponent)}"
    return _strip(_fixed(v, alone_place(v)))


def fmt_pm(mean: Any, std: Any, scale: float = 1.0) -> str:
    """``mean ± std`` by the rule; the mean alone (:func:`fmt`) when there is no spread."""
    m, s = number(mean) * scale, abs(number(std) * scale)
    if not math.isfinite(m) or not has_spread(m, s):
        return fmt(m)
    place = std_place(s)
    if abs(m) >= FIXED_RANGE[1] or s < FIXED_RANGE[0]:
        digits = max(_exponent(m) - place, 0) if m else 0
        return f"{m:.{digits}e} ± {s:.{max(_exponent(s) - place, 0)}e}"
    return f"{_fixed(m, place)} ± {_fixed(s, place)}"


def fmt_bytes(value: Any, std: Any = None) -> str:
    """``664 kB``, ``10.1 ± 0.2 MB`` (powers of 1000; the unit chosen by the value)."""
    v, s = number(value), number(std)
    if not math.isfinite(v):
        return fmt(v)
    for unit, size in (("B", 1.0), ("kB", 1e3), ("MB", 1e6), ("GB", 1e9), ("TB", 1e12)):
        if abs(v) < 1000 * size or unit == "TB":
            return f"{fmt_pm(v / size, s / size)} {unit}"
    raise AssertionError("unreachable")


def excel_format(places: int, percent: bool = False) -> str:
    """A cell number format with ``places`` decimals (of the displayed value: of the
    percentage when ``percent``)."""
    body = "0" + ("." + "0" * places if places > 0 else "")
    return body + ("%" if percent else "")


def ratio_std(numerator: float, numerator_std: float, denominator: float, denominator_std: float) -> float:
    """First-order std of ``numerator / denominator`` from the two stds, the two taken as
    independent: ``r · sqrt((σ_a/a)² + (σ_b/b)²)``. NaN when either std is undefined."""
    a, sa, b, sb = (number(x) for x in (numerator, numerator_std, denominator, denominator_std))
    if not all(math.isfinite(x) for x in (a, sa, b, sb)) or a == 0 or b == 0:
        return math.nan
    return abs(a / b) * math.hypot(sa / a, sb / b)
