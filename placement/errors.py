"""The one error type the planner raises for bad input; the CLI turns it into exit code 2 and its message."""

from __future__ import annotations


class PlacementError(ValueError):
    """Bad planner input: the message names the offending values (and, where there is one, the expected value)."""
