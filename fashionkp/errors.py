"""Mistakes a user can make, and how the command-line entry points report them.

A known user error (a typo in a config value, a missing file, a CSV row that does not parse) is printed
as one line naming the key, file, row or value, and the process exits with status 2. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: The exit status of a known user error (as argparse uses for bad arguments).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in what was asked for; the message alone tells the user what to change."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work, found before any work starts."""

    def __init__(self, key: str, value: object, problem: str, choices: object = None) -> None:
        self.key, self.value = key, value
        message = f"{key}={value!r}: {problem}"
        if isinstance(choices, str):  # a hint rather than a list
            message += f" ({choices})"
        elif choices is not None:
            message += f" (choices: {', '.join(map(str, choices))})"
        super().__init__(message)


def report_user_errors(prog: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate an entry point: a :class:`UserError` becomes ``prog: error: message`` and exit 2."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args, **kwargs) -> T:
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
                sys.exit(USER_ERROR_EXIT)

        return run

    return wrap
