"""Errors a service raises for the user to read; the command tree turns them into replies."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user; the message is shown with the command's usage line."""


class Refusal(Exception):
    """The user may not do this; the message is shown as is (no usage line)."""
