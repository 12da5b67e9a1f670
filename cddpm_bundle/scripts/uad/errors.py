"""The project's error for bad input, and the last line a user sees when it ends a run.

MONAI wraps every error raised while it evaluates a config expression, instantiates a component or applies a
transform (``RuntimeError: applying transform ...``), so the traceback of a bundle run would end with MONAI's wrapper.
Importing this module installs an ``sys.excepthook`` that, after the usual traceback, repeats the project's own
message when it is not already the last line.
"""

from __future__ import annotations

import re
import sys
from types import TracebackType

__all__ = ["InputError", "MissingInputError", "NonFiniteLossError", "input_error_message"]


class InputError(ValueError):
    """Bad input (a data file, a split, a checkpoint, a setting): the message names the file and the problem."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file or folder that does not exist."""


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN or infinite loss."""


PROJECT_ERRORS = ("InputError", "MissingInputError", "NonFiniteLossError")


# how an InputError reads in the text of a traceback (e.g. one re-raised from a DataLoader worker process)
_IN_TEXT = re.compile(rf"^(?:[\w.]+\.)?((?:{'|'.join(PROJECT_ERRORS)}): .+)$", re.MULTILINE)


def input_error_message(error: BaseException) -> str | None:
    """``"InputError: <first line>"`` of the project error (``PROJECT_ERRORS``) behind ``error``: itself, one it
    was raised from, or one quoted in its message by a DataLoader worker; or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ in PROJECT_ERRORS:  # of any copy of the shared code
            return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        found = _IN_TEXT.findall(str(error))
        if found:
            return found[-1]
        error = error.__cause__ or error.__context__
    return None


def _excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    _previous_hook(kind, error, tb)
    message = input_error_message(error)
    last_line = f"{kind.__name__}: {error}".splitlines()[-1] if str(error) else kind.__name__
    if message and not message.endswith(last_line):
        print(message, file=sys.stderr)


_excepthook.repeats_input_errors = True
if not getattr(sys.excepthook, "repeats_input_errors", False):  # once, whichever name imported the module first
    _previous_hook = sys.excepthook
    sys.excepthook = _excepthook
