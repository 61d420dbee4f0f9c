"""Argument checks: one message format, ``argument 'x': …``, the one the C++ binding's check
macro emits (``csrc/common/macros.h``), so that an error names what the caller passed whichever
layer refused it.

Private: the modules of the package import it; users see only the messages.
"""

from __future__ import annotations


def arg_message(name: str, message: str) -> str:
    """``argument 'name': message``."""
    return f"argument '{name}': {message}"


def check_arg(cond: bool, name: str, message: str, error: type[Exception] = ValueError) -> None:
    """Raises ``error(argument 'name': message)`` unless ``cond``."""
    if not cond:
        raise error(arg_message(name, message))


def is_number(x) -> bool:
    """A real Python (or NumPy) number; bools are not numbers here (``k=True`` is a mistake)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x) -> bool:
    """A Python int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)
