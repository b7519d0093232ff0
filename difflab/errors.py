"""Error types. Every user-facing error names the argument, the value and what is accepted."""

from __future__ import annotations


class DifflabError(ValueError):
    """Base class of difflab's input errors (a ``ValueError``, so ``except ValueError`` works)."""


def bad_value(name: str, value: object, accepted: str) -> DifflabError:
    """Build the standard message: what was wrong, the value, and what would be accepted."""
    text = repr(value)
    if len(text) > 200:
        text = text[:200] + "..."
    return DifflabError(f"{name}={text} is not valid: expected {accepted}")
