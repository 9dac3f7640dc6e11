"""The one base of every error a user can cause and fix: the CLIs print its message on one line, exit 2."""


class UserError(Exception):
    """Bad input: the message names the file, key or value and what would be valid."""
