"""The one base class of Buddy's errors: bad input or files, reported in one line (the CLI exits with 2)."""


class BuddyError(ValueError):
    """A value, file or model the user gave cannot be used; the message names it and what is allowed."""
