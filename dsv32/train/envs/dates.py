"""Dates as users write them ("March 14, 2025", "14 March 2025", ...) and back to YYYY-MM-DD."""
from __future__ import annotations

import datetime as dt
import re

MONTHS = ("January February March April May June July August September October November "
          "December").split()

_MONTH_NUMBERS = {**{m.lower(): i for i, m in enumerate(MONTHS, 1)},
                  **{m[:3].lower(): i for i, m in enumerate(MONTHS, 1)}, "sept": 9}
_MONTH = r"(?P<month>[A-Za-z]{3,9})\.?"
_DAY = r"(?P<day>\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"(?P<year>\d{4})"
_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"(?P<year>\d{4})[-/.](?P<mnum>\d{1,2})[-/.](?P<day>\d{1,2})",
    rf"{_MONTH}\s+{_DAY},?\s+{_YEAR}",
    rf"(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}",
)]

DATE_STYLES = ("iso", "iso", "month_day_year", "day_month_year", "short_month", "ordinal",
               "the_ordinal_of", "slashes")


def ordinal(n: int) -> str:
    """1 -> 1st, 2 -> 2nd, 11 -> 11th, 23 -> 23rd."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def write_date(day: dt.date, style: str) -> str:
    """A date in one of DATE_STYLES."""
    month = MONTHS[day.month - 1]
    return {
        "iso": day.isoformat(),
        "month_day_year": f"{month} {day.day}, {day.year}",
        "day_month_year": f"{day.day} {month} {day.year}",
        "short_month": f"{month[:3]} {day.day} {day.year}",
        "ordinal": f"{month} {ordinal(day.day)}, {day.year}",
        "the_ordinal_of": f"the {ordinal(day.day)} of {month} {day.year}",
        "slashes": f"{day.year}/{day.month:02d}/{day.day:02d}",
    }[style]


def normalize_date(text) -> str | None:
    """YYYY-MM-DD for a date written in any DATE_STYLES form, None when it is not one."""
    if not isinstance(text, str):
        return None
    for pattern in _PATTERNS:
        match = pattern.fullmatch(text.strip())
        if not match:
            continue
        parts = match.groupdict()
        month = int(parts["mnum"]) if parts.get("mnum") else _MONTH_NUMBERS.get(parts["month"].lower())
        try:
            return dt.date(int(parts["year"]), month or 0, int(parts["day"])).isoformat()
        except ValueError:
            return None
    return None
