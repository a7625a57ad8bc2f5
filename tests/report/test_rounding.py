"""The one rounding rule of every table: digits from the std, the same in text and workbook."""

from __future__ import annotations

import math

import pytest

from localsgd.report.rounding import decimals, excel_format, fmt, fmt_bytes, fmt_pm, ratio_std


@pytest.mark.parametrize(
    ("mean", "std", "text"),
    [
        # The std keeps two significant digits when its first is 1 or 2, else one; the mean
        # is rounded to the same place.
        (97.79, 0.26, "97.79 ± 0.26"),
        (8.265, 0.6024, "8.3 ± 0.6"),
        (3542.0, 284.0, "3540 ± 280"),
        (0.3885, 0.01905, "0.389 ± 0.019"),
        (96.51, 0.104, "96.51 ± 0.10"),
        (1.75, 0.96, "1.8 ± 1.0"),  # 0.96 rounds to 1.0: a leading 1, two digits
        (12.0, 0.996, "12.0 ± 1.0"),
        (45.2, 26.0, "45 ± 26"),
        (47.0, 35.0, "50 ± 40"),
        (-0.001, 0.03, "0.00 ± 0.03"),  # no "-0.00"
        # No spread: one seed, all seeds equal, or float noise below a millionth of the mean.
        (0.01414, 2.125e-18, "0.01414"),
        (0.0, 0.0, "0"),
        (1250.0, 0.0, "1250"),
        (0.9772500000000001, math.nan, "0.9773"),
        (4.1, None, "4.1"),
        (123456.0, None, "123456"),
        (1.2e-5, None, "1.2e-5"),
        (math.nan, 0.3, ""),
    ],
)
def test_mean_and_std_round_by_the_std(mean: float, std: float | None, text: str) -> None:
    assert fmt_pm(mean, std) == text


def test_scale_applies_before_rounding_and_decimals_match_the_text() -> None:
    assert fmt_pm(0.9779, 0.0026, 100) == "97.79 ± 0.26"
    for mean, std, scale in ((0.9779, 0.0026, 100), (8.265, 0.6024, 1), (3542.0, 284.0, 1), (0.01414, 0, 1)):
        text = fmt_pm(mean, std, scale).split(" ± ")[0]
        places = len(text.split(".")[1]) if "." in text else 0
        assert decimals(mean, std, scale) == places, (mean, std)
    assert decimals(0.9772500000000001, math.nan) == 4  # four significant digits alone


def test_excel_formats_carry_the_same_decimals() -> None:
    assert excel_format(2) == "0.00"
    assert excel_format(0) == "0"
    assert excel_format(1, percent=True) == "0.0%"
    # Accuracy 0.9779 ± 0.0026 shown as 97.79 ± 0.26 %: a percent cell with two decimals.
    assert excel_format(decimals(0.9779, 0.0026, 100), percent=True) == "0.00%"


def test_values_alone_and_bytes() -> None:
    assert fmt(None) == "" and fmt(math.inf) == "inf" and fmt("text") == "text"
    assert fmt(0.1) == "0.1" and fmt(64) == "64"
    assert fmt_bytes(0) == "0 B"
    assert fmt_bytes(663_800) == "663.8 kB"
    assert fmt_bytes(10_050_000, 210_000) == "10.05 ± 0.21 MB"
    assert fmt_bytes(math.nan) == ""


def test_ratio_std_is_first_order_propagation() -> None:
    # speedup = 101 / 55.17; both stds enter relative to their means.
    a, sa, b, sb = 101.0, 2.6458, 55.1667, 2.2546
    expected = (a / b) * math.sqrt((sa / a) ** 2 + (sb / b) ** 2)
    assert ratio_std(a, sa, b, sb) == pytest.approx(expected, rel=1e-12)
    assert ratio_std(a, 0.0, b, 0.0) == 0.0
    assert math.isnan(ratio_std(a, math.nan, b, sb))  # one seed: no spread to propagate
    assert math.isnan(ratio_std(a, sa, 0.0, sb))
