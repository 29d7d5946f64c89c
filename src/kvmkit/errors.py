"""Errors a user can act on.

`UserError` carries one line for the user; the CLI prints it without a traceback and exits
with status 2 (bad input, missing prerequisite), as the README documents.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or machine, reported as one line, exit status 2."""

    exit_status = 2
