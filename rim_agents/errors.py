"""Errors that mean "the user asked for something invalid": scripts print one line and exit 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (a flag, a config value, a path). The message says how to fix it."""
