"""Exceptions.  Every error a user can cause is a GraphoptError whose message
is one line that names the problem; the CLI prints it without a traceback."""


class GraphoptError(Exception):
    """Base class of user-facing errors."""


class ShapeError(GraphoptError):
    """An operator was applied to inputs of invalid shape, dtype or attributes."""


class UnknownOpError(GraphoptError):
    """An operator name that is not in the registry."""


class RuleFormatError(GraphoptError):
    """A rule library file that cannot be read: malformed, truncated, wrong schema."""


class NotAlgebraic(Exception):
    """Raised by an operator that has no semantics in the requested domain (e.g. relu in Z3)."""


def first_line(e: BaseException, default: str = "") -> str:
    """The first line of an exception's message (what a one-line error quotes of a cause)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else default
