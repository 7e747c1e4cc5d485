"""Error messages on one line: what a user sees of an exception in a CLI line, a log line or a close reason."""

from __future__ import annotations


def error_summary(error: BaseException, max_lines: int = 1) -> str:
    """The first `max_lines` non-empty lines of `error`'s message joined by spaces (its type's name if it has none),
    with a count of the lines left out: a multi-line message (e.g. every mismatched checkpoint key) stays readable."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    more = f" (and {len(lines) - max_lines} more)" if len(lines) > max_lines else ""
    return " ".join(lines[:max_lines]) + more
