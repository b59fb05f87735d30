"""How numbers read in what the stages print and in the report's page: one formatter, one spelling of "none"."""

from __future__ import annotations


def number(value: float | None, fmt: str = ".4g", none: str = "–") -> str:
    """`value` formatted with `fmt`, or `none` when there is no value (not measured, not applicable)."""
    return none if value is None else format(value, fmt)
