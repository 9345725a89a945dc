"""Bad input on a command line: one line on stderr and exit code 2, never a traceback or a usage block.

Every console script (c2r-train, c2r-adak, c2r-place, c2r-profile, c2r-route) parses with ``OneLineParser`` and
catches ``BAD_INPUT_ERRORS`` around its work. Those are the errors our code raises with messages naming the offending
values (ValueError and its subclass PlacementError, the file errors, whose messages carry the path); any other
exception is a bug and keeps its traceback. Lives on the lowest floor because all three folders' CLIs use it.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

# FileNotFoundError & co. name the path they failed on (a missing --plan, an --out that is a directory).
BAD_INPUT_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line ("prog: error: MESSAGE (see prog --help)"), not the usage block; its
    subcommand parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.report(f"{self.prog}: error: {message} (see {self.prog} --help)")
        raise SystemExit(2)

    def report(self, line: str) -> None:
        """Print the error line; ``c2r.run_setup`` prints it on one rank only under a launcher."""
        print(line, file=sys.stderr, flush=True)


def positive(kind: type, allow_zero: bool = False):
    """An argparse ``type`` for numbers > 0 (>= 0 with ``allow_zero``): a bad value is one line naming it."""
    bound = ">= 0" if allow_zero else "> 0"
    name = {int: "an integer", float: "a number"}.get(kind, f"a {kind.__name__}")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name} {bound}; got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0):
            raise argparse.ArgumentTypeError(f"expected {name} {bound}; got {text!r}")
        return value

    return parse
