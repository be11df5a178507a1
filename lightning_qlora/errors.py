"""The base class of every error this library raises on purpose.

Each named error lives in the module that raises it and derives from :class:`QLoRAError` and from the built-in
exception a caller would expect (``ValueError`` for bad values, ``ImportError`` for a missing package, ...), so both
``except QLoRAError`` and ``except ValueError`` catch it.
"""

from __future__ import annotations


class QLoRAError(Exception):
    """Base class of the errors raised by lightning_qlora; the message names the bad value, the rule and the fix."""
