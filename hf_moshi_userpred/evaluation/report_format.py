"""How the evaluation reports write a value in their Markdown tables ("-" where a metric is undefined)."""

from __future__ import annotations


def percent(value: float | None, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage with `digits` decimals (`0.125` -> `"12.5%"`)."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def number(value: float | None) -> str:
    """A score with three decimals (an AUC, an F1, a log-loss)."""
    return "-" if value is None else f"{value:.3f}"


def milliseconds(value: float | None, signed: bool = False) -> str:
    """A duration in whole ms; `signed`: with its sign (an anticipation: positive early, negative late)."""
    return "-" if value is None else f"{value:{'+' if signed else ''}.0f} ms"


__all__ = ["milliseconds", "number", "percent"]
